//! Beyond one machine: the container image, the compose cluster (deploy/compose.yaml)
//! and the Kubernetes manifests (deploy/k8s/).
//!
//! `compose_cluster_survives_kills_partitions_scaling_and_a_rolling_restart` builds
//! the image from the binaries this test run built (deploy/build-image.sh --bin-dir),
//! brings the compose cluster up under a project name of its own, runs the
//! walkthrough's data commands from a client container, and then, while recorded
//! clients read and write through the router (published on a free port of 127.0.0.1),
//! `docker kill`s a group leader and the shard master leader, cuts a group leader
//! off the network (`docker network disconnect`), reconnects and restarts it, adds
//! group 3 and removes group 1, and restarts every container one at a time,
//! measuring the longest request and the longest time any hot key (one or more per
//! range) went without an answer. The history is checked for linearizability and
//! lost writes; `down -v` must leave no container, volume or network behind.
//! Takes about four minutes on an idle 2-core machine (nine with a load of 30).
//!
//! Both need a Docker engine (and Compose, v2 or v1) or the manifests' validator
//! (`pip install kubernetes-validate`); without them they print why and pass,
//! except under CI=true, where they fail.

mod common;

use common::faults::{lost_write, seed};
use common::free_ports;
use common::user::{bin_dir, http, poll_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use shardkv::verify::{check, Input, Output, Recorder};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One or two keys in each range of the pre-split key space (cut at g, n, t); not
/// the walkthrough's keys, which are written before the history starts.
const HOT_KEYS: &[&str] = &["avocado", "banana", "kiwi", "mango", "orange", "zebra"];
/// Unique keys are `u-CLIENT-N` (no `/`: the router's path takes one segment).
const UNIQUE_PREFIX: &str = "u-";
const UNIQUE_END: &str = "u.";
/// Longest a cluster may take to settle after a change (elections, range moves).
const SETTLE: Duration = Duration::from_secs(120);
/// Longest any hot key may go without a successful request after a fault.
const SERVE_AGAIN: Duration = Duration::from_secs(30);
/// Longest any hot key may go unanswered during the rolling restart.
const ROLLING_GAP_LIMIT: Duration = Duration::from_secs(15);
/// One HTTP request through the router (its own per-request deadline is 10 s).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prints why a test cannot run here and lets it pass, or fails it under CI=true.
fn skip(test: &str, why: &str) {
    assert!(!under_ci(), "{test}: {why}, and CI=true requires it");
    println!("skipping {test}: {why}");
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, fails the test unless it succeeds, returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// The Compose command of this machine: `docker compose` (v2) or `docker-compose` (v1).
fn compose_program() -> Option<Vec<String>> {
    let works = |prog: &[&str]| {
        Command::new(prog[0])
            .args(&prog[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    [&["docker", "compose"][..], &["docker-compose"][..]]
        .into_iter()
        .find(|p| works(p))
        .map(|p| p.iter().map(|s| s.to_string()).collect())
}

fn docker_answers() -> bool {
    docker(&["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------
// The compose cluster.

/// A compose project of its own (so runs never collide) and the image it runs;
/// dropping it takes the project down with its volumes and removes the image.
struct Cluster {
    compose: Vec<String>,
    project: String,
    image: String,
    /// The router's published address on 127.0.0.1 (a fixed port: one Docker picked
    /// could change when the router restarts).
    router: String,
    down: bool,
}

impl Cluster {
    /// Builds the image from this run's binaries and starts the default services.
    fn up(compose: Vec<String>) -> Cluster {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let project = format!("shardkvtest{}x{nanos}", std::process::id());
        let cluster = Cluster {
            compose,
            image: format!("shardkv-test:{project}"),
            project,
            router: format!("127.0.0.1:{}", free_ports(1)[0]),
            down: false,
        };
        let started = Instant::now();
        run_ok(
            Command::new(repo().join("deploy/build-image.sh"))
                .arg("--bin-dir")
                .arg(bin_dir())
                .args(["--tag", &cluster.image]),
        );
        println!("image {} built in {:?}", cluster.image, started.elapsed());
        cluster.compose_ok(&[], &["up", "-d"]);
        cluster
    }

    fn compose_cmd(&self, profiles: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.project, "-f"])
            .arg(repo().join("deploy/compose.yaml"));
        for p in profiles {
            c.args(["--profile", p]);
        }
        c.args(args)
            .env("SHARDKV_IMAGE", &self.image)
            .env("SHARDKV_ROUTER_ADDR", &self.router);
        c
    }

    fn compose_ok(&self, profiles: &[&str], args: &[&str]) -> String {
        run_ok(&mut self.compose_cmd(profiles, args))
    }

    /// `shardctl ARGS` in a new client container on the cluster's network.
    fn client(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["run", "--rm", "client"];
        all.extend_from_slice(args);
        run(&mut self.compose_cmd(&["tools"], &all))
    }

    /// The id of `service`'s container.
    fn container(&self, service: &str) -> String {
        let id = self.compose_ok(&["group-3"], &["ps", "-q", service]);
        let id = id.trim();
        assert!(!id.is_empty(), "service {service} has no container");
        id.to_owned()
    }

    fn network(&self) -> String {
        format!("{}_shardkv", self.project)
    }

    /// `shardctl ARGS` inside a running server container (quicker than a client
    /// container): the router's, or a shard master's while the router is down.
    fn shardctl(&self, args: &[&str]) -> std::process::Output {
        for service in ["router", "master-1", "master-2", "master-3"] {
            let mut cmd = docker(&["exec", &self.container(service), "shardctl"]);
            let out = run(cmd.args(args));
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("is not running") && !err.contains("is restarting") {
                return out;
            }
        }
        panic!("no running container to run shardctl {args:?} in");
    }

    fn status(&self) -> Value {
        let out = self.shardctl(&["--output", "json", "status"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "shardctl status: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Waits until every shard master and every node of exactly `gids` answers, each
    /// has one leader, all have applied the latest configuration and every range
    /// they hold is SERVING.
    fn wait_settled(&self, gids: &[u64], what: &str) {
        let mut why = String::new();
        let settled = poll_until(SETTLE, || match settled(&self.status(), gids) {
            Ok(()) => true,
            Err(e) => {
                why = e;
                false
            }
        });
        assert!(settled, "{what}: not settled within {SETTLE:?}: {why}");
    }

    /// The service whose container leads: the shard master (`gid` None) or a group.
    fn leader(&self, gid: Option<u64>) -> String {
        let status = self.status();
        let members = match gid {
            None => status["masters"].as_array().cloned(),
            Some(g) => status["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["gid"] == g))
                .and_then(|x| x["nodes"].as_array().cloned()),
        }
        .unwrap_or_default();
        let leader = members
            .iter()
            .find(|m| m["role"] == "leader")
            .unwrap_or_else(|| panic!("no leader of {gid:?} in {status}"));
        let addr = leader["addr"].as_str().unwrap();
        addr.split(':').next().unwrap().to_owned()
    }

    /// `docker compose down -v`, then checks nothing of the project is left.
    fn down(&mut self) {
        self.down = true;
        self.compose_ok(
            &["group-3", "tools"],
            &["down", "-v", "--remove-orphans", "-t", "5"],
        );
        let label = format!("label=com.docker.compose.project={}", self.project);
        for kind in ["container", "volume", "network"] {
            let mut cmd = docker(&[kind, "ls", "-q", "--filter", &label]);
            if kind == "container" {
                cmd.arg("--all");
            }
            let left = run_ok(&mut cmd);
            assert!(
                left.trim().is_empty(),
                "`down -v` left {kind}s behind: {left}"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down {
            let _ = run(&mut self.compose_cmd(
                &["group-3", "tools"],
                &["down", "-v", "--remove-orphans", "-t", "2"],
            ));
        }
        let _ = run(&mut docker(&["rmi", "--force", &self.image]));
    }
}

/// Why `status` (shardctl's JSON) is not settled with groups `gids`, if it is not.
fn settled(status: &Value, gids: &[u64]) -> Result<(), String> {
    let latest = status["config"]
        .as_u64()
        .ok_or("no configuration".to_string())?;
    let masters = status["masters"].as_array().ok_or("no masters")?;
    for m in masters {
        if m["up"] != true || m["latest_config"] != latest {
            return Err(format!("shard master {m}"));
        }
    }
    if masters.iter().filter(|m| m["role"] == "leader").count() != 1 {
        return Err("shard master has no single leader".into());
    }
    let groups = status["groups"].as_array().ok_or("no groups")?;
    let have: Vec<u64> = groups.iter().filter_map(|g| g["gid"].as_u64()).collect();
    if have != gids {
        return Err(format!("groups {have:?}, waiting for {gids:?}"));
    }
    for g in groups {
        let nodes = g["nodes"].as_array().ok_or("no nodes")?;
        for n in nodes {
            let serving = n["ranges"]
                .as_array()
                .is_none_or(|rs| rs.iter().all(|r| r["state"] == "SERVING"));
            if n["up"] != true || n["config"] != latest || !serving {
                return Err(format!("group {}: node {n}", g["gid"]));
            }
        }
        if nodes.iter().filter(|n| n["role"] == "leader").count() != 1 {
            return Err(format!("group {} has no single leader", g["gid"]));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Recorded clients through the router.

/// A finished request: which hot key (None: a unique key), when it ran, whether it
/// was answered (false: failed or timed out, its outcome unknown).
struct Done {
    key: Option<usize>,
    start: Instant,
    end: Instant,
    ok: bool,
}

/// Clients that read and write the hot keys (and put unique keys) through the
/// router over HTTP, recording a history for the linearizability checker.
struct Workload {
    router: String,
    recorder: Recorder,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Done>>>,
    /// Acknowledged unique keys and their values.
    acked: Arc<Mutex<Vec<(String, String)>>>,
    unknown: Arc<AtomicU64>,
    clients: Vec<JoinHandle<()>>,
}

impl Workload {
    fn start(router: &str, clients: u64, seed: u64) -> Workload {
        let mut w = Workload {
            router: router.to_owned(),
            recorder: Recorder::new(),
            stop: Arc::new(AtomicBool::new(false)),
            done: Arc::new(Mutex::new(Vec::new())),
            acked: Arc::new(Mutex::new(Vec::new())),
            unknown: Arc::new(AtomicU64::new(0)),
            clients: Vec::new(),
        };
        for client in 0..clients {
            let (router, recorder, stop) = (w.router.clone(), w.recorder.clone(), w.stop.clone());
            let (done, acked, unknown) = (w.done.clone(), w.acked.clone(), w.unknown.clone());
            let mut rng = StdRng::seed_from_u64(seed ^ client);
            w.clients.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let roll = rng.random_range(0..100);
                    let (key, hot) = if roll < 5 {
                        (format!("{UNIQUE_PREFIX}{client}-{n}"), None)
                    } else {
                        let k = rng.random_range(0..HOT_KEYS.len());
                        (HOT_KEYS[k].to_owned(), Some(k))
                    };
                    let value = format!("{client}-{n}");
                    let (input, method, body) = if hot.is_some() && roll < 50 {
                        (Input::get(key.clone()), "GET", "")
                    } else {
                        (
                            Input::put(key.clone(), value.clone()),
                            "PUT",
                            value.as_str(),
                        )
                    };
                    let start = Instant::now();
                    let h = recorder.invoke(client, input);
                    let reply = http(
                        method,
                        &router,
                        &format!("/keys/{key}"),
                        body.as_bytes(),
                        HTTP_TIMEOUT,
                    );
                    let output = match (&reply, method) {
                        (Ok(r), "GET") if r.status == 200 => {
                            Some(Output::Get(Some(r.body.clone())))
                        }
                        (Ok(r), "GET") if r.status == 404 => Some(Output::Get(None)),
                        (Ok(r), "PUT") if r.status == 200 => Some(Output::Write),
                        _ => None,
                    };
                    let end = Instant::now();
                    done.lock().unwrap().push(Done {
                        key: hot,
                        start,
                        end,
                        ok: output.is_some(),
                    });
                    match output {
                        Some(o) => {
                            recorder.complete(h, o);
                            if hot.is_none() {
                                acked.lock().unwrap().push((key, value));
                            }
                        }
                        None => {
                            // Outcome unknown (the router answered 5xx, timed out or was
                            // down): left open in the history. Back off a little so a
                            // down router is not hammered.
                            unknown.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    // A steady rate rather than a flood: the history stays small
                    // enough to check in seconds.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        w
    }

    /// Waits until every hot key has answered a request invoked after this call.
    fn expect_every_key_served(&self, what: &str) {
        let since = Instant::now();
        let served = poll_until(SERVE_AGAIN, || {
            let done = self.done.lock().unwrap();
            let keys: BTreeSet<usize> = done
                .iter()
                .rev()
                .take_while(|d| d.end > since)
                .filter(|d| d.ok && d.start > since)
                .filter_map(|d| d.key)
                .collect();
            keys.len() == HOT_KEYS.len()
        });
        assert!(
            served,
            "{what}: some hot key went unanswered for {SERVE_AGAIN:?}"
        );
    }

    /// The longest request (answered or not) that ran within `[from, to]`, and the
    /// longest time a hot key went without an answer in it.
    fn measure(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let done = self.done.lock().unwrap();
        let window: Vec<&Done> = done
            .iter()
            .filter(|d| d.start >= from && d.end <= to)
            .collect();
        let longest = window
            .iter()
            .map(|d| d.end - d.start)
            .max()
            .unwrap_or_default();
        let mut gap = Duration::ZERO;
        for k in 0..HOT_KEYS.len() {
            let mut ends: Vec<Instant> = window
                .iter()
                .filter(|d| d.ok && d.key == Some(k))
                .map(|d| d.end)
                .collect();
            ends.sort();
            ends.insert(0, from);
            ends.push(to);
            gap = gap.max(ends.windows(2).map(|w| w[1] - w[0]).max().unwrap());
        }
        (longest, gap)
    }

    /// Stops the clients, reads every hot key back (recorded) and every acknowledged
    /// unique key (`read_unique`: every unique key the cluster holds, read only once
    /// no client writes any more, or a put acknowledged after that read would look
    /// lost), and fails on a linearizability violation or a lost write.
    fn finish(self, read_unique: impl FnOnce() -> BTreeMap<String, String>) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().expect("client thread panicked");
        }
        let unique = read_unique();
        let reader = u64::MAX;
        let mut finals = Vec::new();
        for key in HOT_KEYS {
            let h = self.recorder.invoke(reader, Input::get(*key));
            let r = http(
                "GET",
                &self.router,
                &format!("/keys/{key}"),
                b"",
                HTTP_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("final read of {key}: {e}"));
            let value = match r.status {
                200 => Some(r.body),
                404 => None,
                s => panic!("final read of {key}: HTTP {s}: {}", r.text()),
            };
            self.recorder.complete(h, Output::Get(value.clone()));
            finals.push((key.as_bytes().to_vec(), value));
        }
        let history = self.recorder.into_history();
        let mut lost: Vec<String> = finals
            .iter()
            .filter_map(|(k, v)| lost_write(&history, k, v))
            .collect();
        let acked = self.acked.lock().unwrap();
        assert!(!acked.is_empty(), "no unique key was acknowledged");
        for (k, v) in acked.iter() {
            if unique.get(k) != Some(v) {
                lost.push(format!(
                    "acknowledged PUT {k} = {v} reads back as {:?}",
                    unique.get(k)
                ));
            }
        }
        let started = Instant::now();
        let result = check(&history);
        println!(
            "{} operations ({} of unknown outcome, {} unique keys acknowledged), checked in {:?}",
            history.len(),
            self.unknown.load(Ordering::Relaxed),
            acked.len(),
            started.elapsed()
        );
        println!(
            "violations: {}, lost writes: {}",
            usize::from(!result.is_ok()),
            lost.len()
        );
        assert!(result.is_ok(), "not linearizable:\n{result}");
        assert!(lost.is_empty(), "lost writes:\n{}", lost.join("\n"));
    }
}

// ---------------------------------------------------------------------------

#[test]
fn compose_cluster_survives_kills_partitions_scaling_and_a_rolling_restart() {
    let test = "compose_cluster_survives_kills_partitions_scaling_and_a_rolling_restart";
    if !docker_answers() {
        return skip(test, "no Docker engine answers (`docker info` failed)");
    }
    let Some(compose) = compose_program() else {
        return skip(test, "neither `docker compose` nor `docker-compose` works");
    };
    let started = Instant::now();
    let mut cluster = Cluster::up(compose);
    cluster.wait_settled(&[1, 2], "after `up`");
    println!("cluster up and settled after {:?}", started.elapsed());

    // The walkthrough's data commands, from a client container.
    let ok = |args: &[&str]| {
        let out = cluster.client(args);
        assert!(out.status.success(), "shardctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["put", "colour", "blue"]);
    assert_eq!(ok(&["get", "colour"]).trim(), "blue");
    ok(&["cas", "colour", "--expected", "blue", "--value", "green"]);
    assert!(ok(&["scan", "a", "z", "--limit", "10"]).contains("colour\tgreen"));
    ok(&["delete", "colour"]);
    let absent = cluster.client(&["get", "colour"]);
    assert_eq!(
        absent.status.code(),
        Some(1),
        "get after delete: {absent:?}"
    );
    let config: Value = serde_json::from_str(&ok(&["--output", "json", "query"])).unwrap();
    assert_eq!(
        config["groups"].as_array().map(Vec::len),
        Some(2),
        "{config}"
    );
    // And through the router, from this host.
    let put = http(
        "PUT",
        &cluster.router,
        "/keys/apple",
        b"value-for-apple",
        HTTP_TIMEOUT,
    )
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let get = http("GET", &cluster.router, "/keys/apple", b"", HTTP_TIMEOUT).unwrap();
    assert_eq!(get.text(), "value-for-apple");

    let workload = Workload::start(&cluster.router, 4, seed());
    workload.expect_every_key_served("with the workload started");

    // docker kill: a group leader, then the shard master's leader.
    for (gid, what) in [
        (Some(1), "group 1's leader"),
        (None, "the shard master leader"),
    ] {
        let victim = cluster.leader(gid);
        run_ok(&mut docker(&["kill", &cluster.container(&victim)]));
        println!("killed {victim} ({what})");
        workload.expect_every_key_served(&format!("with {what} {victim} killed"));
        run_ok(&mut docker(&["start", &cluster.container(&victim)]));
        cluster.wait_settled(&[1, 2], &format!("after restarting {victim}"));
    }

    // A real partition: group 2's leader loses its network, comes back, restarts.
    let victim = cluster.leader(Some(2));
    let container = cluster.container(&victim);
    run_ok(&mut docker(&[
        "network",
        "disconnect",
        &cluster.network(),
        &container,
    ]));
    println!("disconnected {victim} from the network");
    workload.expect_every_key_served(&format!("with {victim} cut off"));
    // Compose's name for the container is an alias on its network: give it back.
    run_ok(&mut docker(&[
        "network",
        "connect",
        "--alias",
        &victim,
        &cluster.network(),
        &container,
    ]));
    cluster.wait_settled(&[1, 2], &format!("after reconnecting {victim}"));
    run_ok(&mut docker(&["restart", "-t", "10", &container]));
    cluster.wait_settled(&[1, 2], &format!("after restarting {victim}"));
    workload.expect_every_key_served(&format!("after restarting {victim}"));

    // Scale out with group 3, then remove group 1.
    cluster.compose_ok(&["group-3"], &["up", "-d", "init-join-3"]);
    cluster.wait_settled(&[1, 2, 3], "after group 3 joined");
    println!("group 3 joined");
    let leave = cluster.shardctl(&["--timeout", "120", "leave", "--gid", "1"]);
    assert!(leave.status.success(), "leave --gid 1: {leave:?}");
    cluster.compose_ok(
        &[],
        &["rm", "--stop", "--force", "kv-1-1", "kv-1-2", "kv-1-3"],
    );
    cluster.wait_settled(&[2, 3], "after group 1 left");
    println!("group 1 left");
    workload.expect_every_key_served("after group 1 left");

    // Rolling restart: every container, one at a time, each back before the next.
    let from = Instant::now();
    let services = [
        "master-1", "master-2", "master-3", "kv-2-1", "kv-2-2", "kv-2-3", "kv-3-1", "kv-3-2",
        "kv-3-3", "router",
    ];
    for service in services {
        run_ok(&mut docker(&[
            "restart",
            "-t",
            "10",
            &cluster.container(service),
        ]));
        cluster.wait_settled(&[2, 3], &format!("rolling restart: after {service}"));
        workload.expect_every_key_served(&format!("rolling restart: after {service}"));
        println!("restarted {service}");
    }
    let (longest, gap) = workload.measure(from, Instant::now());
    println!(
        "rolling restart of {} containers in {:?}: longest request {longest:?}, \
         longest a hot key went unanswered {gap:?}",
        services.len(),
        from.elapsed()
    );
    assert!(
        gap < ROLLING_GAP_LIMIT,
        "a range went {gap:?} without serving during the rolling restart"
    );

    workload.finish(|| {
        let out = cluster.shardctl(&["--output", "json", "scan", UNIQUE_PREFIX, UNIQUE_END]);
        assert!(out.status.success(), "scan of the unique keys: {out:?}");
        let pairs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        pairs
            .iter()
            .map(|p| {
                (
                    p["key"].as_str().unwrap().to_owned(),
                    p["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    });

    cluster.down();
    println!("{test}: passed in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// Kubernetes manifests.

/// Every YAML document of `files`, as JSON (PyYAML, which kubernetes-validate
/// installs, does the parsing; it resolves the compose file's anchors and merges).
fn yaml_documents(files: &[PathBuf]) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
                  print(json.dumps(docs))";
    let out = run_ok(Command::new("python3").args(["-c", script]).args(files));
    serde_json::from_str(&out).expect("documents as JSON")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not a list"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("{s} is not a string"))
                .to_owned()
        })
        .collect()
}

/// A server's command line: the program and its `--flag value` pairs.
#[derive(Debug)]
struct CommandLine {
    program: String,
    flags: BTreeMap<String, String>,
}

impl CommandLine {
    fn parse(argv: &[String]) -> CommandLine {
        let mut flags = BTreeMap::new();
        let mut rest = argv[1..].iter();
        while let Some(flag) = rest.next() {
            assert!(flag.starts_with("--"), "{argv:?}: {flag} is not a flag");
            let value = rest
                .next()
                .unwrap_or_else(|| panic!("{argv:?}: {flag} has no value"));
            flags.insert(flag.clone(), value.clone());
        }
        CommandLine {
            program: argv[0].clone(),
            flags,
        }
    }

    fn flag(&self, name: &str) -> &str {
        self.flags
            .get(name)
            .unwrap_or_else(|| panic!("{self:?} has no {name}"))
    }

    fn port(&self) -> u16 {
        port_of(self.flag("--listen"))
    }
}

fn port_of(addr: &str) -> u16 {
    let (_, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{addr} has no port"));
    port.parse().unwrap_or_else(|_| panic!("{addr}: bad port"))
}

/// `ID=HOST:PORT,...` as id -> (host, port).
fn members(list: &str) -> BTreeMap<u64, (String, u16)> {
    list.split(',')
        .map(|m| {
            let (id, addr) = m.split_once('=').unwrap();
            let host = addr.rsplit_once(':').unwrap().0.to_owned();
            (id.parse().unwrap(), (host, port_of(addr)))
        })
        .collect()
}

/// The Kubernetes objects of the manifests, by kind and name.
struct Manifests(Vec<Value>);

impl Manifests {
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
    }

    /// A StatefulSet's server: its command line (the id, which the pod's ordinal
    /// gives, aside) after checking the pieces around it.
    fn stateful_server(&self, name: &str) -> CommandLine {
        let set = self.get("StatefulSet", name);
        let spec = &set["spec"];
        assert_eq!(spec["podManagementPolicy"], "Parallel", "{name}");
        let service = self.get("Service", spec["serviceName"].as_str().unwrap());
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{name}: headless Service"
        );
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "{name}");
        let pdb = self.get("PodDisruptionBudget", name);
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{name}");
        assert_eq!(
            pdb["spec"]["selector"], spec["selector"],
            "{name}: the budget covers the set's pods"
        );
        assert!(
            spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"].is_string()
        );
        let container = &spec["template"]["spec"]["containers"][0];
        let command = strings(&container["command"]);
        // [sh, -c, 'exec PROGRAM --id "$((ordinal + 1))" "$@"', PROGRAM] + args
        assert_eq!(command[..2], ["sh", "-c"], "{name}: {command:?}");
        assert!(
            command[2].starts_with(&format!("exec {} --id ", command[3])),
            "{command:?}"
        );
        let mut argv = vec![command[3].clone()];
        argv.extend(strings(&container["args"]));
        let line = CommandLine::parse(&argv);
        let port = line.port();
        assert_eq!(container["ports"][0]["containerPort"], port, "{name}");
        assert_eq!(
            container["readinessProbe"]["grpc"]["port"], port,
            "{name}: readiness"
        );
        assert_eq!(
            service["spec"]["ports"][0]["port"], port,
            "{name}: Service port"
        );
        assert!(
            container["resources"]["requests"]["cpu"].is_string(),
            "{name}"
        );
        let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
        assert!(
            line.flag("--data-dir").starts_with(mount),
            "{name}: data on the volume"
        );
        // Peer i is pod i-1 of this set, through its headless Service.
        for (id, (host, peer_port)) in members(line.flag("--peers")) {
            assert_eq!(
                host,
                format!(
                    "{name}-{}.{}",
                    id - 1,
                    spec["serviceName"].as_str().unwrap()
                )
            );
            assert_eq!(peer_port, port, "{name}: peer {id}");
        }
        line
    }
}

/// Checks `actual` (Kubernetes) against `expected` (compose), flag by flag: the same
/// flags (but the id), the same listen address and data directory, peers with the
/// same ids and ports.
fn same_server(what: &str, expected: &CommandLine, actual: &CommandLine) {
    assert_eq!(expected.program, actual.program, "{what}");
    let mut names: Vec<&String> = expected.flags.keys().filter(|f| *f != "--id").collect();
    names.sort();
    assert_eq!(
        names,
        actual.flags.keys().collect::<Vec<_>>(),
        "{what}: flags"
    );
    for flag in ["--listen", "--data-dir", "--gid"] {
        assert_eq!(
            expected.flags.get(flag),
            actual.flags.get(flag),
            "{what}: {flag}"
        );
    }
    let ports = |l: &CommandLine| -> Vec<(u64, u16)> {
        members(l.flag("--peers"))
            .into_iter()
            .map(|(id, (_, p))| (id, p))
            .collect()
    };
    assert_eq!(
        ports(expected),
        ports(actual),
        "{what}: --peers ids and ports"
    );
}

#[test]
fn kubernetes_manifests_are_valid_and_match_the_compose_cluster() {
    let test = "kubernetes_manifests_are_valid_and_match_the_compose_cluster";
    // The validator's module, run by the same Python that parses the YAML (a pip
    // install may leave its script off the PATH).
    let installed = Command::new("python3")
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return skip(
            test,
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    // The bundled schemas of the newest Kubernetes it knows; --strict also refuses
    // fields the schemas do not have (a typo would otherwise be ignored).
    run_ok(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
            .args(&files),
    );

    let k8s = Manifests(yaml_documents(&files));
    let compose = yaml_documents(&[repo().join("deploy/compose.yaml")]).remove(0);
    let service = |name: &str| -> &Value {
        let s = &compose["services"][name];
        assert!(s.is_object(), "compose has no service {name}");
        s
    };
    let compose_line = |name: &str| CommandLine::parse(&strings(&service(name)["command"]));

    let master = compose_line("master-1");
    same_server("shard master", &master, &k8s.stateful_server("shardmaster"));
    let mut kv_port = None;
    for g in [1, 2] {
        let node = compose_line(&format!("kv-{g}-1"));
        same_server(
            &format!("group {g}"),
            &node,
            &k8s.stateful_server(&format!("kv-{g}")),
        );
        kv_port.get_or_insert(node.port());

        // The join Job does what compose's init services do.
        let job = &k8s.get("Job", &format!("join-group-{g}"))["spec"]["template"]["spec"];
        assert_eq!(
            strings(&job["initContainers"][0]["command"]),
            strings(&service("init-split")["command"]),
            "the split before joining group {g}"
        );
        let join = strings(&job["containers"][0]["command"]);
        let compose_join = strings(&service(&format!("init-join-{g}"))["command"]);
        assert_eq!(join[..3], compose_join[..3], "join group {g}");
        let ids_ports = |l: &str| -> Vec<(u64, u16)> {
            members(l).into_iter().map(|(id, (_, p))| (id, p)).collect()
        };
        assert_eq!(
            ids_ports(&join[3]),
            ids_ports(&compose_join[3]),
            "join group {g}"
        );
    }
    let router = &k8s.get("Deployment", "router")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        strings(&router["command"]),
        strings(&service("router")["command"])
    );
    let router_port = CommandLine::parse(&strings(&router["command"])[1..]).port();
    assert_eq!(router["ports"][0]["containerPort"], router_port);
    assert_eq!(
        k8s.get("Service", "router")["spec"]["ports"][0]["port"],
        router_port
    );

    // Every container that talks to the shard master finds all of it at its port.
    let masters = |env: &Value| -> Vec<u16> {
        let list = match env {
            Value::Array(vars) => vars
                .iter()
                .find(|v| v["name"] == "SHARDKV_MASTERS")
                .map(|v| &v["value"]),
            _ => env.get("SHARDKV_MASTERS"),
        };
        let list = list
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no SHARDKV_MASTERS in {env}"));
        list.split(',').map(port_of).collect()
    };
    let expected = vec![master.port(); 3];
    for name in ["kv-1-1", "router", "init-split", "client"] {
        assert_eq!(
            masters(&service(name)["environment"]),
            expected,
            "compose {name}"
        );
    }
    let mut checked = 0;
    for doc in &k8s.0 {
        let pod = match doc["kind"].as_str() {
            Some("StatefulSet" | "Deployment" | "Job") => &doc["spec"]["template"]["spec"],
            _ => continue,
        };
        for c in pod["containers"]
            .as_array()
            .into_iter()
            .chain(pod["initContainers"].as_array())
            .flatten()
        {
            if c["name"] != "shardmaster" {
                assert_eq!(
                    masters(&c["env"]),
                    expected,
                    "{} {}",
                    doc["kind"],
                    c["name"]
                );
                checked += 1;
            }
            assert!(
                c["resources"]["requests"].is_object(),
                "{} {}: resource requests",
                doc["kind"],
                c["name"]
            );
        }
    }
    assert!(checked >= 5, "only {checked} containers checked");
    assert_eq!(kv_port, Some(8101), "the port the README and compose use");
}
