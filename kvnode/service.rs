//! The kvnode's gRPC services: `Kv` for clients and `RangeTransfer` for other
//! groups. Handlers validate input, then turn requests into proposals or
//! linearizable reads of [`KvState`], and results into replies.

use super::state::{KvError, KvState, MoveRead, WriteOutcome};
use crate::config::{MAX_BATCH_OPS, MAX_KEY_BYTES};
use crate::proto::batch_op::Op;
use crate::proto::batch_result::Result as OpResult;
use crate::proto::internal::range_transfer_server::RangeTransfer;
use crate::proto::internal::{
    CopyRangeRequest, FreezeMoveReply, FreezeMoveRequest, PullDeltasReply, PullDeltasRequest,
    PullReply, PullRequest, ReleaseReply, ReleaseRequest,
};
use crate::proto::kv_server::Kv;
use crate::proto::storage::kv_command::Command;
use crate::proto::storage::write::Op as WriteOp;
use crate::proto::storage::write_result::Result as Effect;
use crate::proto::storage::{self, RangeOp, Write, WriteBatch};
use crate::proto::{
    BatchReply, BatchRequest, BatchResult, CompareAndSwapReply, CompareAndSwapRequest, DeleteReply,
    DeleteRequest, GetReply, GetRequest, KeyRange, KeyValue, NodeStatusReply, NodeStatusRequest,
    PutReply, PutRequest, ScanReply, ScanRequest,
};
use crate::replica::{Replica, ReplicaError, Role};
use crate::status;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// How long a request for a range that has arrived here in a live move waits for the
/// cutover configuration, rather than being refused (the client would back off).
const HOLD_FOR_CUTOVER: Duration = Duration::from_millis(150);
/// How often a held request looks again.
const HOLD_POLL: Duration = Duration::from_millis(2);

/// Limits on what clients may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_scan_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
            max_scan_limit: 10_000,
        }
    }
}

/// A scan page stops once it holds about this many bytes (and resumes after).
const MAX_SCAN_BYTES: usize = 4 << 20;
/// Most bytes of records in one transfer chunk.
const MAX_PULL_BYTES: u32 = 4 << 20;

fn check_key(field: &str, key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(status::invalid_argument(field, "must not be empty", 1));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(status::invalid_argument(
            field,
            format!("is {} bytes, longer than {MAX_KEY_BYTES}", key.len()),
            MAX_KEY_BYTES as u64,
        ));
    }
    Ok(())
}

fn kv_error(e: KvError) -> Status {
    match e {
        KvError::WrongGroup {
            config_num,
            moving_to: 0,
        } => status::wrong_group(
            config_num,
            0,
            format!("key is not served by this group in configuration {config_num}"),
        ),
        KvError::WrongGroup {
            config_num,
            moving_to,
        } => status::wrong_group(
            config_num,
            moving_to,
            format!("key's range is frozen here for its move to group {moving_to}"),
        ),
        KvError::Superseded { seq } => Status::failed_precondition(format!(
            "write {seq} was already answered (the client acknowledged it)"
        )),
        KvError::TooManyInFlight { limit } => Status::resource_exhausted(format!(
            "more than {limit} unacknowledged writes from this client; advance first_incomplete"
        )),
    }
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(e.to_string())
}

pub struct KvService {
    replica: Replica<KvState>,
    limits: Limits,
    /// Test only (`kvnode --unsafe-stale-reads`): see [`KvService::with_stale_reads`].
    stale_reads: bool,
}

impl KvService {
    pub fn new(replica: Replica<KvState>, limits: Limits) -> KvService {
        KvService {
            replica,
            limits,
            stale_reads: false,
        }
    }

    /// Test only, and wrong on purpose: a follower answers gets from what it has
    /// applied, with no read barrier, and the leader sends its readers to the
    /// follower furthest behind. Gets then see stale values, which `shardctl verify`
    /// must report.
    pub fn with_stale_reads(mut self, on: bool) -> KvService {
        self.stale_reads = on;
        self
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Status> {
        if value.len() > self.limits.max_value_bytes {
            return Err(status::invalid_argument(
                "value",
                format!(
                    "is {} bytes, larger than {}",
                    value.len(),
                    self.limits.max_value_bytes
                ),
                self.limits.max_value_bytes as u64,
            ));
        }
        Ok(())
    }

    /// Checks a client write's fields before it is proposed.
    fn check_write(&self, write: &Write) -> Result<(), Status> {
        check_key("key", &write.key)?;
        match &write.op {
            Some(WriteOp::Put(put)) => self.check_value(&put.value),
            Some(WriteOp::Delete(_)) => Ok(()),
            Some(WriteOp::Cas(cas)) => cas.value.as_ref().map_or(Ok(()), |v| self.check_value(v)),
            // Replicas would stop at a write they cannot apply: never propose one.
            None => Err(Status::internal("a write without an op")),
        }
    }

    /// Waits, up to [`HOLD_FOR_CUTOVER`], until this group serves `key` when it is in
    /// a range that has arrived here and is about to become ours. True if it does.
    async fn hold_for_cutover(&self, key: &[u8]) -> bool {
        let until = Instant::now() + HOLD_FOR_CUTOVER;
        loop {
            {
                let state = self.replica.state();
                if state.serving_range(key).is_ok() {
                    return true;
                }
                if !state.arriving(key) || Instant::now() >= until {
                    return false;
                }
            }
            tokio::time::sleep(HOLD_POLL).await;
        }
    }

    /// Runs `op` for `key`; a wrong-group answer for a range about to become ours is
    /// held for the cutover and tried once more.
    async fn held<T, F, Fut>(&self, key: &[u8], op: F) -> Result<T, Status>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        match op().await {
            Err(e) if is_wrong_group(&e) && self.hold_for_cutover(key).await => op().await,
            other => other,
        }
    }

    /// One client write, proposed as a batch of one.
    async fn write(&self, write: Write) -> Result<OpResult, Status> {
        self.check_write(&write)?;
        let key = write.key.clone();
        self.held(&key, || async {
            let mut results = self.write_many(vec![write.clone()]).await;
            results.pop().expect("one result per write")
        })
        .await
    }

    /// Reads `keys` after one read barrier: one result per key.
    async fn read_many(&self, keys: &[Vec<u8>]) -> Vec<Result<GetReply, Status>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let barrier = if self.stale_reads {
            self.send_readers_to_a_follower()
        } else {
            self.read_barrier().await
        };
        if let Err(e) = barrier {
            return vec![Err(e); keys.len()];
        }
        let state = self.replica.state();
        keys.iter()
            .map(|key| {
                let value = state.get(key).map_err(internal)?.map_err(kv_error)?;
                Ok(GetReply {
                    found: value.is_some(),
                    value: value.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Proposes `writes` as one Raft entry: one result per write.
    async fn write_many(&self, writes: Vec<Write>) -> Vec<Result<OpResult, Status>> {
        let count = writes.len();
        if count == 0 {
            return Vec::new();
        }
        let command = Command::Writes(WriteBatch { writes });
        match self.replica.propose(command).await {
            Ok(results) if results.len() == count => results.into_iter().map(write_reply).collect(),
            Ok(results) => vec![
                Err(Status::internal(format!(
                    "{count} writes produced {} results",
                    results.len()
                )));
                count
            ],
            Err(e) => vec![Err(status::from_replica(e)); count],
        }
    }

    /// With stale reads on: the leader answers not-leader naming its follower with
    /// the least of the log; a follower reads at once.
    fn send_readers_to_a_follower(&self) -> Result<(), Status> {
        let status = self.replica.status();
        if status.role != Role::Leader {
            return Ok(());
        }
        let Some((&id, _)) = status
            .progress
            .iter()
            .filter(|(&id, _)| id != status.id)
            .min_by_key(|(_, p)| p.matched)
        else {
            return Ok(()); // a group of one: nobody to send readers to
        };
        Err(status::from_replica(ReplicaError::NotLeader {
            leader_id: id,
            leader_addr: status.peers.get(&id).cloned(),
        }))
    }

    async fn read_barrier(&self) -> Result<(), Status> {
        self.replica
            .read_barrier()
            .await
            .map_err(status::from_replica)
    }
}

/// Runs a live move's read on a blocking thread, without the state lock.
async fn run_read(read: MoveRead, max_bytes: usize) -> Result<(Vec<KeyValue>, bool), Status> {
    tokio::task::spawn_blocking(move || read.run(max_bytes))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(internal)
}

fn is_wrong_group(e: &Status) -> bool {
    matches!(
        status::detail(e),
        Some(crate::proto::error_detail::Kind::WrongGroup(_))
    )
}

fn unexpected(reply: OpResult) -> Status {
    Status::internal(format!("unexpected reply {reply:?}"))
}

/// A write's stored result as the public reply of its op.
fn write_reply(outcome: WriteOutcome) -> Result<OpResult, Status> {
    let effect = outcome
        .map_err(kv_error)?
        .result
        .ok_or_else(|| Status::internal("write produced no result"))?;
    Ok(match effect {
        Effect::Put(storage::PutResult {}) => OpResult::Put(PutReply {}),
        Effect::Delete(r) => OpResult::Delete(DeleteReply { existed: r.existed }),
        Effect::Cas(r) => OpResult::Cas(CompareAndSwapReply {
            swapped: r.swapped,
            found: r.found,
            current: r.current,
        }),
    })
}

// Client requests as the log stores them (`shardkv.storage.v1`): field by field, so
// a change of the public request does not change what replicas replay.

fn put_write(r: PutRequest) -> Write {
    Write {
        key: r.key,
        id: r.id.map(Into::into),
        op: Some(WriteOp::Put(storage::Put { value: r.value })),
    }
}

fn delete_write(r: DeleteRequest) -> Write {
    Write {
        key: r.key,
        id: r.id.map(Into::into),
        op: Some(WriteOp::Delete(storage::Delete {})),
    }
}

fn cas_write(r: CompareAndSwapRequest) -> Write {
    Write {
        key: r.key,
        id: r.id.map(Into::into),
        op: Some(WriteOp::Cas(storage::CompareAndSwap {
            expected: r.expected,
            value: r.value,
        })),
    }
}

fn op_result(result: Result<OpResult, Status>) -> BatchResult {
    BatchResult {
        result: Some(result.unwrap_or_else(|e| OpResult::Error(status::to_op(&e)))),
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let r = r.into_inner();
        check_key("key", &r.key)?;
        let reply = self
            .held(&r.key, || async {
                let mut results = self.read_many(std::slice::from_ref(&r.key)).await;
                results.pop().expect("one result per key")
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutReply>, Status> {
        match self.write(put_write(r.into_inner())).await? {
            OpResult::Put(reply) => Ok(Response::new(reply)),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<DeleteReply>, Status> {
        match self.write(delete_write(r.into_inner())).await? {
            OpResult::Delete(reply) => Ok(Response::new(reply)),
            other => Err(unexpected(other)),
        }
    }

    async fn scan(&self, r: Request<ScanRequest>) -> Result<Response<ScanReply>, Status> {
        let r = r.into_inner();
        // An empty start is the beginning of the key space.
        if !r.start.is_empty() {
            check_key("start", &r.start)?;
        }
        if !r.end.is_empty() && r.end <= r.start {
            return Err(status::invalid_argument("end", "must be after start", 0));
        }
        let max = self.limits.max_scan_limit;
        if r.limit > max {
            return Err(status::invalid_argument(
                "limit",
                format!("{} is more than {max}", r.limit),
                max as u64,
            ));
        }
        let limit = if r.limit == 0 { max } else { r.limit };
        self.read_barrier().await?;
        let (pairs, resume) = self
            .replica
            .state()
            .scan(&r.start, &r.end, limit as usize, MAX_SCAN_BYTES)
            .map_err(internal)?
            .map_err(kv_error)?;
        Ok(Response::new(ScanReply { pairs, resume }))
    }

    async fn compare_and_swap(
        &self,
        r: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapReply>, Status> {
        match self.write(cas_write(r.into_inner())).await? {
            OpResult::Cas(reply) => Ok(Response::new(reply)),
            other => Err(unexpected(other)),
        }
    }

    async fn batch(&self, r: Request<BatchRequest>) -> Result<Response<BatchReply>, Status> {
        let ops = r.into_inner().ops;
        if ops.len() > MAX_BATCH_OPS {
            return Err(status::invalid_argument(
                "ops",
                format!("{} requests, more than {MAX_BATCH_OPS}", ops.len()),
                MAX_BATCH_OPS as u64,
            ));
        }
        // Sort the ops into reads and writes, answering bad ones at once.
        let mut results: Vec<Option<Result<OpResult, Status>>> = vec![None; ops.len()];
        let (mut reads, mut read_at) = (Vec::new(), Vec::new());
        let (mut writes, mut write_at) = (Vec::new(), Vec::new());
        for (i, op) in ops.into_iter().enumerate() {
            let write = match op.op {
                Some(Op::Get(r)) => {
                    match check_key("key", &r.key) {
                        Ok(()) => {
                            reads.push(r.key);
                            read_at.push(i);
                        }
                        Err(e) => results[i] = Some(Err(e)),
                    }
                    continue;
                }
                Some(Op::Put(r)) => put_write(r),
                Some(Op::Delete(r)) => delete_write(r),
                Some(Op::Cas(r)) => cas_write(r),
                None => {
                    results[i] = Some(Err(status::invalid_argument("op", "must be set", 0)));
                    continue;
                }
            };
            match self.check_write(&write) {
                Ok(()) => {
                    writes.push(write);
                    write_at.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // The ops are concurrent: reads and writes go ahead side by side.
        let (mut read_results, mut write_results) =
            tokio::join!(self.read_many(&reads), self.write_many(writes.clone()));
        // Ops refused for a range that is about to become ours wait for the cutover
        // and go once more.
        let refused = |errors: Vec<Option<&Status>>, keys: Vec<&[u8]>| -> Vec<usize> {
            let state = self.replica.state();
            errors
                .into_iter()
                .zip(keys)
                .enumerate()
                .filter(|(_, (e, key))| e.is_some_and(is_wrong_group) && state.arriving(key))
                .map(|(i, _)| i)
                .collect()
        };
        let again_reads = refused(
            read_results.iter().map(|r| r.as_ref().err()).collect(),
            reads.iter().map(Vec::as_slice).collect(),
        );
        let again_writes = refused(
            write_results.iter().map(|r| r.as_ref().err()).collect(),
            writes.iter().map(|w| w.key.as_slice()).collect(),
        );
        let first = again_reads
            .first()
            .map(|i| reads[*i].clone())
            .or_else(|| again_writes.first().map(|i| writes[*i].key.clone()));
        if let Some(key) = first {
            if self.hold_for_cutover(&key).await {
                let keys: Vec<Vec<u8>> = again_reads.iter().map(|i| reads[*i].clone()).collect();
                let commands = again_writes.iter().map(|i| writes[*i].clone()).collect();
                let (r, w) = tokio::join!(self.read_many(&keys), self.write_many(commands));
                for (i, result) in again_reads.into_iter().zip(r) {
                    read_results[i] = result;
                }
                for (i, result) in again_writes.into_iter().zip(w) {
                    write_results[i] = result;
                }
            }
        }
        for (i, result) in read_at.into_iter().zip(read_results) {
            results[i] = Some(result.map(OpResult::Get));
        }
        for (i, result) in write_at.into_iter().zip(write_results) {
            results[i] = Some(result);
        }
        let results = results
            .into_iter()
            .map(|r| op_result(r.expect("every op has a result")))
            .collect();
        Ok(Response::new(BatchReply { results }))
    }

    async fn node_status(
        &self,
        _: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusReply>, Status> {
        let replica = self.replica.status().to_proto();
        let state = self.replica.state();
        Ok(Response::new(NodeStatusReply {
            replica: Some(replica),
            gid: state.gid(),
            config_num: state.config().num,
            ranges: state.held().to_vec(),
            moves: state.moves().to_vec(),
        }))
    }
}

/// The `RangeTransfer` service: other groups pull frozen ranges from this one and
/// then release them.
pub struct TransferService {
    replica: Replica<KvState>,
}

impl TransferService {
    pub fn new(replica: Replica<KvState>) -> TransferService {
        TransferService { replica }
    }

    /// Proposes one of the group's own commands and waits until it is applied.
    async fn propose(&self, command: Command) -> Result<(), Status> {
        self.replica.propose(command).await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl RangeTransfer for TransferService {
    /// Any replica that has applied the freeze can serve a pull: frozen data no longer
    /// changes.
    async fn pull(&self, r: Request<PullRequest>) -> Result<Response<PullReply>, Status> {
        let r = r.into_inner();
        let range = r.range.unwrap_or_else(KeyRange::full);
        let max_bytes = r.max_bytes.clamp(1, MAX_PULL_BYTES) as usize;
        let (records, done) = self
            .replica
            .state()
            .pull(r.config_num, &range, &r.cursor, max_bytes)
            .map_err(internal)?
            .map_err(Status::unavailable)?;
        Ok(Response::new(PullReply { records, done }))
    }

    /// Drops this group's frozen copy of a range its new owner has installed.
    async fn release(&self, r: Request<ReleaseRequest>) -> Result<Response<ReleaseReply>, Status> {
        let r = r.into_inner();
        if self.replica.status().role != Role::Leader {
            return Err(status::from_replica(self.replica.status().not_leader()));
        }
        // After a live move the new owner may serve before this group has applied the
        // configuration that gave the range away: there is nothing to release yet.
        let applied = self.replica.state().config().num;
        if applied < r.config_num {
            return Err(Status::unavailable(format!(
                "configuration {} not applied yet (at {applied})",
                r.config_num
            )));
        }
        let op = RangeOp {
            config_num: r.config_num,
            range: r.range,
        };
        // Releasing an already-released range is a no-op: the answer is the same.
        self.propose(Command::Release(op)).await?;
        Ok(Response::new(ReleaseReply {}))
    }

    /// Any replica that has applied the plan answers: writes after the plan are
    /// recorded, so a copy from any point after it is made whole by the deltas.
    async fn copy_range(
        &self,
        r: Request<CopyRangeRequest>,
    ) -> Result<Response<PullReply>, Status> {
        let r = r.into_inner();
        let max_bytes = r.max_bytes.clamp(1, MAX_PULL_BYTES) as usize;
        let read = self
            .replica
            .state()
            .copy(r.plan_id, &r.cursor)
            .map_err(Status::unavailable)?;
        let (records, done) = run_read(read, max_bytes).await?;
        Ok(Response::new(PullReply { records, done }))
    }

    /// Any replica that has applied the plan answers; only one that has applied the
    /// freeze can say `done`.
    async fn pull_deltas(
        &self,
        r: Request<PullDeltasRequest>,
    ) -> Result<Response<PullDeltasReply>, Status> {
        let r = r.into_inner();
        let max_bytes = r.max_bytes.clamp(1, MAX_PULL_BYTES) as usize;
        let read = self
            .replica
            .state()
            .deltas(r.plan_id, &r.cursor)
            .map_err(Status::unavailable)?;
        let (frozen, recorded_bytes) = (read.frozen, read.recorded_bytes);
        let (deltas, all) = run_read(read, max_bytes).await?;
        Ok(Response::new(PullDeltasReply {
            deltas,
            done: all && frozen,
            recorded_bytes,
        }))
    }

    /// Freezes the range through the log (idempotent); answers once applied.
    async fn freeze_move(
        &self,
        r: Request<FreezeMoveRequest>,
    ) -> Result<Response<FreezeMoveReply>, Status> {
        let id = r.into_inner().plan_id;
        if self.replica.status().role != Role::Leader {
            return Err(status::from_replica(self.replica.status().not_leader()));
        }
        if self.replica.state().frozen(id) != Some(true) {
            self.propose(Command::FreezeMove(id)).await?;
        }
        match self.replica.state().frozen(id) {
            Some(true) => Ok(Response::new(FreezeMoveReply {})),
            _ => Err(Status::failed_precondition(format!(
                "group {} is not the source of move plan {id}: it ended, or is not applied yet",
                self.replica.state().gid()
            ))),
        }
    }
}
