//! Unit tests of the driver's lease and ReadIndex reads: a group of three replicas
//! on an in-memory network, in one process.

use super::memory::MemoryNetwork;
use super::{start, Replica, ReplicaError, ReplicaOptions, Role, StateMachine, UnknownCommand};
use crate::storage::{ApplyBatch, Engine, Identity, SmStore};
use crate::transport::EVENT_QUEUE;
use raft::prelude::ConfState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const TICK: Duration = Duration::from_millis(20);
const ELECTION_TICKS: usize = 15;
/// Longer than any wait on the group in a healthy test, bounded.
const PATIENCE: Duration = Duration::from_secs(20);

/// Keeps the last command applied under one key.
struct Register;

impl StateMachine for Register {
    type Command = Vec<u8>;
    type Response = u64;

    fn apply(
        &mut self,
        index: u64,
        command: Vec<u8>,
        batch: &mut ApplyBatch,
    ) -> Result<u64, UnknownCommand> {
        batch.put(b"value".to_vec(), command);
        Ok(index)
    }

    fn restore(&mut self, _store: &SmStore) -> anyhow::Result<()> {
        Ok(())
    }
}

const IDS: [u64; 3] = [1, 2, 3];

struct Group {
    network: MemoryNetwork,
    replicas: BTreeMap<u64, Replica<Register>>,
    stores: BTreeMap<u64, SmStore>,
    dirs: BTreeMap<u64, TempDir>,
    compaction: Compaction,
}

/// When the replicas compact their logs: after this many entries or bytes.
#[derive(Clone, Copy)]
struct Compaction {
    entries: u64,
    bytes: u64,
}

fn options(id: u64, compaction: Compaction) -> ReplicaOptions {
    ReplicaOptions {
        tick: TICK,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: 2,
        compact_threshold: compaction.entries,
        compact_log_bytes: compaction.bytes,
        request_timeout: Duration::from_millis(500),
        ..ReplicaOptions::new(id, 1)
    }
}

/// The lease a confirmed ReadIndex round gives (`Driver::lease_duration`).
fn lease_duration() -> Duration {
    TICK * (ELECTION_TICKS as u32 - 2)
}

impl Group {
    /// Starts a new group of three voters that compact after `compact_threshold`
    /// entries (and the default bytes).
    fn start(compact_threshold: u64) -> Group {
        Group::start_compacting(Compaction {
            entries: compact_threshold,
            bytes: ReplicaOptions::new(1, 1).compact_log_bytes,
        })
    }

    fn start_compacting(compaction: Compaction) -> Group {
        let mut group = Group {
            network: MemoryNetwork::default(),
            replicas: BTreeMap::new(),
            stores: BTreeMap::new(),
            dirs: BTreeMap::new(),
            compaction,
        };
        for id in IDS {
            group.dirs.insert(id, tempfile::tempdir().unwrap());
            group.start_replica(id);
        }
        group
    }

    /// Starts replica `id` on its data directory (bootstrapping the group's
    /// membership in a fresh one).
    fn start_replica(&mut self, id: u64) {
        let identity = Identity {
            cluster: "test".into(),
            role: "kvnode".into(),
            group: 1,
            node: id,
        };
        let engine = Engine::open(self.dirs[&id].path(), &identity).unwrap();
        let fresh = engine.is_fresh();
        let (raft_store, sm_store) = engine.into_stores().unwrap();
        if fresh {
            let peers = IDS.iter().map(|id| (*id, format!("mem-{id}"))).collect();
            let conf_state = ConfState {
                voters: IDS.to_vec(),
                ..Default::default()
            };
            raft_store.bootstrap(&conf_state, &peers).unwrap();
        }
        let (events_tx, events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let transport = self.network.connect(id, events_tx, sm_store.clone());
        let replica = start(
            options(id, self.compaction),
            raft_store,
            sm_store.clone(),
            Register,
            transport,
            events,
            slog::Logger::root(slog::Discard, slog::o!()),
        )
        .unwrap();
        self.replicas.insert(id, replica);
        self.stores.insert(id, sm_store);
    }

    /// Stops replica `id`, waits until its thread has let go of its storage, and
    /// starts it again on the same directory.
    async fn restart(&mut self, id: u64) {
        let mut status = self.replicas.remove(&id).unwrap().watch_status();
        self.stores.remove(&id);
        self.network.disconnect(id);
        while status.changed().await.is_ok() {}
        self.start_replica(id);
    }

    fn replica(&self, id: u64) -> &Replica<Register> {
        &self.replicas[&id]
    }

    /// Waits until one of `among` leads in a term after `after`, and returns it.
    async fn leader(&self, among: &[u64], after: u64) -> u64 {
        wait_until("a leader", || {
            among.iter().copied().find(|id| {
                let s = self.replica(*id).status();
                s.role == Role::Leader && s.term > after
            })
        })
        .await
    }

    /// Waits until the leader `id` has applied an entry of its term, so that it may
    /// serve reads at all.
    async fn settled_leader(&self) -> u64 {
        let leader = self.leader(&IDS, 0).await;
        self.replica(leader)
            .propose(b"first".to_vec())
            .await
            .unwrap();
        leader
    }

    /// Stops every replica and waits until their threads are done with the stores.
    async fn stop(self) {
        let mut statuses: Vec<_> = self.replicas.values().map(|r| r.watch_status()).collect();
        drop(self.replicas);
        drop(self.stores);
        for status in &mut statuses {
            while status.changed().await.is_ok() {}
        }
    }
}

/// Polls `check` until it yields a value, failing the test after [`PATIENCE`].
async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Records the latest end of `replica`'s lease it ever published.
fn track_lease(replica: &Replica<Register>) -> Arc<Mutex<Option<Instant>>> {
    let latest = Arc::new(Mutex::new(None));
    let mut status = replica.watch_status();
    let record = latest.clone();
    tokio::spawn(async move {
        loop {
            if let Some(until) = status.borrow_and_update().lease_until {
                let mut latest = record.lock().unwrap();
                *latest = latest.max(Some(until));
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    latest
}

/// Garbled log bytes are a typed error (which stops the replica), not a command.
#[test]
fn garbled_entries_are_an_unknown_command() {
    // A length-delimited field whose length runs past the end.
    let garbled = [0x0a, 0x05, 0x01];
    let error = super::driver::decode_command::<Vec<u8>>(7, &garbled).unwrap_err();
    assert_eq!(error.index, 7);
    assert!(
        error.what.starts_with("bytes that do not decode"),
        "{error}"
    );
    assert_eq!(
        super::driver::decode_command::<Vec<u8>>(8, &[0x0a, 0x01, b'x']),
        Ok(b"x".to_vec())
    );
}

#[tokio::test]
async fn a_read_renews_the_lease_and_later_reads_are_served_on_it_without_a_quorum() {
    // A run too slow to read before its lease ends proves nothing: it tries again, on
    // a fresh group, a bounded number of times.
    for _ in 0..10 {
        let group = Group::start(10_000);
        let leader = group.settled_leader().await;
        let replica = group.replica(leader);
        // A ReadIndex round, confirmed by a majority, gives the leader its lease.
        replica.read_barrier().await.unwrap();
        let until = wait_until("a lease", || replica.status().lease_until).await;
        assert!(until <= Instant::now() + lease_duration());
        // Cut off from every follower, the leader can confirm nothing: the next read
        // is answered by the lease alone.
        group.network.isolate(leader);
        let started = Instant::now();
        let read = replica.read_barrier().await;
        let in_lease = started < until;
        if in_lease {
            read.expect("a read within the lease is served without the followers");
        }
        group.stop().await;
        if in_lease {
            return;
        }
    }
    panic!("no read started within the lease in 10 tries");
}

#[tokio::test]
async fn a_cut_off_leader_stops_serving_reads_once_its_lease_could_have_ended() {
    let group = Group::start(10_000);
    let leader = group.settled_leader().await;
    let replica = group.replica(leader);
    replica.read_barrier().await.unwrap();
    group.network.isolate(leader);
    // No round can be confirmed after the cut, so no lease outlives this.
    let latest_end = Instant::now() + lease_duration();
    let deadline = Instant::now() + PATIENCE;
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "the cut-off leader kept serving reads"
        );
        let started = Instant::now();
        match replica.read_barrier().await {
            Ok(()) => assert!(
                started < latest_end,
                "a read served {:?} after the lease could have ended",
                started - latest_end
            ),
            Err(e) => break e,
        }
    };
    // Its ReadIndex rounds go unanswered until it steps down (check quorum).
    assert!(
        matches!(
            error,
            ReplicaError::Timeout | ReplicaError::NotLeader { .. }
        ),
        "{error:?}"
    );
    let status = wait_until("the step-down", || {
        let s = replica.status();
        (s.role != Role::Leader).then_some(s)
    })
    .await;
    assert_eq!(status.lease_until, None);
    assert!(matches!(
        replica.read_barrier().await,
        Err(ReplicaError::NotLeader { .. })
    ));
    group.stop().await;
}

#[tokio::test]
async fn a_new_leader_is_elected_only_after_the_old_lease_ended_and_the_old_leader_redirects() {
    let group = Group::start(10_000);
    let old = group.settled_leader().await;
    let old_term = group.replica(old).status().term;
    let old_lease = track_lease(group.replica(old));
    group.replica(old).read_barrier().await.unwrap();
    group.network.isolate(old);
    let others: Vec<u64> = IDS.into_iter().filter(|id| *id != old).collect();
    let new = group.leader(&others, old_term).await;
    let elected_by = Instant::now();
    let old_end = old_lease
        .lock()
        .unwrap()
        .expect("the old leader held a lease");
    assert!(
        old_end <= elected_by,
        "node {new} was elected while node {old}'s lease ran for {:?} more",
        old_end - elected_by
    );
    // The new leader serves reads once it has applied an entry of its term.
    group
        .replica(new)
        .propose(b"second".to_vec())
        .await
        .unwrap();
    group.replica(new).read_barrier().await.unwrap();
    // Back on the network, the deposed leader learns of the new one and sends its
    // readers there.
    group.network.heal(old);
    wait_until("the old leader to follow", || {
        (group.replica(old).status().leader_id == new).then_some(())
    })
    .await;
    match group.replica(old).read_barrier().await {
        Err(ReplicaError::NotLeader {
            leader_id,
            leader_addr,
        }) => {
            assert_eq!(leader_id, new);
            assert_eq!(leader_addr, Some(format!("mem-{new}")));
        }
        other => panic!("expected a redirect to node {new}, got {other:?}"),
    }
    group.stop().await;
}

#[tokio::test]
async fn a_follower_behind_the_compacted_log_catches_up_from_a_streamed_snapshot() {
    let group = Group::start(20);
    let leader = group.settled_leader().await;
    let lagging = IDS.into_iter().find(|id| *id != leader).unwrap();
    group.network.isolate(lagging);
    for i in 0..60u32 {
        let command = format!("write-{i}").into_bytes();
        group.replica(leader).propose(command).await.unwrap();
    }
    let leader_status = group.replica(leader).status();
    assert!(leader_status.first_log_index > group.replica(lagging).status().applied_index + 1);
    group.network.heal(lagging);
    wait_until("the follower to catch up", || {
        (group.replica(lagging).status().applied_index >= leader_status.applied_index).then_some(())
    })
    .await;
    assert_eq!(
        group.stores[&lagging].get(b"value").unwrap(),
        Some(b"write-59".to_vec())
    );
    group.stop().await;
}

#[tokio::test]
async fn large_entries_are_compacted_by_bytes_once_every_live_member_has_them() {
    const ENTRY: usize = 32 << 10;
    let group = Group::start_compacting(Compaction {
        entries: 10_000,
        bytes: 8 * ENTRY as u64,
    });
    let leader = group.settled_leader().await;
    let slow = IDS.into_iter().find(|id| *id != leader).unwrap();
    // An isolated member is not live: the leader does not keep the log for it.
    group.network.isolate(slow);
    wait_until("the leader to see the isolated member gone", || {
        let s = group.replica(leader).status();
        (!s.progress[&slow].recent_active).then_some(())
    })
    .await;
    // Fewer than the 4x bound's 32 entries: only the live members' progress allows
    // compacting them.
    for i in 0..28u8 {
        group.replica(leader).propose(vec![i; ENTRY]).await.unwrap();
    }
    let status = group.replica(leader).status();
    let kept = status.applied_index + 1 - status.first_log_index;
    assert!(
        kept <= 10,
        "the leader kept {kept} entries of {ENTRY} bytes after 28 (bound: 8 entries' bytes)"
    );
    for id in IDS.into_iter().filter(|id| *id != slow) {
        let s = wait_until("the live follower to apply every write", || {
            let s = group.replica(id).status();
            (s.applied_index >= status.applied_index).then_some(s)
        })
        .await;
        assert!(
            s.applied_index + 1 - s.first_log_index <= 10,
            "replica {id} kept {} entries",
            s.applied_index + 1 - s.first_log_index
        );
    }
    group.network.heal(slow);
    wait_until("the isolated member to catch up", || {
        (group.replica(slow).status().applied_index >= status.applied_index).then_some(())
    })
    .await;
    assert_eq!(
        group.stores[&slow].get(b"value").unwrap(),
        Some(vec![27u8; ENTRY])
    );
    group.stop().await;
}

#[tokio::test]
async fn a_restarted_follower_grants_no_vote_inside_the_lease_it_confirmed() {
    let mut group = Group::start(10_000);
    let a = group.settled_leader().await;
    let (b, c) = match IDS.into_iter().filter(|id| *id != a).collect::<Vec<_>>()[..] {
        [b, c] => (b, c),
        _ => unreachable!("three voters"),
    };
    let a_term = group.replica(a).status().term;
    let a_lease = track_lease(group.replica(a));
    // C is cut off from A, so A's lease round is confirmed by B alone.
    group.network.cut(a, c);
    group.replica(a).read_barrier().await.unwrap();
    // Then B loses A and restarts at once, knowing no leader; C campaigns. Only
    // B's vote can elect C, and B must not give it inside the lease it confirmed.
    group.network.cut(a, b);
    group.restart(b).await;
    group.network.fire_election_timer(c);
    let new = group.leader(&[b, c], a_term).await;
    let elected_by = Instant::now();
    let a_end = a_lease.lock().unwrap().expect("A held a lease");
    assert!(
        a_end <= elected_by,
        "node {new} was elected while node {a}'s lease ran for {:?} more",
        a_end - elected_by
    );
    group.stop().await;
}
