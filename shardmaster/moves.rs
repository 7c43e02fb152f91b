//! The leader's watch over live moves: a plan whose destination reports no progress
//! for `stall` is cancelled, so a destination that is down or cut off never leaves a
//! range half-moved. Before the cutover the source never stopped serving; a cutover
//! (the source may have frozen the range) gets `cutover_stall`, shorter: the
//! cancellation lets the source serve again.

use super::service::propose;
use super::state::MasterState;
use crate::proto::master_command::Command;
use crate::proto::{CancelMoveRequest, MovePhase};
use crate::replica::{Replica, Role};
use slog::{info, Logger};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub async fn run_move_watchdog(
    replica: Replica<MasterState>,
    stall: Duration,
    cutover_stall: Duration,
    logger: Logger,
) {
    let tick = stall.min(cutover_stall) / 4;
    let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Plan id -> (last progress seen, when it last changed). Only the leader's clock
    // counts: a new leader gives every plan a full `stall` from its election.
    let mut seen: HashMap<u64, ((i32, u64, u64), Instant)> = HashMap::new();
    loop {
        ticker.tick().await;
        if replica.status().role != Role::Leader {
            seen.clear();
            continue;
        }
        let moves = replica.state().moves();
        seen.retain(|id, _| moves.iter().any(|p| p.id == *id));
        let now = Instant::now();
        for plan in moves.into_iter().filter(|p| !p.queued) {
            let progress = (plan.phase, plan.bytes_copied, plan.lag_bytes);
            let entry = seen.entry(plan.id).or_insert((progress, now));
            if entry.0 != progress {
                *entry = (progress, now);
                continue;
            }
            let limit = if plan.phase() == MovePhase::MoveCuttingOver {
                cutover_stall.min(stall)
            } else {
                stall
            };
            if now.duration_since(entry.1) < limit {
                continue;
            }
            let reason = format!(
                "the destination, group {}, made no progress for {limit:?}",
                plan.dest
            );
            info!(logger, "cancelling a stalled move"; "plan" => plan.id, "reason" => &reason);
            let cancel = Command::CancelMove(CancelMoveRequest {
                plan_id: plan.id,
                reason,
                ..Default::default()
            });
            if propose(&replica, cancel).await.is_ok() {
                seen.remove(&plan.id);
            }
        }
    }
}
