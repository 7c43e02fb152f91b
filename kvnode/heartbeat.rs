//! Reports this node to the shard master's leader on an interval: liveness, Raft role
//! and term, applied configuration, and per-range key counts and bytes.

use super::state::{range_stats, KvState};
use crate::client::master::MasterClient;
use crate::proto::{HeartbeatRequest, RangeStats};
use crate::replica::Replica;
use slog::{debug, Logger};
use std::sync::Arc;
use std::time::Duration;

/// Range statistics cost a scan of the data: refresh them every this many beats.
const STATS_EVERY: u64 = 30;

pub async fn run_heartbeats(
    replica: Replica<KvState>,
    masters: Arc<MasterClient>,
    addr: String,
    interval: Duration,
    logger: Logger,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stats: Vec<RangeStats> = Vec::new();
    for beat in 0u64.. {
        ticker.tick().await;
        let (gid, config_num, held, store) = {
            let state = replica.state();
            (
                state.gid(),
                state.config().num,
                state.held().to_vec(),
                state.store_handle(),
            )
        };
        let stale =
            stats.len() != held.len() || stats.iter().zip(&held).any(|(s, h)| s.range != h.range);
        if beat % STATS_EVERY == 0 || stale {
            let counted = tokio::task::spawn_blocking(move || {
                held.iter()
                    .map(|h| {
                        let range = h.range.clone().unwrap_or_default();
                        let (keys, bytes) = range_stats(&store, &range).unwrap_or_default();
                        RangeStats {
                            range: Some(range),
                            state: h.state,
                            keys,
                            bytes,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            if let Ok(counted) = counted {
                stats = counted;
            }
        }
        let status = replica.status();
        let request = HeartbeatRequest {
            gid,
            node_id: status.id,
            addr: addr.clone(),
            role: status.role.as_str().to_owned(),
            term: status.term,
            applied_config: config_num,
            ranges: stats.clone(),
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
