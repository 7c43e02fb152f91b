//! End-to-end tests of the kv replica groups: real `shardmaster` and `kvnode`
//! processes on loopback, driven through the fixture's routing test client.

mod common;

use common::{
    describe_node, expect_within, recorded_random_op, rpc, DetailKind, KvCluster, KvOptions,
    KvTestClient,
};
use shardkv::proto::batch_op::Op as BatchOpKind;
use shardkv::proto::batch_result::Result as BatchOpResult;
use shardkv::proto::internal::PullRequest;
use shardkv::proto::{
    BatchOp, BatchRequest, BatchResult, CompareAndSwapReply, CompareAndSwapRequest, Config,
    DeleteRequest, GetRequest, KeyRange, KeyValue, PutRequest, RangeState, RequestId, ScanRequest,
};
use shardkv::status::{self, detail};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Code, Status};

const LEADER_WAIT: Duration = Duration::from_secs(15);
const SETTLE_WAIT: Duration = Duration::from_secs(30);

fn options(masters: usize, groups: u64) -> KvOptions {
    KvOptions {
        masters,
        groups,
        ..Default::default()
    }
}

/// Joins group 1, splits at every bound in `splits`, joins group 2 (which takes about
/// half of the ranges) and waits until both serve.
async fn two_groups_with_splits(cluster: &KvCluster, splits: &[&[u8]]) -> Config {
    cluster.join(&[1]).await;
    let mut mc = cluster.master_client();
    for s in splits {
        mc.split(s)
            .await
            .unwrap_or_else(|e| panic!("split {:?}: {e}", String::from_utf8_lossy(s)));
    }
    cluster.join(&[2]).await;
    let c = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(c.groups.len(), 2);
    c
}

/// Moves the range containing `key` to `gid` unless it is there already.
async fn ensure_owner(cluster: &KvCluster, key: &[u8], gid: u64) {
    let c = cluster.latest_config().await.expect("latest config");
    if c.owner(key).1 != gid {
        cluster
            .master_client()
            .move_range(key, gid)
            .await
            .unwrap_or_else(|e| panic!("move {:?} to {gid}: {e}", String::from_utf8_lossy(key)));
    }
}

/// ~`n` keys spread over the alphabet: "a00", "b01", ..., "z25", "a26", ...
fn spread_keys(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{}{i:02}", (b'a' + (i % 26) as u8) as char).into_bytes())
        .collect()
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts `r` failed with INVALID_ARGUMENT whose detail names `field`.
fn assert_invalid<T: std::fmt::Debug>(what: &str, r: Result<T, Status>, field: &str) {
    let e = match r {
        Ok(v) => panic!("{what}: accepted ({v:?}), expected INVALID_ARGUMENT on {field}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    match detail(&e) {
        Some(DetailKind::InvalidArgument(a)) => {
            assert_eq!(a.field, field, "{what}: detail names {a:?}")
        }
        other => panic!("{what}: expected an InvalidArgument detail, got {other:?} ({e:?})"),
    }
}

/// Asserts `r` failed with FAILED_PRECONDITION + WrongGroup; returns its config num.
fn assert_wrong_group<T: std::fmt::Debug>(what: &str, r: Result<T, Status>) -> u64 {
    let e = match r {
        Ok(v) => panic!("{what}: answered {v:?}, expected WrongGroup"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
    match detail(&e) {
        Some(DetailKind::WrongGroup(w)) => w.config_num,
        other => panic!("{what}: expected a WrongGroup detail, got {other:?} ({e:?})"),
    }
}

/// Deterministic pseudo-random bytes for value `i`.
fn big_value(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, to compare big values without printing them.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::test]
async fn keys_spread_over_groups_and_one_dead_group_fails_only_its_keys() {
    let mut cluster = KvCluster::start(options(3, 2));
    let config = two_groups_with_splits(&cluster, &[b"g", b"n", b"t"]).await;
    let keys = spread_keys(40);
    let mut kv = cluster.client();
    for k in &keys {
        kv.put(k, format!("v1-{}", s(k)).as_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {}: {e}", s(k)));
    }
    let mut owner: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for k in &keys {
        let v = kv
            .get(k)
            .await
            .unwrap_or_else(|e| panic!("get {}: {e}", s(k)));
        assert_eq!(v, Some(format!("v1-{}", s(k)).into_bytes()), "key {}", s(k));
        assert_eq!(
            kv.last_gid,
            config.owner(k).1,
            "key {} answered by the wrong group",
            s(k)
        );
        owner.insert(k.clone(), config.owner(k).1);
    }
    let g1: Vec<Vec<u8>> = keys.iter().filter(|k| owner[*k] == 1).cloned().collect();
    let g2: Vec<Vec<u8>> = keys.iter().filter(|k| owner[*k] == 2).cloned().collect();
    assert!(
        g1.len() >= 5 && g2.len() >= 5,
        "keys should spread over both groups: {} on group 1, {} on group 2",
        g1.len(),
        g2.len()
    );

    cluster.kill9_group(1);

    // Group 2's keys still read and write.
    for k in &g2 {
        let v = kv
            .get(k)
            .await
            .unwrap_or_else(|e| panic!("get {}: {e}", s(k)));
        assert_eq!(v, Some(format!("v1-{}", s(k)).into_bytes()), "key {}", s(k));
        kv.put(k, format!("v2-{}", s(k)).as_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {} with group 1 down: {e}", s(k)));
        assert_eq!(
            kv.get(k).await.expect("get"),
            Some(format!("v2-{}", s(k)).into_bytes())
        );
    }

    // Group 1's keys fail within a short deadline and never return a value.
    let short = Duration::from_millis(1500);
    let masters = cluster.masters().addrs().to_vec();
    let started = Instant::now();
    let outcomes = futures::future::join_all(g1.iter().map(|k| {
        let mut c = KvTestClient::new(masters.clone());
        c.deadline = short;
        async move {
            let get = c.get(k).await;
            let put = c.put(k, b"never").await;
            (k.clone(), get, put)
        }
    }))
    .await;
    for (k, get, put) in &outcomes {
        assert!(
            get.is_err(),
            "get {} succeeded with its group dead: {get:?}",
            s(k)
        );
        assert!(
            put.is_err(),
            "put {} succeeded with its group dead: {put:?}",
            s(k)
        );
    }
    let took = started.elapsed();
    assert!(
        took < short * 2 + Duration::from_secs(3),
        "failing calls took {took:?} (deadline {short:?} per call)"
    );
    println!(
        "group 1 down: {} of its keys failed (e.g. {:?}) in {took:?}",
        g1.len(),
        outcomes[0].1.as_ref().err().map(|e| e.code())
    );

    // Group 1 comes back with its values; the failed puts never reached it.
    for i in 0..3 {
        cluster.start_node(1, i);
    }
    for k in &g1 {
        let v = kv
            .get(k)
            .await
            .unwrap_or_else(|e| panic!("get {}: {e}", s(k)));
        assert_eq!(v, Some(format!("v1-{}", s(k)).into_bytes()), "key {}", s(k));
    }
}

#[tokio::test]
async fn join_write_join_leave_keeps_every_value() {
    let cluster = KvCluster::start(options(3, 2));
    cluster.join(&[1]).await;
    cluster.wait_group_serving(1, SETTLE_WAIT).await;
    let keys = spread_keys(30);
    let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut kv = cluster.client();
    for k in &keys {
        let v = format!("first-{}", s(k)).into_bytes();
        kv.put(k, &v).await.expect("put");
        last.insert(k.clone(), Some(v));
    }

    let mut mc = cluster.master_client();
    for b in [&b"g"[..], b"n", b"t"] {
        mc.split(b).await.expect("split");
    }
    cluster.join(&[2]).await;
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    let moved = keys.iter().filter(|k| config.owner(k).1 == 2).count();
    assert!(moved > 0, "join 2 should move some keys' ranges to group 2");

    for (i, k) in keys.iter().enumerate() {
        if i % 3 == 0 {
            let v = format!("second-{}", s(k)).into_bytes();
            kv.put(k, &v).await.expect("overwrite");
            last.insert(k.clone(), Some(v));
        }
    }
    assert!(kv.delete(&keys[1]).await.expect("delete"), "key existed");
    last.insert(keys[1].clone(), None);

    let left = mc.leave(vec![1]).await.expect("leave 1");
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert!(config.num >= left.num);
    assert!(
        config.ranges.iter().all(|r| r.gid == 2),
        "after Leave(1) group 2 owns everything: {config:?}"
    );

    let mut fresh = cluster.client();
    for (k, v) in &last {
        assert_eq!(&fresh.get(k).await.expect("get"), v, "key {}", s(k));
        assert_eq!(fresh.last_gid, 2);
    }

    // Group 1 holds nothing any more, on every node.
    for i in 0..3 {
        expect_within(SETTLE_WAIT, "group 1 node to drop every range", || async {
            cluster
                .node_status(1, i)
                .await
                .is_ok_and(|st| st.ranges.is_empty() && st.config_num >= config.num)
        })
        .await;
    }
    let leader = cluster.wait_leader(1, LEADER_WAIT).await;
    let r = rpc(cluster.kv(1, leader).get(GetRequest {
        key: keys[0].clone(),
    }))
    .await;
    let num = assert_wrong_group("Get at group 1 after it left", r);
    assert!(num >= config.num, "WrongGroup names config {num}");

    // Group 1 (same nodes, same data directories) joins again and takes ranges back.
    cluster.join(&[1]).await;
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    let mut served_by = BTreeMap::new();
    for (k, v) in &last {
        assert_eq!(
            &fresh.get(k).await.expect("get"),
            v,
            "key {} after rejoin",
            s(k)
        );
        assert_eq!(fresh.last_gid, config.owner(k).1);
        *served_by.entry(fresh.last_gid).or_insert(0) += 1;
    }
    assert_eq!(
        served_by.len(),
        2,
        "both groups serve keys again: {served_by:?}"
    );
}

#[tokio::test]
async fn kill9_everything_and_restart_keeps_acknowledged_writes() {
    let mut cluster = KvCluster::start(options(3, 2));
    two_groups_with_splits(&cluster, &[b"g", b"n", b"t"]).await;
    let keys = spread_keys(60);
    let mut kv = cluster.client();
    for k in &keys {
        kv.put(k, format!("acked-{}", s(k)).as_bytes())
            .await
            .expect("put");
    }
    // One overwrite and one delete, acknowledged too.
    kv.put(&keys[0], b"overwritten").await.expect("overwrite");
    assert!(kv.delete(&keys[1]).await.expect("delete"));

    cluster.kill9_all();
    let mut down = cluster.client();
    down.deadline = Duration::from_millis(500);
    down.get(&keys[2])
        .await
        .expect_err("nothing answers with every process dead");
    cluster.start_stopped();

    let mut kv = cluster.client();
    kv.deadline = Duration::from_secs(30);
    for (i, k) in keys.iter().enumerate() {
        let expected = match i {
            0 => Some(b"overwritten".to_vec()),
            1 => None,
            _ => Some(format!("acked-{}", s(k)).into_bytes()),
        };
        let v = kv
            .get(k)
            .await
            .unwrap_or_else(|e| panic!("get {} after restart: {e}", s(k)));
        assert_eq!(v, expected, "key {} after kill -9 of everything", s(k));
    }
    kv.put(b"after-restart", b"ok").await.expect("write");
    assert_eq!(
        kv.get(b"after-restart").await.expect("get"),
        Some(b"ok".to_vec())
    );
}

#[tokio::test]
async fn node_down_through_several_configs_catches_up() {
    let mut cluster = KvCluster::start(KvOptions {
        groups: 0,
        ..options(3, 0)
    });
    // A short log on group 1, so the node that was down is sent a snapshot.
    cluster.add_group_with(1, &["--compact-threshold", "40"]);
    cluster.add_group(2);
    cluster.join(&[1]).await;
    cluster.wait_group_serving(1, SETTLE_WAIT).await;
    let mut kv = cluster.client();
    let mut values: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for k in spread_keys(10) {
        let v = format!("early-{}", s(&k)).into_bytes();
        kv.put(&k, &v).await.expect("put");
        values.insert(k, v);
    }

    let leader = cluster.wait_leader(1, LEADER_WAIT).await;
    let down = (leader + 1) % 3;
    let down_commit = cluster
        .must_node_status(1, down)
        .await
        .replica
        .expect("replica")
        .commit_index;
    cluster.kill9(1, down);
    let start_num = cluster.latest_config().await.expect("config").num;

    let mut mc = cluster.master_client();
    for b in [&b"g"[..], b"n", b"t"] {
        mc.split(b).await.expect("split");
    }
    cluster.join(&[2]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    for k in spread_keys(40).into_iter().skip(10) {
        let v = format!("mid-{}", s(&k)).into_bytes();
        kv.put(&k, &v).await.expect("put");
        values.insert(k, v);
    }
    // Some moves either way, then group 2 leaves again: everything comes back.
    ensure_owner(&cluster, b"a", 2).await;
    ensure_owner(&cluster, b"p", 1).await;
    mc.split(b"w").await.expect("split w");
    ensure_owner(&cluster, b"x", 2).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    mc.leave(vec![2]).await.expect("leave 2");
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert!(config.ranges.iter().all(|r| r.gid == 1));
    for k in spread_keys(40) {
        let v = format!("late-{}", s(&k)).into_bytes();
        kv.put(&k, &v).await.expect("put");
        values.insert(k, v);
    }
    let leader_status = cluster.wait_group_serving(1, SETTLE_WAIT).await;
    println!(
        "configs {start_num} -> {} while node {down} was down; leader: {}",
        config.num,
        describe_node(&leader_status)
    );

    // The leader's log no longer holds what the node missed: it needs a snapshot.
    let first = leader_status
        .replica
        .as_ref()
        .expect("replica")
        .first_log_index;
    assert!(
        first > down_commit + 1,
        "leader's log starts at {first}; node {down} stopped at commit {down_commit}"
    );

    cluster.start_node(1, down);
    let caught = cluster.wait_caught_up(1, down, SETTLE_WAIT).await;
    assert_eq!(caught.config_num, config.num);
    println!("node {down} caught up: {}", describe_node(&caught));

    // The caught-up node must be a working quorum member: kill one of the other two.
    let leader = cluster.wait_leader(1, LEADER_WAIT).await;
    let victim = if leader != down {
        leader
    } else {
        (down + 1) % 3
    };
    cluster.kill9(1, victim);
    let mut kv = cluster.client();
    kv.deadline = Duration::from_secs(30);
    for (k, v) in &values {
        assert_eq!(
            kv.get(k)
                .await
                .unwrap_or_else(|e| panic!("get {}: {e}", s(k))),
            Some(v.clone()),
            "key {} with node {victim} dead and node {down} back",
            s(k)
        );
    }
    for k in spread_keys(5) {
        kv.put(&k, b"after").await.expect("put with one node dead");
        assert_eq!(kv.get(&k).await.expect("get"), Some(b"after".to_vec()));
    }
    let st = cluster.must_node_status(1, down).await;
    assert_ne!(
        st.replica.as_ref().map(|r| r.role.as_str()),
        Some("learner")
    );
}

#[tokio::test]
async fn bad_input_is_rejected_and_changes_nothing() {
    let cluster = KvCluster::start(KvOptions {
        max_value_bytes: Some(1024),
        ..options(1, 1)
    });
    cluster.join(&[1]).await;
    cluster.wait_group_serving(1, SETTLE_WAIT).await;
    let mut kv = cluster.client();
    kv.put(b"k", b"old").await.expect("put");
    let leader = cluster.wait_leader(1, LEADER_WAIT).await;
    let mut c = cluster.kv(1, leader);
    let id = |seq| {
        Some(RequestId {
            client_id: 77,
            seq,
            first_incomplete: seq,
        })
    };
    let long_key = vec![b'x'; 4097];
    let max_key = vec![b'y'; 4096];
    let big = vec![b'v'; 1025];

    let r = rpc(c.get(GetRequest { key: vec![] })).await;
    assert_invalid("Get empty key", r, "key");
    let r = rpc(c.get(GetRequest {
        key: long_key.clone(),
    }))
    .await;
    assert_invalid("Get 4097-byte key", r, "key");
    let r = rpc(c.put(PutRequest {
        key: vec![],
        value: b"x".to_vec(),
        id: id(1),
    }))
    .await;
    assert_invalid("Put empty key", r, "key");
    let r = rpc(c.put(PutRequest {
        key: long_key.clone(),
        value: b"x".to_vec(),
        id: id(2),
    }))
    .await;
    assert_invalid("Put 4097-byte key", r, "key");
    let r = rpc(c.put(PutRequest {
        key: b"k".to_vec(),
        value: big.clone(),
        id: id(3),
    }))
    .await;
    assert_invalid("Put 1025-byte value", r, "value");
    let r = rpc(c.delete(DeleteRequest {
        key: vec![],
        id: id(4),
    }))
    .await;
    assert_invalid("Delete empty key", r, "key");
    let r = rpc(c.compare_and_swap(CompareAndSwapRequest {
        key: b"k".to_vec(),
        expected: Some(b"old".to_vec()),
        value: Some(big.clone()),
        id: id(5),
    }))
    .await;
    assert_invalid("CAS to a 1025-byte value", r, "value");
    let r = rpc(c.compare_and_swap(CompareAndSwapRequest {
        key: long_key.clone(),
        expected: None,
        value: Some(b"x".to_vec()),
        id: id(6),
    }))
    .await;
    assert_invalid("CAS 4097-byte key", r, "key");
    let scan = |start: &[u8], end: &[u8], limit| ScanRequest {
        start: start.to_vec(),
        end: end.to_vec(),
        limit,
    };
    let r = rpc(c.scan(scan(b"b", b"a", 0))).await;
    assert_invalid("Scan end < start", r, "end");
    let r = rpc(c.scan(scan(b"b", b"b", 0))).await;
    assert_invalid("Scan end == start", r, "end");
    let r = rpc(c.scan(scan(b"a", b"", 10_001))).await;
    match &r {
        Err(e) => match detail(e) {
            Some(DetailKind::InvalidArgument(a)) => assert_eq!(a.limit, 10_000, "{a:?}"),
            other => panic!("Scan limit 10001: {other:?}"),
        },
        Ok(_) => panic!("Scan limit 10001 accepted"),
    }
    assert_invalid("Scan limit 10001", r, "limit");
    // A follower validates too (before any leadership check).
    let follower = (leader + 1) % 3;
    let r = rpc(cluster.kv(1, follower).put(PutRequest {
        key: b"k".to_vec(),
        value: big.clone(),
        id: id(7),
    }))
    .await;
    assert_invalid("Put 1025-byte value at a follower", r, "value");

    // The limits themselves are accepted.
    kv.put(&max_key, b"max key").await.expect("4096-byte key");
    kv.put(b"v", &[b'v'; 1024]).await.expect("1024-byte value");
    rpc(c.scan(scan(b"a", b"", 10_000)))
        .await
        .expect("scan limit 10000");

    // Nothing changed: the old value, and only the keys written above exist.
    assert_eq!(kv.get(b"k").await.expect("get"), Some(b"old".to_vec()));
    let all = kv.scan_all(b"", b"", 0).await.expect("scan");
    let keys: Vec<Vec<u8>> = all.into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec![b"k".to_vec(), b"v".to_vec(), max_key.clone()]);
    // The rejected writes' ids were not consumed: id 3 can still be used, once.
    let r = rpc(c.put(PutRequest {
        key: b"k".to_vec(),
        value: b"new".to_vec(),
        id: id(3),
    }))
    .await;
    r.expect("put with the id of a rejected put");
    assert_eq!(kv.get(b"k").await.expect("get"), Some(b"new".to_vec()));
}

/// One op's failure in a Batch reply, as the status the single call would return.
fn op_status(result: &BatchResult) -> Result<(), Status> {
    match &result.result {
        Some(BatchOpResult::Error(e)) => Err(status::from_op(e.clone())),
        Some(_) => Ok(()),
        None => panic!("empty batch result"),
    }
}

#[tokio::test]
async fn batch_answers_each_request_on_its_own() {
    let cluster = KvCluster::start(KvOptions {
        max_value_bytes: Some(1024),
        ..options(1, 2)
    });
    two_groups_with_splits(&cluster, &[b"n"]).await;
    ensure_owner(&cluster, b"a", 1).await;
    ensure_owner(&cluster, b"z", 2).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let leader = cluster.wait_leader(1, LEADER_WAIT).await;
    let mut c = cluster.kv(1, leader);
    let id = |seq| {
        Some(RequestId {
            client_id: 99,
            seq,
            first_incomplete: 1,
        })
    };
    let put = |key: &[u8], value: &[u8], seq| BatchOp {
        op: Some(BatchOpKind::Put(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            id: id(seq),
        })),
    };
    let get = |key: &[u8]| BatchOp {
        op: Some(BatchOpKind::Get(GetRequest { key: key.to_vec() })),
    };
    let ops = vec![
        put(b"a", b"1", 1),
        put(b"b", b"2", 2),
        // The other group's key: WrongGroup for this op alone.
        put(b"z", b"3", 3),
        get(b"z"),
        put(b"", b"4", 4),
        put(b"c", &[b'v'; 1025], 5),
        BatchOp {
            op: Some(BatchOpKind::Cas(CompareAndSwapRequest {
                key: b"a".to_vec(),
                expected: Some(b"1".to_vec()),
                value: Some(b"one".to_vec()),
                id: id(6),
            })),
        },
        BatchOp { op: None },
        get(b"b"),
    ];
    let results = rpc(c.batch(BatchRequest { ops }))
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 9, "{results:?}");
    for i in [0, 1, 6] {
        op_status(&results[i]).unwrap_or_else(|e| panic!("op {i}: {e:?}"));
    }
    assert_wrong_group("batched put of z", op_status(&results[2]));
    assert_wrong_group("batched get of z", op_status(&results[3]));
    assert_invalid("batched put of an empty key", op_status(&results[4]), "key");
    assert_invalid("batched 1025-byte value", op_status(&results[5]), "value");
    assert_invalid("batched empty op", op_status(&results[7]), "op");
    // The writes were applied in their order: the CAS saw the put before it.
    match &results[6].result {
        Some(BatchOpResult::Cas(r)) => assert!(r.swapped, "{r:?}"),
        other => panic!("cas: {other:?}"),
    }
    let mut kv = cluster.client();
    assert_eq!(kv.get(b"a").await.expect("get"), Some(b"one".to_vec()));
    assert_eq!(kv.get(b"b").await.expect("get"), Some(b"2".to_vec()));
    assert_eq!(kv.get(b"c").await.expect("get"), None);
    assert_eq!(kv.get(b"z").await.expect("get"), None);

    // Too many ops: the whole call is refused.
    let ops = (0..1025).map(|_| get(b"a")).collect();
    let r = rpc(c.batch(BatchRequest { ops })).await;
    assert_invalid("a batch of 1025 ops", r, "ops");
    // At a follower every op is answered NotLeader, with the leader's address.
    let follower = (leader + 1) % 3;
    let results = rpc(cluster.kv(1, follower).batch(BatchRequest {
        ops: vec![get(b"a"), put(b"a", b"x", 7)],
    }))
    .await
    .expect("batch at a follower")
    .into_inner()
    .results;
    for result in &results {
        let e = op_status(result).expect_err("a follower answered");
        match detail(&e) {
            Some(DetailKind::NotLeader(n)) => assert_eq!(n.leader_addr, cluster.addr(1, leader)),
            other => panic!("expected NotLeader, got {other:?} ({e:?})"),
        }
    }
    assert_eq!(kv.get(b"a").await.expect("get"), Some(b"one".to_vec()));
}

#[tokio::test]
async fn retried_write_is_applied_once_even_after_its_range_moved() {
    let cluster = KvCluster::start(options(3, 2));
    let config = two_groups_with_splits(&cluster, &[b"n"]).await;
    let key = b"apple".to_vec();
    let src = config.owner(&key).1;
    let dst = if src == 1 { 2 } else { 1 };
    let mut kv = cluster.client();
    let cid = kv.client_id();
    let id = |seq, first_incomplete| RequestId {
        client_id: cid,
        seq,
        first_incomplete,
    };

    kv.put_with_id(&key, b"v1", id(1, 1)).await.expect("put v1");
    let first = kv
        .cas_with_id(&key, Some(b"v1"), Some(b"v2"), id(2, 2))
        .await
        .expect("cas v1 -> v2");
    let expected_first = CompareAndSwapReply {
        swapped: true,
        found: true,
        current: b"v2".to_vec(),
    };
    assert_eq!(first, expected_first);
    // The client has not seen seq 2's answer yet when it sends seq 3.
    kv.put_with_id(&key, b"v3", id(3, 2)).await.expect("put v3");
    let again = kv
        .cas_with_id(&key, Some(b"v1"), Some(b"v2"), id(2, 2))
        .await
        .expect("retry of seq 2 at the old owner");
    assert_eq!(again, expected_first, "a retry returns the first reply");
    assert_eq!(kv.get(&key).await.expect("get"), Some(b"v3".to_vec()));

    cluster
        .master_client()
        .move_range(&key, dst)
        .await
        .expect("move");
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(config.owner(&key).1, dst);

    let src_leader = cluster.wait_leader(src, LEADER_WAIT).await;
    let r = rpc(cluster
        .kv(src, src_leader)
        .compare_and_swap(CompareAndSwapRequest {
            key: key.clone(),
            expected: Some(b"v1".to_vec()),
            value: Some(b"v2".to_vec()),
            id: Some(id(2, 2)),
        }))
    .await;
    assert_wrong_group("retry at the old owner after the move", r);

    let moved = kv
        .cas_with_id(&key, Some(b"v1"), Some(b"v2"), id(2, 2))
        .await
        .expect("retry of seq 2 at the new owner");
    assert_eq!(kv.last_gid, dst);
    assert_eq!(
        moved, expected_first,
        "the new owner answers a retry with the first reply"
    );
    assert_eq!(
        kv.get(&key).await.expect("get"),
        Some(b"v3".to_vec()),
        "the retried CAS must not apply again"
    );
    // Seq 1 is below first_incomplete: refused, not applied.
    let r = kv.put_with_id(&key, b"v1", id(1, 1)).await;
    let e = r.expect_err("seq 1 was acknowledged; its retry is stale");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(kv.get(&key).await.expect("get"), Some(b"v3".to_vec()));
    // A new write moves first_incomplete past 2: seq 2 is refused from then on.
    kv.put_with_id(&key, b"v4", id(4, 4)).await.expect("put v4");
    let e = kv
        .cas_with_id(&key, Some(b"v1"), Some(b"v2"), id(2, 2))
        .await
        .expect_err("seq 2 after first_incomplete moved past it");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(kv.get(&key).await.expect("get"), Some(b"v4".to_vec()));
}

#[derive(Default, Debug)]
struct Background {
    calls: u64,
    failures: Vec<String>,
    slowest: Duration,
}

#[tokio::test]
async fn large_range_moves_in_chunks_while_others_keep_serving() {
    const VALUES: u64 = 200;
    const VALUE_BYTES: usize = 256 << 10;
    let cluster = KvCluster::start(options(1, 2));
    two_groups_with_splits(&cluster, &[b"g", b"n", b"t"]).await;
    // Group 1: [-inf, g) and [g, n); group 2: [n, t) and [t, +inf).
    ensure_owner(&cluster, b"a", 1).await;
    ensure_owner(&cluster, b"m", 1).await;
    ensure_owner(&cluster, b"p", 2).await;
    ensure_owner(&cluster, b"x", 2).await;
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(
        [b"a", b"m", b"p", b"x"].map(|k| config.owner(k).1),
        [1, 1, 2, 2]
    );

    let started = Instant::now();
    write_big_values(&cluster, "m", VALUES, VALUE_BYTES).await;
    println!(
        "wrote {} MiB in {:?}",
        (VALUES as usize * VALUE_BYTES) >> 20,
        started.elapsed()
    );
    let masters = cluster.masters().addrs().to_vec();

    // Keys of a range staying on the source and of one on the destination.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let stop = stop.clone();
        let mut c = KvTestClient::new(masters.clone());
        c.deadline = Duration::from_secs(5);
        tokio::spawn(async move {
            let mut b = Background::default();
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for prefix in ["b", "q"] {
                    let key = format!("{prefix}{}", i % 20);
                    let value = format!("{i}");
                    let t = Instant::now();
                    let put = c.put(key.as_bytes(), value.as_bytes()).await;
                    b.slowest = b.slowest.max(t.elapsed());
                    let t = Instant::now();
                    let get = c.get(key.as_bytes()).await;
                    b.slowest = b.slowest.max(t.elapsed());
                    b.calls += 2;
                    if let Err(e) = put {
                        b.failures.push(format!("put {key}: {e}"));
                    }
                    match get {
                        Ok(Some(v)) if v == value.as_bytes() => {}
                        other => b.failures.push(format!("get {key}: {other:?}")),
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            b
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let move_started = Instant::now();
    cluster
        .master_client()
        .move_range(b"m", 2)
        .await
        .expect("move [g, n) to group 2");
    let settled = AtomicBool::new(false);
    let (config, cursors) = tokio::join!(
        async {
            let c = cluster.wait_settled(Duration::from_secs(120)).await;
            settled.store(true, Ordering::Relaxed);
            c
        },
        pull_cursors(&cluster, 2, &settled)
    );
    let took = move_started.elapsed();
    assert_eq!(config.owner(b"m").1, 2);
    stop.store(true, Ordering::Relaxed);
    let b = background.await.expect("background task");
    assert!(
        cursors.len() >= 2,
        "the pull should be seen in progress at several cursors: {:?}",
        cursors.iter().map(|c| s(c)).collect::<Vec<_>>()
    );
    println!(
        "moved {} MiB in {took:?} ({} distinct pull cursors seen); background: {} calls, slowest {:?}, {} failures",
        (VALUES as usize * VALUE_BYTES) >> 20,
        cursors.len(),
        b.calls,
        b.slowest,
        b.failures.len()
    );
    assert!(
        b.failures.is_empty(),
        "background failures: {:?}",
        b.failures
    );
    assert!(b.calls >= 4, "background made {} calls", b.calls);
    assert!(
        b.slowest < Duration::from_secs(2),
        "a background call took {:?}",
        b.slowest
    );

    check_big_values(&cluster, "m", VALUES, VALUE_BYTES, 2).await;
    let moved = KeyRange {
        start: b"g".to_vec(),
        end: b"n".to_vec(),
    };
    wait_dropped(&cluster, 1, &moved).await;
}

/// A transfer survives kill -9 of the destination's leader in the middle of the pull
/// and of the source's leader: the new leader resumes at the replicated cursor, and
/// the range arrives whole.
#[tokio::test]
async fn transfer_resumes_after_kill9_of_both_leaders_midway() {
    const VALUES: u64 = 80;
    const VALUE_BYTES: usize = 256 << 10;
    let mut cluster = KvCluster::start(options(1, 2));
    two_groups_with_splits(&cluster, &[b"g", b"n"]).await;
    ensure_owner(&cluster, b"m", 1).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    write_big_values(&cluster, "m", VALUES, VALUE_BYTES).await;

    cluster
        .master_client()
        .move_range(b"m", 2)
        .await
        .expect("move [g, n) to group 2");
    // The destination's leader has installed part of the range.
    let seen = Mutex::new(None);
    expect_within(SETTLE_WAIT, "group 2 to be pulling [g, n)", || async {
        let statuses = cluster.group_statuses(2).await;
        for (i, st) in statuses {
            let Ok(st) = st else { continue };
            if st.replica.as_ref().is_some_and(|r| r.role == "leader") {
                if let Some(h) = st
                    .ranges
                    .iter()
                    .find(|h| h.state() == RangeState::Pulling && !h.cursor.is_empty())
                {
                    *seen.lock().unwrap() = Some((i, h.cursor.clone()));
                    return true;
                }
            }
        }
        false
    })
    .await;
    let (dst_leader, cursor) = seen.into_inner().unwrap().expect("seen");
    cluster.kill9(2, dst_leader);
    let src_leader = cluster.wait_leader(1, LEADER_WAIT).await;
    cluster.kill9(1, src_leader);
    println!(
        "killed group 2's leader {dst_leader} at cursor {:?} and group 1's leader {src_leader}",
        s(&cursor)
    );

    // The new leader of group 2 carries on from where the old one got (or is done).
    let resumed = Mutex::new(String::new());
    expect_within(SETTLE_WAIT, "group 2's new leader to resume", || async {
        let statuses = cluster.group_statuses(2).await;
        for (_, st) in statuses {
            let Ok(st) = st else { continue };
            if st.replica.as_ref().is_none_or(|r| r.role != "leader") {
                continue;
            }
            *resumed.lock().unwrap() = describe_node(&st);
            let pulling = st
                .ranges
                .iter()
                .find(|h| h.state() == RangeState::Pulling)
                .map(|h| h.cursor.clone());
            return match pulling {
                Some(c) => c >= cursor,
                None => true,
            };
        }
        false
    })
    .await;
    println!("new leader of group 2: {}", resumed.lock().unwrap());

    cluster.start_node(2, dst_leader);
    cluster.start_node(1, src_leader);
    let config = cluster.wait_settled(Duration::from_secs(60)).await;
    assert_eq!(config.owner(b"m").1, 2);
    check_big_values(&cluster, "m", VALUES, VALUE_BYTES, 2).await;
    let moved = KeyRange {
        start: b"g".to_vec(),
        end: b"n".to_vec(),
    };
    wait_dropped(&cluster, 1, &moved).await;
    cluster.wait_caught_up(2, dst_leader, SETTLE_WAIT).await;
    cluster.wait_caught_up(1, src_leader, SETTLE_WAIT).await;
}

/// The cursors of PULLING ranges seen on `gid`'s nodes until `stop` is set (or two
/// minutes pass).
async fn pull_cursors(cluster: &KvCluster, gid: u64, stop: &AtomicBool) -> BTreeSet<Vec<u8>> {
    let mut seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        for (_, st) in cluster.group_statuses(gid).await {
            for h in st.map(|st| st.ranges).unwrap_or_default() {
                if h.state() == RangeState::Pulling && !h.cursor.is_empty() {
                    seen.insert(h.cursor);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen
}

/// Writes `count` values of `len` bytes, "{prefix}000", ... (value i is
/// `big_value(i, len)`), with four writers at once.
async fn write_big_values(cluster: &KvCluster, prefix: &str, count: u64, len: usize) {
    let masters = cluster.masters().addrs().to_vec();
    let writers = 4u64;
    futures::future::join_all((0..writers).map(|w| {
        let mut c = KvTestClient::new(masters.clone());
        c.deadline = Duration::from_secs(60);
        async move {
            for i in (w..count).step_by(writers as usize) {
                let key = format!("{prefix}{i:03}");
                c.put(key.as_bytes(), &big_value(i, len))
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
            }
        }
    }))
    .await;
}

/// Reads every value `write_big_values` wrote and checks it came from `gid`.
async fn check_big_values(cluster: &KvCluster, prefix: &str, count: u64, len: usize, gid: u64) {
    let mut kv = cluster.client();
    for i in 0..count {
        let key = format!("{prefix}{i:03}");
        let v = kv
            .get(key.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e}"))
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(kv.last_gid, gid, "{key} answered by group {}", kv.last_gid);
        assert_eq!(
            (v.len(), fnv(&v)),
            (len, fnv(&big_value(i, len))),
            "{key} has the wrong content"
        );
    }
}

/// Waits until no node of `gid` holds anything of `range`.
async fn wait_dropped(cluster: &KvCluster, gid: u64, range: &KeyRange) {
    for i in 0..cluster.group(gid).len() {
        expect_within(
            SETTLE_WAIT,
            &format!("node {i} of group {gid} to drop {range}"),
            || async {
                cluster.node_status(gid, i).await.is_ok_and(|st| {
                    !st.ranges
                        .iter()
                        .any(|h| h.range.as_ref().is_some_and(|r| overlaps(r, range)))
                })
            },
        )
        .await;
    }
}

fn overlaps(a: &KeyRange, b: &KeyRange) -> bool {
    let a_before_b_end = b.end.is_empty() || a.start < b.end;
    let b_before_a_end = a.end.is_empty() || b.start < a.end;
    a_before_b_end && b_before_a_end
}

#[tokio::test]
async fn scan_stitches_ranges_in_order() {
    let cluster = KvCluster::start(options(1, 2));
    let config = two_groups_with_splits(&cluster, &[b"f", b"m", b"s"]).await;
    let ranges: Vec<String> = config
        .ranges
        .iter()
        .map(|r| format!("{} g{}", r.range.clone().unwrap_or_default(), r.gid))
        .collect();
    println!("ranges: {ranges:?}");
    let mut kv = cluster.client();
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut keys: Vec<Vec<u8>> = spread_keys(52);
    // Keys on and next to the range bounds.
    for k in [
        &b"e\xff"[..],
        b"f",
        b"f\x00",
        b"lzz",
        b"m",
        b"s",
        b"\x01",
        b"\xff\xff",
    ] {
        keys.push(k.to_vec());
    }
    for k in &keys {
        let v = format!("val-{}", s(k)).into_bytes();
        kv.put(k, &v).await.expect("put");
        expected.insert(k.clone(), v);
    }
    let owners: std::collections::BTreeSet<u64> = keys.iter().map(|k| config.owner(k).1).collect();
    assert_eq!(owners.len(), 2, "keys should be on both groups");

    for page in [0, 1, 7] {
        let all = kv.scan_all(b"", b"", page).await.expect("scan all");
        check_scan(
            &expected,
            all,
            b"",
            b"",
            &format!("scan everything, page {page}"),
        );
    }
    for (lo, hi) in [
        (&b"c"[..], &b"p"[..]),
        (b"a", b"m"),
        (b"f", b"s"),
        (b"m", b""),
        (b"n", b"o"),
    ] {
        let got = kv.scan_all(lo, hi, 3).await.expect("scan");
        check_scan(
            &expected,
            got,
            lo,
            hi,
            &format!("scan [{}, {})", s(lo), s(hi)),
        );
    }
    // Deleted keys disappear from scans.
    for k in [&b"f"[..], b"m", b"a00"] {
        assert!(kv.delete(k).await.expect("delete"));
        expected.remove(k);
    }
    let all = kv.scan_all(b"", b"", 5).await.expect("scan after deletes");
    check_scan(&expected, all, b"", b"", "scan after deletes");
}

/// Asserts a scan of [lo, hi) returned exactly the expected pairs in that interval,
/// in order, none twice.
fn check_scan(
    expected: &BTreeMap<Vec<u8>, Vec<u8>>,
    got: Vec<KeyValue>,
    lo: &[u8],
    hi: &[u8],
    what: &str,
) {
    let want: Vec<(Vec<u8>, Vec<u8>)> = expected
        .iter()
        .filter(|(k, _)| k.as_slice() >= lo && (hi.is_empty() || k.as_slice() < hi))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let got: Vec<(Vec<u8>, Vec<u8>)> = got.into_iter().map(|p| (p.key, p.value)).collect();
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "{what}: keys out of order or duplicated"
    );
    assert_eq!(
        got.iter().map(|p| s(&p.0)).collect::<Vec<_>>(),
        want.iter().map(|p| s(&p.0)).collect::<Vec<_>>(),
        "{what}: keys differ"
    );
    assert_eq!(got, want, "{what}: values differ");
}

/// The source serves a frozen range to `Pull` in chunks of at most `max_bytes`,
/// resuming after the cursor, data first and then the client sessions, even when a
/// chunk ends on a session record; the destination, down while the range was moved,
/// pulls it when it comes back.
#[tokio::test]
async fn frozen_range_is_pulled_in_chunks_across_the_sessions() {
    let mut cluster = KvCluster::start(options(1, 2));
    two_groups_with_splits(&cluster, &[b"c", b"n"]).await;
    ensure_owner(&cluster, b"a", 1).await;
    ensure_owner(&cluster, b"h", 1).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    // Pulled bytes count storage keys ("d" + key) and values: 3 + (2^20 - 5) bytes of
    // data, so the first session record passes a 2^20 chunk.
    let value = big_value(7, (1 << 20) - 5);
    let mut kv = cluster.client();
    kv.put(b"h1", &value).await.expect("put");
    // More clients, so there are several sessions (their keys stay on group 1).
    for i in 0..3 {
        let mut other = cluster.client();
        other
            .put(format!("a{i}").as_bytes(), b"x")
            .await
            .expect("put");
    }

    // With group 2 down, the moved range stays FROZEN on group 1.
    cluster.kill9_group(2);
    let moved = cluster
        .master_client()
        .move_range(b"h", 2)
        .await
        .expect("move");
    let frozen = Mutex::new(None);
    expect_within(SETTLE_WAIT, "group 1 to freeze [c, n)", || async {
        let Some(l) = cluster.leader(1).await else {
            return false;
        };
        let Ok(st) = cluster.node_status(1, l).await else {
            return false;
        };
        let h = st
            .ranges
            .iter()
            .find(|h| h.state() == RangeState::Frozen)
            .cloned();
        let found = h.is_some();
        *frozen.lock().unwrap() = h;
        found
    })
    .await;
    let frozen = frozen.into_inner().unwrap().expect("frozen");
    assert_eq!(frozen.config_num, moved.num);
    assert_eq!(frozen.peer_gid, 2);
    let range = frozen.range.clone().expect("range");
    assert_eq!(
        (range.start.as_slice(), range.end.as_slice()),
        (&b"c"[..], &b"n"[..])
    );

    // Any replica that applied the freeze serves the pull; page through it.
    let mut records = Vec::new();
    let mut cursor = Vec::new();
    let mut calls = 0;
    for i in (0..3).cycle().take(20) {
        let reply = rpc(cluster.transfer(1, i).pull(PullRequest {
            config_num: frozen.config_num,
            range: Some(range.clone()),
            cursor: cursor.clone(),
            max_bytes: 1 << 20,
        }))
        .await
        .unwrap_or_else(|e| panic!("pull {calls} from node {i} after {:?}: {e}", s(&cursor)))
        .into_inner();
        calls += 1;
        if let Some(last) = reply.records.last() {
            assert!(
                last.key > cursor,
                "pull did not advance past {:?}",
                s(&cursor)
            );
            cursor = last.key.clone();
        }
        records.extend(reply.records);
        if reply.done {
            break;
        }
    }
    let keys: Vec<String> = records
        .iter()
        .map(|r| s(&r.key[..r.key.len().min(3)]))
        .collect();
    assert!(
        calls >= 2,
        "the first chunk should stop at 1 MiB, within the sessions: {keys:?}"
    );
    assert_eq!(records[0].key, b"dh1", "data first: {keys:?}");
    assert_eq!(fnv(&records[0].value), fnv(&value));
    let sessions = records.iter().filter(|r| r.key[0] == b's').count();
    assert_eq!(sessions, 4, "one session per client: {keys:?}");
    assert_eq!(records.len(), 5, "{keys:?}");
    assert!(records.windows(2).all(|w| w[0].key < w[1].key), "{keys:?}");

    // Group 2 comes back and pulls the range itself.
    for i in 0..3 {
        cluster.start_node(2, i);
    }
    let config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(config.owner(b"h").1, 2);
    let got = kv.get(b"h1").await.expect("get").expect("h1 present");
    assert_eq!(kv.last_gid, 2);
    assert_eq!(fnv(&got), fnv(&value));
    for i in 0..3 {
        let mut other = cluster.client();
        assert_eq!(
            other.get(format!("a{i}").as_bytes()).await.expect("get"),
            Some(b"x".to_vec())
        );
    }
}

/// A SIGSTOPped leader is replaced; once resumed it never answers a read with the
/// value it had before it was paused.
#[tokio::test]
async fn paused_leader_is_replaced_and_serves_no_stale_read_after_resume() {
    let mut cluster = KvCluster::start(options(1, 1));
    cluster.join(&[1]).await;
    cluster.wait_group_serving(1, SETTLE_WAIT).await;
    let mut kv = cluster.client();
    kv.put(b"k", b"v1").await.expect("put v1");
    let old = cluster.wait_leader(1, LEADER_WAIT).await;

    cluster.pause(1, old);
    let t = Instant::now();
    kv.put(b"k", b"v2")
        .await
        .expect("put v2 with the leader paused");
    let failover = t.elapsed();
    let new = cluster.wait_leader(1, LEADER_WAIT).await;
    assert_ne!(new, old, "a paused node cannot lead");
    println!("write with the leader paused took {failover:?}");

    cluster.resume(1, old);
    let mut answers = Vec::new();
    for _ in 0..20 {
        let r = rpc(cluster.kv(1, old).get(GetRequest { key: b"k".to_vec() })).await;
        match r {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert_eq!(
                    (reply.found, reply.value.as_slice()),
                    (true, &b"v2"[..]),
                    "stale read from the resumed old leader"
                );
                answers.push("v2".to_string());
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "unexpected answer from the resumed old leader: {e:?}"
                );
                answers.push(format!("{:?}", e.code()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("old leader after resume answered: {answers:?}");
    expect_within(SETTLE_WAIT, "the old leader to follow", || async {
        cluster.node_status(1, old).await.is_ok_and(|st| {
            st.replica
                .is_some_and(|r| r.role == "follower" && r.leader_id == new as u64 + 1)
        })
    })
    .await;
    assert_eq!(kv.get(b"k").await.expect("get"), Some(b"v2".to_vec()));
}

/// Concurrent clients on a few keys while ranges move between the groups and a
/// leader is killed: the recorded history is linearizable.
#[tokio::test]
async fn concurrent_clients_stay_linearizable_through_moves_and_leader_kills() {
    use rand::{Rng, SeedableRng};
    use shardkv::verify::{check, Output, Recorder};

    let mut cluster = KvCluster::start(options(1, 2));
    two_groups_with_splits(&cluster, &[b"n"]).await;
    let keys: Vec<Vec<u8>> = ["c0", "c1", "c2", "p0", "p1"]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let masters = cluster.masters().addrs().to_vec();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let tasks: Vec<_> = (0..4u64)
        .map(|client| {
            let recorder = recorder.clone();
            let stop = stop.clone();
            let keys = keys.clone();
            let mut kv = KvTestClient::new(masters.clone());
            kv.deadline = Duration::from_secs(5);
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ client);
                let until = Instant::now() + Duration::from_secs(90);
                let (mut done, mut unknown, mut swapped) = (0u64, 0u64, 0u64);
                let mut seen: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    n += 1;
                    let key = keys[rng.random_range(0..keys.len())].clone();
                    let value = format!("{client}-{n}").into_bytes();
                    let dice = rng.random_range(0..100);
                    let (_, out) =
                        recorded_random_op(&mut kv, &recorder, client, &mut seen, key, value, dice)
                            .await;
                    match out {
                        Some(out) => {
                            swapped += u64::from(out == Output::Cas(true));
                            done += 1;
                        }
                        None => unknown += 1,
                    }
                }
                (done, unknown, swapped)
            })
        })
        .collect();

    let other = |gid: u64| if gid == 1 { 2 } else { 1 };
    let mut mc = cluster.master_client();
    tokio::time::sleep(Duration::from_millis(700)).await;
    for round in 0..2 {
        let c = cluster.latest_config().await.expect("config");
        mc.move_range(b"c", other(c.owner(b"c").1))
            .await
            .expect("move c");
        let c = cluster.wait_settled(SETTLE_WAIT).await;
        // Kill the leader of the group that owns "p" (the source of the next move).
        let p_owner = c.owner(b"p").1;
        let victim = cluster.wait_leader(p_owner, LEADER_WAIT).await;
        cluster.kill9(p_owner, victim);
        tokio::time::sleep(Duration::from_millis(400)).await;
        mc.move_range(b"p", other(p_owner)).await.expect("move p");
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start_node(p_owner, victim);
        cluster.wait_settled(SETTLE_WAIT).await;
        println!("round {round}: moved c and p with group {p_owner}'s leader {victim} killed");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for (client, t) in tasks.into_iter().enumerate() {
        let (done, unknown, swapped) = t.await.expect("client task");
        println!("client {client}: {done} completed ({swapped} swaps), {unknown} unknown");
        assert!(
            done >= 10,
            "client {client} completed only {done} operations"
        );
        total += done;
    }
    let history = recorder.into_history();
    let started = Instant::now();
    let result = check(&history);
    println!(
        "{} operations ({total} completed) checked in {:?}",
        history.len(),
        started.elapsed()
    );
    assert!(result.is_ok(), "history is not linearizable: {result:?}");
}
