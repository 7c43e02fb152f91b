//! Live range moves end to end: real `shardmaster` and `kvnode` processes. The
//! source serves the moving range while the destination copies it and catches up;
//! only a short cutover stops it. A move whose destination dies is cancelled and
//! the source serves throughout; kills of every leader in a move keep the history
//! linearizable with no acknowledged write lost.

mod common;

use common::faults::{seed, start_faulty, At, Workload, WorkloadOptions};
use common::{expect_within, KvCluster, KvOptions};
use shardkv::client::{Client, ClientOptions};
use shardkv::proto::testing::LinkFault;
use shardkv::proto::{CancelMoveRequest, Config, MovePhase, MovePlan, RangeState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(20);
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const PROGRESS_WAIT: Duration = Duration::from_secs(30);

/// Joins group 1, splits at `n`, joins group 2 and waits until both serve.
async fn two_groups(cluster: &KvCluster) -> Config {
    cluster.join(&[1]).await;
    cluster
        .master_client()
        .split(b"n")
        .await
        .expect("split at n");
    cluster.join(&[2]).await;
    cluster.wait_settled(SETTLE_WAIT).await
}

/// The live moves as the shard master's leader reports them.
async fn moves(cluster: &KvCluster) -> Option<Vec<MovePlan>> {
    let masters = cluster.masters();
    for i in masters.up() {
        if let Ok(s) = masters.status(i).await {
            if s.replica.as_ref().is_some_and(|r| r.role == "leader") {
                return Some(s.moves);
            }
        }
    }
    None
}

/// Waits until plan `id` reports `phase` with at least `bytes` copied.
async fn wait_phase(cluster: &KvCluster, id: u64, phase: MovePhase, bytes: u64) {
    expect_within(
        PROGRESS_WAIT,
        &format!("plan {id} to be {phase:?} with {bytes} bytes copied"),
        || async {
            moves(cluster).await.is_some_and(|m| {
                m.iter()
                    .any(|p| p.id == id && p.phase() == phase && p.bytes_copied >= bytes)
            })
        },
    )
    .await;
}

/// `count` values of `size` bytes under `prefix`.
fn big_values(prefix: &str, count: usize, size: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let v: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
            (format!("{prefix}-{i:03}").into_bytes(), v)
        })
        .collect()
}

fn plan_of(config: &Config, key: &[u8]) -> MovePlan {
    config
        .moves
        .iter()
        .find(|p| p.range.as_ref().is_some_and(|r| r.contains(key)))
        .cloned()
        .unwrap_or_else(|| panic!("no plan for the range in {:?}", config.moves))
}

/// Two serving groups, the range of `c` holding 4 MiB in 16 values (a copy of several
/// seconds at 1 MiB/s): returns the range's owner, the other group, a client and the
/// values written.
async fn loaded_range(cluster: &KvCluster) -> (u64, u64, Client, Vec<(Vec<u8>, Vec<u8>)>) {
    let config = two_groups(cluster).await;
    let src = config.owner(b"c").1;
    let kv = client(cluster).await;
    let big = big_values("c-big", 16, 256 << 10);
    for (k, v) in &big {
        kv.put(k, v).await.expect("put big value");
    }
    (src, 3 - src, kv, big)
}

async fn client(cluster: &KvCluster) -> Client {
    Client::connect_with(cluster.masters().addrs(), ClientOptions::default())
        .await
        .expect("client connects")
}

/// A client that puts and gets new keys under `prefixes` in turn until stopped.
/// Any error fails the test.
struct Background {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Duration, Vec<Vec<u8>>)>,
}

impl Background {
    async fn start(cluster: &KvCluster, prefixes: &'static [&'static str]) -> Background {
        let kv = client(cluster).await;
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut slowest = Duration::ZERO;
                let mut written = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let prefix = prefixes[written.len() % prefixes.len()];
                    let key = format!("{prefix}-bg-{:05}", written.len()).into_bytes();
                    let started = Instant::now();
                    kv.put(&key, b"bg").await.expect("put in the background");
                    kv.get(&key).await.expect("get in the background");
                    slowest = slowest.max(started.elapsed());
                    written.push(key);
                }
                (slowest, written)
            }
        });
        Background { stop, task }
    }

    /// Stops the client; checks that each of its put-and-get pairs took under 2 s
    /// (generous for a debug build on a shared machine: bench/move.sh measures
    /// latency) and that every key it wrote is there.
    async fn finish(self, kv: &Client, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (slowest, written) = self.task.await.expect("background client");
        println!(
            "{} puts and gets {what}; slowest pair {slowest:?}",
            written.len()
        );
        assert!(
            slowest < Duration::from_secs(2),
            "a put and get took {slowest:?} {what}"
        );
        for key in &written {
            assert!(
                kv.get(key).await.expect("get").is_some(),
                "a write was lost"
            );
        }
    }
}

/// A range of ~3 MiB copied at 1 MiB/s answers reads and writes all along its copy
/// (each within a bound far below the copy's duration), and every write acknowledged
/// by the source during the copy is at the destination after the cutover.
#[tokio::test]
async fn a_range_serves_reads_and_writes_while_its_copy_is_in_progress() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        extra_args: vec!["--move-rate-mib".into(), "1".into()],
        ..Default::default()
    });
    let (src, dst, kv, big) = loaded_range(&cluster).await;

    // A second client writes and reads the range through the whole move, cutover
    // included.
    let background = Background::start(&cluster, &["c"]).await;
    let config = cluster
        .master_client()
        .move_live(b"c", dst)
        .await
        .expect("move");
    let plan = plan_of(&config, b"c");
    assert_eq!(config.owner(b"c").1, src, "a plan is not an owner change");
    wait_phase(&cluster, plan.id, MovePhase::MoveCopying, 1).await;

    // Reads and writes while the copy goes on.
    let mut written = Vec::new();
    let mut slowest = Duration::ZERO;
    let copying_until = Instant::now() + PROGRESS_WAIT;
    let mut during_copy = 0;
    while Instant::now() < copying_until {
        let still_copying = moves(&cluster).await.is_some_and(|m| {
            m.iter()
                .any(|p| p.id == plan.id && p.phase() == MovePhase::MoveCopying)
        });
        if !still_copying {
            break;
        }
        for _ in 0..10 {
            let key = format!("c-live-{:04}", written.len()).into_bytes();
            let value = format!("v{}", written.len()).into_bytes();
            let started = Instant::now();
            kv.put(&key, &value).await.expect("put during the copy");
            let got = kv.get(&key).await.expect("get during the copy");
            assert_eq!(got.as_deref(), Some(&value[..]));
            slowest = slowest.max(started.elapsed());
            written.push((key, value));
        }
        during_copy += 10;
    }
    println!("{during_copy} puts and gets during the copy; slowest pair {slowest:?}");
    assert!(
        during_copy >= 20,
        "only {during_copy} writes went through while the range was copied"
    );
    assert!(
        slowest < Duration::from_millis(1000),
        "a put and get took {slowest:?} during the copy"
    );
    // Overwrite a copied value too: the destination must end with the new one.
    kv.put(&big[0].0, b"overwritten").await.expect("overwrite");

    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(config.owner(b"c").1, dst, "the move finished");
    assert!(config.moves.is_empty());
    background
        .finish(&kv, "through the whole move, cutover included")
        .await;
    assert_eq!(
        kv.get(&big[0].0).await.expect("get").as_deref(),
        Some(&b"overwritten"[..])
    );
    for (k, v) in big.iter().skip(1).chain(&written) {
        let got = kv.get(k).await.expect("get after the move");
        assert!(
            got.as_ref() == Some(v),
            "{} lost in the move",
            String::from_utf8_lossy(k)
        );
    }
    // The destination serves it, and the source no longer holds it.
    let leader = cluster.wait_leader(dst, LEADER_WAIT).await;
    let st = cluster.must_node_status(dst, leader).await;
    assert!(st.moves.is_empty(), "{:?}", st.moves);
    let src_leader = cluster.wait_leader(src, LEADER_WAIT).await;
    let st = cluster.must_node_status(src, src_leader).await;
    assert!(
        st.ranges
            .iter()
            .all(|h| h.state() == RangeState::Serving && !h.range.as_ref().unwrap().contains(b"c")),
        "{:?}",
        st.ranges
    );
}

/// A move whose destination group is killed mid-copy is cancelled by the shard
/// master (no progress for --move-stall-ms); another is cancelled by hand. The source
/// answers every request all along, and the destination, back, drops its copy.
#[tokio::test]
async fn a_move_whose_destination_died_is_cancelled_and_the_source_serves_throughout() {
    let mut cluster = KvCluster::start(KvOptions {
        masters: 1,
        extra_args: vec!["--move-rate-mib".into(), "1".into()],
        master_args: vec!["--move-stall-ms".into(), "2000".into()],
        ..Default::default()
    });
    let (src, dst, kv, _) = loaded_range(&cluster).await;
    let config = cluster
        .master_client()
        .move_live(b"c", dst)
        .await
        .expect("move");
    let plan = plan_of(&config, b"c");
    wait_phase(&cluster, plan.id, MovePhase::MoveCopying, 1).await;
    cluster.kill9_group(dst);
    println!("killed every node of group {dst} mid-copy");

    // The source serves throughout, until and after the shard master gives up.
    let mut n = 0;
    let served = Mutex::new(0);
    let until = Instant::now() + PROGRESS_WAIT;
    loop {
        let key = format!("c-during-{n}").into_bytes();
        let started = Instant::now();
        kv.put(&key, b"x")
            .await
            .expect("put while the destination is down");
        assert!(kv.get(&key).await.expect("get").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a request to the source took {:?}",
            started.elapsed()
        );
        n += 1;
        *served.lock().unwrap() += 1;
        let planned = moves(&cluster).await.is_none_or(|m| !m.is_empty());
        if !planned {
            break;
        }
        assert!(Instant::now() < until, "the stalled move was not cancelled");
    }
    let config = cluster.latest_config().await.expect("config");
    assert_eq!(config.owner(b"c").1, src, "cancelled: the source keeps it");
    println!("cancelled by the shard master after {n} writes to the source");

    // A second move to the dead group, cancelled by hand.
    let config = cluster
        .master_client()
        .move_live(b"c", dst)
        .await
        .expect("move again");
    assert_eq!(config.moves.len(), 1);
    let mut mc = cluster.masters().client(0);
    let cancel = CancelMoveRequest {
        key: b"c".to_vec(),
        ..Default::default()
    };
    let reply = mc.cancel_move(cancel.clone()).await.expect("cancel");
    let config = reply.into_inner().config.expect("config");
    assert!(config.moves.is_empty());
    assert_eq!(config.owner(b"c").1, src);
    let again = mc.cancel_move(cancel).await.expect_err("nothing to cancel");
    assert_eq!(again.code(), Code::NotFound);
    kv.put(b"c-after-cancel", b"y")
        .await
        .expect("put after cancel");

    // The destination comes back, drops its partial copy and settles.
    cluster.start_stopped();
    cluster.wait_settled(SETTLE_WAIT).await;
    for i in 0..n {
        let key = format!("c-during-{i}").into_bytes();
        assert!(kv.get(&key).await.expect("get").is_some(), "write {i} lost");
    }
    let leader = cluster.wait_leader(dst, LEADER_WAIT).await;
    let st = cluster.must_node_status(dst, leader).await;
    assert!(st.moves.is_empty(), "{:?}", st.moves);
}

/// Live moves under a recorded workload on the moving range, with the source's
/// leader, the destination's leader and the shard master's leader each killed while
/// the range is copied, and each killed again at a moment of the move found by
/// polling (catch-up or cutover when it lands there). Checked for linearizability and
/// lost writes.
#[tokio::test]
async fn live_moves_survive_leader_kills_in_every_phase() {
    let seed = seed();
    let mut cluster = start_faulty(KvOptions {
        masters: 3,
        extra_args: vec!["--move-rate-mib".into(), "2".into()],
        // The cutover is held open by the delays below; it must not be cancelled.
        master_args: vec!["--move-cutover-stall-ms".into(), "30000".into()],
        ..Default::default()
    });
    two_groups(&cluster).await;
    let kv = client(&cluster).await;
    for (k, v) in big_values("c-big", 8, 256 << 10) {
        kv.put(&k, &v).await.expect("put big value");
    }
    let work = Workload::start(
        cluster.masters().addrs().to_vec(),
        WorkloadOptions::new(&["c0", "c1", "c2", "c3", "p0"], seed),
    )
    .await;
    work.expect_progress(15, PROGRESS_WAIT, "at the start")
        .await;

    for (round, victim) in ["source", "destination", "master"].iter().enumerate() {
        let config = cluster.latest_config().await.expect("config");
        let src = config.owner(b"c").1;
        let dst = 3 - src;
        let config = cluster
            .master_client()
            .move_live(b"c", dst)
            .await
            .expect("move");
        let plan = plan_of(&config, b"c");
        // Kill once mid-copy, once as soon as the copy is done, and once in the
        // cutover (the source frozen): each of the destination's calls to the source
        // is delayed, so the freeze and the last deltas hold the cutover open.
        for phase in [
            MovePhase::MoveCopying,
            MovePhase::MoveCatchingUp,
            MovePhase::MoveCuttingOver,
        ] {
            slow_calls(&cluster, dst, src, CUTOVER_HOLD).await;
            let seen = Mutex::new(None);
            let found = common::wait_until(PROGRESS_WAIT, || async {
                // No master leader (one was just killed): ask again.
                let Some(m) = moves(&cluster).await else {
                    return false;
                };
                match m.iter().find(|p| p.id == plan.id) {
                    Some(p) if p.phase() >= phase && (p.bytes_copied > 0) => {
                        *seen.lock().unwrap() = Some(p.phase());
                        true
                    }
                    Some(_) => false,
                    None => true, // done already
                }
            })
            .await;
            assert!(found, "plan {} made no progress", plan.id);
            if phase == MovePhase::MoveCuttingOver {
                assert_eq!(
                    *seen.lock().unwrap(),
                    Some(phase),
                    "round {round}: the cutover ended before the kill"
                );
            }
            let at = match *victim {
                "source" => At::Kv(src, cluster.wait_leader(src, LEADER_WAIT).await),
                "destination" => At::Kv(dst, cluster.wait_leader(dst, LEADER_WAIT).await),
                _ => At::Master(cluster.masters().wait_leader(LEADER_WAIT).await),
            };
            match at {
                At::Kv(gid, i) => cluster.kill9(gid, i),
                At::Master(i) => cluster.masters_mut().kill9(i),
            }
            println!(
                "round {round}: killed the {victim}'s leader {at:?} in phase {:?}",
                seen.lock().unwrap()
            );
            // Restarted at once, so the move is still in the next phase to kill in.
            match at {
                At::Kv(gid, i) => cluster.start_node(gid, i),
                At::Master(i) => cluster.masters_mut().restart(i),
            }
            work.expect_progress(10, PROGRESS_WAIT, "after a leader kill")
                .await;
        }
        let config = cluster.wait_settled(SETTLE_WAIT).await;
        assert_eq!(
            config.owner(b"c").1,
            dst,
            "round {round}: the move finished despite the kills"
        );
        cluster.heal_all().await;
        work.expect_progress(15, PROGRESS_WAIT, "after the move")
            .await;
    }
    work.finish("live moves with leader kills").await;
}

/// How long each call of a destination's move worker to the source waits, in the
/// kill test: long enough to kill a leader within one cutover.
const CUTOVER_HOLD: Duration = Duration::from_millis(1500);

/// Delays every call from group `from`'s nodes to group `to`'s nodes by `delay`
/// (Raft traffic stays within each group and is not affected).
async fn slow_calls(cluster: &KvCluster, from: u64, to: u64, delay: Duration) {
    let faults: Vec<LinkFault> = cluster
        .group_nodes(to)
        .into_iter()
        .map(|at| LinkFault {
            peer_addr: cluster.node_addr(at),
            delay_ms: delay.as_millis() as u32,
            ..Default::default()
        })
        .collect();
    for at in cluster.group_nodes(from) {
        cluster.set_faults(at, faults.clone(), false).await;
    }
}

/// A live join: the new groups' ranges move with their sources serving, one move per
/// group at a time (the others queued), while a client reads and writes every range.
#[tokio::test]
async fn a_live_join_moves_ranges_one_per_group_at_a_time_while_they_serve() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 3,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    let mut mc = cluster.master_client();
    for key in ["g", "n", "t"] {
        mc.split(key.as_bytes()).await.expect("split");
    }
    cluster.wait_settled(SETTLE_WAIT).await;
    let kv = client(&cluster).await;
    for (k, v) in ["a", "h", "o", "u"]
        .iter()
        .flat_map(|p| big_values(p, 4, 64 << 10))
    {
        kv.put(&k, &v).await.expect("put");
    }
    let background = Background::start(&cluster, &["a", "h", "o", "u"]).await;
    let groups = vec![cluster.group(2).spec(), cluster.group(3).spec()];
    let config = mc.join_live(groups).await.expect("join");
    assert!(
        config.ranges.iter().all(|r| r.gid == 1),
        "a live join moves no range at once"
    );
    assert_eq!(config.moves.len(), 2, "{:?}", config.moves);
    // Watch the plans until they are done: never two at once for one group.
    let done = common::wait_until(SETTLE_WAIT, || async {
        let Some(m) = moves(&cluster).await else {
            return false;
        };
        let active: Vec<&MovePlan> = m.iter().filter(|p| !p.queued).collect();
        for gid in [1, 2, 3] {
            let n = active
                .iter()
                .filter(|p| p.source == gid || p.dest == gid)
                .count();
            assert!(n <= 1, "group {gid} in {n} moves at once: {m:?}");
        }
        m.is_empty()
    })
    .await;
    assert!(done, "the join's moves did not finish");
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    background.finish(&kv, "through the join").await;
    let mut counts = std::collections::BTreeMap::new();
    for r in &config.ranges {
        *counts.entry(r.gid).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "every group owns a range: {counts:?}");
}

/// A live leave: the leaving group keeps serving its ranges while they move away, one
/// move at a time, and is removed from the configuration once it owns nothing; a
/// client reads and writes every range throughout and loses nothing.
#[tokio::test]
async fn a_live_leave_serves_its_ranges_until_each_has_moved_then_removes_the_group() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 3,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    let mut mc = cluster.master_client();
    for key in ["g", "n", "t"] {
        mc.split(key.as_bytes()).await.expect("split");
    }
    cluster.join(&[2, 3]).await;
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    let owned: Vec<_> = config.ranges.iter().filter(|r| r.gid == 1).collect();
    assert!(!owned.is_empty(), "group 1 owns ranges: {config:?}");
    let kv = client(&cluster).await;
    for (k, v) in ["a", "h", "o", "u"]
        .iter()
        .flat_map(|p| big_values(p, 4, 64 << 10))
    {
        kv.put(&k, &v).await.expect("put");
    }
    let background = Background::start(&cluster, &["a", "h", "o", "u"]).await;
    let left = mc.leave_live(vec![1]).await.expect("leave");
    assert!(
        left.group(1).is_some_and(|g| g.leaving),
        "a leaving group stays listed: {left:?}"
    );
    assert_eq!(
        left.ranges, config.ranges,
        "a live leave moves no range at once"
    );
    assert_eq!(left.moves.len(), owned.len(), "{:?}", left.moves);
    let gone = common::wait_until(SETTLE_WAIT, || async {
        let Some(m) = moves(&cluster).await else {
            return false;
        };
        let active: Vec<&MovePlan> = m.iter().filter(|p| !p.queued).collect();
        assert!(
            active.len() <= 1,
            "group 1 in {} moves at once: {m:?}",
            active.len()
        );
        assert!(m.iter().all(|p| p.source == 1), "{m:?}");
        cluster
            .latest_config()
            .await
            .is_ok_and(|c| c.group(1).is_none())
    })
    .await;
    assert!(gone, "group 1 was not removed");
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert!(config.ranges.iter().all(|r| r.gid == 2 || r.gid == 3));
    background.finish(&kv, "through the leave").await;
    for (k, v) in ["a", "h", "o", "u"]
        .iter()
        .flat_map(|p| big_values(p, 4, 64 << 10))
    {
        assert_eq!(kv.get(&k).await.expect("get").as_ref(), Some(&v));
    }
    // The group's nodes dropped their copies.
    let empty = common::wait_until(SETTLE_WAIT, || async {
        match cluster.node_status(1, 0).await {
            Ok(st) => st.ranges.is_empty(),
            Err(_) => false,
        }
    })
    .await;
    assert!(empty, "group 1 still holds data");
}

/// Writes to the moving range that outpace the catch-up (four writers of 256 KiB
/// values against a 1 MiB/s move) keep its lag over the cutover bound while the
/// move keeps making progress: the shard master cancels it after
/// --move-catch-up-ms (well before the stall limit), the source serving every write.
#[tokio::test]
async fn a_move_whose_writes_outpace_its_catch_up_is_cancelled_and_the_source_serves() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        extra_args: vec!["--move-rate-mib".into(), "1".into()],
        master_args: vec!["--move-catch-up-ms".into(), "3000".into()],
        ..Default::default()
    });
    let (src, dst, kv, _) = loaded_range(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let kv = kv.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let value = vec![w as u8; 256 << 10];
                let mut written = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("c-flood-{w}-{:05}", written.len()).into_bytes();
                    kv.put(&key, &value).await.expect("put during the move");
                    written.push(key);
                }
                written
            })
        })
        .collect();
    let config = cluster
        .master_client()
        .move_live(b"c", dst)
        .await
        .expect("move");
    let plan = plan_of(&config, b"c");
    wait_phase(&cluster, plan.id, MovePhase::MoveCatchingUp, 1).await;
    let catching_up = Instant::now();
    let cancelled = common::wait_until(PROGRESS_WAIT, || async {
        let m = moves(&cluster).await.unwrap_or_default();
        if let Some(p) = m.iter().find(|p| p.id == plan.id) {
            assert_ne!(
                p.phase(),
                MovePhase::MoveCuttingOver,
                "the writers did not outpace the catch-up: {p:?}"
            );
            return false;
        }
        true
    })
    .await;
    assert!(cancelled, "the move was not cancelled");
    let waited = catching_up.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "cancelled after {waited:?}: by the stall rule, not the catch-up limit"
    );
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    let config = cluster.latest_config().await.expect("config");
    assert_eq!(config.owner(b"c").1, src, "cancelled: the source keeps it");
    println!(
        "cancelled {waited:?} into the catch-up; {} writes of 256 KiB meanwhile",
        written.len()
    );
    for key in &written {
        assert!(
            kv.get(key).await.expect("get").is_some(),
            "a write was lost"
        );
    }
    cluster.wait_settled(SETTLE_WAIT).await;
}
