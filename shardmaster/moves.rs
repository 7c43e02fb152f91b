//! The leader's watch over live moves: a plan whose destination reports no progress
//! for `stall` is cancelled, so a destination that is down or cut off never leaves a
//! range half-moved. Before the cutover the source never stopped serving; if the
//! source froze the range for a cutover that stalled, the cancellation lets it serve
//! again.

use super::service::propose;
use super::state::MasterState;
use crate::proto::master_command::Command;
use crate::proto::CancelMoveRequest;
use crate::replica::{Replica, Role};
use slog::{info, Logger};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub async fn run_move_watchdog(replica: Replica<MasterState>, stall: Duration, logger: Logger) {
    let mut ticker = tokio::time::interval((stall / 4).max(Duration::from_millis(100)));
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
        for plan in moves {
            let progress = (plan.phase, plan.bytes_copied, plan.lag_bytes);
            let entry = seen.entry(plan.id).or_insert((progress, now));
            if entry.0 != progress {
                *entry = (progress, now);
                continue;
            }
            if now.duration_since(entry.1) < stall {
                continue;
            }
            let reason = format!(
                "the destination, group {}, made no progress for {stall:?}",
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
