//! Fixture helpers for tests that use shardkv the way a person does: the `shardctl`
//! binary, the HTTP router, the playground, and shell commands copied from the README.
//!
//! - [`bin`] finds a binary built for this test run (`target/debug/...`).
//! - [`PortBlock`] reserves a base port B such that B+1.., B+70, B+1101.. are free:
//!   the playground's default layout (7001.., 7070, 8101..) moved by B - 7000, so a
//!   README command can be rewritten by shifting each port ([`PortBlock::rewrite`]).
//! - [`GroupChild`] is a process started in its own process group; dropping it
//!   SIGKILLs the whole group (the process and everything it started) and reaps it.
//! - [`signal`], [`signal_group`], [`pid_alive`], [`wait_pids_gone`]: signals and pids.
//! - [`http`]: one HTTP/1.1 request over a std `TcpStream` (no client crate).
//! - [`Playground`]: `shardctl playground` with moved ports; waits for its table of
//!   processes and parses it.
//! - [`Shell`]: one long-lived `bash` that runs commands one at a time, keeping
//!   exports and the working directory between them like a terminal does.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Poll interval of the waits in this module.
const POLL: Duration = Duration::from_millis(50);

/// A binary of this package built for the test run (next to the test's `shardctl`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The folder holding this test run's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_shardctl"))
        .parent()
        .expect("shardctl has a folder")
        .to_path_buf()
}

/// Polls `cond` every 50 ms until it is true (then true) or `timeout` has passed
/// (then false). For synchronous code; async tests use `common::wait_until`.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(POLL.min(timeout.saturating_sub(start.elapsed())));
    }
}

// ---------------------------------------------------------------------------
// Ports.

/// Offsets from a [`PortBlock`]'s base of everything the playground and the README
/// walkthrough listen on, as in the default layout with base 7000: shard masters
/// 7001-7003, the router 7070, groups 1-3 at 8101-8103, 8201-8204 and 8301-8303.
const PLAYGROUND_OFFSETS: &[u16] = &[
    1, 2, 3, 70, 1101, 1102, 1103, 1201, 1202, 1203, 1204, 1301, 1302, 1303,
];
/// The default layout's base.
const DEFAULT_BASE: u16 = 7000;
/// Bases are drawn from here: below Linux's ephemeral range (32768-60999), which is
/// where ports bound to :0 (the fixture's `free_ports`) and outgoing connections come from.
const BASE_RANGE: std::ops::Range<u16> = 10_000..30_000;

static BASES_HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A base port B whose playground layout (B+1..B+3 masters, B+70 router, B+1101..
/// kvnodes) was free a moment ago. Each port is checked by binding it on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct PortBlock {
    pub base: u16,
}

impl PortBlock {
    /// A random free block (no two blocks of one test binary share a base).
    pub fn pick() -> PortBlock {
        let mut handed = BASES_HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let handed = handed.get_or_insert_with(HashSet::new);
        for _ in 0..200 {
            // Bases on a 2000-port grid: two blocks never overlap.
            let slots = (BASE_RANGE.end - BASE_RANGE.start) / 2000;
            let base = BASE_RANGE.start + 2000 * (rand::random::<u16>() % slots);
            if handed.contains(&base) {
                continue;
            }
            let all_free = PLAYGROUND_OFFSETS
                .iter()
                .all(|off| TcpListener::bind(("127.0.0.1", base + off)).is_ok());
            if all_free {
                handed.insert(base);
                return PortBlock { base };
            }
        }
        panic!("found no free block of playground ports in {BASE_RANGE:?}");
    }

    /// `default_port` (one of the default layout's, e.g. 7001 or 8203) moved into this block.
    pub fn port(&self, default_port: u16) -> u16 {
        assert!(
            (7001..=7099).contains(&default_port) || (8100..=8999).contains(&default_port),
            "{default_port} is not a port of the playground's default layout"
        );
        default_port - DEFAULT_BASE + self.base
    }

    pub fn master_port(&self) -> u16 {
        self.port(7001)
    }

    pub fn kv_port(&self) -> u16 {
        self.port(8101)
    }

    pub fn router_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port(7070))
    }

    pub fn masters(&self) -> String {
        (7001..=7003)
            .map(|p| format!("127.0.0.1:{}", self.port(p)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `shardctl playground` flags that put the playground on this block.
    pub fn playground_args(&self) -> Vec<String> {
        vec![
            "--master-port".into(),
            self.master_port().to_string(),
            "--kv-port".into(),
            self.kv_port().to_string(),
            "--router".into(),
            self.router_addr(),
        ]
    }

    /// `text` with every `:PORT` of the default layout (`:7001`-`:7099`,
    /// `:8100`-`:8999`, a colon then exactly four digits) moved into this block.
    pub fn rewrite(&self, text: &str) -> String {
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < b.len() {
            let is_port = b[i] == b':'
                && i + 5 <= b.len()
                && b[i + 1..i + 5].iter().all(u8::is_ascii_digit)
                && b.get(i + 5).is_none_or(|c| !c.is_ascii_digit());
            if is_port {
                let p: u16 = text[i + 1..i + 5].parse().expect("four digits");
                if (7001..=7099).contains(&p) || (8100..=8999).contains(&p) {
                    out.push(':');
                    out.push_str(&self.port(p).to_string());
                    i += 5;
                    continue;
                }
            }
            let ch = text[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Processes and signals.

/// Sends `sig` (e.g. "INT", "KILL") to `pid` with `kill(1)`; true if it was delivered.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends `sig` to every process of process group `pgid`; true if one received it.
pub fn signal_group(pgid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), "--".into(), format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True if `pid` is a live process (a zombie, dead but not yet reaped, counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The live processes (zombies excluded) of process group `pgid`, from /proc.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After "(comm)": state, ppid, pgrp.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2
                && fields[0] != "Z"
                && fields[0] != "X"
                && fields[2] == pgid.to_string()
        })
        .collect()
}

/// Waits until none of `pids` is alive; returns those still alive after `timeout`.
pub fn wait_pids_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    poll_until(timeout, || pids.iter().all(|&p| !pid_alive(p)));
    pids.iter().copied().filter(|&p| pid_alive(p)).collect()
}

/// A child process that leads its own process group. Dropping it SIGKILLs the whole
/// group — the child and whatever it started that is still in the group — and reaps
/// the child, so a failing test leaves nothing running.
pub struct GroupChild {
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl GroupChild {
    /// Spawns `command` as the leader of a new process group.
    pub fn spawn(name: &str, command: &mut Command) -> GroupChild {
        let child = command
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        GroupChild {
            name: name.to_owned(),
            child,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_status().is_some());
        self.try_status()
    }

    /// Sends `sig` to the child only (not its group).
    pub fn signal(&self, sig: &str) -> bool {
        self.status.is_none() && signal(self.pid(), sig)
    }

    /// Sends `sig` to the child's whole process group (what Ctrl-C in a terminal does).
    pub fn signal_group(&self, sig: &str) -> bool {
        signal_group(self.pid(), sig)
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // The group outlives its leader while any member lives.
        signal_group(self.pid(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// HTTP.

/// An HTTP response: status code, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request to `addr` (`host:port`) with `Connection: close`; the whole
/// exchange must finish within `timeout`. `path` is sent as is (percent-encode it).
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    // A server may answer (413) and close before reading the whole body: the write may
    // fail while the answer is there to read.
    let sent = stream.write_all(body);
    let mut raw = Vec::new();
    match (stream.read_to_end(&mut raw), sent) {
        (Ok(_), _) => parse_response(&raw),
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) if raw.is_empty() => Err(e),
        // Reset after the answer arrived.
        (Err(_), Ok(())) => parse_response(&raw),
    }
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Lines of a child's output, read on a thread.

/// Collects the lines a reader produces (on a thread) and hands them out in order.
pub struct Lines {
    rx: Receiver<String>,
    /// Every line received so far.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    pub fn new(reader: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned();
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Lines {
            rx,
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The next line, waiting at most until `deadline`. Err(true): the reader ended;
    /// Err(false): time is up.
    pub fn next_before(&self, deadline: Instant) -> Result<String, bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.lock().unwrap().push(line.clone());
                Ok(line)
            }
            Err(RecvTimeoutError::Disconnected) => Err(true),
            Err(RecvTimeoutError::Timeout) => Err(false),
        }
    }

    /// Everything received so far, one line each.
    pub fn so_far(&self) -> String {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.lock().unwrap().push(line);
        }
        self.seen.lock().unwrap().join("\n")
    }
}

// ---------------------------------------------------------------------------
// The playground.

/// One row of the playground's table of processes.
#[derive(Debug, Clone)]
pub struct PlaygroundProc {
    pub name: String,
    pub addr: String,
    pub pid: u32,
    /// Its metrics URL (`http://127.0.0.1:PORT/metrics`).
    pub metrics: String,
    pub log: PathBuf,
}

/// `shardctl playground` in its own process group, on a [`PortBlock`]. Its stdout is
/// read line by line; its stderr goes to `playground-stderr.log` in its folder's parent.
pub struct Playground {
    pub ports: PortBlock,
    /// The `--dir` of the playground.
    pub dir: PathBuf,
    pub procs: Vec<PlaygroundProc>,
    stdout: Lines,
    stderr_path: PathBuf,
    // Last: killed (with its group) after the fields above are no longer needed.
    child: GroupChild,
}

/// The line the playground prints once every group serves.
const PLAYGROUND_UP: &str = "shardkv playground is up";

impl Playground {
    /// Starts the playground with `dir` as `--dir` and the current directory `cwd`.
    pub fn start(cwd: &Path, dir: &Path, ports: PortBlock) -> Playground {
        Playground::start_with(cwd, dir, ports, &[])
    }

    /// [`Playground::start`] with more flags of `shardctl playground`.
    pub fn start_with(cwd: &Path, dir: &Path, ports: PortBlock, extra: &[&str]) -> Playground {
        let stderr_path = dir.with_file_name(format!(
            "{}-stderr.log",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("playground")
        ));
        let stderr =
            std::fs::File::create(&stderr_path).expect("create the playground's stderr log");
        let mut command = Command::new(bin("shardctl"));
        command
            .arg("playground")
            .arg("--dir")
            .arg(dir)
            .args(ports.playground_args())
            .args(extra)
            .current_dir(cwd)
            .env_remove("SHARDKV_MASTERS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = GroupChild::spawn("shardctl playground", &mut command);
        let stdout = Lines::new(child.child_mut().stdout.take().expect("piped stdout"));
        Playground {
            ports,
            dir: dir.to_path_buf(),
            procs: Vec::new(),
            stdout,
            stderr_path,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn child(&mut self) -> &mut GroupChild {
        &mut self.child
    }

    /// Waits until the playground prints that it is up, then parses its table of
    /// processes into [`Playground::procs`]. Panics (with its output) on time-out or
    /// if it exits first.
    pub fn wait_up(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.stdout.next_before(deadline) {
                Ok(line) if line.contains(PLAYGROUND_UP) => break,
                Ok(_) => {}
                Err(ended) => panic!(
                    "the playground {} within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    if ended {
                        "exited before it was up"
                    } else {
                        "was not up"
                    },
                    self.stdout.so_far(),
                    self.stderr()
                ),
            }
        }
        // The table: a header, then one row per process, then an empty line.
        let mut in_table = false;
        loop {
            let line = self
                .stdout
                .next_before(deadline)
                .unwrap_or_else(|_| panic!("no process table; stdout:\n{}", self.stdout.so_far()));
            if line.starts_with("PROCESS") {
                in_table = true;
                continue;
            }
            if !in_table {
                continue;
            }
            if line.trim().is_empty() {
                break;
            }
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells.len(), 5, "unexpected table row {line:?}");
            self.procs.push(PlaygroundProc {
                name: cells[0].to_owned(),
                addr: cells[1].to_owned(),
                pid: cells[2]
                    .parse()
                    .unwrap_or_else(|e| panic!("pid in {line:?}: {e}")),
                metrics: cells[3].to_owned(),
                log: PathBuf::from(cells[4]),
            });
        }
        assert!(!self.procs.is_empty(), "empty process table");
    }

    /// The table row of the process named `name` (e.g. "g1-n2", "router").
    pub fn proc(&self, name: &str) -> &PlaygroundProc {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name} in {:?}", self.procs))
    }

    /// The table row of the process listening on `addr`.
    pub fn proc_at(&self, addr: &str) -> &PlaygroundProc {
        self.procs
            .iter()
            .find(|p| p.addr == addr)
            .unwrap_or_else(|| panic!("no process at {addr} in {:?}", self.procs))
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// Waits until its stdout contains `needle` (the table comes before the hints).
    pub fn wait_stdout_contains(&self, needle: &str, timeout: Duration) -> bool {
        poll_until(timeout, || self.stdout.so_far().contains(needle))
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.so_far()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last `n` lines of the log of process `name`.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let text = std::fs::read_to_string(&self.proc(name).log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- playground stdout:\n{}\n----- playground stderr:\n{}",
                self.stdout.so_far(),
                self.stderr()
            );
            for p in &self.procs {
                eprintln!(
                    "----- last 30 lines of {} [{}]:\n{}",
                    p.name,
                    p.log.display(),
                    self.log_tail(&p.name, 30)
                );
            }
        }
        // `child` is dropped next: SIGKILL to the whole group.
    }
}

// ---------------------------------------------------------------------------
// A shell session.

/// One `bash` process that runs commands one at a time with its stdout and stderr
/// merged, keeping state (exports, variables, the working directory) between them.
/// It leads its own process group; background jobs it starts stay in that group
/// and are killed with it.
pub struct Shell {
    stdin: ChildStdin,
    out: Lines,
    child: GroupChild,
}

/// The line the shell prints after each command: this prefix and the exit status.
const DONE_MARK: &str = "@@shardkv-test-done@@";

/// What one command printed and its exit status.
#[derive(Debug, Clone)]
pub struct CommandResult {
    pub status: i32,
    pub output: String,
}

impl Shell {
    /// Starts `bash` in `cwd` with the environment of the test minus `env_remove`.
    pub fn start(cwd: &Path, env_remove: &[&str]) -> Shell {
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc"])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for v in env_remove {
            command.env_remove(v);
        }
        let mut child = GroupChild::spawn("bash", &mut command);
        let stdin = child.child_mut().stdin.take().expect("piped stdin");
        let out = Lines::new(child.child_mut().stdout.take().expect("piped stdout"));
        let mut shell = Shell { stdin, out, child };
        // From here on, stderr goes where stdout goes.
        let r = shell.run("exec 2>&1", Duration::from_secs(10));
        assert_eq!(r.status, 0, "bash setup: {r:?}");
        shell
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Runs `command` (one or more lines); panics if it does not finish within `timeout`.
    pub fn run(&mut self, command: &str, timeout: Duration) -> CommandResult {
        // The mark starts on a line of its own even if the output does not end in one.
        let script = format!("{command}\nprintf '\\n{DONE_MARK} %s\\n' \"$?\"\n");
        self.stdin
            .write_all(script.as_bytes())
            .and_then(|_| self.stdin.flush())
            .unwrap_or_else(|e| panic!("write to bash: {e}"));
        let deadline = Instant::now() + timeout;
        let mut lines: Vec<String> = Vec::new();
        loop {
            match self.out.next_before(deadline) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(DONE_MARK) {
                        // Drop the empty line the mark's leading newline made.
                        if lines.last().is_some_and(|l| l.is_empty()) {
                            lines.pop();
                        }
                        let status = rest.trim().parse().expect("exit status");
                        return CommandResult {
                            status,
                            output: lines.join("\n"),
                        };
                    }
                    lines.push(line);
                }
                Err(ended) => panic!(
                    "command {}: {command}\noutput so far:\n{}",
                    if ended {
                        "ended the shell"
                    } else {
                        "did not finish in time"
                    },
                    lines.join("\n")
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running a command to completion.

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Ran {
    /// A one-paragraph description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `command` (stdin closed, stdout and stderr captured) in its own process group;
/// panics if it has not finished within `timeout` (the group is killed then).
pub fn run_within(command: &mut Command, timeout: Duration) -> Ran {
    let shown = format!("{command:?}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = GroupChild::spawn(&shown, command);
    let mut stdout = child.child_mut().stdout.take().expect("piped");
    let mut stderr = child.child_mut().stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let Some(status) = child.wait_exit(timeout) else {
        drop(child);
        panic!(
            "{shown} did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default()
        );
    };
    let elapsed = start.elapsed();
    drop(child);
    Ran {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
    }
}

/// `shardctl ARGS` with `--masters` taken from `masters` (not from the environment).
pub fn shardctl(masters: &str, args: &[&str], timeout: Duration) -> Ran {
    let mut c = Command::new(bin("shardctl"));
    c.env_remove("SHARDKV_MASTERS")
        .arg("--masters")
        .arg(masters)
        .args(args);
    run_within(&mut c, timeout)
}
