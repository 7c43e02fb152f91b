//! Raft messages between the replicas of one group, over gRPC.
//!
//! Outbound: one task per peer drains a bounded queue and writes batches of messages
//! to one long-lived gRPC stream to that peer, without waiting for replies (so
//! appends are pipelined, and a batch costs a frame rather than a call); a full
//! queue drops messages (Raft retransmits) and counts them; a failed stream reports
//! the peer unreachable to Raft, backs off and opens another. HTTP/2 keepalive
//! notices a peer that stopped answering. Snapshots are streamed on their own RPC in
//! bounded chunks from a pinned engine snapshot.
//!
//! Test-only: with fault injection enabled ([`crate::faults`]), each outbound batch
//! and snapshot first asks the fault table whether to send, drop or delay it.
//!
//! Inbound: [`RaftService`] hands messages to the replica driver through a bounded
//! channel (ending its streams when the node shuts down, so shutdown is not held
//! up by peers), and writes a received snapshot into a staging generation of the
//! state-machine store before handing its Raft message to the driver.

use crate::faults::{Faults, Verdict};
use crate::proto::internal::raft_client::RaftClient;
use crate::proto::internal::raft_server::Raft;
use crate::proto::internal::{
    RaftAck, RaftBatch, RaftTiming, SnapshotChunk, SnapshotEnd, SnapshotRecord,
};
use crate::replica::{NetEvent, Transport};
use crate::security::{Dialer, SecureChannel};
use crate::storage::{OutgoingSnapshot, SmStore};
use backon::{BackoffBuilder, ExponentialBuilder};
use protobuf::Message as _;
use raft::prelude::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Messages queued for one peer before further ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Messages and bytes sent in one RPC at most.
const MAX_BATCH_MESSAGES: usize = 512;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Batches written to a peer's stream ahead of the network.
const STREAM_BUFFER: usize = 64;
/// Interval of HTTP/2 pings on a message stream, and how long one may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long the batches written to a removed peer's stream may take to go out.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(5);
/// A stream that failed after living this long starts its backoff afresh.
const HEALTHY_STREAM: Duration = Duration::from_secs(2);
/// Size of one snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest gRPC message the Raft service accepts (a batch or a chunk, with slack for
/// one maximal value).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Events from the network queued for the driver before further ones are dropped.
pub const EVENT_QUEUE: usize = 8192;

struct Peer {
    addr: String,
    queue: mpsc::Sender<Message>,
    /// For snapshots (the message stream has a connection of its own).
    channel: SecureChannel,
}

/// Outbound side of the Raft transport of one group.
pub struct GrpcTransport {
    group: u64,
    /// This node's id and address, sent with every batch.
    me: (u64, String),
    events: mpsc::Sender<NetEvent>,
    peers: Mutex<HashMap<u64, Peer>>,
    dropped: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// Test-only fault injection; `None` unless enabled.
    faults: Option<Arc<Faults>>,
    /// This node's Raft timing, sent with every batch and required of every peer.
    timing: RaftTiming,
    /// Opens the connections to peers (TLS, this node's certificate).
    dialer: Dialer,
}

impl GrpcTransport {
    /// Creates the transport of `group`; reports go to `events`. Must be called inside
    /// the tokio runtime that should run the network tasks. `faults` is the test-only
    /// fault table (`None` in production). `dialer` opens every connection to a peer.
    pub fn new(
        group: u64,
        me: (u64, String),
        timing: RaftTiming,
        events: mpsc::Sender<NetEvent>,
        faults: Option<Arc<Faults>>,
        dialer: Dialer,
    ) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            group,
            me,
            events,
            peers: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
            faults,
            timing,
            dialer,
        })
    }
}

impl Transport for GrpcTransport {
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn set_peer(&self, id: u64, addr: &str) {
        let mut peers = self.peers.lock().expect("poisoned");
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let endpoint = match self.dialer.endpoint(addr) {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(_) => return,
        };
        let _guard = self.runtime.enter();
        let channel = self
            .dialer
            .connect_lazy(endpoint.clone().timeout(Duration::from_secs(5)));
        // No call timeout: the stream lives as long as the connection does.
        let stream_channel = self.dialer.connect_lazy(
            endpoint
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .keep_alive_while_idle(true),
        );
        let (queue, rx) = mpsc::channel(PEER_QUEUE);
        // What every batch to this peer says besides its messages.
        let header = RaftBatch {
            group: self.group,
            messages: Vec::new(),
            from: self.me.0,
            from_addr: self.me.1.clone(),
            timing: Some(self.timing),
        };
        self.runtime.spawn(send_loop(
            header,
            (id, addr.to_owned()),
            stream_channel,
            rx,
            self.events.clone(),
            self.faults.clone(),
        ));
        // Replacing the entry drops the old queue's sender, which ends its task.
        peers.insert(
            id,
            Peer {
                addr: addr.to_owned(),
                queue,
                channel,
            },
        );
    }

    fn remove_peer(&self, id: u64) {
        self.peers.lock().expect("poisoned").remove(&id);
    }

    fn send(&self, msg: Message) {
        let to = msg.to;
        let peers = self.peers.lock().expect("poisoned");
        match peers.get(&to) {
            Some(peer) => {
                if peer.queue.try_send(msg).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::metrics().dropped_outbound.inc();
                }
            }
            None => {
                drop(peers);
                let _ = self.events.try_send(NetEvent::Unreachable(to));
            }
        }
    }

    /// Streams `snapshot` in bounded chunks on its own RPC.
    fn send_snapshot(&self, msg: Message, snapshot: OutgoingSnapshot) {
        let to = msg.to;
        let peer = self
            .peers
            .lock()
            .expect("poisoned")
            .get(&to)
            .map(|p| (p.channel.clone(), p.addr.clone()));
        let events = self.events.clone();
        let group = self.group;
        let faults = self.faults.clone();
        self.runtime.spawn(async move {
            let ok = match peer {
                Some((channel, addr)) => {
                    let verdict = faults.as_ref().map_or(Verdict::Send, |f| f.decide(&addr));
                    match verdict {
                        Verdict::Blocked | Verdict::Lost => false,
                        Verdict::Delay(d) => {
                            tokio::time::sleep(d).await;
                            stream_snapshot(group, channel, msg, snapshot, faults)
                                .await
                                .is_ok()
                        }
                        Verdict::Send => stream_snapshot(group, channel, msg, snapshot, faults)
                            .await
                            .is_ok(),
                    }
                }
                None => false,
            };
            let _ = events.send(NetEvent::SnapshotSent { to, ok }).await;
        });
    }

    fn faults(&self) -> Option<&Arc<Faults>> {
        self.faults.as_ref()
    }
}

impl GrpcTransport {
    /// Learns the address of a peer that sent us a message, unless it is known already.
    pub fn learn_peer(&self, id: u64, addr: &str) {
        if id == 0 || addr.is_empty() || self.peers.lock().expect("poisoned").contains_key(&id) {
            return;
        }
        self.set_peer(id, addr);
    }
}

async fn send_loop(
    header: RaftBatch,
    (peer, peer_addr): (u64, String),
    channel: SecureChannel,
    mut queue: mpsc::Receiver<Message>,
    events: mpsc::Sender<NetEvent>,
    faults: Option<Arc<Faults>>,
) {
    let mut client = RaftClient::new(channel).max_encoding_message_size(MAX_MESSAGE_BYTES);
    let new_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    // A stream is opened when there is something to send, and lives until it fails.
    while let Some(first) = queue.recv().await {
        let (batches, outgoing) = mpsc::channel(STREAM_BUFFER);
        // With fault injection, batches go through a delay line that keeps their
        // order, so a delayed link adds latency without limiting throughput.
        let delay_line = faults.as_ref().map(|_| delay_line(batches.clone()));
        let mut call = std::pin::pin!(client.send(ReceiverStream::new(outgoing)));
        let opened = std::time::Instant::now();
        let mut next = Some(first);
        loop {
            let first = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    m = queue.recv() => match m {
                        Some(m) => m,
                        // The peer was removed. What is written still goes out: the
                        // last batches tell a removed node that it was removed.
                        None => {
                            drop(delay_line);
                            drop(batches);
                            let _ = tokio::time::timeout(FLUSH_ON_CLOSE, &mut call).await;
                            return;
                        }
                    },
                    // Only a failure (or the peer stopping) ends the call.
                    _ = &mut call => break,
                },
            };
            let batch = RaftBatch {
                messages: take_batch(first, &mut queue),
                ..header.clone()
            };
            if let (Some(faults), Some(line)) = (&faults, &delay_line) {
                let delay = match faults.decide(&peer_addr) {
                    Verdict::Send => Duration::ZERO,
                    // Lost on the way: Raft retransmits.
                    Verdict::Lost => continue,
                    // A cut link fails like an unreachable peer.
                    Verdict::Blocked => {
                        let _ = events.try_send(NetEvent::Unreachable(peer));
                        continue;
                    }
                    Verdict::Delay(d) => d,
                };
                let due = tokio::time::Instant::now() + delay;
                if line.send((due, batch)).is_err() {
                    break;
                }
                continue;
            }
            tokio::select! {
                sent = batches.send(batch) => if sent.is_err() { break },
                _ = &mut call => break,
            }
        }
        let _ = events.try_send(NetEvent::Unreachable(peer));
        if opened.elapsed() >= HEALTHY_STREAM {
            backoff = new_backoff();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(delay).await;
        // Messages that waited out the backoff are stale; Raft resends.
        while queue.try_recv().is_ok() {}
    }
}

/// Test only: forwards each batch to `batches` at its due time, in order.
fn delay_line(
    batches: mpsc::Sender<RaftBatch>,
) -> mpsc::UnboundedSender<(tokio::time::Instant, RaftBatch)> {
    let (line, mut delayed) = mpsc::unbounded_channel::<(tokio::time::Instant, RaftBatch)>();
    tokio::spawn(async move {
        while let Some((due, batch)) = delayed.recv().await {
            tokio::time::sleep_until(due).await;
            if batches.send(batch).await.is_err() {
                return;
            }
        }
    });
    line
}

/// `first` and whatever else is queued, encoded, up to the batch limits.
fn take_batch(first: Message, queue: &mut mpsc::Receiver<Message>) -> Vec<Vec<u8>> {
    let mut messages = vec![first.write_to_bytes().expect("encode")];
    let mut bytes = messages[0].len();
    while messages.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
        match queue.try_recv() {
            Ok(m) => {
                let raw = m.write_to_bytes().expect("encode");
                bytes += raw.len();
                messages.push(raw);
            }
            Err(_) => break,
        }
    }
    messages
}

/// What a snapshot stream held, so the receiver can tell a complete stream from one
/// whose sender stopped part way (a stream that ends early ends cleanly on the wire).
#[derive(Default)]
struct StreamDigest {
    records: u64,
    crc: crc32fast::Hasher,
}

impl StreamDigest {
    fn add(&mut self, record: &SnapshotRecord) {
        self.records += 1;
        for part in [&record.key, &record.value] {
            self.crc.update(&(part.len() as u64).to_be_bytes());
            self.crc.update(part);
        }
    }

    fn end(self) -> SnapshotEnd {
        SnapshotEnd {
            records: self.records,
            crc32: self.crc.finalize(),
        }
    }
}

/// Streams `snapshot` in chunks, the last one carrying the stream's [`SnapshotEnd`].
/// `faults` (test only) can make the read fail part way.
async fn stream_snapshot(
    group: u64,
    channel: SecureChannel,
    msg: Message,
    snapshot: OutgoingSnapshot,
    faults: Option<Arc<Faults>>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(2);
    let first = SnapshotChunk {
        group,
        message: msg.write_to_bytes()?,
        ..Default::default()
    };
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        tx.blocking_send(first)?;
        let mut digest = StreamDigest::default();
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut chunks = 1;
        for item in snapshot.records() {
            if faults
                .as_ref()
                .is_some_and(|f| f.fails_snapshot_read(chunks))
            {
                anyhow::bail!("injected fault: snapshot read failed after {chunks} chunks");
            }
            let (key, value) = item?;
            bytes += key.len() + value.len();
            let record = SnapshotRecord { key, value };
            digest.add(&record);
            records.push(record);
            if bytes >= SNAPSHOT_CHUNK_BYTES {
                let chunk = SnapshotChunk {
                    group,
                    records: std::mem::take(&mut records),
                    ..Default::default()
                };
                tx.blocking_send(chunk)?;
                chunks += 1;
                bytes = 0;
            }
        }
        tx.blocking_send(SnapshotChunk {
            group,
            records,
            end: Some(digest.end()),
            ..Default::default()
        })?;
        Ok(())
    });
    let mut client = RaftClient::new(channel).max_encoding_message_size(MAX_MESSAGE_BYTES);
    let sent = client.install_snapshot(ReceiverStream::new(rx)).await;
    reader.await??;
    sent?;
    Ok(())
}

/// Inbound side: the `Raft` gRPC service of one group.
pub struct RaftService {
    group: u64,
    events: mpsc::Sender<NetEvent>,
    transport: Arc<GrpcTransport>,
    store: SmStore,
    /// One snapshot is received at a time.
    receiving: tokio::sync::Mutex<()>,
    /// Becomes true when the node shuts down: message streams end then.
    stopping: watch::Receiver<bool>,
    logger: slog::Logger,
}

impl RaftService {
    pub fn new(
        group: u64,
        events: mpsc::Sender<NetEvent>,
        transport: Arc<GrpcTransport>,
        store: SmStore,
        stopping: watch::Receiver<bool>,
        logger: slog::Logger,
    ) -> RaftService {
        RaftService {
            group,
            events,
            transport,
            store,
            receiving: tokio::sync::Mutex::new(()),
            stopping,
            logger,
        }
    }

    /// Refuses a member whose Raft timing differs from ours: the leader lease
    /// assumes every member refuses votes for as long as the leader's own election
    /// timeout. (A sender that names no timing predates the check.)
    fn check_timing(&self, batch: &RaftBatch) -> Result<(), Status> {
        let ours = self.transport.timing;
        match batch.timing {
            Some(theirs) if theirs != ours => {
                let message = format!(
                    "node {} at {} runs Raft ticks of {} ms with an election timeout of {} \
                     ticks, this node {} ms and {} ticks: every member of a group must run \
                     the same --tick-ms (the leader lease depends on it)",
                    batch.from,
                    batch.from_addr,
                    theirs.tick_ms,
                    theirs.election_ticks,
                    ours.tick_ms,
                    ours.election_ticks
                );
                slog::error!(self.logger, "refused a peer's Raft messages"; "why" => &message);
                Err(Status::failed_precondition(message))
            }
            _ => Ok(()),
        }
    }

    fn check_group(&self, group: u64) -> Result<(), Status> {
        if group != self.group {
            return Err(Status::failed_precondition(format!(
                "this node serves Raft group {}, not {group}",
                self.group
            )));
        }
        Ok(())
    }
}

fn decode_message(raw: &[u8]) -> Result<Message, Status> {
    Message::parse_from_bytes(raw)
        .map_err(|e| Status::invalid_argument(format!("bad Raft message: {e}")))
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let batch = tokio::select! {
                batch = stream.message() => match batch? {
                    Some(batch) => batch,
                    None => break,
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            self.check_group(batch.group)?;
            self.check_timing(&batch)?;
            self.transport.learn_peer(batch.from, &batch.from_addr);
            for (i, raw) in batch.messages.iter().enumerate() {
                let msg = decode_message(raw)?;
                if self.events.try_send(NetEvent::Message(msg)).is_err() {
                    // The driver is overloaded or stopped: drop, Raft retransmits.
                    let dropped = batch.messages.len() - i;
                    crate::metrics::metrics()
                        .dropped_inbound
                        .inc_by(dropped as u64);
                    break;
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let _one_at_a_time = self
            .receiving
            .try_lock()
            .map_err(|_| Status::resource_exhausted("already receiving a snapshot"))?;
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_group(first.group)?;
        let message = decode_message(&first.message)?;
        let mut writer = self.store.receive_snapshot().map_err(internal)?;
        let mut digest = StreamDigest::default();
        let mut write = |records: Vec<SnapshotRecord>| -> Result<(), Status> {
            records.iter().for_each(|r| digest.add(r));
            writer
                .write(records.into_iter().map(|r| (r.key, r.value)))
                .map_err(internal)
        };
        // A staged generation that is not handed to the driver is dropped on the next
        // start (or overwritten by the next snapshot), never installed.
        let mut end = first.end;
        write(first.records)?;
        while end.is_none() {
            let Some(chunk) = stream.message().await? else {
                return Err(Status::data_loss(
                    "snapshot stream ended before its end marker: not installed",
                ));
            };
            end = chunk.end;
            write(chunk.records)?;
        }
        let expected = end.expect("loop ends on the marker");
        let received = digest.end();
        if received != expected {
            return Err(Status::data_loss(format!(
                "snapshot stream held {} records (crc {:08x}), its end marker says {} \
                 (crc {:08x}): not installed",
                received.records, received.crc32, expected.records, expected.crc32
            )));
        }
        let staged = writer.finish(message.get_snapshot().get_metadata().index);
        let (done, handled) = oneshot::channel();
        self.events
            .send(NetEvent::Snapshot {
                message,
                staged,
                done,
            })
            .await
            .map_err(|_| Status::unavailable("replica stopped"))?;
        handled
            .await
            .map_err(|_| Status::unavailable("replica stopped"))?;
        Ok(Response::new(RaftAck {}))
    }
}

fn internal(e: crate::storage::StorageError) -> Status {
    Status::internal(e.to_string())
}
