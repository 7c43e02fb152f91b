//! `shardctl verify` as a user runs it: against a healthy cluster (with a leader
//! killed and restarted mid-run) it reports the history linearizable, exit 0, and
//! leaves no scratch keys; against a deliberately broken cluster (kvnodes started
//! with the test-only `--unsafe-stale-reads`, followers lagging behind delayed
//! links) it reports a violation with the offending history, exit 1.

mod common;

use common::faults::{start_faulty, FAULT_FLAG};
use common::user::{bin, run_within, shardctl, Ran};
use common::{KvCluster, KvOptions};
use std::process::Command;
use std::time::Duration;

const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// Generous: the run itself, then the final reads, the check and the deletes.
const VERIFY_LIMIT: Duration = Duration::from_secs(90);

fn one_group() -> KvOptions {
    KvOptions {
        masters: 1,
        groups: 1,
        ..Default::default()
    }
}

/// Runs `shardctl verify` with `args` on a blocking thread.
async fn verify(masters: String, args: &[&str]) -> Ran {
    let mut all = vec!["verify".to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        shardctl(&masters, &args, VERIFY_LIMIT)
    })
    .await
    .expect("shardctl thread")
}

#[tokio::test]
async fn verify_finds_a_healthy_cluster_linearizable_through_a_leader_kill() {
    let mut cluster = KvCluster::start(one_group());
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    let masters = cluster.masters().addrs().join(",");

    let run = tokio::spawn(verify(
        masters.clone(),
        &["--duration", "6", "--keys", "4", "--output", "json"],
    ));
    // Fault timing: the kill falls inside the 6 s run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster.wait_leader(1, SETTLE_WAIT).await;
    cluster.kill9(1, leader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_node(1, leader);
    let ran = run.await.expect("verify task");
    println!("{}", ran.stdout);

    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let out: serde_json::Value = serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|e| panic!("JSON: {e}: {}", ran.describe()));
    assert_eq!(out["verdict"], "linearizable", "{}", ran.describe());
    assert!(out["violation"].is_null());
    let completed = out["completed"].as_u64().expect("completed");
    let (cas, swapped) = (
        out["cas"].as_u64().unwrap(),
        out["swapped"].as_u64().unwrap(),
    );
    assert!(completed > 100, "only {completed} operations completed");
    assert!(
        swapped > 0 && swapped < cas,
        "CASes should both swap and fail on shared keys: {swapped} of {cas} swapped"
    );
    assert_eq!(out["keys_left"], 0);
    // The scratch keys are gone.
    let prefix = out["prefix"].as_str().expect("prefix");
    let scan = shardctl(
        &masters,
        &["--output", "json", "scan", "verify/", "verify0"],
        VERIFY_LIMIT,
    );
    assert_eq!(scan.code, Some(0), "{}", scan.describe());
    assert!(
        !scan.stdout.contains(prefix),
        "keys under {prefix} left behind: {}",
        scan.stdout
    );
}

#[tokio::test]
async fn verify_catches_stale_reads_of_a_broken_server() {
    let mut cluster = start_faulty(KvOptions {
        groups: 0,
        ..one_group()
    });
    cluster.add_group_with(1, &["--unsafe-stale-reads"]);
    cluster.join(&[1]).await;
    cluster.wait_settled(SETTLE_WAIT).await;
    // Followers learn of each commit 150 ms after the leader: a read they serve
    // without a barrier misses writes already acknowledged.
    cluster.set_loss(0.0, 150).await;
    let masters = cluster.masters().addrs().join(",");

    let ran = verify(masters, &["--duration", "5", "--keys", "4"]).await;
    println!("{}", ran.stdout);

    assert_eq!(ran.code, Some(1), "{}", ran.describe());
    assert!(
        ran.stdout.contains("verdict     NOT LINEARIZABLE"),
        "{}",
        ran.describe()
    );
    // The smallest offending history: its key and at least a write and a read.
    assert!(
        ran.stdout
            .contains("is not linearizable: no order of these"),
        "{}",
        ran.describe()
    );
    let witness: Vec<&str> = ran
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("client "))
        .collect();
    assert!(
        witness.len() >= 2 && witness.iter().any(|l| l.contains("get(")),
        "no offending history printed: {}",
        ran.describe()
    );
    assert!(ran.stdout.contains("(deleted)"), "{}", ran.describe());
    cluster.heal_all().await;
}

#[test]
fn unsafe_stale_reads_is_hidden_and_refused_without_fault_injection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut kvnode = Command::new(bin("kvnode"));
    kvnode.args([
        "--gid",
        "1",
        "--id",
        "1",
        "--peers",
        "1=127.0.0.1:1",
        "--data-dir",
        &dir.path().display().to_string(),
        "--unsafe-stale-reads",
    ]);
    let ran = run_within(&mut kvnode, Duration::from_secs(30));
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(ran.stderr.contains(FAULT_FLAG), "{}", ran.describe());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a refused kvnode wrote to its data directory"
    );

    let help = run_within(
        Command::new(bin("kvnode")).arg("--help"),
        Duration::from_secs(30),
    );
    assert!(help.stdout.contains("--data-dir"), "{}", help.describe());
    assert!(!help.stdout.contains("stale"), "{}", help.describe());
}
