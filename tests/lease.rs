//! The leader lease at its edges: three ways a leader could serve a read from its
//! lease after another node had already made a newer value visible. Each test
//! arranges its interleaving with test-only faults (a delayed link, a slow disk, a
//! clock jump; `src/faults.rs`), lets one reader call the old leader over and over,
//! and fails if any read invoked after the newer value was acknowledged returned
//! the old one. ARCHITECTURE.md ("Leader lease") gives the reasoning for each fix.

mod common;

use common::faults::{blocked, start_faulty, At};
use common::{expect_within, rpc, rpc_within, KvCluster, KvOptions};
use shardkv::proto::membership_client::MembershipClient;
use shardkv::proto::testing::{LinkFault, NodeFaults};
use shardkv::proto::{GetRequest, PutRequest, RequestId, TransferLeaderRequest};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
/// A read of the old leader is abandoned after this long, so the reader keeps
/// probing while reads that need a quorum hang.
const PROBE_LIMIT: Duration = Duration::from_millis(150);

/// `groups` groups of three with Raft ticks of `tick_ms` (the lease lasts 8 ticks,
/// elections come after 10 to 20), holding `key` = `v1`; returns the cluster and
/// group 1's leader.
async fn group_with_value(key: &[u8], groups: u64, tick_ms: u64) -> (KvCluster, usize) {
    let cluster = start_faulty(KvOptions {
        masters: 1,
        groups,
        tick_ms,
        ..Default::default()
    });
    cluster.join(&(1..=groups).collect::<Vec<_>>()).await;
    cluster.wait_settled(WAIT).await;
    cluster.client().put(key, b"v1").await.expect("put v1");
    let leader = cluster.wait_leader(1, WAIT).await;
    (cluster, leader)
}

/// Reads `key` at node `i` of group 1 until `stop`, recording (invoked, value) of
/// every read that was answered.
struct Prober {
    stop: AtomicBool,
    answered: Mutex<Vec<(Instant, Vec<u8>)>>,
    calls: Mutex<u64>,
}

impl Prober {
    fn new() -> Prober {
        Prober {
            stop: AtomicBool::new(false),
            answered: Mutex::new(Vec::new()),
            calls: Mutex::new(0),
        }
    }

    async fn run(&self, cluster: &KvCluster, i: usize, key: &[u8]) {
        for _ in 0..1_000_000 {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let invoked = Instant::now();
            let mut client = cluster.kv(1, i);
            let read = rpc_within(PROBE_LIMIT, client.get(GetRequest { key: key.to_vec() })).await;
            *self.calls.lock().unwrap() += 1;
            if let Ok(reply) = read {
                self.answered
                    .lock()
                    .unwrap()
                    .push((invoked, reply.into_inner().value));
            }
        }
    }

    /// Stops at `deadline` (past the end of any lease the old leader could hold),
    /// once at least 3 more reads were invoked.
    async fn stop_at(&self, deadline: Instant) {
        let base = *self.calls.lock().unwrap();
        tokio::time::sleep_until(deadline.into()).await;
        expect_within(WAIT, "reads of the old leader after the ack", || async {
            *self.calls.lock().unwrap() >= base + 3
        })
        .await;
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Fails if a read invoked after `acked` returned `old`.
    fn assert_none_stale(&self, start: Instant, acked: Instant, old: &[u8]) {
        let ms = |t: Instant| t.saturating_duration_since(start).as_millis();
        let answered = self.answered.lock().unwrap();
        let stale: Vec<u128> = answered
            .iter()
            .filter(|(invoked, value)| *invoked > acked && value == old)
            .map(|(invoked, _)| ms(*invoked))
            .collect();
        let last_answer = answered.iter().map(|(invoked, _)| ms(*invoked)).max();
        println!(
            "{} reads invoked, {} answered (the last invoked at {last_answer:?} ms); the \
             newer value was acknowledged at {} ms",
            self.calls.lock().unwrap(),
            answered.len(),
            ms(acked)
        );
        assert!(
            stale.is_empty(),
            "the old leader served the old value to {} reads invoked after the newer \
             value was acknowledged at {} ms: the first at {} ms, the last at {} ms",
            stale.len(),
            ms(acked),
            stale[0],
            stale[stale.len() - 1]
        );
    }
}

/// Waits until group 1's leader `i` holds a lease with at least 2 s left (of 2.4 s:
/// tick 300 ms), renewing it by reading.
async fn fresh_lease(cluster: &KvCluster, i: usize) {
    expect_within(WAIT, "a fresh lease at the leader", || async {
        let _ = rpc(cluster.kv(1, i).get(GetRequest { key: b"k".to_vec() })).await;
        let left = cluster
            .node_status(1, i)
            .await
            .map_or(0, |s| s.replica.map_or(0, |r| r.lease_remaining_ms));
        left >= 2000
    })
    .await;
}

/// Puts `key` = `value` at whichever of `nodes` (of group 1) leads, until one
/// acknowledges it.
async fn put_at(cluster: &KvCluster, nodes: &[usize], key: &[u8], value: &[u8]) -> Instant {
    let id = RequestId {
        client_id: rand::random::<u64>() | 1,
        seq: 1,
        first_incomplete: 1,
    };
    expect_within(WAIT, "the put acknowledged by the new leader", || async {
        for &i in nodes {
            let request = PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                id: Some(id),
            };
            if rpc(cluster.kv(1, i).put(request)).await.is_ok() {
                return true;
            }
        }
        false
    })
    .await;
    Instant::now()
}

/// Finding 1: a leader that started a transfer sent MsgTimeoutNow, which arrived
/// late; meanwhile it gave the transfer up and went back to its lease, renewed by
/// rounds confirmed during the transfer. The transferee was elected with votes that
/// ignore leases and acknowledged a write while the old leader still served reads.
#[tokio::test]
async fn aborted_leader_transfer_does_not_bring_back_a_lease() {
    let (cluster, a) = group_with_value(b"k", 1, 100).await;
    let (b, c) = ((a + 1) % 3, (a + 2) % 3);
    // A→B is slow: B still hears from A within its election timeout, and the
    // MsgTimeoutNow of the transfer reaches it 900 ms after it was sent.
    let slow = LinkFault {
        peer_addr: cluster.addr(1, b).to_owned(),
        delay_ms: 900,
        ..Default::default()
    };
    cluster.set_faults(At::Kv(1, a), vec![slow], false).await;
    let prober = Prober::new();
    let start = Instant::now();
    let scenario = async {
        // The transfer answers only once it is over: let it run on its own.
        let mut membership = MembershipClient::new(common::grpc_channel(cluster.addr(1, a)));
        let to = b as u64 + 1;
        let transfer = tokio::spawn(async move {
            let _ = membership
                .transfer_leader(TransferLeaderRequest { to })
                .await;
        });
        // Reads at A meanwhile are confirmed by C. Just before the MsgTimeoutNow
        // arrives, B and C stop reaching A: A learns nothing of B's election.
        tokio::time::sleep_until((start + Duration::from_millis(780)).into()).await;
        cluster
            .set_faults(At::Kv(1, b), vec![blocked(cluster.addr(1, a))], false)
            .await;
        cluster
            .set_faults(At::Kv(1, c), vec![blocked(cluster.addr(1, a))], false)
            .await;
        let acked = put_at(&cluster, &[b], b"k", b"v2").await;
        // A gives the transfer up one election timeout after it began; its old lease
        // would have lasted until about 1.6 s.
        prober.stop_at(acked + Duration::from_secs(1)).await;
        let _ = transfer.await;
        acked
    };
    let ((), acked) = tokio::join!(prober.run(&cluster, a, b"k"), scenario);
    prober.assert_none_stale(start, acked, b"v1");
    cluster.heal_all().await;
    assert_eq!(
        cluster.client().get(b"k").await.expect("get"),
        Some(b"v2".to_vec())
    );
}

/// Finding 2: a follower that confirmed the leader's lease round was killed and
/// restarted; knowing no leader, it voted at once for a node cut off from the
/// leader, which was elected and acknowledged a write inside the old lease.
#[tokio::test]
async fn restarted_follower_does_not_vote_inside_the_lease_it_confirmed() {
    // Ticks of 300 ms: a 2.4 s lease leaves room for a restart inside it.
    let (mut cluster, a) = group_with_value(b"k", 1, 300).await;
    let (b, c) = ((a + 1) % 3, (a + 2) % 3);
    // C is cut off from A; A's rounds are confirmed by B alone.
    cluster.cut(At::Kv(1, a), At::Kv(1, c)).await;
    cluster.cut(At::Kv(1, c), At::Kv(1, a)).await;
    fresh_lease(&cluster, a).await;
    let start = Instant::now();
    // Then A and B lose each other, and B is killed and restarted at once.
    cluster.cut(At::Kv(1, a), At::Kv(1, b)).await;
    cluster.kill9(1, b);
    cluster.restart(1, b);
    expect_within(WAIT, "the restarted node answers", || async {
        cluster.node_status(1, b).await.is_ok()
    })
    .await;
    cluster.cut(At::Kv(1, b), At::Kv(1, a)).await;
    let booted = Instant::now();
    // C's election timer fires (any moment is possible: it has not heard from A
    // for a while); only B's vote can elect it (or, later, C's can elect B).
    let fire = NodeFaults {
        fire_election_timer: true,
        ..Default::default()
    };
    cluster.set_node_faults(At::Kv(1, c), fire).await;
    let prober = Prober::new();
    let scenario = async {
        let acked = put_at(&cluster, &[b, c], b"k", b"v2").await;
        prober.stop_at(acked + Duration::from_secs(3)).await;
        acked
    };
    let ((), acked) = tokio::join!(prober.run(&cluster, a, b"k"), scenario);
    println!(
        "B answered {} ms after A's lease round; C acknowledged at {} ms",
        booted.duration_since(start).as_millis(),
        acked.duration_since(start).as_millis()
    );
    prober.assert_none_stale(start, acked, b"v1");
}

/// Finding 3: followers apply an entry as soon as the leader's messages say it is
/// committed, which can be before the leader's own (slow) persist and apply. A
/// range frozen at the followers moved to its new owner, which acknowledged a
/// write, while the leader still served the range from its lease.
#[tokio::test]
async fn lease_reads_see_what_followers_applied_and_handed_on() {
    // Ticks of 300 ms: a 2.4 s lease leaves room for a move inside it.
    let (cluster, a) = group_with_value(b"k", 2, 300).await;
    let owner = cluster.latest_config().await.expect("config").owner(b"k").1;
    assert_eq!(owner, 1, "k starts on group 1");
    fresh_lease(&cluster, a).await;
    // Its disk becomes slow: each persist (its own entries, the commit index) waits
    // 600 ms, well inside its followers' election timeout.
    let slow_disk = NodeFaults {
        persist_delay_ms: 600,
        ..Default::default()
    };
    cluster.set_node_faults(At::Kv(1, a), slow_disk).await;
    let start = Instant::now();
    let prober = Prober::new();
    let scenario = async {
        cluster
            .master_client()
            .move_range(b"k", 2)
            .await
            .expect("move k to group 2");
        let acked = async {
            let mut client = cluster.client();
            client.put(b"k", b"v2").await.expect("put v2 at group 2");
            Instant::now()
        }
        .await;
        prober.stop_at(acked + Duration::from_secs(3)).await;
        acked
    };
    let ((), acked) = tokio::join!(prober.run(&cluster, a, b"k"), scenario);
    prober.assert_none_stale(start, acked, b"v1");
    cluster
        .set_node_faults(At::Kv(1, a), NodeFaults::default())
        .await;
    assert_eq!(
        cluster.client().get(b"k").await.expect("get"),
        Some(b"v2".to_vec())
    );
}

/// The lease counts on every member of a group refusing votes as long as the
/// leader's own election timeout: a member restarted with another `--tick-ms` is
/// refused by the others, says why in its log, and catches up once it runs the
/// group's timing again.
#[tokio::test]
async fn member_with_other_raft_timing_is_refused_and_says_why() {
    let (mut cluster, a) = group_with_value(b"k", 1, 100).await;
    let f = (a + 1) % 3;
    let set_tick = |tick: &'static str| {
        move |args: &mut Vec<String>| {
            let at = args
                .iter()
                .position(|a| a == "--tick-ms")
                .expect("--tick-ms");
            args[at + 1] = tick.to_owned();
        }
    };
    cluster.kill9(1, f);
    cluster.restart_with(1, f, set_tick("200"));
    expect_within(WAIT, "the refusal in the node's log", || async {
        cluster
            .group(1)
            .proc(f)
            .log()
            .contains("must run the same --tick-ms")
    })
    .await;
    cluster.client().put(b"k", b"v2").await.expect("put v2");
    let leader_applied = cluster
        .must_node_status(1, a)
        .await
        .replica
        .map_or(0, |r| r.applied_index);
    let applied = cluster
        .must_node_status(1, f)
        .await
        .replica
        .map_or(0, |r| r.applied_index);
    assert!(
        applied < leader_applied,
        "the node with other timing applied {applied}, as far as the leader ({leader_applied})"
    );
    cluster.kill9(1, f);
    cluster.restart_with(1, f, set_tick("100"));
    cluster.wait_caught_up(1, f, WAIT).await;
}
