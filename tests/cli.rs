//! The `shardctl` binary as a user runs it: exit codes and messages for a cluster
//! that is down, for bad arguments and for refused requests, and `--output json`
//! that parses. Documented exit codes (`shardctl --help`): 0 success; 1 `get` found
//! no key or `cas` did not swap; 2 an error, with the reason on stderr.

mod common;

use base64::Engine as _;
use common::user::{bin, run_within, shardctl, Ran};
use common::{free_ports, KvCluster, KvOptions};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// Time limit of one shardctl run that should succeed or fail on its own.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn assert_code(what: &str, ran: &Ran, code: i32) {
    assert_eq!(ran.code, Some(code), "{what}: {}", ran.describe());
}

/// Asserts `ran` failed with exit code 2 and a stderr mentioning every one of `needles`.
fn assert_error(what: &str, ran: &Ran, needles: &[&str]) {
    assert_code(what, ran, 2);
    for n in needles {
        assert!(
            ran.stderr.contains(n),
            "{what}: stderr does not say {n:?}: {}",
            ran.describe()
        );
    }
}

/// A running cluster: one shard master, one group of one kvnode, joined and serving.
async fn small_cluster() -> (KvCluster, String) {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 1,
        replicas: 1,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(Duration::from_secs(60)).await;
    let masters = cluster.masters().addrs().join(",");
    (cluster, masters)
}

/// `n` loopback addresses nobody listens on, and them as a --masters list.
fn closed_ports(n: usize) -> (Vec<String>, String) {
    let closed: Vec<String> = free_ports(n)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let masters = closed.join(",");
    (closed, masters)
}

#[test]
fn a_down_cluster_fails_every_command_quickly_with_exit_2_and_says_why() {
    // Ports nobody listens on: the shard master is "down".
    let (closed, masters) = closed_ports(2);
    for args in [
        &["get", "k"][..],
        &["put", "k", "v"],
        &["query"],
        &["status"],
        &["split", "m"],
        &["--output", "json", "get", "k"],
        &["verify", "--duration", "1"],
    ] {
        let mut full = vec!["--timeout", "2"];
        full.extend_from_slice(args);
        let ran = shardctl(&masters, &full, RUN_LIMIT);
        let what = format!("shardctl {}", full.join(" "));
        assert_error(&what, &ran, &["cannot reach the shard master", &closed[0]]);
        // --timeout 2 bounds the wait (a loaded machine gets generous slack).
        assert!(
            ran.elapsed < Duration::from_secs(20),
            "{what} took {:?}",
            ran.elapsed
        );
    }
    // status still prints what it could see before failing.
    let ran = shardctl(&masters, &["--timeout", "2", "status"], RUN_LIMIT);
    assert!(ran.stdout.contains("DOWN"), "{}", ran.describe());
}

#[test]
fn refused_or_malformed_master_addresses_fail_at_once_and_say_so() {
    let (closed, masters) = closed_ports(3);
    // No --timeout: the default deadline (10 s) must not be waited out when every
    // shard master refuses the connection.
    for args in [
        &["get", "k"][..],
        &["put", "k", "v"],
        &["query"],
        &["scan"],
        &["leave", "--gid", "1"],
    ] {
        let ran = shardctl(&masters, args, RUN_LIMIT);
        let what = format!("shardctl {}", args.join(" "));
        assert_error(&what, &ran, &["connection refused at", &closed[2]]);
        assert!(
            ran.elapsed < Duration::from_secs(5),
            "{what} took {:?} to notice that nothing listens",
            ran.elapsed
        );
    }
    // A malformed address is refused before any connection, from the flag or the
    // environment.
    let ran = shardctl("garbage", &["get", "k"], RUN_LIMIT);
    assert_error("--masters garbage", &ran, &["\"garbage\"", "HOST:PORT"]);
    let mut c = std::process::Command::new(bin("shardctl"));
    c.env("SHARDKV_MASTERS", "127.0.0.1:7001,nonsense")
        .args(["get", "k"]);
    let ran = run_within(&mut c, RUN_LIMIT);
    assert_error(
        "SHARDKV_MASTERS with nonsense",
        &ran,
        &["\"nonsense\"", "HOST:PORT"],
    );
    assert!(ran.elapsed < Duration::from_secs(5), "{}", ran.describe());
}

#[test]
fn bad_arguments_exit_2_with_a_usage_message_before_any_network_call() {
    // The masters are closed ports: these must fail on the arguments, not the network.
    let masters = format!("127.0.0.1:{}", free_ports(1)[0]);
    let cases: &[(&[&str], &[&str])] = &[
        (&["get"], &["required", "<KEY>"]),
        (&["put", "k"], &["required"]),
        (&["frobnicate"], &["unrecognized subcommand", "frobnicate"]),
        (&["--output", "yaml", "query"], &["invalid value", "yaml"]),
        (&["--timeout", "0", "query"], &["must be more than 0"]),
        (&["--timeout", "soon", "query"], &["is not a number"]),
        (&["query", "notanumber"], &["invalid value", "notanumber"]),
        (&["leave", "--gid", "x"], &["invalid value"]),
        (&["verify", "--keys", "0"], &["invalid value", "--keys"]),
        (&["verify", "--duration", "0"], &["must be more than 0"]),
        (&["cas", "k", "--value", "v"], &["required"]),
        (&["scan", "--limit", "0"], &["--limit", "at least 1"]),
        (
            &["get", "k", "--raw", "--value-file", "x"],
            &["cannot be used with"],
        ),
        (
            &["--output", "json", "get", "k", "--raw"],
            &["cannot be used together"],
        ),
        (
            &["join", "--gid", "3", "--node", "127.0.0.1:1"],
            &["--node"],
        ),
    ];
    for (args, needles) in cases {
        let ran = shardctl(&masters, args, RUN_LIMIT);
        assert_error(&format!("shardctl {}", args.join(" ")), &ran, needles);
        assert!(
            ran.elapsed < Duration::from_secs(10),
            "shardctl {args:?} took {:?}: it should not wait for the network",
            ran.elapsed
        );
    }
    let mut c = std::process::Command::new(bin("shardctl"));
    c.env_remove("SHARDKV_MASTERS")
        .args(["--masters", ",", "query"]);
    let ran = run_within(&mut c, RUN_LIMIT);
    assert_error("empty --masters", &ran, &["no shard master address"]);
    // Masters given through the environment are not shown as a required option.
    let mut c = std::process::Command::new(bin("shardctl"));
    c.env("SHARDKV_MASTERS", &masters).arg("get");
    let ran = run_within(&mut c, RUN_LIMIT);
    assert_error("get without a key", &ran, &["Usage: shardctl get <KEY>"]);
    assert!(!ran.stderr.contains("--masters"), "{}", ran.describe());
    // --help is not an error.
    let ran = shardctl(&masters, &["--help"], RUN_LIMIT);
    assert_code("--help", &ran, 0);
    assert!(ran.stdout.contains("Exit status"), "{}", ran.describe());
}

#[tokio::test]
async fn refused_requests_exit_non_zero_and_json_output_parses() {
    let (_cluster, masters) = small_cluster().await;
    let run = |args: &[&str]| shardctl(&masters, args, RUN_LIMIT);

    // Success, then the documented exit 1 cases.
    assert_code("put", &run(&["put", "colour", "blue"]), 0);
    let ran = run(&["get", "colour"]);
    assert_code("get", &ran, 0);
    assert_eq!(ran.stdout.trim(), "blue");
    let ran = run(&["get", "nothing-here"]);
    assert_code("get of a missing key", &ran, 1);
    assert!(ran.stderr.contains("not found"), "{}", ran.describe());
    let ran = run(&["cas", "colour", "--expected", "red", "--value", "green"]);
    assert_code("cas that does not swap", &ran, 1);

    // Refused by the cluster: exit 2 and the reason.
    let ran = run(&["put", "", "v"]);
    assert_error("empty key", &ran, &["key", "must not be empty"]);
    let ran = run(&["get", ""]);
    assert_error("empty key (get)", &ran, &["must not be empty"]);
    let long = "k".repeat(5000);
    let ran = run(&["put", &long, "v"]);
    assert_error("key of 5000 bytes", &ran, &["longer than 4096"]);
    let ran = run(&["--timeout", "5", "leave", "--gid", "99"]);
    assert_error("leave of an unknown gid", &ran, &["99"]);
    let ran = run(&["move", "apple", "99"]);
    assert_error("move to an unknown gid", &ran, &["99"]);
    let ran = run(&["node", "transfer-leader", "--gid", "99", "--to", "1"]);
    assert_error("transfer-leader in an unknown gid", &ran, &["99"]);
    // Nothing above changed the data.
    assert_eq!(run(&["get", "colour"]).stdout.trim(), "blue");

    // --output json is one JSON document on stdout, for reads and for errors alike.
    let json = |args: &[&str], code: i32| -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let ran = run(&full);
        assert_code(&format!("shardctl {}", full.join(" ")), &ran, code);
        serde_json::from_str(&ran.stdout).unwrap_or_else(|e| {
            panic!(
                "shardctl {full:?}: stdout is not JSON ({e}): {}",
                ran.describe()
            )
        })
    };
    let q = json(&["query"], 0);
    assert!(q["num"].as_u64().is_some_and(|n| n >= 1), "{q}");
    assert_eq!(q["groups"][0]["gid"], 1, "{q}");
    let g = json(&["get", "colour"], 0);
    assert_eq!(g["found"], true, "{g}");
    assert_eq!(g["value"], "blue", "{g}");
    let g = json(&["get", "nothing-here"], 1);
    assert_eq!(g["found"], false, "{g}");
    let s = json(&["status"], 0);
    assert_eq!(s["masters"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(s["groups"][0]["nodes"][0]["role"], "leader", "{s}");
    json(&["scan"], 0);
}

/// `shardctl --masters MASTERS ARGS` with arguments that may not be UTF-8.
fn shardctl_bytes(masters: &str, args: &[&[u8]]) -> Ran {
    let mut c = std::process::Command::new(bin("shardctl"));
    c.env_remove("SHARDKV_MASTERS")
        .arg("--masters")
        .arg(masters)
        .args(args.iter().map(|a| OsStr::from_bytes(a)));
    run_within(&mut c, RUN_LIMIT)
}

#[tokio::test]
async fn binary_keys_and_values_round_trip_byte_for_byte() {
    let (_cluster, masters) = small_cluster().await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let value: &[u8] = b"\xff\xfe\x00line 1\nline 2\n";
    let input = tmp.path().join("bin.val");
    std::fs::write(&input, value).expect("write");
    let path = |p: &std::path::Path| p.as_os_str().as_bytes().to_vec();

    // A key that is not UTF-8, from the command line.
    let key: &[u8] = b"\xff\xfekey";
    let ran = shardctl_bytes(&masters, &[b"put", key, b"v1"]);
    assert_code("put of a non-UTF-8 key", &ran, 0);
    let ran = shardctl_bytes(&masters, &[b"get", key]);
    assert_code("get of a non-UTF-8 key", &ran, 0);
    assert_eq!(ran.stdout, "v1\n");

    // A binary value: put from a file, read back exactly three ways.
    let ran = shardctl_bytes(
        &masters,
        &[b"put", b"binval", b"--value-file", &path(&input)],
    );
    assert_code("put --value-file", &ran, 0);
    let output = tmp.path().join("out.val");
    let ran = shardctl_bytes(
        &masters,
        &[b"get", b"binval", b"--value-file", &path(&output)],
    );
    assert_code("get --value-file", &ran, 0);
    assert_eq!(std::fs::read(&output).expect("read"), value);
    let raw = tmp.path().join("raw.val");
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "{} --masters {masters} get --raw binval > {}",
            bin("shardctl").display(),
            raw.display()
        ))
        .env_remove("SHARDKV_MASTERS");
    let ran = run_within(&mut c, RUN_LIMIT);
    assert_code("get --raw", &ran, 0);
    assert_eq!(std::fs::read(&raw).expect("read"), value, "get --raw");
    let ran = shardctl(&masters, &["--output", "json", "get", "binval"], RUN_LIMIT);
    let doc: serde_json::Value = serde_json::from_str(&ran.stdout).expect("JSON");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(doc["value_base64"].as_str().expect("value_base64"))
        .expect("base64");
    assert_eq!(decoded, value, "{doc}");

    // For a person: one line, every byte visible.
    let ran = shardctl(&masters, &["get", "binval"], RUN_LIMIT);
    assert_code("get", &ran, 0);
    assert_eq!(ran.stdout, "\\xff\\xfe\\x00line 1\\nline 2\\n\n");
    assert!(ran.stderr.contains("--raw"), "{}", ran.describe());
    let ran = shardctl(&masters, &["scan"], RUN_LIMIT);
    assert_code("scan", &ran, 0);
    assert_eq!(
        ran.stdout.lines().collect::<Vec<_>>(),
        [
            "binval\t\\xff\\xfe\\x00line 1\\nline 2\\n",
            "\\xff\\xfekey\tv1"
        ]
    );
    let ran = shardctl(&masters, &["--output", "json", "scan"], RUN_LIMIT);
    let pairs: serde_json::Value = serde_json::from_str(&ran.stdout).expect("JSON");
    assert_eq!(pairs[1]["key_base64"], "//5rZXk=", "{pairs}");
    assert_eq!(pairs[1]["value"], "v1", "{pairs}");
}

#[tokio::test]
async fn move_with_wait_returns_once_the_new_owner_serves_the_data() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 2,
        replicas: 1,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(Duration::from_secs(60)).await;
    let masters = cluster.masters().addrs().join(",");
    let run = |args: &[&str]| shardctl(&masters, args, RUN_LIMIT);
    for i in 0..50 {
        let ran = run(&["put", &format!("k{i:03}"), &"v".repeat(10_000)]);
        assert_code("put", &ran, 0);
    }
    cluster.join(&[2]).await;
    let config = cluster.wait_settled(Duration::from_secs(60)).await;
    let dest = if config.owner(b"k000").1 == 1 { 2 } else { 1 };

    let ran = run(&[
        "--output",
        "json",
        "move",
        "k000",
        &dest.to_string(),
        "--wait",
    ]);
    assert_code("move --wait", &ran, 0);
    let out: serde_json::Value = serde_json::from_str(&ran.stdout).expect("JSON");
    assert!(out["arrived_after_secs"].as_f64().is_some(), "{out}");
    // Returned means arrived: the new owner serves the range now, without waiting.
    let status = common::rpc(
        cluster
            .kv(dest, 0)
            .node_status(shardkv::proto::NodeStatusRequest {}),
    )
    .await
    .expect("node status")
    .into_inner();
    let held = status
        .ranges
        .iter()
        .find(|h| h.range.as_ref().is_some_and(|r| r.contains(b"k000")))
        .expect("the new owner holds the range");
    assert_eq!(
        held.state(),
        shardkv::proto::RangeState::Serving,
        "{held:?}"
    );
    let ran = run(&["get", "k049"]);
    assert_eq!(ran.stdout.trim().len(), 10_000, "{}", ran.describe());

    let ran = run(&["--timeout", "5", "move", "k000", "99", "--wait"]);
    assert_error("move --wait to an unknown gid", &ran, &["99"]);
}

#[tokio::test]
async fn bench_runs_exactly_ops_and_leaves_no_keys_unless_asked() {
    let (_cluster, masters) = small_cluster().await;
    let run = |args: &[&str]| shardctl(&masters, args, RUN_LIMIT);
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "--output",
            "json",
            "bench",
            "--workload",
            "write-only",
            "--ops",
            "200",
            "--concurrency",
            "8",
            "--keys",
            "1000",
            "--warmup",
            "0",
        ];
        args.extend_from_slice(extra);
        let ran = run(&args);
        assert_code("bench", &ran, 0);
        let report: serde_json::Value = serde_json::from_str(&ran.stdout).expect("JSON");
        assert_eq!(report["total_ops"], 200, "{report}");
        ran
    };
    assert_code("put", &run(&["put", "mine", "v"]), 0);
    let ran = bench(&[]);
    assert!(ran.stderr.contains("--keep"), "{}", ran.describe());
    // Only the user's key is left.
    assert_eq!(run(&["scan"]).stdout, "mine\tv\n");
    // --keep keeps them.
    bench(&["--keep"]);
    let pairs = run(&["scan"]).stdout.lines().count();
    assert!(pairs > 100, "{pairs} pairs after bench --keep");
}

/// A kvnode with `args`, logging into `dir/NAME.log`, at the test clusters' Raft
/// tick (every member of a group must run the same).
fn kvnode(dir: &std::path::Path, name: &str, args: &[&str]) -> common::Proc {
    let tick = KvOptions::default().tick_ms.to_string();
    common::Proc::spawn(
        name,
        bin("kvnode"),
        args.iter()
            .copied()
            .chain(["--tick-ms", &tick])
            .map(str::to_owned)
            .collect(),
        dir.join(format!("{name}.log")),
    )
}

#[tokio::test]
async fn a_removed_node_exits_0_and_peers_is_needed_only_the_first_time() {
    let (_cluster, masters) = small_cluster().await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| shardctl(&masters, args, RUN_LIMIT);
    let data = |name: &str| tmp.path().join(name).display().to_string();

    // `node remove` of a node added as the README shows: it stops, and exits 0.
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut joiner = kvnode(
        tmp.path(),
        "g1-n4",
        &[
            "--gid",
            "1",
            "--id",
            "4",
            "--join",
            "--listen",
            &addr,
            "--masters",
            &masters,
            "--data-dir",
            &data("g1-n4"),
        ],
    );
    let ran = run(&["node", "add", "--gid", "1", "--id", "4", "--addr", &addr]);
    assert_code("node add", &ran, 0);
    let ran = run(&["node", "remove", "--gid", "1", "--id", "4"]);
    assert_code("node remove", &ran, 0);
    let mut exited = None;
    common::user::poll_until(Duration::from_secs(30), || {
        exited = joiner.exited();
        exited.is_some()
    });
    let status =
        exited.unwrap_or_else(|| panic!("the removed node still runs:\n{}", joiner.log_tail(20)));
    assert!(
        status.success(),
        "{status:?}; log:\n{}",
        joiner.log_tail(20)
    );
    assert!(
        joiner.log().contains("removed from its group"),
        "{}",
        joiner.log_tail(20)
    );

    // A new node of a new group: --peers the first time, then --listen is enough.
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let dir = data("g2-n1");
    let mut first = vec![
        "--gid",
        "2",
        "--id",
        "1",
        "--masters",
        &masters,
        "--data-dir",
        &dir,
    ];
    let without_peers = first.clone();
    let ran = run_within(
        std::process::Command::new(bin("kvnode")).args(&without_peers),
        RUN_LIMIT,
    );
    assert_code("kvnode on a new directory without --peers", &ran, 1);
    assert!(
        ran.stderr.contains("--peers is needed the first time"),
        "{}",
        ran.describe()
    );
    let peers = format!("1={addr}");
    first.extend_from_slice(&["--peers", &peers]);
    let mut node = kvnode(tmp.path(), "g2-n1", &first);
    // Leading its one-node group: bootstrapped from --peers.
    let leads = || async {
        let Ok(mut kv) =
            shardkv::proto::kv_client::KvClient::connect(format!("http://{addr}")).await
        else {
            return false;
        };
        kv.node_status(shardkv::proto::NodeStatusRequest {})
            .await
            .is_ok_and(|s| s.into_inner().replica.is_some_and(|r| r.role == "leader"))
    };
    common::expect_within(
        Duration::from_secs(30),
        "the new node to lead its group",
        leads,
    )
    .await;
    node.kill9();
    let tick = KvOptions::default().tick_ms.to_string();
    let mut again = without_peers.clone();
    again.extend_from_slice(&["--listen", &addr, "--tick-ms", &tick]);
    node.set_args(again.iter().map(|s| s.to_string()).collect());
    node.start();
    common::expect_within(
        Duration::from_secs(30),
        "the node to start again without --peers",
        leads,
    )
    .await;
}
