//! Reports this node to the shard master's leader on an interval: liveness, Raft role
//! and term, applied configuration and, from the leader, the size and load of each
//! range the group owns (`stats.rs`), which the leader also exports as metrics.

use super::state::{count_range, KvState};
use crate::client::master::MasterClient;
use crate::proto::HeartbeatRequest;
use crate::replica::{Replica, Role};
use slog::{debug, Logger};
use std::sync::Arc;
use std::time::Duration;

/// Exports the size and load of the ranges this group owns, read at each metrics
/// scrape; only the leader counts them.
pub fn report_range_metrics(replica: Replica<KvState>) {
    crate::metrics::metrics().set_ranges(move || {
        if replica.status().role == Role::Leader {
            replica.state().range_stats()
        } else {
            Vec::new()
        }
    });
}

pub async fn run_heartbeats(
    replica: Replica<KvState>,
    masters: Arc<MasterClient>,
    addr: String,
    interval: Duration,
    logger: Logger,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let status = replica.status();
        let leader = status.role == Role::Leader;
        if leader {
            seed(&replica).await;
        }
        let (gid, config_num, ranges) = {
            let state = replica.state();
            let ranges = if leader {
                state.range_stats()
            } else {
                Vec::new()
            };
            (state.gid(), state.config().num, ranges)
        };
        let request = HeartbeatRequest {
            gid,
            node_id: status.id,
            addr: addr.clone(),
            role: status.role.as_str().to_owned(),
            term: status.term,
            applied_config: config_num,
            ranges,
        };
        let sent = masters
            .call(|mut c| {
                let request = request.clone();
                async move { c.heartbeat(request).await }
            })
            .await;
        if let Err(e) = sent {
            debug!(logger, "heartbeat not delivered"; "error" => e.message());
        }
    }
}

/// Counts the ranges whose size is unknown or has drifted, on a blocking thread and
/// outside the state lock.
async fn seed(replica: &Replica<KvState>) {
    let (jobs, view) = replica.state().seed_jobs();
    if jobs.is_empty() {
        return;
    }
    let counted = tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .map(|job| {
                let count = count_range(&view, &job.range);
                (job, count)
            })
            .collect::<Vec<_>>()
    })
    .await;
    let Ok(counted) = counted else { return };
    let state = replica.state();
    for (job, count) in counted {
        state.seeded(&job, count);
    }
}
