//! The leader's watch over live moves. A plan is cancelled when
//! * its destination reports no progress for `stall` (down or cut off),
//! * its cutover (the source may have frozen the range) has not completed within
//!   `cutover_stall`, shorter: the cancellation lets the source serve again, or
//! * it has been catching up for `catch_up` without getting close enough to cut
//!   over: the writes to the range outpace what the destination installs, so the
//!   lag never falls under the cutover bound (it keeps changing, so the stall rule
//!   never fires).
//!
//! Before the cutover the source never stopped serving, so a cancellation loses
//! nothing. The decisions are a pure function of the reported plans and the time
//! ([`Watch::observe`]); the task around it only reads the plans and proposes.

use super::service::propose;
use super::state::MasterState;
use crate::proto::storage::master_command::Command;
use crate::proto::storage::CancelMove;
use crate::proto::{MovePhase, MovePlan};
use crate::replica::{Replica, Role};
use slog::{info, Logger};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a plan may go without finishing, by what it is doing.
#[derive(Clone, Copy, Debug)]
pub struct MoveLimits {
    pub stall: Duration,
    pub cutover_stall: Duration,
    pub catch_up: Duration,
}

/// What the leader has seen of one plan.
struct Seen {
    progress: (i32, u64, u64),
    changed: Instant,
    /// When the plan was first seen catching up (or cutting over).
    catching_up_since: Option<Instant>,
}

/// The plans' last progress and when it changed. Only the leader's clock counts: a
/// new leader gives every plan its full limits from its election.
pub struct Watch {
    limits: MoveLimits,
    seen: HashMap<u64, Seen>,
}

impl Watch {
    pub fn new(limits: MoveLimits) -> Watch {
        Watch {
            limits,
            seen: HashMap::new(),
        }
    }

    /// Takes the plans as reported at `now`; returns the plans to cancel, with why.
    pub fn observe(&mut self, plans: &[MovePlan], now: Instant) -> Vec<(u64, String)> {
        self.seen.retain(|id, _| plans.iter().any(|p| p.id == *id));
        let mut cancel = Vec::new();
        for plan in plans.iter().filter(|p| !p.queued) {
            let progress = (plan.phase, plan.bytes_copied, plan.lag_bytes);
            let seen = self.seen.entry(plan.id).or_insert(Seen {
                progress,
                changed: now,
                catching_up_since: None,
            });
            if plan.phase() != MovePhase::MoveCopying {
                seen.catching_up_since.get_or_insert(now);
            }
            let cutting_over = plan.phase() == MovePhase::MoveCuttingOver;
            if let Some(since) = seen.catching_up_since {
                let limit = self.limits.catch_up;
                if !cutting_over && now.duration_since(since) >= limit {
                    cancel.push((
                        plan.id,
                        format!(
                            "the writes to the range outpace the catch-up: still {} KiB \
                             behind after {limit:?} of catching up",
                            plan.lag_bytes / 1024
                        ),
                    ));
                    continue;
                }
            }
            if seen.progress != progress {
                seen.progress = progress;
                seen.changed = now;
                continue;
            }
            let limit = if cutting_over {
                self.limits.cutover_stall.min(self.limits.stall)
            } else {
                self.limits.stall
            };
            if now.duration_since(seen.changed) >= limit {
                cancel.push((
                    plan.id,
                    format!(
                        "the destination, group {}, made no progress for {limit:?}",
                        plan.dest
                    ),
                ));
            }
        }
        cancel
    }

    /// Forgets a plan (cancelled): if it comes back, it is a new one.
    fn forget(&mut self, id: u64) {
        self.seen.remove(&id);
    }

    fn clear(&mut self) {
        self.seen.clear();
    }
}

pub async fn run_move_watchdog(replica: Replica<MasterState>, limits: MoveLimits, logger: Logger) {
    let tick = limits.stall.min(limits.cutover_stall).min(limits.catch_up) / 4;
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::new(limits);
    loop {
        ticker.tick().await;
        if replica.status().role != Role::Leader {
            watch.clear();
            continue;
        }
        let moves = replica.state().moves();
        for (plan_id, reason) in watch.observe(&moves, Instant::now()) {
            info!(logger, "cancelling a live move"; "plan" => plan_id, "reason" => &reason);
            let cancel = Command::CancelMove(CancelMove {
                plan_id,
                reason,
                ..Default::default()
            });
            if propose(&replica, cancel).await.is_ok() {
                watch.forget(plan_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MoveLimits = MoveLimits {
        stall: Duration::from_secs(20),
        cutover_stall: Duration::from_secs(3),
        catch_up: Duration::from_secs(60),
    };

    fn plan(phase: MovePhase, bytes: u64, lag: u64) -> MovePlan {
        MovePlan {
            id: 7,
            dest: 2,
            phase: phase as i32,
            bytes_copied: bytes,
            lag_bytes: lag,
            ..Default::default()
        }
    }

    fn cancelled(watch: &mut Watch, p: MovePlan, at: Instant) -> Option<String> {
        watch.observe(&[p], at).pop().map(|(id, why)| {
            assert_eq!(id, 7);
            why
        })
    }

    #[test]
    fn a_plan_that_makes_progress_is_left_alone_until_it_stalls() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut w = Watch::new(LIMITS);
        for i in 0..30 {
            let p = plan(MovePhase::MoveCopying, i << 20, 0);
            assert_eq!(cancelled(&mut w, p, t + s(i)), None);
        }
        let stuck = plan(MovePhase::MoveCopying, 29 << 20, 0);
        assert_eq!(cancelled(&mut w, stuck.clone(), t + s(48)), None);
        let why = cancelled(&mut w, stuck, t + s(49)).expect("stalled for 20 s");
        assert!(why.contains("no progress"), "{why}");
    }

    #[test]
    fn a_stuck_cutover_gets_the_shorter_limit() {
        let t = Instant::now();
        let mut w = Watch::new(LIMITS);
        let p = plan(MovePhase::MoveCuttingOver, 5, 0);
        assert_eq!(cancelled(&mut w, p.clone(), t), None);
        assert_eq!(
            cancelled(&mut w, p.clone(), t + Duration::from_millis(2900)),
            None
        );
        assert!(cancelled(&mut w, p, t + Duration::from_secs(3)).is_some());
    }

    #[test]
    fn a_catch_up_that_never_gets_close_is_cancelled_though_it_progresses() {
        let t = Instant::now();
        let mut w = Watch::new(LIMITS);
        for i in 0..60 {
            // Bytes installed grow, the lag stays high: progress, but no end.
            let p = plan(MovePhase::MoveCatchingUp, 100 + i, 8 << 20);
            assert_eq!(cancelled(&mut w, p, t + Duration::from_secs(i)), None);
        }
        let why = cancelled(
            &mut w,
            plan(MovePhase::MoveCatchingUp, 500, 8 << 20),
            t + Duration::from_secs(60),
        )
        .expect("caught up for 60 s without cutting over");
        assert!(why.contains("outpace") && why.contains("8192 KiB"), "{why}");
        // Once the cutover has begun, the cutover limit alone applies.
        let mut w = Watch::new(LIMITS);
        assert_eq!(
            cancelled(&mut w, plan(MovePhase::MoveCatchingUp, 1, 9), t),
            None
        );
        let cutting = plan(MovePhase::MoveCuttingOver, 2, 0);
        assert_eq!(
            cancelled(&mut w, cutting.clone(), t + Duration::from_secs(59)),
            None
        );
        assert_eq!(
            cancelled(&mut w, cutting, t + Duration::from_secs(61)),
            None
        );
    }

    #[test]
    fn queued_plans_are_not_watched_and_ended_ones_are_forgotten() {
        let t = Instant::now();
        let mut w = Watch::new(LIMITS);
        let mut queued = plan(MovePhase::MoveCopying, 0, 0);
        queued.queued = true;
        assert!(w.observe(std::slice::from_ref(&queued), t).is_empty());
        assert!(w
            .observe(&[queued], t + Duration::from_secs(100))
            .is_empty());
        let p = plan(MovePhase::MoveCopying, 0, 0);
        assert!(w.observe(std::slice::from_ref(&p), t).is_empty());
        assert!(w.observe(&[], t + Duration::from_secs(1)).is_empty());
        // Seen again (a new plan with the same id cannot exist; a new leader's view):
        // a full limit from now.
        assert!(w.observe(&[p], t + Duration::from_secs(30)).is_empty());
    }
}
