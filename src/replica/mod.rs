//! The Raft replica driver: the only code that touches the `raft` crate's RawNode.
//!
//! A [`Replica`] runs one member of one Raft group on a dedicated thread. It knows
//! nothing of keys or configurations: it orders the commands of its
//! [`StateMachine`]'s type through the log (encoded as protobuf) and hands each
//! committed command to the state machine, which writes into an
//! [`ApplyBatch`] that is committed atomically with the applied index. Callers
//! propose commands and await the state machine's response, or ask for a
//! linearizable read point (Raft ReadIndex, or the leader lease it renews) and then
//! read the state machine.

mod driver;
#[cfg(test)]
mod memory;
mod network;
#[cfg(test)]
mod tests;

use crate::storage::{ApplyBatch, SmStore};
use raft::prelude::{ConfChange, ConfChangeType, ConfState};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

pub use driver::start;
pub use network::{NetEvent, Transport};

/// A deterministic state machine replicated by Raft.
pub trait StateMachine: Send + Sync + 'static {
    /// What is proposed and applied; the log holds it protobuf-encoded.
    type Command: prost::Message + Default + Send + 'static;
    /// What applying a command returns to the proposer.
    type Response: Send + 'static;

    /// Applies the committed command at log position `index`. Every durable effect
    /// goes into `batch`; the same command applied on every replica must produce the
    /// same writes and response. A command this build does not understand is
    /// refused, before anything is written, and stops the replica.
    fn apply(
        &mut self,
        index: u64,
        command: Self::Command,
        batch: &mut ApplyBatch,
    ) -> Result<Self::Response, UnknownCommand>;

    /// Rebuilds in-memory state from `store`: at start-up and after a snapshot from the
    /// leader replaced the store's contents.
    fn restore(&mut self, store: &SmStore) -> anyhow::Result<()>;
}

/// A committed log entry this build does not understand: written by a newer release
/// (a command or op it does not know), or corrupt. Skipping it would let this
/// replica's state drift from the replicas that apply it, so the replica stops with
/// this error instead, and the entry stays in the log for a build that knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "log entry {index} holds {what}: stopping rather than skip it \
     (was it written by a newer release?)"
)]
pub struct UnknownCommand {
    pub index: u64,
    pub what: String,
}

impl UnknownCommand {
    pub fn new(index: u64, what: impl Into<String>) -> UnknownCommand {
        UnknownCommand {
            index,
            what: what.into(),
        }
    }
}

/// Tuning of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// This node's id (non-zero, unique within the group).
    pub id: u64,
    /// The Raft group: 0 for the shard master, the gid for a kv group.
    pub group: u64,
    /// Interval of one Raft tick.
    pub tick: Duration,
    /// Test only (a clock-rate fault): this replica ticks `tick_multiplier` times as
    /// often as `tick` says, while its lease still counts in `tick`s. 1.0 otherwise.
    pub tick_multiplier: f64,
    /// Ticks without a heartbeat before a follower campaigns (randomised up to 2x).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log once it holds this many applied entries (keeping half of them
    /// for followers that are only slightly behind).
    pub compact_threshold: u64,
    /// Compact the log once its applied entries hold this many bytes, as far as every
    /// live member has it (see `Driver::maybe_compact`).
    pub compact_log_bytes: u64,
    /// How long a proposal or read may wait before it fails with [`ReplicaError::Timeout`].
    pub request_timeout: Duration,
}

impl ReplicaOptions {
    pub fn new(id: u64, group: u64) -> ReplicaOptions {
        ReplicaOptions {
            id,
            group,
            tick: Duration::from_millis(100),
            tick_multiplier: 1.0,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_threshold: 10_000,
            compact_log_bytes: 16 << 20,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// How often the Raft clock really ticks: `tick`, unless a test skews it.
    pub fn tick_interval(&self) -> Duration {
        self.tick.div_f64(self.tick_multiplier)
    }
}

/// Why a proposal or read did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// This replica is not the leader; retry at the leader. For a proposal this also
    /// means the outcome is unknown if it was already in the log (it may still commit).
    #[error("not the leader (leader: {})", leader_display(*leader_id, leader_addr))]
    NotLeader {
        leader_id: u64,
        leader_addr: Option<String>,
    },
    /// No answer within the request timeout (no quorum, or an election is under way).
    /// The outcome of a proposal is unknown.
    #[error("timed out waiting for the Raft group")]
    Timeout,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    ConfChange(String),
    /// The replica has stopped (shutdown or a fatal storage error).
    #[error("replica stopped")]
    Stopped,
}

fn leader_display(id: u64, addr: &Option<String>) -> String {
    match (id, addr) {
        (0, _) => "unknown, election under way".to_owned(),
        (id, Some(addr)) => format!("node {id} at {addr}"),
        (id, None) => format!("node {id}"),
    }
}

/// A membership change of the group.
#[derive(Debug, Clone)]
pub enum MembershipChange {
    /// Adds a non-voting learner that receives the log (and a snapshot).
    AddLearner {
        id: u64,
        addr: String,
    },
    /// Makes a node a voter (a learner that caught up, or a brand-new node).
    AddVoter {
        id: u64,
        addr: String,
    },
    Remove {
        id: u64,
    },
}

impl MembershipChange {
    fn into_conf_change(self) -> (ConfChange, Vec<u8>) {
        let mut cc = ConfChange::default();
        let context = match self {
            MembershipChange::AddLearner { id, addr } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = id;
                addr.into_bytes()
            }
            MembershipChange::AddVoter { id, addr } => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                addr.into_bytes()
            }
            MembershipChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
                Vec::new()
            }
        };
        cc.context = context.clone().into();
        (cc, context)
    }
}

/// The Raft role of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Leader => "leader",
        }
    }
}

/// A point-in-time view of a replica, refreshed after every Raft step.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub conf_state: ConfState,
    /// Address of every known member.
    pub peers: BTreeMap<u64, String>,
    /// Raft messages dropped because a peer's queue was full.
    pub dropped_messages: u64,
    /// On the leader: how far each member's log matches the leader's.
    pub progress: BTreeMap<u64, PeerProgress>,
    /// This node was removed from the group and has stopped.
    pub removed: bool,
    /// On the leader: the end of its read lease, if it holds one.
    pub lease_until: Option<Instant>,
}

/// The leader's view of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProgress {
    /// Highest log index known to be replicated on the member.
    pub matched: u64,
    /// The leader heard from the member within the last three heartbeat intervals.
    pub recent_active: bool,
}

impl ReplicaStatus {
    /// The error to return when this replica cannot serve a leader-only request.
    pub fn not_leader(&self) -> ReplicaError {
        ReplicaError::NotLeader {
            leader_id: self.leader_id,
            leader_addr: self.peers.get(&self.leader_id).cloned(),
        }
    }

    /// On the leader: members it has not heard from lately.
    pub fn unreachable(&self) -> Vec<u64> {
        self.progress
            .iter()
            .filter(|(_, p)| !p.recent_active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// True if `id` is a learner (it replicates but does not vote).
    pub fn is_learner(&self, id: u64) -> bool {
        self.conf_state.learners.contains(&id)
    }

    /// The view served by the shard master's and kvnodes' status RPCs.
    pub fn to_proto(&self) -> crate::proto::ReplicaStatus {
        let role = if self.is_learner(self.id) {
            "learner"
        } else {
            self.role.as_str()
        };
        crate::proto::ReplicaStatus {
            id: self.id,
            addr: self.peers.get(&self.id).cloned().unwrap_or_default(),
            role: role.to_owned(),
            term: self.term,
            leader_id: self.leader_id,
            commit_index: self.commit_index,
            applied_index: self.applied_index,
            first_log_index: self.first_log_index,
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            unreachable: self.unreachable(),
            lease_remaining_ms: self.lease_until.map_or(0, |until| {
                until.saturating_duration_since(Instant::now()).as_millis() as u64
            }),
        }
    }
}

pub(crate) enum Request<S: StateMachine> {
    Propose {
        command: Vec<u8>,
        reply: oneshot::Sender<Result<S::Response, ReplicaError>>,
    },
    ChangeMembership {
        change: MembershipChange,
        reply: oneshot::Sender<Result<ConfState, ReplicaError>>,
    },
    Read {
        reply: oneshot::Sender<Result<(), ReplicaError>>,
    },
    TransferLeader {
        to: u64,
    },
}

/// The leader lease as the driver last published it: callers read on it without a
/// round trip to the driver's thread (TiKV's local reader). The driver publishes it
/// after every step and ends it at once where a new leader could come sooner.
#[derive(Debug, Default)]
struct LeaseView(Mutex<Option<Instant>>);

impl LeaseView {
    fn set(&self, until: Option<Instant>) {
        *self.0.lock().expect("poisoned") = until;
    }

    fn holds(&self) -> bool {
        self.0
            .lock()
            .expect("poisoned")
            .is_some_and(|until| Instant::now() < until)
    }
}

/// Handle to a running replica. Cloning is cheap.
pub struct Replica<S: StateMachine> {
    requests: mpsc::Sender<Request<S>>,
    state: Arc<RwLock<S>>,
    status: watch::Receiver<ReplicaStatus>,
    lease: Arc<LeaseView>,
    timeout: Duration,
}

impl<S: StateMachine> Clone for Replica<S> {
    fn clone(&self) -> Self {
        Replica {
            requests: self.requests.clone(),
            state: self.state.clone(),
            status: self.status.clone(),
            lease: self.lease.clone(),
            timeout: self.timeout,
        }
    }
}

impl<S: StateMachine> Replica<S> {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ReplicaError>>) -> Request<S>,
    ) -> Result<T, ReplicaError> {
        let (tx, rx) = oneshot::channel();
        let work = async {
            self.requests
                .send(make(tx))
                .await
                .map_err(|_| ReplicaError::Stopped)?;
            rx.await.map_err(|_| ReplicaError::Stopped)?
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(ReplicaError::Timeout))
    }

    /// Orders `command` through the Raft log and returns what the state machine's
    /// `apply` answered. Only the leader accepts proposals.
    pub async fn propose(
        &self,
        command: impl Into<S::Command>,
    ) -> Result<S::Response, ReplicaError> {
        let command = prost::Message::encode_to_vec(&command.into());
        self.call(|reply| Request::Propose { command, reply }).await
    }

    /// Waits until this replica is confirmed leader (Raft ReadIndex, or within the
    /// lease a recent ReadIndex round gave it) and has applied everything committed
    /// before the call. A read of the state machine after this
    /// returns is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ReplicaError> {
        if self.lease.holds() {
            crate::metrics::metrics().raft.lease_reads.inc();
            return Ok(());
        }
        self.call(|reply| Request::Read { reply }).await
    }

    /// Proposes a membership change and returns the group's conf state after it applied.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<ConfState, ReplicaError> {
        self.call(|reply| Request::ChangeMembership { change, reply })
            .await
    }

    /// Asks the leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ReplicaError> {
        self.requests
            .send(Request::TransferLeader { to })
            .await
            .map_err(|_| ReplicaError::Stopped)
    }

    /// The state machine, for reads. Hold the guard briefly: apply waits for it.
    pub fn state(&self) -> RwLockReadGuard<'_, S> {
        self.state.read().expect("state machine lock poisoned")
    }

    /// The latest status.
    pub fn status(&self) -> ReplicaStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status updates (for waiting on a role or index).
    pub fn watch_status(&self) -> watch::Receiver<ReplicaStatus> {
        self.status.clone()
    }

    /// Resolves when the replica has stopped: removed from its group, or a fatal
    /// storage error.
    pub async fn stopped(&self) {
        let mut status = self.status.clone();
        while status.changed().await.is_ok() {}
    }
}
