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
use common::{expect_within, rpc, KvCluster, KvOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardkv::proto::{Config, PutRequest};
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
fn start(net: &Arc<Net>, groups: u64, extra_args: &[&str]) -> KvCluster {
    KvCluster::start(KvOptions {
        masters: 3,
        groups,
        net: Some(net.clone()),
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
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

fn workload(cluster: &KvCluster, seed: u64) -> Workload {
    Workload::start(
        cluster.masters().addrs().to_vec(),
        WorkloadOptions::new(&KEYS, seed),
    )
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

/// A group's leader is partitioned away from every other server (the test's clients
/// still reach it): it acknowledges no write, the majority elects a leader and
/// serves, and after healing the history is linearizable with no write lost.
#[test]
fn kernel_minority_partition() {
    netns::run("kernel_minority_partition", |net| async move {
        let seed = seed();
        let cluster = start(&net, 2, &[]);
        bootstrap(&cluster, &[2]).await;
        let work = workload(&cluster, seed);
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
            .await;

        let old = cluster.wait_leader(1, LEADER_WAIT).await;
        let term = leading_term(&cluster, 1, old).await.unwrap_or(0);
        let minority = vec![cluster.addr(1, old).to_owned()];
        let majority = all_but(&cluster, &minority);
        net.partition(&[minority, majority]);
        wait_new_leader(&cluster, 1, old, term).await;

        // The bite: the partitioned node takes no write (group 1 owns `a...`).
        let put = rpc(cluster.kv(1, old).put(PutRequest {
            key: b"a-minority".to_vec(),
            value: b"must not be acknowledged".to_vec(),
            id: None,
        }))
        .await;
        match put {
            Ok(_) => panic!("the partitioned old leader acknowledged a write"),
            Err(e) => println!("partitioned old leader {old} refused a write: {e}"),
        }
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader cut off")
            .await;
        let dropped = net.dropped();
        assert!(dropped > 0, "the partition dropped no packet");
        println!("partition dropped {dropped} packets");

        net.heal_all();
        cluster.wait_caught_up(1, old, SETTLE_WAIT).await;
        cluster.wait_settled(SETTLE_WAIT).await;
        work.finish("kernel minority partition").await;
    });
}

/// A group's leader can send nothing to its followers (they still reach it): they
/// stop hearing heartbeats and elect another leader; the history stays linearizable.
#[test]
fn kernel_one_way_cut_from_a_leader_causes_an_election() {
    netns::run("kernel_one_way_cut", |net| async move {
        let seed = seed();
        let cluster = start(&net, 1, &[]);
        bootstrap(&cluster, &[]).await;
        let work = workload(&cluster, seed);
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
            .await;

        let old = cluster.wait_leader(1, LEADER_WAIT).await;
        let term = leading_term(&cluster, 1, old).await.unwrap_or(0);
        let from = cluster.addr(1, old).to_owned();
        for i in (0..3).filter(|&i| i != old) {
            net.cut(&from, cluster.addr(1, i));
        }
        // The bite: the cut alone makes the followers elect a new leader.
        wait_new_leader(&cluster, 1, old, term).await;
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "with the old leader muted")
            .await;

        net.heal_all();
        cluster.wait_settled(SETTLE_WAIT).await;
        work.finish("kernel one-way cut").await;
    });
}

/// Every server loses 15 % of what it sends to other servers (and waits 5 ms more
/// where the kernel has netem) while a group joins and a range moves.
#[test]
fn kernel_packet_loss_during_a_join_and_a_move() {
    netns::run("kernel_packet_loss", |net| async move {
        let seed = seed();
        let cluster = start(&net, 2, &[]);
        bootstrap(&cluster, &[]).await;
        let work = workload(&cluster, seed);
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
            .await;

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
        // The bite: packets were really lost.
        let dropped = net.dropped();
        assert!(dropped > 0, "the loss rules dropped no packet");
        println!("loss dropped {dropped} packets");

        net.heal_all();
        cluster.wait_settled(SETTLE_WAIT).await;
        work.finish("kernel packet loss").await;
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
        let seed = seed();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cluster = start(&net, 2, &[]);
        bootstrap(&cluster, &[2]).await;
        let work = workload(&cluster, seed);
        work.expect_progress(PROGRESS, PROGRESS_WAIT, "at the start")
            .await;

        let end = Instant::now() + Duration::from_secs(secs);
        let mut steps = Vec::new();
        while Instant::now() < end {
            let gid = rng.random_range(1..=2u64);
            let fault = match rng.random_range(0..5) {
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
                        let me = vec![cluster.addr(*g, l).to_owned()];
                        let rest = all_but(&cluster, &me);
                        net.partition(&[me, rest]);
                    }
                }
                SoakFault::IsolateAny(addr) => {
                    let me = vec![addr.clone()];
                    let rest = all_but(&cluster, &me);
                    net.partition(&[me, rest]);
                }
                SoakFault::MuteLeader(g) => {
                    if let Some(l) = cluster.leader(*g).await {
                        for i in (0..3).filter(|&i| i != l) {
                            net.cut(cluster.addr(*g, l), cluster.addr(*g, i));
                        }
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
