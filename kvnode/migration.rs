//! The leader's background work: follow the shard master's configurations one at a
//! time, pull ranges this group gained, tell old owners to drop what was pulled, and
//! delete ranges other groups have taken; drive the live moves this group is the
//! destination of (copy, catch up, cutover). Every step is a proposal through the
//! group's log, so a new leader resumes where the old one stopped.

use super::state::KvState;
use crate::client::leader::Replicas;
use crate::client::master::MasterClient;
use crate::faults::{Faults, Verdict};
use crate::metrics::metrics;
use crate::proto::internal::range_transfer_client::RangeTransferClient;
use crate::proto::internal::{
    CopyRangeRequest, FreezeMoveRequest, PullDeltasRequest, PullRequest, ReleaseRequest,
};
use crate::proto::storage::kv_command::Command;
use crate::proto::storage::{InstallChunk, MoveChunk, RangeOp};
use crate::proto::{
    FinishMoveRequest, HeldRange, MovePhase, MovePlan, MoveState, Node, RangeState,
    ReportMoveRequest,
};
use crate::replica::{Replica, Role};
use crate::security::{Dialer, SecureChannel};
use anyhow::Context;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use slog::{debug, info, Logger};
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Response, Status};

/// Configurations applied per step at most.
const MAX_CONFIGS_PER_STEP: usize = 64;
/// Garbage-collection commands per range per step, so other work is not starved.
const DELETE_CHUNKS_PER_STEP: usize = 64;
/// A live move's catch-up ends, and its cutover begins, once the writes recorded at
/// the source and not yet installed here are at most this many bytes after a round:
/// what is left then travels in one chunk while the range is frozen, one Raft entry
/// here (a few ms), whatever the range's size.
const CUTOVER_LAG_BYTES: u64 = 256 << 10;
/// Time one step spends on one live move before it looks at the configuration again
/// (a cancellation) and reports progress.
const MOVE_STEP: Duration = Duration::from_secs(1);
/// Once the source is frozen the range answers nothing, so the step drives the
/// cutover to its end without going back to its other work (garbage collection,
/// the next tick), for up to this long: the shard master cancels a cutover stalled
/// for 3 s anyway.
const CUTOVER_STEP: Duration = Duration::from_secs(3);

/// How a move's data travels: in chunks of at most `chunk_bytes` (one Raft entry
/// each at the destination), at most `rate` fast.
pub struct MovePacing {
    pub chunk_bytes: u32,
    pub rate: Option<MoveRate>,
}

impl MovePacing {
    /// `mib_per_sec` 0: no limit.
    pub fn new(mib_per_sec: u32, chunk_kib: u32) -> MovePacing {
        let chunk_bytes = chunk_kib.saturating_mul(1024);
        MovePacing {
            chunk_bytes,
            rate: MoveRate::new(mib_per_sec, chunk_bytes),
        }
    }
}

/// Key and value bytes of pulled records.
fn record_bytes(records: &[crate::proto::KeyValue]) -> usize {
    records.iter().map(|r| r.key.len() + r.value.len()).sum()
}

/// Paces the bytes this node pulls from other groups, so a large move leaves CPU
/// and disk to the ranges that keep serving (TiKV's snap-io-max-bytes-per-sec).
pub struct MoveRate {
    limiter: DefaultDirectRateLimiter,
    /// The most KiB one pace call may ask for.
    burst: NonZeroU32,
}

impl MoveRate {
    /// `None` for 0: pulls go as fast as the groups can take them.
    fn new(mib_per_sec: u32, chunk_bytes: u32) -> Option<MoveRate> {
        let kib = NonZeroU32::new(mib_per_sec.checked_mul(1024)?)?;
        // At least one full chunk, or a rate under a chunk a second could not pass one.
        let burst = kib.max(NonZeroU32::new(chunk_bytes / 1024)?);
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
/// calls to other groups. `dialer` opens the connections to other groups' nodes.
pub async fn run_migrations(
    replica: Replica<KvState>,
    masters: Arc<MasterClient>,
    interval: Duration,
    pacing: MovePacing,
    logger: Logger,
    faults: Option<Arc<Faults>>,
    dialer: Dialer,
) {
    let mut worker = Worker {
        replica,
        masters,
        dialer,
        groups: HashMap::new(),
        chunk_bytes: pacing.chunk_bytes,
        rate: pacing.rate,
        logger,
        faults,
        move_started: HashMap::new(),
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
    dialer: Dialer,
    /// The replicas of each group this one transfers ranges with (the one that
    /// answered last is tried first: the leader, usually), remade when the group's
    /// members change.
    groups: HashMap<u64, Replicas>,
    /// Bytes of records asked for per pull, copy or delta round.
    chunk_bytes: u32,
    rate: Option<MoveRate>,
    logger: Logger,
    faults: Option<Arc<Faults>>,
    /// When this leader first drove each live move, for its duration metric.
    move_started: HashMap<u64, Instant>,
}

impl Worker {
    async fn step(&mut self) -> anyhow::Result<()> {
        self.follow_configs().await?;
        let (moves, ended, gid) = {
            let state = self.replica.state();
            (
                state.moves().to_vec(),
                state.ended_plans().to_vec(),
                state.gid(),
            )
        };
        self.move_started.retain(|id, _| {
            moves
                .iter()
                .any(|m| m.plan.as_ref().is_some_and(|p| p.id == *id))
        });
        for m in &moves {
            if m.plan.as_ref().is_some_and(|p| p.dest == gid) {
                self.drive_move(m).await?;
            }
        }
        for id in ended {
            for _ in 0..DELETE_CHUNKS_PER_STEP {
                self.propose(Command::DropDeltas(id)).await?;
                if !self.replica.state().ended_plans().contains(&id) {
                    break;
                }
            }
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

    /// A group that was down, or joined late, catches up through every configuration
    /// in order; those that move nothing of its ranges pass at once.
    async fn follow_configs(&mut self) -> anyhow::Result<()> {
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
                break;
            };
            info!(self.logger, "moving to configuration"; "num" => next.num);
            self.propose(Command::Config(next)).await?;
        }
        Ok(())
    }

    /// Proposes one of the group's own commands (which cannot fail once applied).
    async fn propose(&self, command: Command) -> anyhow::Result<()> {
        self.replica.propose(command).await?;
        Ok(())
    }

    /// Calls `call` on the nodes of group `gid` (`nodes`), each once at most, until
    /// one answers: the one that answered last first, a not-leader's hint next.
    async fn call_group<T, F, Fut>(
        &mut self,
        gid: u64,
        nodes: &[Node],
        call: F,
    ) -> anyhow::Result<T>
    where
        F: Fn(RangeTransferClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        anyhow::ensure!(!nodes.is_empty(), "the group has no nodes");
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
        if self.groups.get(&gid).is_none_or(|r| r.addrs() != addrs) {
            let replicas = Replicas::new(
                &format!("group {gid}"),
                &addrs,
                &self.dialer,
                Some(Duration::from_secs(10)),
            )?;
            self.groups.insert(gid, replicas);
        }
        let faults = &self.faults;
        let reply = self.groups[&gid]
            .call_each(|target| {
                let client = RangeTransferClient::new(target.channel)
                    .max_decoding_message_size(crate::transport::MAX_MESSAGE_BYTES);
                // Not sent until awaited, so after the fault table's verdict.
                let reply = call(client);
                async move {
                    if let Some(faults) = faults {
                        match faults.decide(&target.addr) {
                            Verdict::Send => {}
                            Verdict::Blocked | Verdict::Lost => {
                                return Err(Status::unavailable(format!(
                                    "{}: dropped by fault injection",
                                    target.addr
                                )))
                            }
                            Verdict::Delay(d) => tokio::time::sleep(d).await,
                        }
                    }
                    Ok(reply.await?.into_inner())
                }
            })
            .await;
        reply.map_err(|e| anyhow::anyhow!("{}", e.message()))
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
                max_bytes: self.chunk_bytes,
            };
            let reply = self
                .call_group(held.peer_gid, &held.peer_nodes, |mut c| {
                    let request = request.clone();
                    async move { c.pull(request).await }
                })
                .await
                .with_context(|| format!("pulling from group {}", held.peer_gid))?;
            if let Some(last) = reply.records.last() {
                cursor = last.key.clone();
                let bytes = record_bytes(&reply.records);
                metrics().moves.pulled_bytes.inc_by(bytes as u64);
                if let Some(rate) = &self.rate {
                    rate.pace(bytes).await;
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

    /// Drives this group's side of a live move as the destination, for up to
    /// [`MOVE_STEP`]: copy the range, then install the source's recorded writes in
    /// rounds until what is left is small, then freeze the source, install the rest
    /// and ask the shard master for the cutover. Reports progress to the shard master.
    async fn drive_move(&mut self, m: &MoveState) -> anyhow::Result<()> {
        let plan = m.plan.clone().unwrap_or_default();
        let source = {
            let state = self.replica.state();
            state
                .config()
                .group(plan.source)
                .map(|g| g.nodes.clone())
                .unwrap_or_default()
        };
        self.move_started
            .entry(plan.id)
            .or_insert_with(Instant::now);
        let started = Instant::now();
        let mut lag = 0;
        let mut frozen: Option<Instant> = None;
        let result = async {
            loop {
                let Some(m) = self.current(plan.id) else {
                    return Ok(()); // the plan ended
                };
                if m.ready {
                    return self.finish_move(&plan).await;
                }
                let out_of_time = match frozen {
                    None => started.elapsed() >= MOVE_STEP,
                    Some(at) => at.elapsed() >= CUTOVER_STEP,
                };
                if out_of_time {
                    return Ok(());
                }
                if !m.copy_done {
                    self.copy_chunk(&plan, &source, &m).await?;
                    continue;
                }
                let (installed, remaining) = self
                    .delta_round(&plan, &source, &m, frozen.is_none())
                    .await?;
                lag = remaining;
                if frozen.is_none()
                    && remaining <= CUTOVER_LAG_BYTES
                    && installed < self.chunk_bytes
                {
                    // Said first, so the shard master gives a cutover that stalls
                    // (the range is frozen) its shorter limit.
                    self.report(&plan, remaining, true).await;
                    self.freeze(&plan, &source).await?;
                    frozen = Some(Instant::now());
                }
            }
        }
        .await;
        self.report(&plan, lag, frozen.is_some()).await;
        result
    }

    /// This group's state of plan `id`, if it still exists.
    fn current(&self, id: u64) -> Option<MoveState> {
        self.replica
            .state()
            .moves()
            .iter()
            .find(|m| m.plan.as_ref().is_some_and(|p| p.id == id))
            .cloned()
    }

    async fn copy_chunk(
        &mut self,
        plan: &MovePlan,
        source: &[Node],
        m: &MoveState,
    ) -> anyhow::Result<()> {
        let request = CopyRangeRequest {
            plan_id: plan.id,
            cursor: m.copy_cursor.clone(),
            max_bytes: self.chunk_bytes,
        };
        let reply = self
            .call_group(plan.source, source, |mut c| {
                let request = request.clone();
                async move { c.copy_range(request).await }
            })
            .await
            .with_context(|| format!("copying from group {}", plan.source))?;
        let bytes = record_bytes(&reply.records);
        metrics().moves.copied_bytes.inc_by(bytes as u64);
        if let Some(rate) = &self.rate {
            rate.pace(bytes).await;
        }
        self.propose(Command::MoveCopy(MoveChunk {
            plan_id: plan.id,
            records: reply.records,
            last: reply.done,
        }))
        .await
    }

    /// Pulls and installs one chunk of recorded writes: the bytes installed, and
    /// those recorded at the source and not installed here yet.
    async fn delta_round(
        &mut self,
        plan: &MovePlan,
        source: &[Node],
        m: &MoveState,
        paced: bool,
    ) -> anyhow::Result<(u32, u64)> {
        let request = PullDeltasRequest {
            plan_id: plan.id,
            cursor: m.delta_cursor.clone(),
            max_bytes: self.chunk_bytes,
        };
        let reply = self
            .call_group(plan.source, source, |mut c| {
                let request = request.clone();
                async move { c.pull_deltas(request).await }
            })
            .await
            .with_context(|| format!("pulling writes from group {}", plan.source))?;
        let bytes: usize = reply.deltas.iter().map(|r| r.value.len()).sum();
        metrics().moves.catch_up_bytes.inc_by(bytes as u64);
        if bytes > 0 || reply.done {
            if let Some(rate) = self.rate.as_ref().filter(|_| paced) {
                rate.pace(bytes).await;
            }
            self.propose(Command::MoveDeltas(MoveChunk {
                plan_id: plan.id,
                records: reply.deltas,
                last: reply.done,
            }))
            .await?;
        } else if !paced {
            // Frozen, and this replica has not applied the freeze yet: it will soon.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let installed = m.delta_bytes + bytes as u64;
        Ok((
            u32::try_from(bytes).unwrap_or(u32::MAX),
            reply.recorded_bytes.saturating_sub(installed),
        ))
    }

    /// Asks the source's leader to stop serving the range (through its log).
    async fn freeze(&mut self, plan: &MovePlan, source: &[Node]) -> anyhow::Result<()> {
        let request = FreezeMoveRequest { plan_id: plan.id };
        self.call_group(plan.source, source, |mut c| async move {
            c.freeze_move(request).await
        })
        .await
        .with_context(|| format!("freezing the range at group {}", plan.source))?;
        info!(self.logger, "move cutover: source frozen"; "plan" => plan.id, "range" => plan.range.as_ref().map(|r| r.to_string()));
        Ok(())
    }

    /// Everything has arrived: the shard master gives the range to this group, which
    /// moves to that configuration at once.
    async fn finish_move(&mut self, plan: &MovePlan) -> anyhow::Result<()> {
        let request = FinishMoveRequest { plan_id: plan.id };
        let reply = self
            .masters
            .call(|mut c| async move { c.finish_move(request).await })
            .await;
        let config = match reply {
            Ok(r) => r.into_inner().config.unwrap_or_default(),
            // Finished by an earlier leader, or cancelled: the configurations say.
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => anyhow::bail!("finishing move plan {}: {}", plan.id, e.message()),
        };
        info!(self.logger, "move cutover: range is ours"; "plan" => plan.id, "config" => config.num);
        if let Some(first) = self.move_started.remove(&plan.id) {
            metrics()
                .moves
                .duration
                .observe(first.elapsed().as_secs_f64());
        }
        if config.num == self.replica.state().config().num + 1 {
            self.propose(Command::Config(config)).await?;
        }
        // Configurations made meanwhile come before it: follow them now, not at the
        // next step.
        self.follow_configs().await
    }

    /// Tells the shard master how far the move is (best effort: the next step will).
    async fn report(&mut self, plan: &MovePlan, lag: u64, frozen: bool) {
        let Some(m) = self.current(plan.id) else {
            return;
        };
        let phase = if frozen || m.ready {
            MovePhase::MoveCuttingOver
        } else if m.copy_done {
            MovePhase::MoveCatchingUp
        } else {
            MovePhase::MoveCopying
        };
        let request = ReportMoveRequest {
            progress: Some(MovePlan {
                id: plan.id,
                phase: phase as i32,
                bytes_copied: m.bytes_installed,
                lag_bytes: lag,
                ..Default::default()
            }),
        };
        let sent = self
            .masters
            .call(|mut c| {
                let request = request.clone();
                async move { c.report_move(request).await }
            })
            .await;
        if let Err(e) = sent {
            debug!(self.logger, "move progress not reported"; "error" => e.message());
        }
    }

    /// Tells the previous owner it may drop its copy, then records that it was told.
    async fn release(&mut self, held: &HeldRange) -> anyhow::Result<()> {
        let request = ReleaseRequest {
            config_num: held.config_num,
            range: held.range.clone(),
        };
        self.call_group(held.peer_gid, &held.peer_nodes, |mut c| {
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
        assert!(MovePacing::new(0, 1024).rate.is_none(), "0 means no limit");
        let rate = MovePacing::new(1, 1024).rate.expect("1 MiB/s");
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
