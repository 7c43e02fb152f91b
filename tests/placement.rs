//! Autonomous placement end to end: real `shardmaster` and `kvnode` processes with
//! a small split size. Ranges split as data arrives, spread over the groups by
//! bytes under a recorded workload (checked for linearizability and lost writes),
//! split by load with the halves on different groups, report a single hot key
//! instead of splitting it, merge once most data is deleted, and a joining group
//! receives its share of the bytes.

mod common;

use common::faults::{seed, Workload, WorkloadOptions};
use common::{expect_within, KvCluster, KvOptions};
use shardkv::client::{Client, ClientOptions};
use shardkv::proto::placement_decision::Kind;
use shardkv::proto::{
    Config, PlacementDecision, RangeStats, SchedulerRequest, SchedulerSettings,
    SetSchedulerRequest, StatusReply,
};
use std::collections::BTreeMap;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SPLIT: u64 = 4 * MIB;
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const BALANCE_WAIT: Duration = Duration::from_secs(180);

/// One test at a time: each runs a cluster and moves tens of MiB live, and on a
/// small machine several at once starve each other's heartbeats and moves.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One master, `groups` groups of one replica each (placement does not depend on
/// replication, and the machine is small), all joined.
async fn cluster(groups: u64, joined: &[u64]) -> KvCluster {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups,
        replicas: 1,
        ..Default::default()
    });
    for gid in joined {
        cluster.join(&[*gid]).await;
    }
    cluster.wait_settled(SETTLE_WAIT).await;
    cluster
}

async fn set(cluster: &KvCluster, settings: SchedulerSettings, flags: &[&str]) {
    let masters = cluster.masters();
    let leader = masters.wait_leader(SETTLE_WAIT).await;
    masters
        .client(leader)
        .set_scheduler(SetSchedulerRequest {
            settings: Some(settings),
            set_flags: flags.iter().map(|f| f.to_string()).collect(),
            id: None,
        })
        .await
        .expect("set scheduler settings");
}

async fn status(cluster: &KvCluster) -> StatusReply {
    let masters = cluster.masters();
    let leader = masters.wait_leader(SETTLE_WAIT).await;
    masters.must_status(leader).await
}

async fn history(cluster: &KvCluster) -> Vec<PlacementDecision> {
    let masters = cluster.masters();
    let leader = masters.wait_leader(SETTLE_WAIT).await;
    masters
        .client(leader)
        .scheduler(SchedulerRequest {})
        .await
        .expect("scheduler history")
        .into_inner()
        .history
}

async fn client(cluster: &KvCluster) -> Client {
    Client::connect_with(cluster.masters().addrs(), ClientOptions::default())
        .await
        .expect("client connects")
}

/// Bytes per group of `config`, if every range's size is reported.
fn group_bytes(config: &Config, stats: &[RangeStats]) -> Option<BTreeMap<u64, u64>> {
    let mut out: BTreeMap<u64, u64> = config.groups.iter().map(|g| (g.gid, 0)).collect();
    for r in &config.ranges {
        let s = stats.iter().find(|s| s.range == r.range)?;
        *out.entry(r.gid).or_default() += s.bytes;
    }
    Some(out)
}

/// True if every group holds within ±`band` of the mean bytes.
fn within(bytes: &BTreeMap<u64, u64>, band: f64) -> bool {
    let mean = bytes.values().sum::<u64>() as f64 / bytes.len() as f64;
    bytes
        .values()
        .all(|&b| (b as f64 - mean).abs() <= band * mean)
}

/// Waits until the ranges hold at least `min_total` bytes (the statistics have
/// caught up with what was written), no move is under way, every group is within
/// ±20% of the mean bytes and no range is over `max_range` bytes; returns the
/// configuration and the bytes per group.
async fn wait_balanced(
    cluster: &KvCluster,
    (min_total, max_range): (u64, u64),
    what: &str,
) -> (Config, BTreeMap<u64, u64>) {
    let seen = std::sync::Mutex::new(None);
    expect_within(BALANCE_WAIT, what, || async {
        let s = status(cluster).await;
        let Ok(config) = cluster.latest_config().await else {
            return false;
        };
        let Some(bytes) = group_bytes(&config, &s.ranges) else {
            return false;
        };
        let small = s.ranges.iter().all(|r| r.bytes <= max_range);
        let counted = bytes.values().sum::<u64>() >= min_total;
        let done = counted && config.moves.is_empty() && within(&bytes, 0.2) && small;
        println!(
            "{what}: {} ranges, bytes per group {bytes:?}",
            config.ranges.len()
        );
        *seen.lock().unwrap() = Some((config, bytes));
        done
    })
    .await;
    let found = seen.lock().unwrap().take().expect("seen");
    found
}

/// `count` values of `size` bytes under `prefix`, in an order that spreads them
/// over the prefix's key space.
fn values(prefix: &str, count: usize, size: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let k = (i * 7919) % count;
            let v: Vec<u8> = (0..size).map(|j| (k * 31 + j * 7) as u8).collect();
            (format!("{prefix}-{k:04}").into_bytes(), v)
        })
        .collect()
}

async fn put_all(kv: &Client, data: &[(Vec<u8>, Vec<u8>)]) {
    for chunk in data.chunks(8) {
        let puts = chunk.iter().map(|(k, v)| kv.put(k, v));
        for r in futures::future::join_all(puts).await {
            r.expect("bulk put");
        }
    }
}

/// 64 MiB under one prefix with a 4 MiB split size, while a recorded workload runs
/// on other keys: the prefix splits into pieces of at most the split size, the
/// groups end within ±20% of the mean bytes, and the history is linearizable with
/// no write lost (the bulk values read back too).
#[tokio::test]
async fn a_growing_prefix_splits_and_spreads_by_bytes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = seed();
    let cluster = cluster(2, &[1, 2]).await;
    set(
        &cluster,
        SchedulerSettings {
            split_bytes: SPLIT,
            split_load: 1e9,
            ..Default::default()
        },
        &[],
    )
    .await;
    let work = Workload::start(
        cluster.masters().addrs().to_vec(),
        WorkloadOptions::new(&["a0", "a1", "z0", "z1"], seed),
    )
    .await;
    let kv = client(&cluster).await;
    let data = values("p", 256, 256 << 10);
    put_all(&kv, &data).await;
    let max_range = SPLIT + (256 << 10);
    let (config, bytes) = wait_balanced(
        &cluster,
        (60 * MIB, max_range),
        "64 MiB spread over 2 groups",
    )
    .await;
    let s = status(&cluster).await;
    let pieces: Vec<&RangeStats> = s.ranges.iter().filter(|r| r.bytes > MIB).collect();
    // Each split cuts a range of just over 4 MiB near its middle: 64 MiB ends in
    // pieces of 2 to 4 MiB, 16 to 32 of them.
    assert!(
        (16..=34).contains(&pieces.len()),
        "{} pieces over 1 MiB in {config:?}",
        pieces.len()
    );
    assert!(bytes.values().all(|&b| b > 20 * MIB), "{bytes:?}");
    let h = history(&cluster).await;
    assert!(h
        .iter()
        .any(|d| d.kind() == Kind::Split && d.why.contains("over the split size")));
    assert!(h.iter().any(|d| d.kind() == Kind::Move));
    work.expect_progress(20, SETTLE_WAIT, "after balancing")
        .await;
    for (k, v) in &data {
        assert_eq!(
            kv.get(k).await.expect("read back").as_ref(),
            Some(v),
            "bulk value lost"
        );
    }
    work.finish("growing prefix").await;
}

/// A third group joining a balanced two-group cluster ends with about a third of
/// the bytes (within ±20% of the mean). The split size is small enough for the
/// pieces to allow that: a move only ever shrinks the gap between two groups, so
/// 8 pieces over 3 groups would stop at 3/3/2.
#[tokio::test]
async fn a_joining_group_receives_a_third_of_the_bytes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = cluster(2, &[1, 2]).await;
    set(
        &cluster,
        SchedulerSettings {
            // Pieces of 0.5 to 1 MiB: fine enough for a third within ±20%.
            split_bytes: MIB,
            split_load: 1e9,
            ..Default::default()
        },
        &[],
    )
    .await;
    let kv = client(&cluster).await;
    put_all(&kv, &values("j", 96, 256 << 10)).await;
    wait_balanced(&cluster, (22 * MIB, u64::MAX), "24 MiB over 2 groups").await;
    cluster.add_group(3);
    cluster.join(&[3]).await;
    let (_, bytes) = wait_balanced(&cluster, (22 * MIB, u64::MAX), "24 MiB over 3 groups").await;
    assert_eq!(bytes.len(), 3);
    let third = bytes[&3] as f64 / bytes.values().sum::<u64>() as f64;
    assert!(
        (0.26..=0.40).contains(&third),
        "group 3 holds {third:.2} of {bytes:?}"
    );
}

/// Reads `keys` from `tasks` concurrent tasks for `length`; returns the reads done.
async fn read_load(kv: &Client, keys: &[Vec<u8>], tasks: usize, length: Duration) -> u64 {
    let until = tokio::time::Instant::now() + length;
    let one = |t: usize| async move {
        let mut n = 0u64;
        while tokio::time::Instant::now() < until {
            let key = &keys[(n as usize * 7 + t * 13) % keys.len()];
            kv.get(key).await.expect("load read");
            n += 1;
        }
        n
    };
    futures::future::join_all((0..tasks).map(one))
        .await
        .into_iter()
        .sum()
}

/// A range read far over the split load is split where its load divides and the
/// halves end on different groups; a range whose load is one key reports the key
/// and is not split.
#[tokio::test]
async fn a_hot_range_splits_by_load_and_a_hot_key_is_reported() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(2, &[1, 2]).await;
    set(
        &cluster,
        SchedulerSettings {
            split_load: 100.0,
            ..Default::default()
        },
        &[],
    )
    .await;
    let kv = client(&cluster).await;
    let spread: Vec<Vec<u8>> = (0..64).map(|i| format!("h-{i:02}").into_bytes()).collect();
    for k in &spread {
        kv.put(k, b"v").await.expect("put");
    }
    kv.put(b"x-hot", b"v").await.expect("put");

    // One hot key: reported, never split.
    let hot = vec![b"x-hot".to_vec()];
    let load = read_load(&kv, &hot, 8, Duration::from_secs(12));
    let reported = async {
        expect_within(
            SETTLE_WAIT,
            "the hot key in the range statistics",
            || async {
                status(&cluster)
                    .await
                    .ranges
                    .iter()
                    .any(|r| r.hot_key == b"x-hot" && r.reads_per_sec > 100.0)
            },
        )
        .await
    };
    let (reads, ()) = tokio::join!(load, reported);
    println!("hot key: {reads} reads");
    let config = cluster.latest_config().await.expect("config");
    assert_eq!(
        config.ranges.len(),
        1,
        "a single hot key was split: {config:?}"
    );
    assert!(history(&cluster).await.is_empty());

    // Load spread over 64 keys: split where it divides, halves on two groups.
    let load = read_load(&kv, &spread, 8, Duration::from_secs(40));
    let spread_out = async {
        expect_within(
            SETTLE_WAIT,
            "the hot range's halves on two groups",
            || async {
                let Ok(config) = cluster.latest_config().await else {
                    return false;
                };
                let owners: std::collections::BTreeSet<u64> =
                    spread.iter().map(|k| config.owner(k).1).collect();
                owners.len() == 2 && config.moves.is_empty()
            },
        )
        .await
    };
    let (reads, ()) = tokio::join!(load, spread_out);
    println!("spread load: {reads} reads");
    let h = history(&cluster).await;
    assert!(
        h.iter()
            .any(|d| d.kind() == Kind::Split && d.why.contains("load")),
        "{h:?}"
    );
    assert!(h.iter().any(|d| d.kind() == Kind::Move), "{h:?}");
}

/// Deleting most of the data merges the pieces it had been split into.
#[tokio::test]
async fn deleting_most_data_merges_ranges() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = cluster(1, &[1]).await;
    set(
        &cluster,
        SchedulerSettings {
            split_bytes: SPLIT,
            split_load: 1e9,
            // The pieces of the splits may merge a second after.
            hold_ms: 1000,
            ..Default::default()
        },
        &[],
    )
    .await;
    let kv = client(&cluster).await;
    let data = values("d", 96, 256 << 10);
    put_all(&kv, &data).await;
    expect_within(SETTLE_WAIT, "24 MiB split into pieces", || async {
        cluster
            .latest_config()
            .await
            .is_ok_and(|c| c.ranges.len() >= 6)
    })
    .await;
    let split = cluster.latest_config().await.expect("config").ranges.len();
    // Two values are left (512 KiB): every two neighbours together are under a
    // quarter of the split size, so the pieces merge round after round.
    let kept = |k: &[u8]| k.ends_with(b"00") || k.ends_with(b"50");
    for (k, _) in data.iter().filter(|(k, _)| !kept(k)) {
        kv.delete(k).await.expect("delete");
    }
    expect_within(SETTLE_WAIT, "the emptied pieces merged", || async {
        cluster
            .latest_config()
            .await
            .is_ok_and(|c| c.ranges.len() <= 2)
    })
    .await;
    let h = history(&cluster).await;
    let merges = h.iter().filter(|d| d.kind() == Kind::Merge).count();
    assert!(
        merges >= split - 2,
        "{merges} merges of {split} ranges: {h:?}"
    );
    for (k, v) in data.iter().filter(|(k, _)| kept(k)) {
        assert_eq!(kv.get(k).await.expect("read").as_ref(), Some(v));
    }
}
