//! The leader's background work: follow the shard master's configurations one at a
//! time, pull ranges this group gained, tell old owners to drop what was pulled, and
//! delete ranges other groups have taken. Every step is a proposal through the
//! group's log, so a new leader resumes where the old one stopped.

use super::state::{only, KvState};
use crate::client::master::MasterClient;
use crate::faults::{Faults, Verdict};
use crate::proto::kv_command::Command;
use crate::proto::range_transfer_client::RangeTransferClient;
use crate::proto::{
    HeldRange, InstallChunk, KvCommand, Node, PullRequest, RangeOp, RangeState, ReleaseRequest,
};
use crate::replica::{Replica, Role};
use anyhow::Context;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prost::Message;
use slog::{debug, info, Logger};
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Bytes of records asked for per pull.
const PULL_CHUNK_BYTES: u32 = 1 << 20;
/// Configurations applied per step at most.
const MAX_CONFIGS_PER_STEP: usize = 64;
/// Garbage-collection commands per range per step, so other work is not starved.
const DELETE_CHUNKS_PER_STEP: usize = 64;

/// Paces the bytes this node pulls from other groups, so a large move leaves CPU
/// and disk to the ranges that keep serving (TiKV's snap-io-max-bytes-per-sec).
pub struct MoveRate {
    limiter: DefaultDirectRateLimiter,
    /// The most KiB one pace call may ask for.
    burst: NonZeroU32,
}

impl MoveRate {
    /// `None` for 0: pulls go as fast as the groups can take them.
    pub fn new(mib_per_sec: u32) -> Option<MoveRate> {
        let kib = NonZeroU32::new(mib_per_sec.checked_mul(1024)?)?;
        // At least one full chunk, or a rate under a chunk a second could not pass one.
        let burst = kib.max(NonZeroU32::new(PULL_CHUNK_BYTES / 1024).expect("chunk is 1 MiB"));
        Some(MoveRate {
            limiter: RateLimiter::direct(Quota::per_second(kib).allow_burst(burst)),
            burst,
        })
    }

    /// Waits until `bytes` more may be installed.
    async fn pace(&self, bytes: usize) {
        let kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX);
        let cells = NonZeroU32::new(kib).map_or(NonZeroU32::MIN, |n| n.min(self.burst));
        // Cannot fail: cells never exceed the burst.
        let _ = self.limiter.until_n_ready(cells).await;
    }
}

/// Runs forever, doing work only while this replica leads its group. `faults` is
/// the test-only fault table (`None` in production): it also governs the transfer
/// calls to other groups.
pub async fn run_migrations(
    replica: Replica<KvState>,
    masters: Arc<MasterClient>,
    interval: Duration,
    rate: Option<MoveRate>,
    logger: Logger,
    faults: Option<Arc<Faults>>,
) {
    let mut worker = Worker {
        replica,
        masters,
        channels: HashMap::new(),
        rate,
        logger,
        faults,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if worker.replica.status().role != Role::Leader {
            continue;
        }
        if let Err(e) = worker.step().await {
            debug!(worker.logger, "migration step incomplete"; "error" => format!("{e:#}"));
        }
    }
}

struct Worker {
    replica: Replica<KvState>,
    masters: Arc<MasterClient>,
    channels: HashMap<String, Channel>,
    rate: Option<MoveRate>,
    logger: Logger,
    faults: Option<Arc<Faults>>,
}

impl Worker {
    async fn step(&mut self) -> anyhow::Result<()> {
        // A group that was down, or joined late, catches up through every
        // configuration in order; those that move nothing of its ranges pass at once.
        for _ in 0..MAX_CONFIGS_PER_STEP {
            let (settled, num) = {
                let state = self.replica.state();
                (state.settled(), state.config().num)
            };
            if !settled {
                break;
            }
            // A configuration that does not exist yet is an error answer: nothing to do.
            let Ok(next) = self.masters.query(Some(num + 1)).await else {
                return Ok(());
            };
            info!(self.logger, "moving to configuration"; "num" => next.num);
            self.propose(Command::Config(next)).await?;
        }
        let held = self.replica.state().held().to_vec();
        for range in &held {
            match range.state() {
                RangeState::Pulling => self.pull(range).await?,
                RangeState::Serving if range.release_pending => self.release(range).await?,
                RangeState::Garbage => self.collect(range).await?,
                RangeState::Serving | RangeState::Frozen => {}
            }
        }
        Ok(())
    }

    async fn propose(&self, command: Command) -> anyhow::Result<()> {
        let encoded = KvCommand {
            command: Some(command),
        }
        .encode_to_vec();
        let results = self.replica.propose(encoded).await?;
        only(results).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    }

    fn channel(&mut self, addr: &str) -> anyhow::Result<Channel> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        self.channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Calls `call` on each node of `nodes` in turn until one answers.
    async fn call_any<T, F, Fut>(&mut self, nodes: &[Node], call: F) -> anyhow::Result<T>
    where
        F: Fn(RangeTransferClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last_error = anyhow::anyhow!("the group has no nodes");
        for node in nodes {
            if let Some(faults) = &self.faults {
                match faults.decide(&node.addr) {
                    Verdict::Send => {}
                    Verdict::Blocked | Verdict::Lost => {
                        last_error = anyhow::anyhow!(
                            "node {} at {}: dropped by fault injection",
                            node.id,
                            node.addr
                        );
                        continue;
                    }
                    Verdict::Delay(d) => tokio::time::sleep(d).await,
                }
            }
            let client = RangeTransferClient::new(self.channel(&node.addr)?)
                .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES);
            match call(client).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(e) => {
                    last_error =
                        anyhow::anyhow!("node {} at {}: {}", node.id, node.addr, e.message())
                }
            }
        }
        Err(last_error)
    }

    fn op(range: &HeldRange) -> RangeOp {
        RangeOp {
            config_num: range.config_num,
            range: range.range.clone(),
        }
    }

    /// Pulls a range from its previous owner chunk by chunk, installing each through
    /// the log, resuming after the last installed key.
    async fn pull(&mut self, held: &HeldRange) -> anyhow::Result<()> {
        let mut cursor = held.cursor.clone();
        loop {
            let request = PullRequest {
                config_num: held.config_num,
                range: held.range.clone(),
                cursor: cursor.clone(),
                max_bytes: PULL_CHUNK_BYTES,
            };
            let reply = self
                .call_any(&held.peer_nodes, |mut c| {
                    let request = request.clone();
                    async move { c.pull(request).await }
                })
                .await
                .with_context(|| format!("pulling from group {}", held.peer_gid))?;
            if let Some(last) = reply.records.last() {
                cursor = last.key.clone();
                if let Some(rate) = &self.rate {
                    let bytes = reply.records.iter().map(|r| r.key.len() + r.value.len());
                    rate.pace(bytes.sum()).await;
                }
                self.propose(Command::Install(InstallChunk {
                    config_num: held.config_num,
                    range: held.range.clone(),
                    records: reply.records,
                }))
                .await?;
            }
            if reply.done {
                self.propose(Command::FinishPull(Self::op(held))).await?;
                info!(self.logger, "range arrived"; "range" => held.range.as_ref().map(|r| r.to_string()), "from" => held.peer_gid);
                return Ok(());
            }
        }
    }

    /// Tells the previous owner it may drop its copy, then records that it was told.
    async fn release(&mut self, held: &HeldRange) -> anyhow::Result<()> {
        let request = ReleaseRequest {
            config_num: held.config_num,
            range: held.range.clone(),
        };
        self.call_any(&held.peer_nodes, |mut c| {
            let request = request.clone();
            async move { c.release(request).await }
        })
        .await
        .with_context(|| format!("releasing to group {}", held.peer_gid))?;
        self.propose(Command::Released(Self::op(held))).await
    }

    /// Deletes a garbage range in bounded chunks through the log.
    async fn collect(&mut self, held: &HeldRange) -> anyhow::Result<()> {
        for _ in 0..DELETE_CHUNKS_PER_STEP {
            self.propose(Command::DeleteChunk(Self::op(held))).await?;
            let gone = !self
                .replica
                .state()
                .held()
                .iter()
                .any(|h| h.range == held.range && h.state() == RangeState::Garbage);
            if gone {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn move_rate_lets_a_burst_through_then_paces_to_the_rate() {
        assert!(MoveRate::new(0).is_none(), "0 means no limit");
        let rate = MoveRate::new(1).expect("1 MiB/s");
        let started = Instant::now();
        // The first MiB is the burst; 512 KiB more at 1 MiB/s take half a second.
        for _ in 0..6 {
            rate.pace(256 << 10).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
        // A chunk larger than the burst waits for the burst, not forever.
        rate.pace(64 << 20).await;
        assert!(started.elapsed() >= elapsed + Duration::from_millis(900));
    }
}
