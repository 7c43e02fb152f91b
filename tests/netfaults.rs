//! Jepsen-style tests with faults made by the kernel: every `shardmaster` and
//! `kvnode` runs in its own network namespace (tests/common/netns.rs), and
//! partitions, one-way cuts and loss are nftables rules there, so the servers' own
//! sockets and connections are what fails (tests/faults.rs does the same scenarios
//! with the in-process fault table). Each scenario runs recorded concurrent
//! clients, checks their history for linearizability and lost acknowledged writes
//! (`common::faults::Workload::finish`), and first checks that its fault bites.
//!
//! Needs root, `ip` and `nft`; elsewhere the tests print why and skip, except under
//! `CI=true`, where they fail. `kernel_soak` runs for `SHARDKV_SOAK_SECS` seconds
//! (default 20). Seeds are printed; `SHARDKV_SEED=<n>` replays the clients' and the
//! soak's choices (timing still varies).

mod common;

use common::faults::{seed, Workload, WorkloadOptions, FAULT_FLAG};
use common::netns::{self, Net};
use common::{expect_within, rpc, rpc_within, KvCluster, KvOptions};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shardkv::proto::{Config, GetRequest, PutRequest};
use shardkv::verify::{check, CheckResult, Input, Output, Recorder};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LEADER_WAIT: Duration = Duration::from_secs(20);
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const PROGRESS_WAIT: Duration = Duration::from_secs(30);
/// Operations the clients must complete between steps, so every step overlaps traffic.
const PROGRESS: u64 = 15;
/// The soak's length unless `SHARDKV_SOAK_SECS` says otherwise.
const DEFAULT_SOAK_SECS: u64 = 20;
/// Hot keys: `a*` in group 1's range, `p*` in group 2's (split at `m`).
const KEYS: [&str; 4] = ["a0", "a1", "p0", "p1"];

/// Three masters and `groups` groups of three kvnodes, each in its own namespace.
fn start(net: &Arc<Net>, groups: u64) -> KvCluster {
    KvCluster::start(KvOptions {
        masters: 3,
        groups,
        net: Some(net.clone()),
        ..Default::default()
    })
}

/// Joins group 1, splits at `m`, joins `more` and waits until every group serves.
async fn bootstrap(cluster: &KvCluster, more: &[u64]) -> Config {
    cluster.join(&[1]).await;
    cluster
        .master_client()
        .split(b"m")
        .await
        .expect("split at m");
    if !more.is_empty() {
        cluster.join(more).await;
    }
    cluster.wait_settled(SETTLE_WAIT).await
}

/// The term of node `i` of `gid` if it says it leads.
async fn leading_term(cluster: &KvCluster, gid: u64, i: usize) -> Option<u64> {
    let st = cluster.node_status(gid, i).await.ok()?;
    let r = st.replica?;
    (r.role == "leader").then_some(r.term)
}

/// Waits until a node of `gid` other than `old` leads in a term above `term`.
async fn wait_new_leader(cluster: &KvCluster, gid: u64, old: usize, term: u64) -> (usize, u64) {
    let found = Mutex::new(None);
    expect_within(LEADER_WAIT, "a new leader in a later term", || async {
        for i in (0..cluster.group(gid).len()).filter(|&i| i != old) {
            if let Some(t) = leading_term(cluster, gid, i).await.filter(|&t| t > term) {
                *found.lock().unwrap() = Some((i, t));
                return true;
            }
        }
        false
    })
    .await;
    let (i, t) = found.lock().unwrap().expect("found");
    println!("node {i} of group {gid} leads in term {t} (was node {old} in term {term})");
    (i, t)
}

/// Every server's address except `except`.
fn all_but(cluster: &KvCluster, except: &[String]) -> Vec<String> {
    let mut all = cluster.masters().addrs().to_vec();
    for gid in cluster.gids() {
        all.extend(cluster.group(gid).addrs().iter().cloned());
    }
    all.retain(|a| !except.contains(a));
    all
}

/// Partitions the server at `addr` away from every other server.
fn isolate(net: &Net, cluster: &KvCluster, addr: &str) {
    let me = vec![addr.to_owned()];
    let rest = all_but(cluster, &me);
    net.partition(&[me, rest]);
}

/// Drops everything node `leader` of `gid` sends to the rest of its group.
fn mute(net: &Net, cluster: &KvCluster, gid: u64, leader: usize) {
    for i in (0..cluster.group(gid).len()).filter(|&i| i != leader) {
        net.cut(cluster.addr(gid, leader), cluster.addr(gid, i));
    }
}

/// Heals every fault, waits until every group serves, and checks the clients'
/// history (see `Workload::finish`).
async fn heal_and_finish(net: &Net, cluster: &KvCluster, work: Workload, what: &str) {
    net.heal_all();
    cluster.wait_settled(SETTLE_WAIT).await;
    work.finish(what).await;
}

/// A cluster of `groups` groups (group 1 joined, split at `m`, `more` joined), with
/// recorded clients that have made progress, and their seed.
async fn serving(net: &Arc<Net>, groups: u64, more: &[u64]) -> (KvCluster, Workload, u64) {
    let seed = seed();
    let cluster = start(net, groups);
    bootstrap(&cluster, more).await;
    let work = Workload::start(
        cluster.masters().addrs().to_vec(),
        WorkloadOptions::new(&KEYS, seed),
    )
    .await;
    work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
        .await;
    (cluster, work, seed)
}

/// A group's leader is partitioned away from every other server (the test's clients
/// still reach it): it acknowledges no write, the majority elects a leader and
/// serves, and after healing the history is linearizable with no write lost.
#[test]
fn kernel_minority_partition() {
    netns::run("kernel_minority_partition", |net| async move {
        let (cluster, work, _) = serving(&net, 2, &[2]).await;

        let old = cluster.wait_leader(1, LEADER_WAIT).await;
        let term = leading_term(&cluster, 1, old).await.unwrap_or(0);
        isolate(&net, &cluster, cluster.addr(1, old));

        // The bite: the partitioned leader, which does not know it yet, takes no
        // write (group 1 owns `a...`); nor is the write applied later.
        let sent = Instant::now();
        let put = rpc(cluster.kv(1, old).put(PutRequest {
            key: b"a-minority".to_vec(),
            value: b"must not be acknowledged".to_vec(),
            id: None,
        }))
        .await;
        match put {
            Ok(_) => panic!("the partitioned old leader acknowledged a write"),
            Err(e) => println!(
                "partitioned old leader {old} did not acknowledge a write: {e} (after {:?})",
                sent.elapsed()
            ),
        }
        wait_new_leader(&cluster, 1, old, term).await;
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader cut off")
            .await;
        net.expect_dropped("partition");

        heal_and_finish(&net, &cluster, work, "kernel minority partition").await;
        cluster.wait_caught_up(1, old, SETTLE_WAIT).await;
        let probe = cluster.client().get(b"a-minority").await.expect("get");
        assert_eq!(
            probe, None,
            "the minority's unacknowledged write was applied"
        );
    });
}

/// A group's leader can send nothing to its followers (they still reach it): they
/// stop hearing heartbeats and elect another leader; the history stays linearizable.
#[test]
fn kernel_one_way_cut_from_a_leader_causes_an_election() {
    netns::run("kernel_one_way_cut", |net| async move {
        let (cluster, work, _) = serving(&net, 1, &[]).await;

        let old = cluster.wait_leader(1, LEADER_WAIT).await;
        let term = leading_term(&cluster, 1, old).await.unwrap_or(0);
        mute(&net, &cluster, 1, old);
        // The bite: the cut alone makes the followers elect a new leader.
        wait_new_leader(&cluster, 1, old, term).await;
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader muted")
            .await;

        heal_and_finish(&net, &cluster, work, "kernel one-way cut").await;
    });
}

/// Every server loses 15 % of what it sends to other servers (and waits 5 ms more
/// where the kernel has netem) while a group joins and a range moves.
#[test]
fn kernel_packet_loss_during_a_join_and_a_move() {
    netns::run("kernel_packet_loss", |net| async move {
        let (cluster, work, _) = serving(&net, 2, &[]).await;

        for addr in all_but(&cluster, &[]) {
            net.set_loss(&addr, 15);
            if let Err(why) = net.set_delay(&addr, 5) {
                println!("no delay on {addr}: {why}");
            }
        }
        cluster.join(&[2]).await;
        cluster.wait_settled(SETTLE_WAIT).await;
        let owner = cluster.latest_config().await.expect("config").owner(b"a").1;
        cluster
            .master_client()
            .move_range(b"a", 3 - owner)
            .await
            .expect("move a");
        cluster.wait_settled(SETTLE_WAIT).await;
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "under loss")
            .await;
        net.expect_dropped("loss");

        heal_and_finish(&net, &cluster, work, "kernel packet loss").await;
    });
}

/// A group's leader is frozen with SIGSTOP (its connections stay open, nothing
/// answers): the others elect a leader and serve; resumed, the old leader follows.
#[test]
fn kernel_paused_leader() {
    netns::run("kernel_paused_leader", |net| async move {
        let (mut cluster, work, _) = serving(&net, 1, &[]).await;
        let old = cluster.wait_leader(1, LEADER_WAIT).await;
        let term = leading_term(&cluster, 1, old).await.unwrap_or(0);
        cluster.pause(1, old);
        // The bite: the pause alone makes the others elect a new leader.
        wait_new_leader(&cluster, 1, old, term).await;
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader paused")
            .await;

        cluster.resume(1, old);
        let caught = cluster.wait_caught_up(1, old, SETTLE_WAIT).await;
        let role = caught.replica.map(|r| r.role).unwrap_or_default();
        println!("resumed old leader {old} is now a {role}");
        cluster.wait_settled(SETTLE_WAIT).await;
        work.finish("kernel paused leader").await;
    });
}

/// One randomized fault of the soak, undone by healing (and resuming).
#[derive(Debug)]
enum SoakFault {
    /// A group's leader partitioned away from every other server.
    IsolateLeader(u64),
    /// A random server (master or kvnode) partitioned away.
    IsolateAny(String),
    /// A group's leader can send nothing to its followers.
    MuteLeader(u64),
    /// Every server loses this percentage of what it sends to the others.
    Loss(u32),
    /// A kvnode SIGSTOPped.
    Pause(u64, usize),
}

/// Randomized kernel faults for `SHARDKV_SOAK_SECS` seconds (default 20), one at a
/// time, each held for 1-3 s while the clients run, then healed; the clients must
/// progress after every heal.
#[test]
fn kernel_soak() {
    netns::run("kernel_soak", |net| async move {
        let secs: u64 = std::env::var("SHARDKV_SOAK_SECS")
            .ok()
            .map(|s| s.parse().expect("SHARDKV_SOAK_SECS is a number of seconds"))
            .unwrap_or(DEFAULT_SOAK_SECS);
        let (mut cluster, work, seed) = serving(&net, 2, &[2]).await;
        let mut rng = StdRng::seed_from_u64(seed);

        let end = Instant::now() + Duration::from_secs(secs);
        let mut steps = Vec::new();
        // Every kind of fault once per five steps (in a random order), so even the
        // short default run has each.
        let mut kinds = Vec::new();
        while Instant::now() < end {
            if kinds.is_empty() {
                kinds = (0..5).collect();
                kinds.shuffle(&mut rng);
            }
            let gid = rng.random_range(1..=2u64);
            let fault = match kinds.pop().expect("a kind") {
                0 => SoakFault::IsolateLeader(gid),
                1 => {
                    let all = all_but(&cluster, &[]);
                    SoakFault::IsolateAny(all[rng.random_range(0..all.len())].clone())
                }
                2 => SoakFault::MuteLeader(gid),
                3 => SoakFault::Loss(rng.random_range(5..=30)),
                _ => SoakFault::Pause(gid, rng.random_range(0..3)),
            };
            println!("soak step {}: {fault:?}", steps.len());
            match &fault {
                SoakFault::IsolateLeader(g) => {
                    if let Some(l) = cluster.leader(*g).await {
                        isolate(&net, &cluster, cluster.addr(*g, l));
                    }
                }
                SoakFault::IsolateAny(addr) => isolate(&net, &cluster, addr),
                SoakFault::MuteLeader(g) => {
                    if let Some(l) = cluster.leader(*g).await {
                        mute(&net, &cluster, *g, l);
                    }
                }
                SoakFault::Loss(p) => {
                    for addr in all_but(&cluster, &[]) {
                        net.set_loss(&addr, *p);
                    }
                }
                SoakFault::Pause(g, i) => cluster.pause(*g, *i),
            }
            let hold = Duration::from_millis(rng.random_range(1000..3000));
            tokio::time::sleep(hold).await;
            net.heal_all();
            if let SoakFault::Pause(g, i) = fault {
                cluster.resume(g, i);
            }
            work.expect_progress(PROGRESS, PROGRESS_WAIT, "after healing")
                .await;
            steps.push(fault);
        }
        println!("soak: {} steps in {secs} s (seed {seed})", steps.len());
        cluster.wait_settled(SETTLE_WAIT).await;
        work.finish("kernel soak").await;
    });
}

/// How a leader cut off with a fresh lease fared while its followers' Raft clocks
/// ran `rate` times fast (`--test-tick-multiplier`).
struct LeaseEdge {
    /// The history of the cut-off leader's reads and the majority's write, checked.
    result: CheckResult,
    /// Reads the cut-off leader served after the majority acknowledged the write.
    served_after_ack: usize,
    /// Reads it served after the cut (the lease window was exercised).
    served_after_cut: usize,
}

/// Cuts a leader off (one group, default tick, so the lease is 800 ms and elections
/// take 1-2 s by the followers' clocks) right after its lease was renewed, while
/// its two followers' clocks run `rate` times fast. One task keeps reading from the
/// old leader, another writes v2 on the majority; the history of both is checked.
async fn cut_off_leader_with_fast_follower_clocks(net: &Arc<Net>, rate: &str) -> LeaseEdge {
    let mut cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 1,
        tick_ms: 100,
        net: Some(net.clone()),
        extra_args: vec![FAULT_FLAG.to_string()],
        ..Default::default()
    });
    bootstrap(&cluster, &[]).await;
    let old = cluster.wait_leader(1, LEADER_WAIT).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    for &i in &others {
        cluster.restart_with(1, i, |args| {
            args.extend(["--test-tick-multiplier".to_owned(), rate.to_owned()])
        });
        cluster.wait_caught_up(1, i, SETTLE_WAIT).await;
    }
    assert_eq!(
        cluster.wait_leader(1, LEADER_WAIT).await,
        old,
        "leadership moved while the followers restarted with fast clocks"
    );

    let key = b"a-lease".to_vec();
    let recorder = Recorder::new();
    let h = recorder.invoke(0, Input::put(key.clone(), b"v1".to_vec()));
    cluster.client().put(&key, b"v1").await.expect("put v1");
    recorder.complete(h, Output::Write);
    let read_old = || {
        let mut client = cluster.kv(1, old);
        let key = key.clone();
        let recorder = recorder.clone();
        async move {
            let h = recorder.invoke(1, Input::get(key.clone()));
            let started = Instant::now();
            match rpc(client.get(GetRequest { key })).await {
                Ok(r) => {
                    let r = r.into_inner();
                    recorder.complete(h, Output::Get(r.found.then_some(r.value)));
                    Some(started)
                }
                Err(_) => {
                    recorder.unknown(h);
                    None
                }
            }
        }
    };
    // A read of an expired lease starts a round that renews it: cut right after.
    expect_within(LEADER_WAIT, "a fresh lease at the leader", || async {
        read_old().await.is_some()
            && cluster
                .node_status(1, old)
                .await
                .is_ok_and(|st| st.replica.is_some_and(|r| r.lease_remaining_ms >= 750))
    })
    .await;
    let cut = Instant::now();
    isolate(net, &cluster, cluster.addr(1, old));

    let acked = Mutex::new(None::<Instant>);
    let served = Mutex::new(Vec::new());
    let reader = async {
        for _ in 0..100_000 {
            let after_ack = acked
                .lock()
                .unwrap()
                .map(|a| served.lock().unwrap().iter().filter(|&&s| s > a).count());
            // Stop once the lease is surely over, or a few served reads after the ack.
            if cut.elapsed() > Duration::from_secs(3) || after_ack >= Some(3) {
                break;
            }
            if let Some(started) = read_old().await {
                served.lock().unwrap().push(started);
            }
        }
    };
    let writer = async {
        let h = recorder.invoke(2, Input::put(key.clone(), b"v2".to_vec()));
        'acked: for _ in 0..1000 {
            for &i in &others {
                let put = PutRequest {
                    key: key.clone(),
                    value: b"v2".to_vec(),
                    id: None,
                };
                if rpc_within(Duration::from_millis(500), cluster.kv(1, i).put(put))
                    .await
                    .is_ok()
                {
                    break 'acked;
                }
            }
            // No leader yet: poll again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        recorder.complete(h, Output::Write);
        *acked.lock().unwrap() = Some(Instant::now());
    };
    tokio::join!(reader, writer);

    let acked = acked.into_inner().unwrap().expect("v2 acknowledged");
    let served = served.into_inner().unwrap();
    let ms = |t: Instant| t.saturating_duration_since(cut).as_millis();
    println!(
        "followers at {rate}x: cut at 0 ms, v2 acknowledged by the majority at {} ms, \
         the cut-off leader served reads invoked at {:?} ms",
        ms(acked),
        served.iter().map(|&s| ms(s)).collect::<Vec<_>>()
    );
    let result = check(&recorder.snapshot());
    println!("followers at {rate}x: {result}");
    LeaseEdge {
        result,
        served_after_ack: served.iter().filter(|&&s| s > acked).count(),
        served_after_cut: served.iter().filter(|&&s| s > cut).count(),
    }
}

/// The lease leaves one tick of ten as a margin for clock rates: with the
/// followers' clocks 10 % fast, a cut-off leader still stops serving from its lease
/// before they can elect another leader.
#[test]
fn kernel_follower_clocks_within_the_lease_margin_keep_reads_linearizable() {
    netns::run("kernel_clock_within_margin", |net| async move {
        let edge = cut_off_leader_with_fast_follower_clocks(&net, "1.1").await;
        assert!(
            edge.served_after_cut > 0,
            "the cut-off leader served no read from its lease after the cut"
        );
        assert_eq!(edge.served_after_ack, 0, "stale reads: {}", edge.result);
        assert!(edge.result.is_ok(), "{}", edge.result);
    });
}

/// The clock-rate fault bites: with the followers' clocks 4x fast they elect a
/// leader, which acknowledges a write, while the cut-off leader still serves the old
/// value from its lease, and the checker reports it. (The lease assumes clock rates
/// differ by less than its margin; this is what happens when they do not.)
#[test]
fn kernel_follower_clocks_beyond_the_lease_margin_break_it() {
    netns::run("kernel_clock_beyond_margin", |net| async move {
        let edge = cut_off_leader_with_fast_follower_clocks(&net, "4").await;
        assert!(
            edge.served_after_ack > 0 && !edge.result.is_ok(),
            "4x fast follower clocks did not let a stale read through: {}",
            edge.result
        );
    });
}

/// The clock-rate fault is test-only: a kvnode refuses it without the
/// fault-injection flag, and takes it with the flag.
#[test]
fn tick_multiplier_needs_the_fault_injection_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = [
        "--gid",
        "1",
        "--id",
        "1",
        "--peers",
        "1=127.0.0.1:1",
        "--masters",
        "127.0.0.1:2",
        "--data-dir",
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvnode"))
        .args(base)
        .arg(dir.path())
        .args(["--test-tick-multiplier", "2"])
        .output()
        .expect("run kvnode");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted without the flag: {stderr}");
    assert!(stderr.contains(FAULT_FLAG), "{stderr}");
    assert!(
        std::fs::read_dir(dir.path())
            .expect("read dir")
            .next()
            .is_none(),
        "a refused start wrote to the data directory"
    );
}
