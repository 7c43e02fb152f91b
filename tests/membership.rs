//! End-to-end tests of changing who is in a replica group: adding nodes (started with
//! `--join`) through Raft and the shard master's list, removing them, handing
//! leadership over, heartbeats marking nodes down and up, and the bad inputs.

mod common;

use common::{
    expect_within, fake_group, free_ports, rpc, KvCluster, KvOptions, MasterClient, MasterCluster,
    Proc,
};
use shardkv::client::{Client, ClientOptions};
use shardkv::proto::membership_client::MembershipClient;
use shardkv::proto::shard_master_client::ShardMasterClient;
use shardkv::proto::{
    AddMemberRequest, Liveness, Node, NodeStatusRequest, RemoveMemberRequest, StatusRequest,
    TransferLeaderRequest,
};
use shardkv::verify::{check, Input, Output, Recorder};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const SETTLE_WAIT: Duration = Duration::from_secs(30);
const CHANGE_WAIT: Duration = Duration::from_secs(30);

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(20))
        .connect_lazy()
}

/// A kvnode started with `--join`: empty, waiting for the group to add it.
fn start_joiner(cluster: &KvCluster, gid: u64, id: u64, name: &str) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let dir = cluster.masters().dir().join(name);
    let args = vec![
        "--gid".to_string(),
        gid.to_string(),
        "--id".into(),
        id.to_string(),
        "--join".into(),
        "--listen".into(),
        addr.clone(),
        "--masters".into(),
        cluster.masters().addrs().join(","),
        "--data-dir".into(),
        dir.display().to_string(),
        "--tick-ms".into(),
        "30".into(),
        "--poll-ms".into(),
        "50".into(),
        "--heartbeat-ms".into(),
        "200".into(),
    ];
    let log = cluster.masters().dir().join(format!("{name}.log"));
    (
        Proc::spawn(name, env!("CARGO_BIN_EXE_kvnode"), args, log),
        addr,
    )
}

/// Runs a Membership call at the group's leader (among `addrs`), following
/// not-leader answers, until it succeeds, fails for good, or `CHANGE_WAIT` passes.
async fn at_leader<T, F, Fut>(addrs: &[String], call: F) -> Result<T, Status>
where
    F: Fn(MembershipClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let deadline = Instant::now() + CHANGE_WAIT;
    let mut last = Status::unavailable("no attempt");
    for attempt in 0..200 {
        if Instant::now() >= deadline {
            break;
        }
        let addr = &addrs[attempt % addrs.len()];
        match call(MembershipClient::new(channel(addr))).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                last = s;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s),
        }
    }
    Err(last)
}

async fn voters_seen_by(addr: &str) -> Option<(Vec<u64>, String)> {
    let mut kv = shardkv::proto::kv_client::KvClient::new(channel(addr));
    let status = rpc(kv.node_status(NodeStatusRequest {}))
        .await
        .ok()?
        .into_inner();
    let replica = status.replica?;
    let mut voters = replica.voters;
    voters.sort();
    Some((voters, replica.role))
}

async fn leader_addr(addrs: &[String]) -> Option<String> {
    for a in addrs {
        if let Some((_, role)) = voters_seen_by(a).await {
            if role == "leader" {
                return Some(a.clone());
            }
        }
    }
    None
}

fn client_options() -> ClientOptions {
    ClientOptions {
        call_deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_grows_to_five_and_back_to_three_under_writes() {
    let cluster = KvCluster::start(KvOptions {
        groups: 1,
        compact_threshold: Some(40),
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let client = Client::connect_with(cluster.masters().addrs(), client_options())
        .await
        .expect("connect");

    // Writers and readers run through every membership change.
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3u64)
        .map(|w| {
            let (client, recorder, stop) = (client.clone(), recorder.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = BTreeMap::new();
                for n in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("k{}", n % 8).into_bytes();
                    if n % 3 == 0 {
                        let h = recorder.invoke(w, Input::get(key.clone()));
                        match client.get(&key).await {
                            Ok(v) => recorder.complete(h, Output::Get(v)),
                            Err(_) => recorder.unknown(h),
                        }
                    } else {
                        let value = format!("{w}-{n}").into_bytes();
                        let h = recorder.invoke(w, Input::put(key.clone(), value.clone()));
                        match client.put(&key, &value).await {
                            Ok(()) => {
                                recorder.complete(h, Output::Write);
                                acked.insert(format!("w{w}-{n}"), value);
                            }
                            Err(_) => recorder.unknown(h),
                        }
                        // A key no one else writes: it must survive every change.
                        let own = format!("w{w}-{n}");
                        if client.put(own.as_bytes(), own.as_bytes()).await.is_err() {
                            acked.remove(&own);
                        }
                    }
                }
                acked
            })
        })
        .collect();

    let group_addrs: Vec<String> = (0..3).map(|i| cluster.addr(1, i).to_string()).collect();
    let mut mc = cluster.master_client();
    let mut joiners = Vec::new();
    for id in [4u64, 5] {
        let (proc, addr) = start_joiner(&cluster, 1, id, &format!("kv-1-{id}"));
        let node = Node {
            id,
            addr: addr.clone(),
        };
        let reply = at_leader(&group_addrs, |mut c| {
            let node = node.clone();
            async move { c.add_member(AddMemberRequest { node: Some(node) }).await }
        })
        .await
        .unwrap_or_else(|e| panic!("add node {id}: {e}"));
        assert!(
            reply.voters.contains(&id),
            "node {id} is a voter: {reply:?}"
        );
        mc.add_node(1, node).await.expect("list node in the master");
        joiners.push((proc, addr));
    }
    let all: Vec<String> = group_addrs
        .iter()
        .cloned()
        .chain(joiners.iter().map(|(_, a)| a.clone()))
        .collect();
    expect_within(CHANGE_WAIT, "all five nodes to see five voters", || async {
        for a in &all {
            match voters_seen_by(a).await {
                Some((voters, _)) if voters == [1, 2, 3, 4, 5] => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Back to three: routing first, then Raft. The removed nodes stop by themselves.
    for (i, id) in [4u64, 5].iter().enumerate() {
        mc.remove_node(1, *id).await.expect("unlist node");
        at_leader(&group_addrs, |mut c| async move {
            c.remove_member(RemoveMemberRequest { id: *id }).await
        })
        .await
        .unwrap_or_else(|e| panic!("remove node {id}: {e}"));
        let proc = &mut joiners[i].0;
        expect_within(CHANGE_WAIT, "the removed node to exit", || {
            let exited = proc.exited().is_some();
            async move { exited }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in workers {
        acked.extend(w.await.expect("worker"));
    }
    assert!(
        acked.len() > 20,
        "the workload made progress: {}",
        acked.len()
    );
    for own in acked.keys() {
        let value = client.get(own.as_bytes()).await.expect("read back");
        assert_eq!(
            value.as_deref(),
            Some(own.as_bytes()),
            "acknowledged {own} was lost"
        );
    }
    let history = recorder.into_history();
    let verdict = check(&history);
    assert!(verdict.is_ok(), "not linearizable: {verdict}");
    let (voters, _) = voters_seen_by(&group_addrs[0]).await.expect("status");
    assert_eq!(voters, [1, 2, 3]);

    // A removed node refuses to start again on its data directory.
    let (mut removed, _) = joiners.remove(0);
    removed.restart();
    expect_within(CHANGE_WAIT, "the removed node to refuse to start", || {
        let exited = removed.exited().is_some_and(|s| !s.success());
        async move { exited }
    })
    .await;
    assert!(removed.log().contains("was removed from its group"));
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_node_catches_up_from_a_snapshot_after_compaction() {
    let mut cluster = KvCluster::start(KvOptions {
        groups: 1,
        compact_threshold: Some(20),
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let client = Client::connect_with(cluster.masters().addrs(), client_options())
        .await
        .expect("connect");
    // Node 3 dies for good and is replaced.
    let leader = cluster.wait_leader(1, SETTLE_WAIT).await;
    let dead = (leader + 2) % 3;
    cluster.kill9(1, dead);
    let live: Vec<String> = (0..3)
        .filter(|i| *i != dead)
        .map(|i| cluster.addr(1, i).to_string())
        .collect();
    let dead_id = dead as u64 + 1;
    let mut mc = cluster.master_client();
    mc.remove_node(1, dead_id)
        .await
        .expect("unlist the dead node");
    at_leader(&live, |mut c| async move {
        c.remove_member(RemoveMemberRequest { id: dead_id }).await
    })
    .await
    .expect("remove the dead node");
    for i in 0..100 {
        let key = format!("key-{i:03}");
        client
            .put(key.as_bytes(), key.as_bytes())
            .await
            .expect("put");
    }
    let leader = leader_addr(&live).await.expect("a leader");
    let mut kv = shardkv::proto::kv_client::KvClient::new(channel(&leader));
    let before = rpc(kv.node_status(NodeStatusRequest {}))
        .await
        .expect("status")
        .into_inner()
        .replica
        .expect("replica");
    assert!(
        before.first_log_index > 50,
        "the leader compacted its log: first index {}",
        before.first_log_index
    );

    let (_replacement, addr) = start_joiner(&cluster, 1, 4, "kv-1-4");
    let node = Node {
        id: 4,
        addr: addr.clone(),
    };
    at_leader(&live, |mut c| {
        let node = node.clone();
        async move { c.add_member(AddMemberRequest { node: Some(node) }).await }
    })
    .await
    .expect("add the replacement");
    mc.add_node(1, node).await.expect("list the replacement");
    let mut replacement = shardkv::proto::kv_client::KvClient::new(channel(&addr));
    expect_within(CHANGE_WAIT, "the replacement to catch up", || {
        let mut replacement = replacement.clone();
        let target = before.commit_index;
        async move {
            rpc(replacement.node_status(NodeStatusRequest {}))
                .await
                .ok()
                .and_then(|s| s.into_inner().replica)
                .is_some_and(|r| r.applied_index >= target && r.first_log_index > 50)
        }
    })
    .await;
    let status = rpc(replacement.node_status(NodeStatusRequest {}))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.ranges.len(), 1, "it holds the group's range");
    // The replacement is a working member: with one old node down, the group
    // (replacement + one) still has a quorum and serves every key.
    let other_live = (0..3).find(|i| *i != dead && cluster.addr(1, *i) != leader);
    if let Some(i) = other_live {
        cluster.kill9(1, i);
    }
    for i in (0..100).step_by(7) {
        let key = format!("key-{i:03}");
        assert_eq!(
            client.get(key.as_bytes()).await.expect("get"),
            Some(key.clone().into_bytes())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_shown_down_then_up_after_restart() {
    let mut cluster = KvCluster::start(KvOptions {
        groups: 1,
        extra_args: vec!["--heartbeat-ms".into(), "200".into()],
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let masters = cluster.masters().addrs().to_vec();
    let liveness_of = |node_id: u64| {
        let masters = masters.clone();
        async move {
            for m in &masters {
                let mut c = ShardMasterClient::new(channel(m));
                let Ok(s) = rpc(c.status(StatusRequest {})).await else {
                    continue;
                };
                let s = s.into_inner();
                if s.replica.as_ref().is_some_and(|r| r.role == "leader") {
                    return s
                        .nodes
                        .iter()
                        .find(|n| n.gid == 1 && n.node_id == node_id)
                        .map(|n| n.liveness());
                }
            }
            None
        }
    };
    expect_within(SETTLE_WAIT, "node 2 reported up", || async {
        liveness_of(2).await == Some(Liveness::Up)
    })
    .await;
    cluster.kill9(1, 1);
    // The masters' default --down-after-ms is 5 s.
    let killed = Instant::now();
    expect_within(Duration::from_secs(15), "node 2 reported down", || async {
        liveness_of(2).await == Some(Liveness::Down)
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(4),
        "not before the timeout"
    );
    assert_eq!(
        liveness_of(1).await,
        Some(Liveness::Up),
        "the others stay up"
    );
    cluster.restart(1, 1);
    expect_within(SETTLE_WAIT, "node 2 reported up again", || async {
        liveness_of(2).await == Some(Liveness::Up)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_moves_leadership_and_keeps_serving() {
    let cluster = KvCluster::start(KvOptions {
        groups: 1,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let client = Client::connect_with(cluster.masters().addrs(), client_options())
        .await
        .expect("connect");
    client.put(b"before", b"1").await.expect("put");
    let addrs: Vec<String> = (0..3).map(|i| cluster.addr(1, i).to_string()).collect();
    for round in 0..2 {
        let leader = cluster.wait_leader(1, SETTLE_WAIT).await;
        let target = (leader + 1) % 3;
        let to = target as u64 + 1;
        let reply = at_leader(&addrs, |mut c| async move {
            c.transfer_leader(TransferLeaderRequest { to }).await
        })
        .await
        .expect("transfer");
        assert_eq!(reply.leader_id, to, "round {round}");
        let (_, role) = voters_seen_by(&addrs[target]).await.expect("status");
        assert_eq!(role, "leader");
        client
            .put(b"after", format!("{round}").as_bytes())
            .await
            .expect("put");
        assert_eq!(
            client.get(b"before").await.expect("get"),
            Some(b"1".to_vec())
        );
    }
    let refused = at_leader(&addrs, |mut c| async move {
        c.transfer_leader(TransferLeaderRequest { to: 9 }).await
    })
    .await
    .expect_err("no node 9");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Removing a leader hands leadership over first; the caller retries at the brand
    // new leader, whose liveness view must not mistake "not heard yet" for "down".
    let leader = cluster.wait_leader(1, SETTLE_WAIT).await;
    let id = leader as u64 + 1;
    let reply = at_leader(&addrs, |mut c| async move {
        c.remove_member(RemoveMemberRequest { id }).await
    })
    .await
    .expect("remove the leader right after it handed over");
    assert!(!reply.voters.contains(&id), "{reply:?}");
    client.put(b"after", b"removed").await.expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_changes_are_refused_and_change_nothing() {
    let mut cluster = KvCluster::start(KvOptions {
        groups: 1,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let addrs: Vec<String> = (0..3).map(|i| cluster.addr(1, i).to_string()).collect();
    let mut mc = cluster.master_client();
    let num = cluster.latest_config().await.expect("config").num;

    // Another node's address, under a new id.
    let taken = Node {
        id: 7,
        addr: addrs[1].clone(),
    };
    let e = at_leader(&addrs, |mut c| {
        let node = taken.clone();
        async move { c.add_member(AddMemberRequest { node: Some(node) }).await }
    })
    .await
    .expect_err("address in use");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = mc
        .add_node(1, taken.clone())
        .await
        .expect_err("address in use");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = mc
        .add_node(
            9,
            Node {
                id: 1,
                addr: "127.0.0.1:1".into(),
            },
        )
        .await
        .expect_err("unknown group");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = at_leader(&addrs, |mut c| async move {
        c.remove_member(RemoveMemberRequest { id: 9 }).await
    })
    .await
    .expect_err("unknown node");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = mc.remove_node(1, 9).await.expect_err("unknown node");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // With one voter dead, removing a live one would leave no live majority.
    let leader = cluster.wait_leader(1, SETTLE_WAIT).await;
    let dead = (leader + 1) % 3;
    let live_follower = (leader + 2) % 3;
    cluster.kill9(1, dead);
    let live = vec![addrs[leader].clone(), addrs[live_follower].clone()];
    let victim = live_follower as u64 + 1;
    let dead_id = dead as u64 + 1;
    let leader_addr = addrs[leader].clone();
    expect_within(SETTLE_WAIT, "the leader to notice the dead voter", || {
        let leader_addr = leader_addr.clone();
        async move {
            let mut kv = shardkv::proto::kv_client::KvClient::new(channel(&leader_addr));
            rpc(kv.node_status(NodeStatusRequest {}))
                .await
                .ok()
                .and_then(|s| s.into_inner().replica)
                .is_some_and(|r| r.unreachable.contains(&dead_id))
        }
    })
    .await;
    let e = at_leader(&live, |mut c| async move {
        c.remove_member(RemoveMemberRequest { id: victim }).await
    })
    .await
    .expect_err("removing a live voter with another one dead must be refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("no majority"), "{e}");
    let (voters, _) = voters_seen_by(&addrs[leader]).await.expect("status");
    assert_eq!(voters, [1, 2, 3], "membership unchanged");
    assert_eq!(
        cluster.latest_config().await.expect("config").num,
        num,
        "config unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_node_that_is_never_added_says_why_it_waits() {
    let cluster = KvCluster::start(KvOptions {
        groups: 1,
        ..Default::default()
    });
    let (joiner, _) = start_joiner(&cluster, 1, 4, "kv-1-4");
    expect_within(
        Duration::from_secs(15),
        "the joiner to explain itself",
        || {
            let log = joiner.log();
            async move { log.contains("waiting to be added to the group") }
        },
    )
    .await;
    assert!(joiner.is_up());
    assert!(Path::new(joiner.log_path()).exists());
}

/// Runs `shardctl` with `args` and returns its exit success and combined output.
fn shardctl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(args)
        .output()
        .expect("run shardctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_master_replica_is_replaced_through_shardctl() {
    let mut cluster = MasterCluster::start(3);
    cluster.wait_leader(SETTLE_WAIT).await;
    let mut masters = cluster.master_client();
    masters.join(vec![fake_group(1, 3)]).await.expect("join 1");
    // The new replica starts empty and waits to be added.
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let dir = cluster.dir().join("master-4");
    let args: Vec<String> = [
        "--id",
        "4",
        "--join",
        "--listen",
        &addr,
        "--data-dir",
        &dir.display().to_string(),
        "--tick-ms",
        "30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = cluster.dir().join("master-4.log");
    let _joiner = Proc::spawn("master-4", env!("CARGO_BIN_EXE_shardmaster"), args, log);
    let old = cluster.addrs().join(",");
    let (ok, out) = shardctl(&[
        "--masters",
        &old,
        "master",
        "add",
        "--id",
        "4",
        "--addr",
        &addr,
    ]);
    assert!(ok, "master add: {out}");
    // Replace replica 1: the group is then 2, 3 and the new 4.
    let (ok, out) = shardctl(&["--masters", &old, "master", "remove", "--id", "1"]);
    assert!(ok, "master remove: {out}");
    expect_within(CHANGE_WAIT, "the removed replica to stop", || {
        let stopped = cluster.proc_mut(0).exited().is_some();
        async move { stopped }
    })
    .await;
    let new: Vec<String> = cluster.addrs()[1..]
        .iter()
        .cloned()
        .chain([addr.clone()])
        .collect();
    let mut masters = MasterClient::new(new.clone());
    let latest = masters
        .join(vec![fake_group(2, 3)])
        .await
        .expect("join 2 after the replacement");
    // Every remaining replica, the new one included, holds the same history.
    let mut client = ShardMasterClient::new(channel(&addr));
    let expected = (1..=latest.num).collect::<Vec<_>>();
    expect_within(CHANGE_WAIT, "the new replica to hold every config", || {
        let mut client = client.clone();
        async move {
            client
                .query(shardkv::proto::QueryRequest { num: None })
                .await
                .is_ok_and(|r| r.into_inner().num == latest.num)
        }
    })
    .await;
    for num in expected {
        let mine = rpc(client.query(shardkv::proto::QueryRequest { num: Some(num) }))
            .await
            .expect("query the new replica")
            .into_inner();
        let theirs = cluster.query(1, Some(num)).await.expect("query replica 2");
        assert_eq!(mine, theirs, "config {num}");
    }
    let (ok, out) = shardctl(&[
        "--masters",
        &new.join(","),
        "master",
        "transfer-leader",
        "--to",
        "4",
    ]);
    assert!(ok, "transfer to the new replica: {out}");
    assert!(out.contains("replica 4 now leads"), "{out}");
    let (ok, out) = shardctl(&["--masters", &old, "master", "remove", "--id", "7"]);
    assert!(
        !ok && out.contains("not a member"),
        "unknown replica: {out}"
    );
}
