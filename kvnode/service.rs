//! The kvnode's gRPC services: `Kv` for clients and `RangeTransfer` for other
//! groups. Handlers validate input, then turn requests into proposals or
//! linearizable reads of [`KvState`], and results into replies.

use super::state::{KvError, KvResult, KvState};
use crate::config::MAX_KEY_BYTES;
use crate::proto::kv_command::Command;
use crate::proto::kv_reply::Reply;
use crate::proto::kv_server::Kv;
use crate::proto::range_transfer_server::RangeTransfer;
use crate::proto::{
    CompareAndSwapReply, CompareAndSwapRequest, DeleteReply, DeleteRequest, GetReply, GetRequest,
    KeyRange, KvCommand, NodeStatusReply, NodeStatusRequest, PullReply, PullRequest, PutReply,
    PutRequest, RangeOp, ReleaseReply, ReleaseRequest, ScanReply, ScanRequest,
};
use crate::replica::{Replica, Role};
use crate::status;
use prost::Message;
use tonic::{Request, Response, Status};

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
        KvError::WrongGroup { config_num } => status::wrong_group(
            config_num,
            format!("key is not served by this group in configuration {config_num}"),
        ),
        KvError::Superseded { seq } => Status::failed_precondition(format!(
            "write {seq} was already answered (the client acknowledged it)"
        )),
        KvError::TooManyInFlight { limit } => Status::resource_exhausted(format!(
            "more than {limit} unacknowledged writes from this client; advance first_incomplete"
        )),
        KvError::Malformed => Status::invalid_argument("malformed command"),
    }
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(e.to_string())
}

pub struct KvService {
    replica: Replica<KvState>,
    limits: Limits,
}

impl KvService {
    pub fn new(replica: Replica<KvState>, limits: Limits) -> KvService {
        KvService { replica, limits }
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

    async fn write(&self, command: Command) -> Result<Reply, Status> {
        let encoded = KvCommand {
            command: Some(command),
        }
        .encode_to_vec();
        let result: KvResult = self
            .replica
            .propose(encoded)
            .await
            .map_err(status::from_replica)?;
        result
            .map_err(kv_error)?
            .reply
            .ok_or_else(|| Status::internal("write produced no reply"))
    }

    async fn read_barrier(&self) -> Result<(), Status> {
        self.replica
            .read_barrier()
            .await
            .map_err(status::from_replica)
    }
}

fn unexpected(reply: Reply) -> Status {
    Status::internal(format!("unexpected reply {reply:?}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let r = r.into_inner();
        check_key("key", &r.key)?;
        self.read_barrier().await?;
        let value = self
            .replica
            .state()
            .get(&r.key)
            .map_err(internal)?
            .map_err(kv_error)?;
        Ok(Response::new(GetReply {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutReply>, Status> {
        let r = r.into_inner();
        check_key("key", &r.key)?;
        self.check_value(&r.value)?;
        match self.write(Command::Put(r)).await? {
            Reply::Put(reply) => Ok(Response::new(reply)),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<DeleteReply>, Status> {
        let r = r.into_inner();
        check_key("key", &r.key)?;
        match self.write(Command::Delete(r)).await? {
            Reply::Delete(reply) => Ok(Response::new(reply)),
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
        let r = r.into_inner();
        check_key("key", &r.key)?;
        if let Some(v) = &r.value {
            self.check_value(v)?;
        }
        match self.write(Command::Cas(r)).await? {
            Reply::Cas(reply) => Ok(Response::new(reply)),
            other => Err(unexpected(other)),
        }
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
        let op = RangeOp {
            config_num: r.config_num,
            range: r.range,
        };
        let encoded = KvCommand {
            command: Some(Command::Release(op)),
        }
        .encode_to_vec();
        // Releasing an already-released range is a no-op: the answer is the same.
        self.replica
            .propose(encoded)
            .await
            .map_err(status::from_replica)?
            .map_err(kv_error)?;
        Ok(Response::new(ReleaseReply {}))
    }
}
