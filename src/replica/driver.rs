//! The Ready loop. Follows the order raft-rs requires (its five_mem_node example):
//! send leader messages, install a snapshot, persist entries and hard state (one
//! fsync), send the messages that needed persistence, apply committed entries,
//! advance, then repeat for the light ready.

use super::{
    LeaseView, NetEvent, PeerProgress, ReplicaError, ReplicaOptions, ReplicaStatus, Request, Role,
    StateMachine, Transport, UnknownCommand,
};
use crate::metrics::metrics;
use crate::storage::{RaftStore, SmStore, StagedSnapshot};
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use slog::{error, info, warn, Logger};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

use super::Replica;

/// Requests handled per loop iteration at most, so ticks are never starved.
const MAX_REQUESTS_PER_STEP: usize = 1024;
/// Requests queued before callers wait.
const REQUEST_QUEUE: usize = 4096;

type ReadWaiter = oneshot::Sender<Result<(), ReplicaError>>;

enum Pending<R> {
    Command(oneshot::Sender<Result<R, ReplicaError>>),
    ConfChange(oneshot::Sender<Result<ConfState, ReplicaError>>),
}

struct Driver<S: StateMachine> {
    node: RawNode<RaftStore>,
    store: RaftStore,
    sm_store: SmStore,
    sm: Arc<RwLock<S>>,
    transport: Arc<dyn Transport>,
    logger: Logger,
    options: ReplicaOptions,
    /// Proposals awaiting their apply, by log index, with the term they were proposed in.
    pending: HashMap<u64, (u64, Pending<S::Response>)>,
    /// ReadIndex requests sent to Raft, by request id, with the term and time sent.
    reads_in_flight: HashMap<u64, (u64, Instant, Vec<ReadWaiter>)>,
    next_read_id: u64,
    /// Reads confirmed by the leader, waiting for the apply of their read index.
    reads_confirmed: VecDeque<(u64, Vec<ReadWaiter>)>,
    /// Reads received this step, sent to Raft as one ReadIndex (or served under
    /// the lease).
    read_batch: Vec<ReadWaiter>,
    /// (term, until): while it holds, this leader serves reads at its applied index
    /// without a ReadIndex round. See [`Driver::renew_lease`].
    lease: Option<(u64, Instant)>,
    /// A term in which this leader sent MsgTimeoutNow: no lease for the rest of it.
    /// The transferee campaigns with votes that ignore leases whenever the message
    /// arrives, even after the transfer was given up here (etcd issue 12704).
    no_lease_term: u64,
    /// Ticks since this replica started: it grants no vote for an election timeout
    /// of them ([`Driver::refuses_votes`]).
    ticks_since_start: usize,
    /// The lease as callers see it ([`Driver::usable_lease`]), so they can read without
    /// a round trip to this thread.
    lease_view: Arc<LeaseView>,
    /// A received snapshot staged on disk, until Raft hands it back for install.
    staged_snapshot: Option<StagedSnapshot>,
    applied: u64,
    /// Term of the entry at `applied`.
    applied_term: u64,
    /// A conf change removed this node: stop after this step.
    removed: bool,
    /// When a message from each peer last arrived: who is alive, as this node sees it.
    last_heard: HashMap<u64, Instant>,
    peers: std::collections::BTreeMap<u64, String>,
    status: watch::Sender<ReplicaStatus>,
}

/// A committed entry's command; bytes that do not decode are an [`UnknownCommand`].
pub(super) fn decode_command<C: prost::Message + Default>(
    index: u64,
    data: &[u8],
) -> Result<C, UnknownCommand> {
    C::decode(data)
        .map_err(|e| UnknownCommand::new(index, format!("bytes that do not decode ({e})")))
}

/// Starts the replica of `options.id` on its own thread and returns its handle.
///
/// `events` carries what the transport receives for this group (the receiver of
/// the channel the transport reports to).
pub fn start<S: StateMachine>(
    options: ReplicaOptions,
    store: RaftStore,
    sm_store: SmStore,
    mut sm: S,
    transport: Arc<dyn Transport>,
    events: mpsc::Receiver<NetEvent>,
    logger: Logger,
) -> anyhow::Result<Replica<S>> {
    sm.restore(&sm_store)?;
    let applied_state = sm_store.applied_state()?;
    let raft_config = raft::Config {
        id: options.id,
        election_tick: options.election_ticks,
        heartbeat_tick: options.heartbeat_ticks,
        applied: applied_state.index,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_config.validate()?;
    let node = RawNode::new(&raft_config, store.clone(), &logger)?;
    crate::logging::set_term(node.raft.term);
    for (id, addr) in &applied_state.peers {
        if *id != options.id {
            transport.set_peer(*id, addr);
        }
    }
    let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let sm = Arc::new(RwLock::new(sm));
    let initial_status = ReplicaStatus {
        id: options.id,
        role: Role::Follower,
        term: node.raft.term,
        leader_id: 0,
        commit_index: node.raft.raft_log.committed,
        applied_index: applied_state.index,
        first_log_index: store.first_index(),
        conf_state: applied_state.conf_state.clone(),
        peers: applied_state.peers.clone(),
        dropped_messages: 0,
        progress: Default::default(),
        removed: false,
        lease_until: None,
    };
    let (status_tx, status_rx) = watch::channel(initial_status);
    let timeout = options.request_timeout;
    let lease_view = Arc::new(LeaseView::default());
    let driver = Driver {
        node,
        store,
        sm_store,
        sm: sm.clone(),
        transport,
        logger: logger.clone(),
        options,
        pending: HashMap::new(),
        reads_in_flight: HashMap::new(),
        next_read_id: 1,
        reads_confirmed: VecDeque::new(),
        read_batch: Vec::new(),
        lease: None,
        no_lease_term: 0,
        ticks_since_start: 0,
        lease_view: lease_view.clone(),
        staged_snapshot: None,
        applied: applied_state.index,
        applied_term: applied_state.term,
        removed: false,
        last_heard: HashMap::new(),
        peers: applied_state.peers,
        status: status_tx,
    };
    std::thread::Builder::new()
        .name(format!("raft-{}", driver.options.id))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("driver runtime");
            if let Err(e) = runtime.block_on(driver.run(requests, events)) {
                // Storage failures leave the node unable to keep its promises: stop.
                error!(logger, "replica stopped on a fatal error"; "error" => %e);
            }
        })?;
    Ok(Replica {
        requests: requests_tx,
        state: sm,
        status: status_rx,
        lease: lease_view,
        timeout,
    })
}

impl<S: StateMachine> Driver<S> {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request<S>>,
        mut events: mpsc::Receiver<NetEvent>,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(self.options.tick_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.node.tick();
                    self.ticks_since_start = self.ticks_since_start.saturating_add(1);
                    self.injected_clock_jump();
                    self.expire_abandoned_reads();
                }
                request = requests.recv() => match request {
                    Some(r) => self.on_request(r),
                    None => return Ok(()),
                },
                event = events.recv() => match event {
                    Some(e) => self.on_event(e)?,
                    None => return Ok(()),
                },
            }
            for _ in 0..MAX_REQUESTS_PER_STEP {
                match requests.try_recv() {
                    Ok(r) => self.on_request(r),
                    Err(_) => break,
                }
            }
            for _ in 0..MAX_REQUESTS_PER_STEP {
                match events.try_recv() {
                    Ok(e) => self.on_event(e)?,
                    Err(_) => break,
                }
            }
            self.flush_reads();
            self.on_ready()?;
            self.publish_status();
            if self.removed {
                self.store.mark_removed()?;
                error!(
                    self.logger,
                    "this node was removed from its group; stopping"
                );
                self.fail_leader_work();
                return Ok(());
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> ReplicaError {
        let leader_id = self.node.raft.leader_id;
        ReplicaError::NotLeader {
            leader_id,
            leader_addr: self.peers.get(&leader_id).cloned(),
        }
    }

    fn on_request(&mut self, request: Request<S>) {
        match request {
            Request::Propose { command, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let before = self.node.raft.raft_log.last_index();
                metrics().raft.proposed_commands.inc();
                let _ = self.node.propose(Vec::new(), command);
                self.track(before, Pending::Command(reply));
            }
            Request::ChangeMembership { change, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let before = self.node.raft.raft_log.last_index();
                let (cc, context) = change.into_conf_change();
                metrics().raft.proposed_membership_changes.inc();
                let _ = self.node.propose_conf_change(context, cc);
                self.track(before, Pending::ConfChange(reply));
            }
            Request::Read { reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                self.read_batch.push(reply);
            }
            Request::TransferLeader { to } => {
                if self.is_leader() {
                    // The transferee is elected at once, whatever the followers' leases.
                    self.end_lease();
                    self.node.transfer_leader(to);
                }
            }
        }
    }

    /// Remembers a proposal's reply under the index Raft gave it, or answers at once if
    /// Raft dropped it (for example during a leader transfer).
    fn track(&mut self, before: u64, pending: Pending<S::Response>) {
        let index = self.node.raft.raft_log.last_index();
        if index == before {
            let err = self.not_leader();
            match pending {
                Pending::Command(reply) => drop(reply.send(Err(err))),
                Pending::ConfChange(reply) => drop(reply.send(Err(err))),
            }
            return;
        }
        self.pending.insert(index, (self.node.raft.term, pending));
    }

    fn flush_reads(&mut self) {
        if self.read_batch.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.read_batch);
        let reads = &metrics().raft;
        if let Some(index) = self.lease_read_index() {
            reads.lease_reads.inc_by(waiters.len() as u64);
            self.reads_confirmed.push_back((index, waiters));
            // Usually applied already: answer now, not at the next Ready.
            self.release_reads();
            return;
        }
        reads.read_index_reads.inc_by(waiters.len() as u64);
        let id = self.next_read_id;
        self.next_read_id += 1;
        self.node.read_index(id.to_be_bytes().to_vec());
        self.reads_in_flight
            .insert(id, (self.node.raft.term, Instant::now(), waiters));
    }

    /// How long a confirmed ReadIndex round lets this leader serve reads on its own.
    ///
    /// A follower that answered a heartbeat sent at `t` refuses to vote (or pre-vote)
    /// for another candidate until `election_ticks` of its ticks have passed since it
    /// received it (raft-rs with check_quorum), and its ticks are never faster than
    /// the tick interval; so no other leader can be elected by a majority before
    /// `t + (election_ticks - 1) * tick`. One more tick is a margin for clock rates.
    /// A leadership transfer skips the followers' check: it ends the lease first.
    fn lease_duration(&self) -> Duration {
        let ticks = self.options.election_ticks.saturating_sub(2) as u32;
        self.options.tick * ticks
    }

    /// A ReadIndex round sent at `sent` in `term` was confirmed by a majority.
    fn renew_lease(&mut self, term: u64, sent: Instant) {
        if !self.is_leader() || self.node.raft.term != term || self.no_lease_term == term {
            return;
        }
        let until = sent + self.lease_duration();
        if self.lease.is_none_or(|(t, old)| t != term || old < until) {
            self.lease = Some((term, until));
        }
    }

    /// The end of the lease, if reads may be served on it now: this replica leads in
    /// the lease's term, has sent no MsgTimeoutNow in it, no transfer is under way,
    /// and it has applied an entry of its term, so its applied state holds every write
    /// committed before the term. A read that waits for the apply of the commit index
    /// and reads before the end is linearizable.
    fn usable_lease(&self) -> Option<Instant> {
        let (term, until) = self.lease?;
        let raft = &self.node.raft;
        let usable = self.is_leader()
            && term == raft.term
            && self.no_lease_term != term
            && raft.lead_transferee.is_none()
            && self.applied_term == raft.term;
        usable.then_some(until)
    }

    /// The index a read may be served at without asking the followers: the commit
    /// index, not the applied one. Followers apply what the leader has committed as
    /// soon as its messages reach them, possibly before the leader's own fsync and
    /// apply, and their effects can become visible elsewhere (a frozen range handed
    /// to its new owner, which then acknowledges writes).
    fn lease_read_index(&self) -> Option<u64> {
        let until = self.usable_lease()?;
        (Instant::now() < until).then_some(self.node.raft.raft_log.committed)
    }

    /// The lease callers may read on without this thread: only while everything
    /// committed is applied (see [`Driver::lease_read_index`]).
    fn local_lease(&self) -> Option<Instant> {
        let caught_up = self.node.raft.raft_log.committed <= self.applied;
        self.usable_lease().filter(|_| caught_up)
    }

    /// A restarted replica forgets which leader it heard from last, so raft-rs would
    /// grant votes at once; a leader's lease counts on every follower that confirmed
    /// it refusing votes for an election timeout. So grant none for an election
    /// timeout of its own ticks after starting (TiKV issue 15035), counted as raft-rs
    /// counts that of a follower that knows its leader.
    fn refuses_votes(&self, msg: &Message) -> bool {
        matches!(
            msg.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) && self.ticks_since_start < self.options.election_ticks
    }

    /// Ends the lease at once, for callers too: before anything that lets another
    /// leader be elected sooner than the lease assumed.
    fn end_lease(&mut self) {
        self.lease = None;
        self.lease_view.set(None);
    }

    /// Raft silently ignores a ReadIndex it cannot serve (a new leader that has not yet
    /// committed in its term): forget reads whose callers have given up.
    fn expire_abandoned_reads(&mut self) {
        self.reads_in_flight.retain(|_, (_, _, waiters)| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty()
        });
    }

    fn on_event(&mut self, event: NetEvent) -> anyhow::Result<()> {
        match event {
            NetEvent::Message(msg) => {
                self.last_heard.insert(msg.from, Instant::now());
                if self.refuses_votes(&msg) {
                    return Ok(());
                }
                if let Err(e) = self.node.step(msg) {
                    warn!(self.logger, "dropped a Raft message"; "error" => %e);
                }
            }
            NetEvent::Snapshot {
                message,
                staged,
                done,
            } => {
                self.staged_snapshot = Some(staged);
                if let Err(e) = self.node.step(message) {
                    warn!(self.logger, "dropped a snapshot message"; "error" => %e);
                }
                // Install before telling the sender, so that a following snapshot cannot
                // stage over this one.
                self.on_ready()?;
                self.staged_snapshot = None;
                let _ = done.send(());
            }
            NetEvent::Unreachable(to) => self.node.report_unreachable(to),
            NetEvent::SnapshotSent { to, ok } => {
                let status = if ok {
                    metrics().raft.snapshots_sent_ok.inc();
                    SnapshotStatus::Finish
                } else {
                    metrics().raft.snapshots_sent_failed.inc();
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
        }
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for msg in messages {
            if msg.get_msg_type() == MessageType::MsgTimeoutNow {
                self.no_lease_term = self.node.raft.term;
                self.end_lease();
            }
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                match self.store.take_outgoing(msg.to) {
                    Some(snapshot) => self.transport.send_snapshot(msg, snapshot),
                    None => warn!(self.logger, "snapshot message without data"; "to" => msg.to),
                }
            } else {
                self.transport.send(msg);
            }
        }
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        if self.node.raft.raft_log.committed > self.applied {
            // These messages may tell followers of commits not yet applied here: no
            // local lease reads until they are (see `lease_read_index`).
            self.lease_view.set(None);
        }
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
        }
        for rs in ready.take_read_states() {
            let id = u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some((term, sent, waiters)) = self.reads_in_flight.remove(&id) {
                self.renew_lease(term, sent);
                self.reads_confirmed.push_back((rs.index, waiters));
            }
        }
        let committed = ready.take_committed_entries();
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.injected_disk_stall();
        }
        self.store.persist(ready.entries(), ready.hs())?;
        if let Some(ss) = ready.ss() {
            if ss.raft_state != StateRole::Leader {
                self.fail_leader_work();
            }
            info!(self.logger, "raft role"; "role" => ?ss.raft_state, "leader" => ss.leader_id, "term" => self.node.raft.term);
        }
        self.apply(committed)?;
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    /// Test only: a slow disk, stalling this thread as a slow fsync would.
    fn injected_disk_stall(&self) {
        if let Some(delay) = self.transport.faults().and_then(|f| f.persist_delay()) {
            std::thread::sleep(delay);
        }
    }

    /// Test only: a clock that jumped forward fires the election timer now. Ticks
    /// until raft-rs campaigns, at most twice the election timeout (its randomised
    /// maximum).
    fn injected_clock_jump(&mut self) {
        if !self
            .transport
            .faults()
            .is_some_and(|f| f.take_election_timer_fire())
        {
            return;
        }
        for _ in 0..2 * self.options.election_ticks {
            if self.node.raft.state != StateRole::Follower {
                break;
            }
            self.node.tick();
        }
    }

    /// After losing leadership nothing in flight can be answered by this replica.
    fn fail_leader_work(&mut self) {
        self.end_lease();
        let err = self.not_leader();
        for (_, (_, pending)) in self.pending.drain() {
            match pending {
                Pending::Command(reply) => drop(reply.send(Err(err.clone()))),
                Pending::ConfChange(reply) => drop(reply.send(Err(err.clone()))),
            }
        }
        let reads = self
            .reads_in_flight
            .drain()
            .flat_map(|(_, (_, _, w))| w)
            .chain(self.reads_confirmed.drain(..).flat_map(|(_, w)| w))
            .chain(self.read_batch.drain(..));
        for waiter in reads {
            let _ = waiter.send(Err(err.clone()));
        }
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> anyhow::Result<()> {
        let index = snapshot.get_metadata().index;
        let staged = match self.staged_snapshot.take() {
            Some(staged) if staged.index() == index => staged,
            _ => anyhow::bail!("Raft asked to install snapshot {index}, which was not received"),
        };
        self.store.install_snapshot(snapshot, staged)?;
        let applied = self.sm_store.applied_state()?;
        self.sm.write().expect("poisoned").restore(&self.sm_store)?;
        for (id, addr) in &applied.peers {
            if *id != self.options.id {
                self.transport.set_peer(*id, addr);
            }
        }
        self.peers = applied.peers;
        self.applied = index;
        self.applied_term = snapshot.get_metadata().term;
        metrics().raft.snapshots_received.inc();
        info!(self.logger, "installed snapshot"; "index" => index);
        Ok(())
    }

    /// Applies committed entries one at a time, committing each entry's writes with
    /// its index before the next: a state machine that reads while applying then sees
    /// every earlier entry, however entries were grouped into Readys (which differs
    /// between replicas). These commits are not fsynced; the log is.
    fn apply(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let sm_lock = self.sm.clone();
        for entry in entries {
            let position = (entry.index, entry.term);
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let mut batch = self.sm_store.batch();
                    let response = if entry.data.is_empty() {
                        None
                    } else {
                        let command = decode_command::<S::Command>(entry.index, &entry.data)?;
                        let mut sm = sm_lock.write().expect("poisoned");
                        Some(sm.apply(entry.index, command, &mut batch)?)
                    };
                    self.sm_store.commit(batch, position, None)?;
                    self.applied = entry.index;
                    self.applied_term = entry.term;
                    self.answer(entry.index, entry.term, response);
                }
                EntryType::EntryConfChange => {
                    let result = self.apply_conf_change(&entry)?;
                    self.applied = entry.index;
                    self.applied_term = entry.term;
                    self.answer_conf_change(entry.index, entry.term, result);
                }
                EntryType::EntryConfChangeV2 => {
                    anyhow::bail!("joint-consensus conf changes are not proposed by this driver")
                }
            }
        }
        Ok(())
    }

    fn answer(&mut self, index: u64, term: u64, response: Option<S::Response>) {
        let Some((proposed_term, pending)) = self.pending.remove(&index) else {
            return;
        };
        let result = match response {
            Some(r) if proposed_term == term => Ok(r),
            // Another leader's entry took this index: ours was lost.
            _ => Err(self.not_leader()),
        };
        match pending {
            Pending::Command(reply) => drop(reply.send(result)),
            Pending::ConfChange(reply) => {
                let _ = reply.send(Err(ReplicaError::ConfChange(
                    "another membership change was in progress".into(),
                )));
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> anyhow::Result<Result<ConfState, String>> {
        let cc = ConfChange::parse_from_bytes(&entry.data)?;
        let cs = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                // Deterministic on every replica: the change is refused, membership stays.
                self.sm_store
                    .commit(self.sm_store.batch(), (entry.index, entry.term), None)?;
                return Ok(Err(e.to_string()));
            }
        };
        // The majority that confirmed the lease was one of the old configuration.
        self.end_lease();
        let addr = String::from_utf8_lossy(&cc.context).into_owned();
        let peer = (!addr.is_empty()).then_some((cc.node_id, addr.as_str()));
        self.sm_store.commit(
            self.sm_store.batch(),
            (entry.index, entry.term),
            Some((&cs, peer)),
        )?;
        self.store.set_conf_state(cs.clone());
        if let Some((id, addr)) = peer {
            self.peers.insert(id, addr.to_owned());
            if id != self.options.id {
                self.transport.set_peer(id, addr);
            }
        }
        if cc.get_change_type() == raft::prelude::ConfChangeType::RemoveNode {
            self.transport.remove_peer(cc.node_id);
            self.removed |= cc.node_id == self.options.id;
        }
        info!(self.logger, "membership changed"; "voters" => ?cs.voters, "learners" => ?cs.learners);
        Ok(Ok(cs))
    }

    fn answer_conf_change(&mut self, index: u64, term: u64, result: Result<ConfState, String>) {
        let Some((proposed_term, pending)) = self.pending.remove(&index) else {
            return;
        };
        let result = if proposed_term != term {
            Err(self.not_leader())
        } else {
            result.map_err(ReplicaError::ConfChange)
        };
        match pending {
            Pending::ConfChange(reply) => drop(reply.send(result)),
            Pending::Command(reply) => drop(reply.send(Err(self.not_leader()))),
        }
    }

    fn release_reads(&mut self) {
        while let Some((index, _)) = self.reads_confirmed.front() {
            if *index > self.applied {
                break;
            }
            let (_, waiters) = self.reads_confirmed.pop_front().expect("front exists");
            for w in waiters {
                let _ = w.send(Ok(()));
            }
        }
    }

    /// Compacts the log by count, keeping half of it for followers slightly behind,
    /// and by bytes: large entries (a move's chunks) are dropped while still in the
    /// engine's memtable, so they are never also written to a table, as soon as every
    /// live follower has them. A log past four times its byte bound is compacted even
    /// under a slow follower, which then catches up from a snapshot.
    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        let first = self.store.first_index();
        let mut to = 0;
        if self.applied + 1 >= first + self.options.compact_threshold {
            to = self.applied - self.options.compact_threshold / 2;
        }
        let bytes = self.store.bytes_through(self.applied);
        if bytes > 4 * self.options.compact_log_bytes {
            to = self.applied;
        } else if bytes > self.options.compact_log_bytes {
            to = to.max(self.applied.min(self.slowest_live_match()));
        }
        if to >= first {
            self.store.compact_to(to)?;
        }
        Ok(())
    }

    /// The lowest index every live member's log holds (on a follower, which serves
    /// no one its log: its applied index).
    fn slowest_live_match(&self) -> u64 {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return self.applied;
        }
        let window = self.liveness_window();
        raft.prs()
            .iter()
            .filter(|(id, _)| {
                **id != self.options.id
                    && self
                        .last_heard
                        .get(id)
                        .is_some_and(|t| t.elapsed() < window)
            })
            .map(|(_, p)| p.matched)
            .min()
            .unwrap_or(self.applied)
    }

    /// A live peer answers every heartbeat; three missed ones mean it is gone. (Raft's
    /// own recent_active is refreshed only once per election timeout: too stale to
    /// decide whether removing a member leaves a live majority.)
    fn liveness_window(&self) -> Duration {
        self.options.tick * (3 * self.options.heartbeat_ticks as u32)
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        crate::logging::set_term(raft.term);
        let m = &metrics().raft;
        m.term.set(raft.term as i64);
        m.commit_index.set(raft.raft_log.committed as i64);
        m.applied_index.set(self.applied as i64);
        let role = match raft.state {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Leader => Role::Leader,
        };
        m.set_role(role);
        let conf_state = raft.prs().conf().to_conf_state();
        let window = self.liveness_window();
        let progress: std::collections::BTreeMap<u64, PeerProgress> = if role == Role::Leader {
            raft.prs()
                .iter()
                .map(|(id, p)| {
                    let heard = self
                        .last_heard
                        .get(id)
                        .is_some_and(|t| t.elapsed() < window);
                    (
                        *id,
                        PeerProgress {
                            matched: p.matched,
                            recent_active: heard || *id == self.options.id,
                        },
                    )
                })
                .collect()
        } else {
            Default::default()
        };
        let lease_until = self.usable_lease();
        self.lease_view.set(self.local_lease());
        self.status.send_if_modified(|s| {
            let changed = s.role != role
                || s.term != raft.term
                || s.leader_id != raft.leader_id
                || s.commit_index != raft.raft_log.committed
                || s.applied_index != self.applied
                || s.conf_state != conf_state
                || s.peers != self.peers
                || s.progress != progress
                || s.removed != self.removed
                || s.lease_until != lease_until;
            if s.leader_id != raft.leader_id && raft.leader_id != 0 {
                m.leader_changes.inc();
            }
            s.role = role;
            s.term = raft.term;
            s.leader_id = raft.leader_id;
            s.commit_index = raft.raft_log.committed;
            s.applied_index = self.applied;
            s.first_log_index = self.store.first_index();
            s.conf_state = conf_state.clone();
            s.peers = self.peers.clone();
            s.dropped_messages = self.transport.dropped();
            s.progress = progress;
            s.removed = self.removed;
            s.lease_until = lease_until;
            changed
        });
    }
}
