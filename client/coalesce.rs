//! Coalescing of concurrent requests to one server into `Kv.Batch` calls.
//!
//! Each server has a queue and a task that drains it: whenever a call slot is free,
//! every request waiting at that moment goes out in one Batch. A lone request
//! therefore goes out at once, alone (no added latency), while under load the
//! batches grow with the load and the number of calls stays bounded, and with it the
//! per-call cost of gRPC on both sides, of Raft entries and of apply commits. (TiKV's
//! client does the same with its BatchCommands stream.)

use crate::proto::batch_op::Op;
use crate::proto::batch_result::Result as OpResult;
use crate::proto::kv_client::KvClient;
use crate::proto::{BatchOp, BatchRequest};
use crate::security::SecureChannel;
use crate::status;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

/// A batch stops growing at this many requests...
const MAX_OPS: usize = 256;
/// ... or once it holds this many bytes (a larger request goes alone).
const MAX_BYTES: usize = 4 << 20;

type Reply = oneshot::Sender<Result<OpResult, Status>>;

/// The queue of one server. Cheap to clone; the draining task ends when every
/// clone is dropped.
#[derive(Clone)]
pub(crate) struct Coalescer {
    queue: mpsc::UnboundedSender<(Op, Reply)>,
}

impl Coalescer {
    /// Starts the task that sends the queued requests to `kv`, in at most
    /// `calls_in_flight` Batch calls at a time, each given up after `call_timeout`.
    pub(crate) fn start(
        kv: KvClient<SecureChannel>,
        calls_in_flight: usize,
        call_timeout: Duration,
    ) -> Coalescer {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(drain(kv, waiting, calls_in_flight.max(1), call_timeout));
        Coalescer { queue }
    }

    /// Sends `op` with whatever else is waiting, and returns its own result: what
    /// the single call would have returned.
    pub(crate) async fn call(&self, op: Op) -> Result<OpResult, Status> {
        let (reply, result) = oneshot::channel();
        self.queue
            .send((op, reply))
            .map_err(|_| Status::cancelled("the client is shutting down"))?;
        result
            .await
            .map_err(|_| Status::cancelled("the batch call was dropped"))?
    }
}

async fn drain(
    kv: KvClient<SecureChannel>,
    mut waiting: mpsc::UnboundedReceiver<(Op, Reply)>,
    calls_in_flight: usize,
    call_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(calls_in_flight));
    while let Some(first) = waiting.recv().await {
        // Requests arriving while every slot is busy join this batch.
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let mut bytes = first.0.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_OPS && bytes < MAX_BYTES {
            match waiting.try_recv() {
                Ok(next) => {
                    bytes += next.0.encoded_len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (its attempt timed out) retries on its own.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let kv = kv.clone();
        tokio::spawn(async move {
            send(kv, batch, call_timeout).await;
            drop(slot);
        });
    }
}

async fn send(mut kv: KvClient<SecureChannel>, batch: Vec<(Op, Reply)>, call_timeout: Duration) {
    let (ops, replies): (Vec<BatchOp>, Vec<Reply>) = batch
        .into_iter()
        .map(|(op, reply)| (BatchOp { op: Some(op) }, reply))
        .unzip();
    let count = ops.len();
    let call = kv.batch(BatchRequest { ops });
    let results = match tokio::time::timeout(call_timeout, call).await {
        Ok(Ok(reply)) => reply.into_inner().results,
        Ok(Err(status)) => return fail(replies, status),
        Err(_) => {
            let status = Status::deadline_exceeded(format!("no answer within {call_timeout:?}"));
            return fail(replies, status);
        }
    };
    if results.len() != count {
        let status = Status::internal(format!(
            "a batch of {count} requests got {} results",
            results.len()
        ));
        return fail(replies, status);
    }
    for (reply, result) in replies.into_iter().zip(results) {
        let result = match result.result {
            Some(OpResult::Error(e)) => Err(status::from_op(e)),
            Some(r) => Ok(r),
            None => Err(Status::internal("a batch result is empty")),
        };
        let _ = reply.send(result);
    }
}

fn fail(replies: Vec<Reply>, status: Status) {
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}
