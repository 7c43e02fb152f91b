//! `shardctl playground` as a user runs it: it starts, says it is up with a table of
//! processes, keeps serving after one of them is killed by pid, stops everything on
//! Ctrl-C (SIGINT), and starts again on the same data. Ports are moved off the
//! defaults (`--master-port`, `--kv-port`, `--router`) so tests can run in parallel.

mod common;

use common::user::{
    group_members, http, pid_alive, poll_until, run_within, shardctl, signal, wait_pids_gone,
    Playground, PortBlock,
};
use std::net::TcpListener;
use std::time::Duration;

const UP_WAIT: Duration = Duration::from_secs(120);
const STOP_WAIT: Duration = Duration::from_secs(60);
const HTTP_LIMIT: Duration = Duration::from_secs(30);

/// The address of the leader of group `gid`, from `shardctl status --output json`.
fn leader_addr(masters: &str, gid: u64) -> Option<String> {
    let ran = shardctl(
        masters,
        &["--output", "json", "status"],
        Duration::from_secs(60),
    );
    let status: serde_json::Value = serde_json::from_str(&ran.stdout).ok()?;
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["gid"] == gid)?["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["role"] == "leader")
        .and_then(|n| n["addr"].as_str().map(str::to_owned))
}

/// PUT then GET `key` through the router until both succeed (the router's client
/// retries within its own deadline; this covers a slower election).
fn put_get_eventually(router: &str, key: &str, value: &str) {
    let path = format!("/keys/{key}");
    let mut last = String::new();
    let ok = poll_until(Duration::from_secs(90), || {
        match http("PUT", router, &path, value.as_bytes(), HTTP_LIMIT) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => {
                last = format!("PUT {}: {}", r.status, r.text());
                return false;
            }
            Err(e) => {
                last = format!("PUT: {e}");
                return false;
            }
        }
        match http("GET", router, &path, b"", HTTP_LIMIT) {
            Ok(r) if r.status == 200 && r.body == value.as_bytes() => true,
            Ok(r) => {
                last = format!("GET {}: {}", r.status, r.text());
                false
            }
            Err(e) => {
                last = format!("GET: {e}");
                false
            }
        }
    });
    assert!(
        ok,
        "{key} not written and read back through the router; last: {last}"
    );
}

#[test]
fn playground_serves_survives_a_kill_and_stops_cleanly_on_sigint() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    let dir = tmp.path().join("playground");
    let mut pg = Playground::start(tmp.path(), &dir, ports);
    pg.wait_up(UP_WAIT);

    // The table lists every process at the moved ports, each alive.
    let names: Vec<&str> = pg.procs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "master1", "master2", "master3", "g1-n1", "g1-n2", "g1-n3", "g2-n1", "g2-n2", "g2-n3",
            "router"
        ]
    );
    assert_eq!(
        pg.proc("master2").addr,
        format!("127.0.0.1:{}", ports.port(7002))
    );
    assert_eq!(
        pg.proc("g2-n3").addr,
        format!("127.0.0.1:{}", ports.port(8203))
    );
    assert_eq!(pg.proc("router").addr, ports.router_addr());
    for p in &pg.procs {
        assert!(
            pid_alive(p.pid),
            "{} (pid {}) is not running",
            p.name,
            p.pid
        );
        assert!(
            p.log.exists(),
            "{} has no log at {}",
            p.name,
            p.log.display()
        );
        // Its metrics answer at the address the table shows.
        let addr = p
            .metrics
            .strip_prefix("http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("{}: metrics URL {:?}", p.name, p.metrics));
        let scraped = http("GET", addr, "/metrics", b"", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: scrape {addr}: {e}", p.name));
        assert_eq!(scraped.status, 200, "{}", p.name);
        assert!(
            scraped.text().contains("shardkv_node_info{"),
            "{}: {}",
            p.name,
            scraped.text()
        );
    }
    // It tells the user how to reach it, at the moved ports.
    for hint in [
        format!("export SHARDKV_MASTERS={}", ports.masters()),
        format!("http://localhost:{}/keys/apple", ports.port(7070)),
    ] {
        assert!(
            pg.wait_stdout_contains(&hint, Duration::from_secs(10)),
            "no {hint:?} in:\n{}",
            pg.stdout()
        );
    }

    // Status shows each group's ranges as `query` does (a node merges adjacent
    // ranges it holds; the playground's pre-split must stay visible).
    let json = |args: &[&str]| -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let ran = shardctl(&ports.masters(), &full, Duration::from_secs(60));
        serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {}", ran.describe()))
    };
    let query = json(&["query"]);
    let status = json(&["status"]);
    for group in status["groups"].as_array().expect("groups") {
        let leader = group["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["role"] == "leader")
            .unwrap_or_else(|| panic!("no leader: {status}"));
        let held: Vec<(&serde_json::Value, &serde_json::Value)> = leader["ranges"]
            .as_array()
            .expect("ranges")
            .iter()
            .map(|r| (&r["start"], &r["end"]))
            .collect();
        let owned: Vec<(&serde_json::Value, &serde_json::Value)> = query["ranges"]
            .as_array()
            .expect("ranges")
            .iter()
            .filter(|r| r["gid"] == group["gid"])
            .map(|r| (&r["start"], &r["end"]))
            .collect();
        assert_eq!(held, owned, "group {}: status vs query", group["gid"]);
    }

    let router = ports.router_addr();
    put_get_eventually(&router, "apple", "value-for-apple");
    put_get_eventually(&router, "zebra", "value-for-zebra");

    // kill -9 group 1's leader, found the way a user would: status, then the table.
    let masters = ports.masters();
    let mut leader = None;
    assert!(
        poll_until(Duration::from_secs(60), || {
            leader = leader_addr(&masters, 1);
            leader.is_some()
        }),
        "no leader of group 1 in shardctl status"
    );
    let victim = pg.proc_at(&leader.expect("found")).clone();
    // And a shard master replica that does not lead (its leader keeps the heartbeats).
    let masters_status = json(&["status"]);
    let follower = masters_status["masters"]
        .as_array()
        .expect("masters")
        .iter()
        .find(|m| m["role"] == "follower")
        .and_then(|m| m["addr"].as_str())
        .unwrap_or_else(|| panic!("no follower among the masters: {masters_status}"))
        .to_owned();
    let master_victim = pg.proc_at(&follower).clone();
    assert!(signal(victim.pid, "KILL"), "kill -9 {}", victim.pid);
    assert!(signal(master_victim.pid, "KILL"));
    assert!(
        wait_pids_gone(&[victim.pid, master_victim.pid], Duration::from_secs(10)).is_empty(),
        "{} survived kill -9",
        victim.name
    );
    // Right after the kill the shard master still has a recent heartbeat: status
    // says what each column means; the down master keeps its id.
    let ran = shardctl(&masters, &["status"], Duration::from_secs(60));
    let row = |addr: &str| {
        ran.stdout
            .lines()
            .find(|l| l.contains(addr))
            .unwrap_or_else(|| panic!("{addr} not in status:\n{}", ran.stdout))
            .to_owned()
    };
    let node_row = row(&victim.addr);
    assert!(node_row.contains("DOWN"), "{node_row}");
    if node_row.contains(" UP ") {
        assert!(ran.stdout.contains("last heartbeat"), "{}", ran.stdout);
    }
    let id = master_victim.name.trim_start_matches("master");
    let master_row = row(&master_victim.addr);
    assert!(
        master_row.starts_with(&format!("{id} ")) && master_row.contains("DOWN"),
        "{master_row}"
    );
    // The rest keeps working: group 1 elects a new leader, group 2 never noticed.
    put_get_eventually(&router, "apple", "value-for-apple-2");
    put_get_eventually(&router, "zebra", "value-for-zebra-2");
    let ran = shardctl(&masters, &["status"], Duration::from_secs(60));
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let row = ran
        .stdout
        .lines()
        .find(|l| l.contains(&victim.addr))
        .unwrap_or_else(|| panic!("{} not in status:\n{}", victim.addr, ran.stdout));
    assert!(row.contains("DOWN"), "killed node not shown DOWN: {row}");

    // Ctrl-C: the playground stops every process it started, and exits 0.
    let pids: Vec<u32> = pg
        .pids()
        .into_iter()
        .filter(|&p| p != victim.pid && p != master_victim.pid)
        .collect();
    assert!(pg.child().signal("INT"), "SIGINT to the playground");
    let status = pg.child().wait_exit(STOP_WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "playground after SIGINT: {status:?}; stderr:\n{}",
        pg.stderr()
    );
    let left = wait_pids_gone(&pids, Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "still running after the playground stopped: {left:?}"
    );
    let group = group_members(pg.pid());
    assert!(
        group.is_empty(),
        "left in the playground's process group: {group:?}"
    );
    assert!(
        pg.stderr().contains("stopping every process"),
        "{}",
        pg.stderr()
    );
    for (name, port) in [
        ("master1", ports.port(7001)),
        ("g1-n1", ports.port(8101)),
        ("router", ports.port(7070)),
    ] {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} of {name} still taken"
        );
    }
    drop(pg);

    // Run it again: the same cluster, with its data (and the killed node back).
    let mut pg = Playground::start(tmp.path(), &dir, ports);
    pg.wait_up(UP_WAIT);
    let r = http("GET", &router, "/keys/apple", b"", HTTP_LIMIT).expect("GET apple");
    assert_eq!((r.status, r.text()), (200, "value-for-apple-2".into()));
    // This time stop it with SIGTERM (what `kill PID` sends): the same clean stop.
    let pids = pg.pids();
    assert!(pg.child().signal("TERM"));
    let status = pg.child().wait_exit(STOP_WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "after SIGTERM: {status:?}"
    );
    let left = wait_pids_gone(&pids, Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "still running after the second stop: {left:?}"
    );
    let group = group_members(pg.pid());
    assert!(
        group.is_empty(),
        "left in the playground's process group: {group:?}"
    );
}

#[test]
fn ctrl_c_while_starting_up_stops_what_was_started() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    let mut pg = Playground::start(tmp.path(), &tmp.path().join("playground"), ports);
    // As soon as it has started a server (long before the cluster can be up).
    assert!(
        poll_until(Duration::from_secs(60), || group_members(pg.pid()).len()
            >= 2),
        "the playground started no server"
    );
    assert!(pg.child().signal("INT"));
    let status = pg.child().wait_exit(STOP_WAIT);
    assert!(
        status.is_some(),
        "the playground ignored SIGINT while starting"
    );
    let mut left = Vec::new();
    poll_until(Duration::from_secs(10), || {
        left = group_members(pg.pid());
        left.is_empty()
    });
    assert!(
        left.is_empty(),
        "left running after SIGINT during start-up: {left:?}"
    );
    // It said what happened (or, if it was up already, stopped as usual).
    let stderr = pg.stderr();
    eprintln!("playground's stderr after an early SIGINT: {stderr}");
    assert!(
        stderr.contains("interrupted") || stderr.contains("stopping every process"),
        "{stderr}"
    );
}

#[test]
fn a_taken_port_or_a_bad_layout_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    // Something else holds group 2's first kvnode port.
    let _squatter = TcpListener::bind(("127.0.0.1", ports.port(8201))).expect("bind");
    let mut c = std::process::Command::new(common::user::bin("shardctl"));
    c.current_dir(tmp.path())
        .arg("playground")
        .args(ports.playground_args());
    let ran = run_within(&mut c, Duration::from_secs(60));
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(
        ran.stderr.contains(&format!(
            "port {} (for g2-n1) is not free",
            ports.port(8201)
        )),
        "{}",
        ran.describe()
    );
    // Nothing was started: the master ports are still free.
    assert!(TcpListener::bind(("127.0.0.1", ports.port(7001))).is_ok());

    // Overlapping layouts are refused with the flags to change.
    let mut c = std::process::Command::new(common::user::bin("shardctl"));
    c.current_dir(tmp.path())
        .args(["playground", "--master-port", "20001", "--kv-port", "20002"]);
    let ran = run_within(&mut c, Duration::from_secs(60));
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(ran.stderr.contains("--kv-port"), "{}", ran.describe());
}

/// The pid in the last line of `text` that starts with `prefix` and ends with `pid N`.
fn pid_after(text: &str, prefix: &str) -> Option<u32> {
    text.lines()
        .rev()
        .find(|l| l.starts_with(prefix))?
        .rsplit_once("pid ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// True once the kernel has forgotten `pid`: exited and reaped (a zombie still has
/// its /proc entry).
fn reaped(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_playground_reports_reaps_and_restarts_its_processes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    let dir = tmp.path().join("playground");
    let mut pg = Playground::start_with(tmp.path(), &dir, ports, &["--auto-restart"]);
    pg.wait_up(UP_WAIT);

    // kill -9 of a node: reported with its exit status, reaped, restarted by itself.
    let victim = pg.proc("g1-n2").clone();
    assert!(signal(victim.pid, "KILL"));
    let reported = format!("g1-n2 (pid {}) exited: signal: 9", victim.pid);
    assert!(
        poll_until(Duration::from_secs(30), || pg.stderr().contains(&reported)),
        "no {reported:?} in the playground's stderr:\n{}",
        pg.stderr()
    );
    assert!(
        poll_until(Duration::from_secs(10), || reaped(victim.pid)),
        "pid {} was not reaped (a zombie)",
        victim.pid
    );
    let mut restarted = None;
    poll_until(Duration::from_secs(30), || {
        restarted = pid_after(&pg.stderr(), "g1-n2 restarted:");
        restarted.is_some()
    });
    let restarted = restarted.unwrap_or_else(|| panic!("g1-n2 not restarted:\n{}", pg.stderr()));
    assert!(pid_alive(restarted));
    assert!(group_members(pg.pid()).contains(&restarted));

    // A restart asked for from another terminal, of a process that runs.
    let restart = |name: &str| {
        let mut c = std::process::Command::new(common::user::bin("shardctl"));
        c.args(["playground", "restart", name, "--dir"]).arg(&dir);
        run_within(&mut c, Duration::from_secs(60))
    };
    let old = pg.proc("g2-n1").pid;
    let ran = restart("g2-n1");
    assert_eq!(ran.code, Some(0), "{}", ran.describe());
    let new = pid_after(&ran.stdout, "g2-n1 restarted:")
        .unwrap_or_else(|| panic!("no new pid: {}", ran.describe()));
    assert!(
        poll_until(Duration::from_secs(10), || reaped(old)),
        "{old} not reaped"
    );
    assert!(pid_alive(new));
    put_get_eventually(&ports.router_addr(), "zebra", "after-restarts");
    let ran = restart("g9-n9");
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(
        ran.stderr.contains("no process \"g9-n9\""),
        "{}",
        ran.describe()
    );

    // A second playground on the same folder is refused while this one runs.
    let mut c = std::process::Command::new(common::user::bin("shardctl"));
    c.current_dir(tmp.path())
        .arg("playground")
        .arg("--dir")
        .arg(&dir)
        .args(PortBlock::pick().playground_args());
    let ran = run_within(&mut c, Duration::from_secs(60));
    assert_eq!(ran.code, Some(2), "{}", ran.describe());
    assert!(
        ran.stderr.contains("another playground is running"),
        "{}",
        ran.describe()
    );

    // Ctrl-C stops every process, the restarted ones too.
    assert!(pg.child().signal("INT"));
    let status = pg.child().wait_exit(STOP_WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let left = wait_pids_gone(&[restarted, new], Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "restarted processes left running: {left:?}"
    );
    assert!(group_members(pg.pid()).is_empty());
}
