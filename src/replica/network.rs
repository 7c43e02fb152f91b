//! The driver's side of the network: what it needs of a transport, and what a
//! transport tells it. The gRPC implementation is [`crate::transport`]; the driver's
//! unit tests use an in-memory one.

use crate::faults::Faults;
use crate::storage::{OutgoingSnapshot, StagedSnapshot};
use raft::prelude::Message;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Sends a replica's Raft messages and snapshots to the other members of its group.
/// What arrives from them comes to the driver as [`NetEvent`]s.
pub trait Transport: Send + Sync + 'static {
    /// Sets (or changes) the address of peer `id`.
    fn set_peer(&self, id: u64, addr: &str);

    /// Forgets peer `id` (after it left the group).
    fn remove_peer(&self, id: u64);

    /// Queues `msg` for its destination; never blocks. A message may be lost: Raft
    /// retransmits.
    fn send(&self, msg: Message);

    /// Sends `snapshot` with its Raft message `msg` to the message's destination and
    /// reports the outcome as [`NetEvent::SnapshotSent`].
    fn send_snapshot(&self, msg: Message, snapshot: OutgoingSnapshot);

    /// Messages dropped so far because a peer's queue was full.
    fn dropped(&self) -> u64;

    /// The test-only fault table, when fault injection is enabled.
    fn faults(&self) -> Option<&Arc<Faults>> {
        None
    }
}

/// What the network tells the replica driver.
pub enum NetEvent {
    Message(Message),
    /// A snapshot was received and staged on disk; the driver steps `message` and
    /// answers on `done` once it has been handled.
    Snapshot {
        message: Message,
        staged: StagedSnapshot,
        done: oneshot::Sender<()>,
    },
    Unreachable(u64),
    SnapshotSent {
        to: u64,
        ok: bool,
    },
}
