//! Jepsen-style end-to-end tests: real `shardmaster` and `kvnode` processes with
//! test-only fault injection (cut links, loss, delay) on their Raft traffic and
//! range transfers, plus kill -9, while concurrent recorded clients run: raw test
//! clients and tasks sharing one product `Client` (batching, retries, write
//! window), recorded into one history. Every
//! scenario checks the history for linearizability and that no acknowledged write
//! was lost (`common::faults::Workload::finish`), and prints its seed
//! (`SHARDKV_SEED=<n>` replays the clients' choices; faults and timing still vary).
//!
//! What tests/kvnode.rs covers already is not repeated here: static ranges, join
//! and leave without concurrency, kill -9 of everything, a node killed through
//! several configs, large transfers in chunks, transfer resumption after leader
//! kills (without a recorded history), a SIGSTOPped leader.
//!
//! `soak` runs randomized faults for `SHARDKV_SOAK_SECS` seconds (skipped unless set).

mod common;

use common::faults::{seed, start_faulty, At, Workload, WorkloadOptions};
use common::{describe_node, expect_within, rpc, KvCluster, KvOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardkv::proto::testing::faults_client::FaultsClient;
use shardkv::proto::testing::{GetFaultsRequest, LinkFault};
use shardkv::proto::{Config, GetRequest, RangeState};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(20);
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const PROGRESS_WAIT: Duration = Duration::from_secs(30);
/// Operations the clients must complete between steps, so every step overlaps traffic.
const PROGRESS: u64 = 15;

fn options(masters: usize, groups: u64) -> KvOptions {
    KvOptions {
        masters,
        groups,
        ..Default::default()
    }
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Joins group 1, splits at `splits`, joins `more` and waits until every group serves.
async fn bootstrap(cluster: &KvCluster, splits: &[&str], more: &[u64]) -> Config {
    cluster.join(&[1]).await;
    let mut mc = cluster.master_client();
    for sp in splits {
        mc.split(sp.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("split {sp}: {e}"));
    }
    if !more.is_empty() {
        cluster.join(more).await;
    }
    cluster.wait_settled(SETTLE_WAIT).await
}

async fn owner(cluster: &KvCluster, key: &str) -> u64 {
    let c = cluster.latest_config().await.expect("latest config");
    c.owner(key.as_bytes()).1
}

/// The Faults service exists only on servers started with the hidden flag.
#[tokio::test]
async fn fault_service_exists_only_with_the_hidden_flag() {
    let tiny = KvOptions {
        masters: 1,
        groups: 1,
        replicas: 1,
        ..Default::default()
    };
    let plain = KvCluster::start(tiny.clone());
    let faulty = start_faulty(tiny);
    for (cluster, enabled) in [(&plain, false), (&faulty, true)] {
        for at in [At::Master(0), At::Kv(1, 0)] {
            let addr = cluster.node_addr(at);
            let answer = Mutex::new(None);
            expect_within(LEADER_WAIT, &format!("{at:?} to answer"), || async {
                let mut c = FaultsClient::new(common::grpc_channel(&addr));
                let r = rpc(c.get_faults(GetFaultsRequest {})).await;
                let done = match &r {
                    Ok(_) => true,
                    Err(e) => !common::is_transport_failure(e) || e.code() == Code::Unimplemented,
                };
                *answer.lock().unwrap() = Some(r.map(|r| r.into_inner()));
                done
            })
            .await;
            let answer = answer.into_inner().unwrap().expect("answered");
            if enabled {
                let reply = answer.unwrap_or_else(|e| panic!("GetFaults on {at:?}: {e:?}"));
                assert!(reply.faults.is_empty(), "{at:?} starts with faults");
            } else {
                let e = answer.expect_err("Faults answered without the flag");
                assert_eq!(e.code(), Code::Unimplemented, "{at:?}: {e:?}");
            }
        }
    }
    // A rule is kept, reported back, and a bad probability is refused.
    let mut c = FaultsClient::new(common::grpc_channel(&faulty.node_addr(At::Kv(1, 0))));
    let rule = LinkFault {
        peer_addr: "127.0.0.1:9".into(),
        blocked: false,
        drop_probability: 0.5,
        delay_ms: 7,
    };
    let reply = rpc(c.set_faults(shardkv::proto::testing::SetFaultsRequest {
        faults: vec![rule.clone()],
        replace: true,
        ..Default::default()
    }))
    .await
    .expect("SetFaults")
    .into_inner();
    assert_eq!(reply.faults, vec![rule]);
    let bad = rpc(c.set_faults(shardkv::proto::testing::SetFaultsRequest {
        faults: vec![LinkFault {
            drop_probability: 1.5,
            ..Default::default()
        }],
        replace: false,
        ..Default::default()
    }))
    .await;
    assert_eq!(
        bad.expect_err("p=1.5 accepted").code(),
        Code::InvalidArgument
    );
    faulty.heal_all().await;
    // The flag is hidden from --help.
    for program in [
        env!("CARGO_BIN_EXE_kvnode"),
        env!("CARGO_BIN_EXE_shardmaster"),
    ] {
        let out = std::process::Command::new(program)
            .arg("--help")
            .output()
            .expect("run --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--data-dir"), "{program} --help: {help}");
        assert!(
            !help.contains("fault-injection"),
            "{program} --help shows the flag"
        );
    }
}

/// Clients keep going while groups join and leave, the shard master's leader is
/// killed in the middle of a Join (which then applies exactly once), and a whole
/// group is killed and restarted.
#[tokio::test]
async fn clients_through_joins_leaves_master_kill_mid_join_and_group_restart() {
    let seed = seed();
    let mut cluster = start_faulty(options(3, 3));
    bootstrap(&cluster, &["g", "n", "t"], &[]).await;
    let masters = cluster.masters().addrs().to_vec();
    let work = Workload::start(
        masters,
        WorkloadOptions::new(&["b0", "b1", "h0", "p0", "p1", "w0"], seed),
    )
    .await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;

    cluster.join(&[2]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "after joining group 2")
        .await;

    // Join group 3 while the master leader cannot replicate (its outbound links are
    // cut one way), then kill it: the client retries the same request at the new
    // leader, and the Join is applied once.
    let before = cluster.latest_config().await.expect("config").num;
    let leader = cluster.masters().wait_leader(LEADER_WAIT).await;
    for f in (0..3).filter(|&f| f != leader) {
        cluster.cut(At::Master(leader), At::Master(f)).await;
    }
    let spec = cluster.group(3).spec();
    let mut mc = cluster.master_client();
    let join = tokio::spawn(async move { mc.join(vec![spec]).await });
    // Fault timing, not synchronisation: let the request reach the leader, which
    // cannot commit it. (On a badly stalled machine the followers may elect a new
    // leader first and the retried Join finish before the kill; the exactly-once
    // checks below hold either way.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    let in_flight = !join.is_finished();
    cluster.masters_mut().kill9(leader);
    println!("killed master leader {leader} (Join still in flight: {in_flight})");
    let joined = join
        .await
        .expect("join task")
        .expect("Join after the leader was killed");
    cluster.masters_mut().start_stopped();
    assert_eq!(
        joined.num,
        before + 1,
        "the Join made config {}, expected {}",
        joined.num,
        before + 1
    );
    assert!(joined.groups.iter().any(|g| g.gid == 3));
    let settled = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(
        settled.num, joined.num,
        "a retried Join was applied more than once"
    );
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "after joining group 3")
        .await;

    cluster
        .master_client()
        .leave(vec![2])
        .await
        .expect("leave 2");
    cluster.wait_settled(SETTLE_WAIT).await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "after group 2 left")
        .await;

    // A whole group down and back (kill -9 of every node, same data).
    cluster.kill9_group(1);
    println!("killed every node of group 1");
    work.expect_progress(3, PROGRESS_WAIT, "with group 1 down")
        .await;
    for i in 0..3 {
        cluster.start_node(1, i);
    }
    cluster.wait_settled(SETTLE_WAIT).await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "after group 1 restarted")
        .await;

    cluster.heal_all().await;
    cluster.wait_settled(SETTLE_WAIT).await;
    work.finish("joins/leaves/restarts").await;
}

/// Configuration changes over a lossy, slow network; then a range transfer slowed
/// down on purpose, with the destination's leader and then the source's leader
/// killed while it is under way.
#[tokio::test]
async fn lossy_network_during_moves_and_leaders_killed_mid_transfer() {
    let seed = seed();
    let mut cluster = start_faulty(options(1, 2));
    bootstrap(&cluster, &["g", "n", "t"], &[2]).await;
    let masters = cluster.masters().addrs().to_vec();
    let work = Workload::start(
        masters.clone(),
        WorkloadOptions::new(&["b0", "h0", "h1", "p0", "w0"], seed),
    )
    .await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;

    cluster.set_loss(0.15, 4).await;
    let mut mc = cluster.master_client();
    for key in ["h", "b", "h"] {
        let from = owner(&cluster, key).await;
        let to = 3 - from;
        mc.move_range(key.as_bytes(), to).await.expect("move");
        cluster.wait_settled(SETTLE_WAIT).await;
        println!("moved {key} from {from} to {to} over the lossy network");
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "over the lossy network")
            .await;
    }
    let dropped = cluster.faults_dropped().await;
    assert!(dropped > 0, "fault injection dropped nothing");
    println!("dropped {dropped} batches/calls");
    cluster.heal_all().await;

    // A range of a few chunks (1 MiB each), pulled slowly.
    let (src, dst) = {
        let o = owner(&cluster, "p").await;
        (o, 3 - o)
    };
    let mut kv = cluster.client();
    let big: Vec<(Vec<u8>, Vec<u8>)> = (0..7)
        .map(|i| {
            let v: Vec<u8> = (0..300 << 10).map(|j| (i * 31 + j * 7) as u8).collect();
            (format!("q-big-{i}").into_bytes(), v)
        })
        .collect();
    for (k, v) in &big {
        kv.put(k, v).await.expect("put big value");
    }
    for d in cluster.group_nodes(dst) {
        let slow = cluster
            .group_nodes(src)
            .into_iter()
            .map(|at| LinkFault {
                peer_addr: cluster.node_addr(at),
                delay_ms: 700,
                ..Default::default()
            })
            .collect();
        cluster.set_faults(d, slow, false).await;
    }
    mc.move_range(b"p", dst).await.expect("move p");
    let pulling = Mutex::new(None);
    expect_within(SETTLE_WAIT, "the destination to be mid-pull", || async {
        let Some(l) = cluster.leader(dst).await else {
            return false;
        };
        let Ok(st) = cluster.node_status(dst, l).await else {
            return false;
        };
        let mid = st
            .ranges
            .iter()
            .any(|h| h.state() == RangeState::Pulling && !h.cursor.is_empty());
        if mid {
            *pulling.lock().unwrap() = Some((l, describe_node(&st)));
        }
        mid
    })
    .await;
    let (victim, view) = pulling.into_inner().unwrap().expect("seen");
    cluster.kill9(dst, victim);
    println!("killed group {dst}'s leader {victim} mid-pull: {view}");
    cluster.wait_leader(dst, LEADER_WAIT).await;
    cluster.start_node(dst, victim);
    let src_leader = cluster.wait_leader(src, LEADER_WAIT).await;
    let still_pulling = cluster
        .group_statuses(dst)
        .await
        .into_iter()
        .filter_map(|(_, st)| st.ok())
        .any(|st| st.ranges.iter().any(|h| h.state() == RangeState::Pulling));
    cluster.kill9(src, src_leader);
    println!(
        "killed group {src}'s leader {src_leader} (transfer still under way: {still_pulling})"
    );
    cluster.wait_leader(src, LEADER_WAIT).await;
    cluster.start_node(src, src_leader);
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "after the leader kills")
        .await;

    cluster.heal_all().await;
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(config.owner(b"p").1, dst);
    let mut kv = cluster.client();
    kv.deadline = Duration::from_secs(30);
    for (k, v) in &big {
        let got = kv.get(k).await.expect("get big value");
        assert!(got.as_ref() == Some(v), "{} changed in the transfer", s(k));
    }
    work.finish("lossy moves and mid-transfer kills").await;
}

/// A group's leader is cut off from the rest (a minority of one): it serves no
/// stale read, the majority elects a leader and keeps serving, and while it is cut
/// off the group goes through several configurations and compacts its log; healed,
/// the node catches up (from a snapshot) to the latest configuration.
#[tokio::test]
async fn minority_partition_serves_no_stale_read_and_catches_up_after_missed_configs() {
    let seed = seed();
    let mut cluster = start_faulty(options(1, 0));
    cluster.add_group_with(1, &["--compact-threshold", "60"]);
    cluster.add_group(2);
    bootstrap(&cluster, &["g", "n", "t"], &[]).await;
    let masters = cluster.masters().addrs().to_vec();
    let work = Workload::start(
        masters.clone(),
        WorkloadOptions::new(&["b0", "h0", "p0", "p1", "w0"], seed),
    )
    .await;
    let mut kv = cluster.client();
    kv.put(b"fresh", b"v1").await.expect("put v1");
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;

    let old = cluster.wait_leader(1, LEADER_WAIT).await;
    let old_status = cluster.must_node_status(1, old).await;
    let old_commit = old_status.replica.as_ref().expect("replica").commit_index;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    cluster.partition_group(1, &[&[old][..], &others[..]]).await;

    // The majority side elects a new leader and takes a new value.
    let new = Mutex::new(None);
    expect_within(LEADER_WAIT, "a leader on the majority side", || async {
        let statuses = cluster.group_statuses(1).await;
        let l = statuses.iter().find_map(|(i, st)| {
            let st = st.as_ref().ok()?;
            (others.contains(i) && st.replica.as_ref()?.role == "leader").then_some(*i)
        });
        *new.lock().unwrap() = l;
        l.is_some()
    })
    .await;
    kv.put(b"fresh", b"v2")
        .await
        .expect("put v2 on the majority");
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader cut off")
        .await;

    // The old leader must not answer with v1 (nor anything): it cannot confirm it
    // still leads.
    let mut answers = Vec::new();
    for _ in 0..5 {
        let r = rpc(cluster.kv(1, old).get(GetRequest {
            key: b"fresh".to_vec(),
        }))
        .await;
        match r {
            Ok(reply) => panic!(
                "the cut-off old leader answered a read: found {} value {:?}",
                reply.get_ref().found,
                s(&reply.get_ref().value)
            ),
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "unexpected answer from the cut-off old leader: {e:?}"
                );
                answers.push(format!("{:?}", e.code()));
            }
        }
    }
    println!("cut-off old leader {old} answered: {answers:?}");

    // Several configurations while node `old` is cut off.
    let start_num = cluster.latest_config().await.expect("config").num;
    cluster.join(&[2]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let mut mc = cluster.master_client();
    for key in ["b", "p"] {
        let from = owner(&cluster, key).await;
        mc.move_range(key.as_bytes(), 3 - from).await.expect("move");
        cluster.wait_settled(SETTLE_WAIT).await;
    }
    work.expect_progress(PROGRESS * 2, PROGRESS_WAIT, "while node is cut off")
        .await;
    // Enough writes to group 1 that its leader compacts what node `old` misses: it
    // must catch up from a snapshot sent through the healed links.
    let config = cluster.latest_config().await.expect("config");
    let g1_key = ["b", "h", "p", "w"]
        .into_iter()
        .find(|k| config.owner(k.as_bytes()).1 == 1)
        .expect("group 1 owns a range");
    let mut leader_status = cluster.wait_group_serving(1, SETTLE_WAIT).await;
    for n in 0..400 {
        let first = leader_status
            .replica
            .as_ref()
            .expect("replica")
            .first_log_index;
        if first > old_commit + 1 {
            break;
        }
        kv.put(format!("{g1_key}-fill-{n}").as_bytes(), b"x")
            .await
            .expect("fill put");
        if n % 20 == 19 {
            leader_status = cluster.wait_group_serving(1, SETTLE_WAIT).await;
        }
    }
    let end_num = leader_status.config_num;
    let first = leader_status
        .replica
        .as_ref()
        .expect("replica")
        .first_log_index;
    assert!(
        first > old_commit + 1,
        "group 1's log was not compacted past node {old}'s commit {old_commit}"
    );
    println!(
        "configs {start_num} -> {end_num} while node {old} was cut off at commit {old_commit}; \
         leader's log starts at {first}"
    );
    assert!(end_num >= start_num + 3);

    cluster.heal_all().await;
    let caught = cluster.wait_caught_up(1, old, SETTLE_WAIT).await;
    println!("node {old} caught up: {}", describe_node(&caught));
    assert_eq!(kv.get(b"fresh").await.expect("get"), Some(b"v2".to_vec()));
    cluster.wait_settled(SETTLE_WAIT).await;
    work.finish("minority partition").await;
}

/// The leader lease at its edge: a leader cut off with most of its lease left goes
/// on serving reads from it, and stops before the majority can elect another leader
/// and acknowledge a write. Every read of the cut-off leader is timed against that
/// acknowledgement: none invoked after it may return (it could only return the old
/// value).
#[tokio::test]
async fn cut_off_leader_stops_lease_reads_before_a_new_leader_acknowledges_a_write() {
    // The default tick, so the lease (8 ticks) and the election timeout (10 to 20)
    // are those of a production node.
    let cluster = start_faulty(KvOptions {
        tick_ms: 100,
        ..options(1, 1)
    });
    bootstrap(&cluster, &[], &[]).await;
    let mut kv = cluster.client();
    kv.put(b"lease", b"v1").await.expect("put v1");
    let old = cluster.wait_leader(1, LEADER_WAIT).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let read_old = || {
        let mut client = cluster.kv(1, old);
        async move {
            let started = Instant::now();
            let r = rpc(client.get(GetRequest {
                key: b"lease".to_vec(),
            }))
            .await
            .map(|r| r.into_inner());
            (started, Instant::now(), r)
        }
    };

    // Reads renew the lease once it has run out; cut the leader off while most of a
    // fresh lease is left, so the cut-off leader has a window to serve reads in.
    let fresh_ms = 600;
    expect_within(LEADER_WAIT, "a fresh lease at the leader", || async {
        let (_, _, r) = read_old().await;
        let left = match cluster.node_status(1, old).await {
            Ok(st) => st.replica.map_or(0, |r| r.lease_remaining_ms),
            Err(_) => 0,
        };
        r.is_ok_and(|r| r.value == b"v1") && left >= fresh_ms
    })
    .await;
    let cut = Instant::now();
    cluster.partition_group(1, &[&[old][..], &others[..]]).await;
    let cut_done = Instant::now();

    // One reader keeps calling the cut-off leader while the majority elects a leader
    // and takes v2.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = Mutex::new(Vec::new());
    let reader = async {
        for _ in 0..100_000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let read = read_old().await;
            reads.lock().unwrap().push(read);
        }
    };
    let writer = async {
        kv.put(b"lease", b"v2")
            .await
            .expect("put v2 on the majority");
        let acked = Instant::now();
        // Let the reader call the old leader a few more times after the ack.
        expect_within(
            LEADER_WAIT,
            "reads of the old leader after the ack",
            || async {
                reads
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(s, _, _)| *s > acked)
                    .count()
                    >= 3
            },
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        acked
    };
    let ((), acked) = tokio::join!(reader, writer);

    let reads = reads.into_inner().unwrap();
    let ms = |t: Instant| t.saturating_duration_since(cut).as_millis();
    let served: Vec<_> = reads.iter().filter(|(_, _, r)| r.is_ok()).collect();
    let last_served = served.iter().map(|(_, end, _)| *end).max();
    println!(
        "cut at 0 ms (links cut by {} ms): {} reads, {} served by the lease, the last \
         ending at {:?} ms; v2 acknowledged by the new leader at {} ms",
        ms(cut_done),
        reads.len(),
        served.len(),
        last_served.map(ms),
        ms(acked)
    );
    for (start, end, r) in &reads {
        match r {
            Ok(reply) => {
                assert!(
                    *start < acked,
                    "the cut-off leader answered a read invoked at {} ms, after v2 was \
                     acknowledged at {} ms, with {:?}",
                    ms(*start),
                    ms(acked),
                    s(&reply.value)
                );
                assert_eq!(reply.value, b"v1", "read at {} ms", ms(*start));
            }
            Err(e) => assert!(
                matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                "unexpected answer from the cut-off leader at {}-{} ms: {e:?}",
                ms(*start),
                ms(*end)
            ),
        }
    }
    assert!(
        served.iter().any(|(start, _, _)| *start > cut_done),
        "the cut-off leader served no read from its lease after the cut"
    );
    // The lease was last confirmed by a round sent before the links were cut, and
    // lasts 8 ticks from it: 2 ticks short of the earliest election, the margin for
    // clock rates. A read served later was served on a lease held too long.
    let lease = Duration::from_millis(800);
    for (start, _, _) in &served {
        assert!(
            *start < cut_done + lease,
            "the cut-off leader served a read invoked at {} ms, more than a lease after \
             the cut",
            ms(*start)
        );
    }
    cluster.heal_all().await;
    assert_eq!(kv.get(b"lease").await.expect("get"), Some(b"v2".to_vec()));
}

/// A group joins and takes one range from a live group and one from a dead group:
/// the range from the live group arrives and serves while the other is still
/// blocked, and ranges that do not move keep serving throughout.
#[tokio::test]
async fn dead_source_blocks_only_its_range_and_arrived_ranges_serve_first() {
    let seed = seed();
    let mut cluster = start_faulty(options(1, 3));
    // Six ranges, three per group; group 3 will take one from each.
    bootstrap(&cluster, &["d", "h", "n", "q", "t"], &[2]).await;
    let keys = ["b0", "e0", "j0", "o0", "r0", "w0"];
    let masters = cluster.masters().addrs().to_vec();
    let work = Workload::start(masters.clone(), WorkloadOptions::new(&keys, seed)).await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;

    cluster.kill9_group(2);
    println!("killed every node of group 2");
    let before = cluster.latest_config().await.expect("config");
    let after = cluster.join(&[3]).await;
    let gained: Vec<(&str, u64)> = keys
        .iter()
        .filter(|k| after.owner(k.as_bytes()).1 == 3)
        .map(|k| (*k, before.owner(k.as_bytes()).1))
        .collect();
    println!("group 3 gains {gained:?} (key, previous owner)");
    let from_live = gained.iter().find(|(_, g)| *g == 1).map(|(k, _)| *k);
    let from_dead = gained.iter().find(|(_, g)| *g == 2).map(|(k, _)| *k);
    let (Some(from_live), Some(from_dead)) = (from_live, from_dead) else {
        panic!("expected group 3 to take a range from each group: {gained:?}");
    };

    // The range from group 1 arrives and serves; the one from group 2 stays pulling.
    let view = Mutex::new(String::new());
    expect_within(
        SETTLE_WAIT,
        "the range from group 1 to serve on group 3",
        || async {
            let Some(l) = cluster.leader(3).await else {
                return false;
            };
            let Ok(st) = cluster.node_status(3, l).await else {
                return false;
            };
            *view.lock().unwrap() = describe_node(&st);
            let state_of = |key: &str| {
                st.ranges
                    .iter()
                    .find(|h| {
                        h.range.as_ref().is_some_and(|r| {
                            r.start.as_slice() <= key.as_bytes()
                                && (r.end.is_empty() || key.as_bytes() < r.end.as_slice())
                        })
                    })
                    .map(|h| h.state())
            };
            state_of(from_live) == Some(RangeState::Serving)
                && state_of(from_dead) == Some(RangeState::Pulling)
        },
    )
    .await;
    println!("group 3: {}", view.lock().unwrap());

    // Keys beside the hot ones (same ranges; not in the recorded history).
    let mut kv = cluster.client();
    kv.deadline = Duration::from_secs(10);
    for k in keys {
        let o = after.owner(k.as_bytes()).1;
        if o == 1 || k == from_live {
            let side = format!("{k}-side");
            kv.put(side.as_bytes(), b"while-blocked")
                .await
                .unwrap_or_else(|e| panic!("put {side} (group {o}) while group 2 is dead: {e}"));
            assert_eq!(
                kv.get(side.as_bytes()).await.expect("get"),
                Some(b"while-blocked".to_vec())
            );
        }
    }
    kv.deadline = Duration::from_millis(1500);
    let side = format!("{from_dead}-side");
    let blocked = kv.get(side.as_bytes()).await;
    assert!(
        blocked.is_err(),
        "{side} answered before its range arrived: {blocked:?}"
    );
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "with group 2 dead")
        .await;

    for i in 0..3 {
        cluster.start_node(2, i);
    }
    cluster.wait_settled(SETTLE_WAIT).await;
    work.finish("dead source group").await;
}

/// Randomized faults for `SHARDKV_SOAK_SECS` seconds; skipped unless it is set.
#[tokio::test]
async fn soak() {
    let Some(secs) = std::env::var("SHARDKV_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        println!("soak skipped: set SHARDKV_SOAK_SECS=<seconds> to run it");
        return;
    };
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = start_faulty(options(3, 3));
    bootstrap(&cluster, &["d", "h", "n", "q", "t"], &[2]).await;
    let keys = [
        "a0", "b0", "e0", "f0", "j0", "k0", "o0", "p0", "r0", "s0", "w0", "x0",
    ];
    let masters = cluster.masters().addrs().to_vec();
    let mut wo = WorkloadOptions::new(&keys, seed);
    wo.clients = 6;
    wo.product_tasks = 16;
    let work = Workload::start(masters, wo).await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;

    let until = Instant::now() + Duration::from_secs(secs);
    let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut group3_joined = false;
    let mut mc = cluster.master_client();
    mc.deadline = Duration::from_secs(10);
    while Instant::now() < until {
        let gids = if group3_joined {
            vec![1, 2, 3]
        } else {
            vec![1, 2]
        };
        let gid = gids[rng.random_range(0..gids.len())];
        let node = rng.random_range(0..3);
        let action = match rng.random_range(0..100) {
            0..15 => "kill",
            15..25 => "pause",
            25..40 => "partition",
            40..50 => "isolate-master",
            50..60 => "loss",
            60..65 => "kill-group",
            65..75 => "join-leave",
            75..90 => "move",
            _ => "kill-master",
        };
        *counts.entry(action).or_default() += 1;
        let hold = Duration::from_millis(rng.random_range(300..2500));
        match action {
            "kill" => cluster.kill9(gid, node),
            "pause" => cluster.pause(gid, node),
            "partition" => {
                let others: Vec<usize> = (0..3).filter(|&i| i != node).collect();
                cluster
                    .partition_group(gid, &[&[node][..], &others[..]])
                    .await;
            }
            "isolate-master" => cluster.isolate(At::Master(node)).await,
            "loss" => {
                let p = rng.random_range(0.05..0.3);
                cluster.set_loss(p, rng.random_range(0..10)).await;
            }
            "kill-group" => cluster.kill9_group(gid),
            "kill-master" => cluster.masters_mut().kill9(node),
            // Mostly live (the range serves while it moves), sometimes the
            // immediate kind; the faults above land in every phase of them.
            "join-leave" => {
                let live = rng.random_bool(0.75);
                // A live leave keeps the group in the configuration, marked leaving,
                // until its last range has moved: ask where it is now.
                let group3 = match cluster.latest_config().await {
                    Ok(c) => c.groups.iter().find(|g| g.gid == 3).map(|g| g.leaving),
                    Err(_) => group3_joined.then_some(false),
                };
                group3_joined = group3.is_some();
                let r = match (group3, live) {
                    (Some(true), _) => {
                        println!("group 3 is still leaving");
                        Ok(None)
                    }
                    (Some(false), true) => mc.leave_live(vec![3]).await.map(Some),
                    (Some(false), false) => mc.leave(vec![3]).await.map(Some),
                    (None, true) => mc.join_live(vec![cluster.group(3).spec()]).await.map(Some),
                    (None, false) => mc.join(vec![cluster.group(3).spec()]).await.map(Some),
                };
                match r {
                    Ok(Some(c)) => {
                        group3_joined = c.groups.iter().any(|g| g.gid == 3);
                        println!(
                            "config {}: group 3 in it: {group3_joined} (live: {live})",
                            c.num
                        );
                    }
                    Ok(None) => {}
                    Err(e) => println!("join/leave of group 3 failed: {e}"),
                }
            }
            "move" => {
                let key = keys[rng.random_range(0..keys.len())];
                let r = if rng.random_bool(0.75) {
                    mc.move_live(key.as_bytes(), gid).await
                } else {
                    mc.move_range(key.as_bytes(), gid).await
                };
                if let Err(e) = r {
                    println!("move {key} to {gid} failed: {e}");
                }
            }
            _ => unreachable!(),
        }
        println!(
            "[{:>4}s] {action} (group {gid}, node {node}) for {hold:?}; {} ops completed",
            secs.saturating_sub(until.saturating_duration_since(Instant::now()).as_secs()),
            work.completed()
        );
        // Fault timing: how long this fault lasts.
        tokio::time::sleep(hold).await;
        // Undo: everything back up and healed, except a random leftover partition
        // or loss now and then (the next step may overlap it).
        for g in cluster.gids() {
            for i in 0..3 {
                if cluster.group(g).proc(i).is_started() && !cluster.group(g).proc(i).is_up() {
                    cluster.resume(g, i);
                }
            }
        }
        cluster.start_stopped();
        if rng.random_bool(0.7) {
            cluster.heal_all().await;
        }
    }
    println!("soak actions: {counts:?}");
    cluster.start_stopped();
    cluster.heal_all().await;
    cluster.wait_settled(Duration::from_secs(180)).await;
    let report = work.finish("soak").await;
    println!(
        "soak: seed {seed}, {secs} s, {} operations, violations: {}, lost writes: {}",
        report.operations, report.violations, report.lost_writes
    );
}
