//! Shared end-to-end test fixture: real server processes on loopback ports, each
//! with its own data directory and log file inside one temporary directory.
//!
//! - [`Proc`] is one server process (any binary): start, `kill -9`, restart with the
//!   same arguments, SIGSTOP/SIGCONT. Dropping it kills the process; if the test is
//!   panicking it first prints the tail of the process's log.
//! - [`MasterCluster`] runs N `shardmaster` replicas (replica index `i` has Raft id
//!   `i + 1`) and offers the gRPC helpers tests need ([`MasterCluster::status`],
//!   [`MasterCluster::query`], [`MasterCluster::wait_leader`], ...).
//! - [`MasterClient`] sends shard-master writes to the leader, following NotLeader
//!   hints and retrying transient failures with the same [`RequestId`], so a retried
//!   write is applied once.
//! - [`wait_until`] is the bounded polling helper every wait is built on.
//!
//! kvnode groups can reuse [`Proc`], [`free_ports`], [`grpc_channel`], [`rpc`] and
//! [`wait_until`]; keep their processes in a struct that also owns (or borrows) the
//! [`TempDir`] so logs outlive the processes.
#![allow(dead_code)]

use shardkv::proto::master_command::Command;
use shardkv::proto::shard_master_client::ShardMasterClient;
use shardkv::proto::{
    AddNodeRequest, Config, Group, JoinRequest, LeaveRequest, MoveRequest, Node, QueryRequest,
    RemoveNodeRequest, RequestId, SplitRequest, StatusReply, StatusRequest,
};
use shardkv::status::detail;
use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as OsCommand, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use shardkv::proto::error_detail::Kind as DetailKind;

/// Raft tick of test clusters: elections take 10-20 ticks.
pub const TEST_TICK_MS: u64 = 30;
/// Time limit of one RPC made by the fixture. Longer than nothing the servers do in
/// a healthy cluster; a paused server makes calls to it time out after this.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Poll interval of [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Lines of each process's log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 60;
/// Set this environment variable to keep the temporary directory of a failed test.
pub const KEEP_DIR_ENV: &str = "SHARDKV_KEEP_TEST_DIR";

// ---------------------------------------------------------------------------
// Ports, channels, RPCs, polling.

/// Ports handed out by [`free_ports`] in this test binary, never handed out twice
/// (tests of one binary run in parallel).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// `n` distinct loopback ports that were free a moment ago: each is bound on
/// 127.0.0.1:0, read, and released (all listeners are held until every port is chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n * 20 + 20 {
        if ports.len() == n {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if handed.insert(port) {
            ports.push(port);
        }
        held.push(listener);
    }
    assert_eq!(ports.len(), n, "could not find {n} free ports");
    ports
}

/// A lazily connected channel to `addr` (`host:port`): creating it never fails; a
/// call fails with UNAVAILABLE while nothing listens there.
pub fn grpc_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid address")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// True if `s` says the call failed below the service (no connection, a time-out, a
/// reset), as opposed to an answer from the server.
pub fn is_transport_failure(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => detail(s).is_none(),
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => true,
        _ => false,
    }
}

/// Runs one RPC with the fixture's time limit; running out of time is reported as
/// DEADLINE_EXCEEDED.
pub async fn rpc<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    rpc_within(RPC_TIMEOUT, call).await
}

/// [`rpc`] with an explicit time limit.
pub async fn rpc_within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {limit:?} (client-side limit)"
        ))),
    }
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns true (then true) or `timeout`
/// has passed (then false). One poll that outlives the remaining time is abandoned.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let max_polls = (timeout.as_millis() / POLL_INTERVAL.as_millis()).max(1) + 1;
    for _ in 0..max_polls {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        if let Ok(true) = tokio::time::timeout(left, cond()).await {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
    false
}

/// [`wait_until`], panicking with `what` on time-out.
pub async fn expect_within<F, Fut>(timeout: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        wait_until(timeout, cond).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}

// ---------------------------------------------------------------------------
// One server process.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Stopped,
    Running,
    Paused,
}

/// One server process: its program, arguments and log file. The process's stdout
/// and stderr are appended to the log file across restarts.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
    state: ProcState,
    starts: u32,
}

impl Proc {
    /// Describes a process without starting it.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        log_path: impl Into<PathBuf>,
    ) -> Proc {
        Proc {
            name: name.into(),
            program: program.into(),
            args,
            log_path: log_path.into(),
            child: None,
            state: ProcState::Stopped,
            starts: 0,
        }
    }

    /// Describes and starts a process.
    pub fn spawn(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        log_path: impl Into<PathBuf>,
    ) -> Proc {
        let mut p = Proc::new(name, program, args, log_path);
        p.start();
        p
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Replaces the arguments used by the next start.
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The pid of the running (or paused) process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True if the fixture started the process and has not killed it (it may be paused).
    pub fn is_started(&self) -> bool {
        self.state != ProcState::Stopped
    }

    /// True if started and not paused: it is expected to answer.
    pub fn is_up(&self) -> bool {
        self.state == ProcState::Running
    }

    /// The exit status if the process has exited on its own (a crash), else None.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Starts the process. Panics if it is already started.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already started", self.name);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let _ = writeln!(
            log,
            "===== start #{} of {}: {} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args.join(" ")
        );
        let stderr = log.try_clone().expect("clone log file");
        let child = OsCommand::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .env("RUST_BACKTRACE", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
        self.state = ProcState::Running;
    }

    /// SIGKILLs the process (paused or not) and reaps it. No-op if not started.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.note(&format!("===== {} killed with SIGKILL", self.name));
        }
        self.state = ProcState::Stopped;
    }

    /// Kills the process if it is started, then starts it again with the same arguments.
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    /// Freezes the process with SIGSTOP.
    pub fn pause(&mut self) {
        assert_eq!(
            self.state,
            ProcState::Running,
            "{} is not running",
            self.name
        );
        self.signal("-STOP");
        self.state = ProcState::Paused;
        self.note(&format!("===== {} paused (SIGSTOP)", self.name));
    }

    /// Resumes a paused process with SIGCONT.
    pub fn resume(&mut self) {
        assert_eq!(self.state, ProcState::Paused, "{} is not paused", self.name);
        self.signal("-CONT");
        self.state = ProcState::Running;
        self.note(&format!("===== {} resumed (SIGCONT)", self.name));
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("started").to_string();
        let status = OsCommand::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap_or_else(|e| panic!("run kill {sig} {pid}: {e}"));
        assert!(status.success(), "kill {sig} {pid} failed: {status}");
    }

    /// Appends a marker line to the log (between process outputs).
    fn note(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "{line}");
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = match std::fs::read(&self.log_path) {
            Ok(raw) => String::from_utf8_lossy(&raw).into_owned(),
            Err(e) => return format!("(cannot read {}: {e})", self.log_path.display()),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let crashed = match self.exited() {
                Some(status) => format!(" (it had exited on its own: {status})"),
                None => String::new(),
            };
            eprintln!(
                "----- last {LOG_TAIL_LINES} lines of {} [{}]{crashed}:\n{}\n----- end of {}",
                self.name,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
        // A paused process dies of SIGKILL too.
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// The shard master cluster.

/// How to start a [`MasterCluster`].
#[derive(Debug, Clone)]
pub struct MasterOptions {
    pub replicas: usize,
    pub tick_ms: u64,
    pub compact_threshold: Option<u64>,
    pub log_level: String,
    /// Appended to every replica's command line.
    pub extra_args: Vec<String>,
}

impl Default for MasterOptions {
    fn default() -> Self {
        MasterOptions {
            replicas: 3,
            tick_ms: TEST_TICK_MS,
            compact_threshold: None,
            log_level: "info".into(),
            extra_args: Vec::new(),
        }
    }
}

/// N shard-master replicas. Replica index `i` (0-based) has Raft id `i + 1`.
pub struct MasterCluster {
    // Dropped first: processes die (and print their logs) before the directory goes.
    procs: Vec<Proc>,
    addrs: Vec<String>,
    /// One channel per replica, reused across calls (a new connection costs ~10 ms);
    /// forgotten when the replica is killed, restarted, paused or resumed, or a call
    /// to it fails at the transport level.
    channels: Mutex<Vec<Option<Channel>>>,
    dir: Option<TempDir>,
}

impl MasterCluster {
    /// Starts `replicas` shard masters with the default test options.
    pub fn start(replicas: usize) -> MasterCluster {
        MasterCluster::start_with(MasterOptions {
            replicas,
            ..Default::default()
        })
    }

    pub fn start_with(options: MasterOptions) -> MasterCluster {
        let dir = tempfile::Builder::new()
            .prefix("shardkv-e2e-")
            .tempdir()
            .expect("create temp dir");
        MasterCluster::start_in(dir, options)
    }

    /// Starts the cluster in `dir` (which the cluster then owns).
    pub fn start_in(dir: TempDir, options: MasterOptions) -> MasterCluster {
        assert!(options.replicas > 0);
        let addrs: Vec<String> = free_ports(options.replicas)
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let program = env!("CARGO_BIN_EXE_shardmaster");
        let mut procs = Vec::new();
        for i in 0..options.replicas {
            let id = i as u64 + 1;
            let data_dir = dir.path().join(format!("master-{id}"));
            let mut args = vec![
                "--id".to_string(),
                id.to_string(),
                "--peers".into(),
                peers.clone(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--tick-ms".into(),
                options.tick_ms.to_string(),
                "--log-level".into(),
                options.log_level.clone(),
            ];
            if let Some(t) = options.compact_threshold {
                args.extend(["--compact-threshold".to_string(), t.to_string()]);
            }
            args.extend(options.extra_args.iter().cloned());
            let log = dir.path().join(format!("master-{id}.log"));
            procs.push(Proc::spawn(format!("master-{id}"), program, args, log));
        }
        MasterCluster {
            channels: Mutex::new(vec![None; procs.len()]),
            procs,
            addrs,
            dir: Some(dir),
        }
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// The Raft id of replica `i`.
    pub fn id(i: usize) -> u64 {
        i as u64 + 1
    }

    /// The replica index of Raft id `id`.
    pub fn index_of(id: u64) -> usize {
        assert!(id > 0, "id 0 is no replica");
        (id - 1) as usize
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The temporary directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    pub fn proc(&self, i: usize) -> &Proc {
        &self.procs[i]
    }

    pub fn proc_mut(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    /// True if replica `i` is started and not paused.
    pub fn is_up(&self, i: usize) -> bool {
        self.procs[i].is_up()
    }

    /// Indexes of the replicas that are started and not paused.
    pub fn up(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.is_up(i)).collect()
    }

    pub fn kill9(&mut self, i: usize) {
        self.procs[i].kill9();
        self.forget_channel(i);
    }

    pub fn restart(&mut self, i: usize) {
        self.procs[i].restart();
        self.forget_channel(i);
    }

    pub fn pause(&mut self, i: usize) {
        self.procs[i].pause();
        self.forget_channel(i);
    }

    pub fn resume(&mut self, i: usize) {
        self.procs[i].resume();
        self.forget_channel(i);
    }

    pub fn kill9_all(&mut self) {
        for i in 0..self.len() {
            self.kill9(i);
        }
    }

    /// Starts every replica that is not started.
    pub fn start_stopped(&mut self) {
        for i in 0..self.len() {
            if !self.procs[i].is_started() {
                self.procs[i].start();
                self.forget_channel(i);
            }
        }
    }

    /// The (shared, lazily connected) channel to replica `i`.
    pub fn channel(&self, i: usize) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels[i]
            .get_or_insert_with(|| grpc_channel(&self.addrs[i]))
            .clone()
    }

    /// Drops the cached channel to replica `i`; the next call connects afresh.
    pub fn forget_channel(&self, i: usize) {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
    }

    /// A client of replica `i` (lazily connected; calls fail while it is down).
    pub fn client(&self, i: usize) -> ShardMasterClient<Channel> {
        ShardMasterClient::new(self.channel(i))
    }

    /// Forgets the channel to `i` if `result` failed at the transport level.
    fn note_result<T>(&self, i: usize, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(s) = &result {
            if is_transport_failure(s) {
                self.forget_channel(i);
            }
        }
        result
    }

    /// Status of replica `i`.
    pub async fn status(&self, i: usize) -> Result<StatusReply, Status> {
        let mut c = self.client(i);
        let r = rpc(c.status(StatusRequest {})).await;
        self.note_result(i, r.map(|r| r.into_inner()))
    }

    /// Status of replica `i`, which must answer.
    pub async fn must_status(&self, i: usize) -> StatusReply {
        self.status(i)
            .await
            .unwrap_or_else(|e| panic!("status of replica {i}: {e}"))
    }

    /// Query(num) on replica `i` (None: its latest).
    pub async fn query(&self, i: usize, num: Option<u64>) -> Result<Config, Status> {
        let mut c = self.client(i);
        let r = rpc(c.query(QueryRequest { num })).await;
        self.note_result(i, r.map(|r| r.into_inner()))
    }

    /// Waits until exactly one up replica claims to be leader and every other up
    /// replica names it leader in the same term; returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let found = Mutex::new(None);
        let last_view = Mutex::new(String::new());
        let ok = wait_until(timeout, || async {
            let (leader, view) = self.agreed_leader().await;
            *last_view.lock().unwrap() = view;
            *found.lock().unwrap() = leader;
            leader.is_some()
        })
        .await;
        assert!(
            ok,
            "no agreed leader within {timeout:?}; last view: {}",
            last_view.lock().unwrap()
        );
        let leader = found.lock().unwrap().expect("found");
        leader
    }

    /// One look at every up replica: the agreed leader, if any, and what was seen.
    async fn agreed_leader(&self) -> (Option<usize>, String) {
        let up = self.up();
        let statuses = futures::future::join_all(up.iter().map(|&i| self.status(i))).await;
        let mut view = Vec::new();
        let mut seen = BTreeMap::new();
        for (&i, s) in up.iter().zip(statuses) {
            match s {
                Ok(s) => {
                    let r = s.replica.clone().unwrap_or_default();
                    view.push(format!(
                        "{i}: {} term {} leader {}",
                        r.role, r.term, r.leader_id
                    ));
                    seen.insert(i, r);
                }
                Err(e) => view.push(format!("{i}: {:?} {}", e.code(), e.message())),
            }
        }
        let view = view.join("; ");
        if seen.len() != up.len() {
            return (None, view);
        }
        let leaders: Vec<usize> = seen
            .iter()
            .filter(|(_, r)| r.role == "leader")
            .map(|(&i, _)| i)
            .collect();
        let [leader] = leaders[..] else {
            return (None, view);
        };
        let term = seen[&leader].term;
        let agreed = seen
            .values()
            .all(|r| r.leader_id == MasterCluster::id(leader) && r.term == term);
        (agreed.then_some(leader), view)
    }

    /// Waits until every up replica answers Status with the same latest_config_num
    /// and applied index; returns that config num.
    pub async fn wait_converged(&self, timeout: Duration) -> u64 {
        let latest = Mutex::new(0);
        let last_view = Mutex::new(String::new());
        let ok = wait_until(timeout, || async {
            let up = self.up();
            let statuses = futures::future::join_all(up.iter().map(|&i| self.status(i))).await;
            let mut pairs = Vec::new();
            for s in statuses {
                match s {
                    Ok(s) => pairs.push((
                        s.latest_config_num,
                        s.replica.map(|r| r.applied_index).unwrap_or_default(),
                    )),
                    Err(e) => {
                        *last_view.lock().unwrap() = format!("{e}");
                        return false;
                    }
                }
            }
            *last_view.lock().unwrap() =
                format!("(latest config, applied) per up replica: {pairs:?}");
            let same = pairs.windows(2).all(|w| w[0] == w[1]);
            if same {
                *latest.lock().unwrap() = pairs[0].0;
            }
            same
        })
        .await;
        assert!(
            ok,
            "replicas did not converge within {timeout:?}; last view: {}",
            last_view.lock().unwrap()
        );
        let n = *latest.lock().unwrap();
        n
    }

    /// Every configuration 0..=`latest` as replica `i` returns it (a few queries
    /// in flight at once).
    pub async fn history(&self, i: usize, latest: u64) -> Vec<Config> {
        use futures::StreamExt;
        let configs: Vec<Config> = futures::stream::iter(0..=latest)
            .map(|n| async move {
                let c = self
                    .query(i, Some(n))
                    .await
                    .unwrap_or_else(|e| panic!("Query({n}) on replica {i}: {e}"));
                assert_eq!(
                    c.num, n,
                    "Query({n}) on replica {i} answered config {}",
                    c.num
                );
                c
            })
            .buffered(8)
            .collect()
            .await;
        configs
    }

    /// A retrying writer that knows every replica's address.
    pub fn master_client(&self) -> MasterClient {
        MasterClient::new(self.addrs.clone())
    }
}

impl Drop for MasterCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        // Procs print their log tails (when panicking) and die before the dir goes.
        self.procs.clear();
        if let Some(dir) = self.dir.take() {
            if panicking {
                if std::env::var_os(KEEP_DIR_ENV).is_some() {
                    eprintln!("----- kept test directory {}", dir.keep().display());
                } else {
                    eprintln!(
                        "----- test directory {} removed (set {KEEP_DIR_ENV}=1 to keep it)",
                        dir.path().display()
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A retrying shard-master client.

/// Sends shard-master commands to the leader. Every command carries a
/// `RequestId { client_id, seq }`; a command whose outcome is unknown (UNAVAILABLE,
/// DEADLINE_EXCEEDED, a lost connection) is retried with the same id, so the server
/// applies it once and answers every retry with the first outcome.
pub struct MasterClient {
    addrs: Vec<String>,
    /// Reused channels by address; dropped after a transport failure.
    channels: BTreeMap<String, Channel>,
    leader: usize,
    client_id: u64,
    seq: u64,
    /// Give up on one command after this long.
    pub deadline: Duration,
    /// Time limit of one attempt.
    pub attempt_timeout: Duration,
    /// Attempts made by the last command (1 = no retry).
    pub last_attempts: u32,
}

impl MasterClient {
    pub fn new(addrs: Vec<String>) -> MasterClient {
        MasterClient::with_client_id(addrs, rand::random::<u64>() | 1)
    }

    pub fn with_client_id(addrs: Vec<String>, client_id: u64) -> MasterClient {
        assert!(!addrs.is_empty());
        MasterClient {
            addrs,
            channels: BTreeMap::new(),
            leader: 0,
            client_id,
            seq: 0,
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
            last_attempts: 0,
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The seq of the last id handed out.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A fresh request id (the next seq).
    pub fn next_id(&mut self) -> RequestId {
        self.seq += 1;
        RequestId {
            client_id: self.client_id,
            seq: self.seq,
            first_incomplete: self.seq,
        }
    }

    fn client_of(&mut self, i: usize) -> ShardMasterClient<Channel> {
        let addr = &self.addrs[i];
        let channel = self
            .channels
            .entry(addr.clone())
            .or_insert_with(|| grpc_channel(addr));
        ShardMasterClient::new(channel.clone())
    }

    fn note_failure(&mut self, i: usize, s: &Status) {
        if is_transport_failure(s) {
            self.channels.remove(&self.addrs[i]);
        }
    }

    /// The address this client currently believes is the leader.
    pub fn leader_addr(&self) -> &str {
        &self.addrs[self.leader]
    }

    /// Sends `command` with a fresh request id.
    pub async fn execute(&mut self, mut command: Command) -> Result<Config, Status> {
        let id = self.next_id();
        set_request_id(&mut command, id);
        self.send(command).await
    }

    /// Sends `command` exactly as given (with whatever request id it carries),
    /// retrying transient failures with the same id.
    pub async fn send(&mut self, command: Command) -> Result<Config, Status> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        let mut last = Status::unavailable("no attempt made");
        let max_attempts = 1000;
        while attempts < max_attempts && start.elapsed() < self.deadline {
            attempts += 1;
            self.last_attempts = attempts;
            let target = self.leader;
            let mut client = self.client_of(target);
            let limit = self
                .attempt_timeout
                .min(self.deadline.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(100));
            let result = rpc_within(limit, send_command(&mut client, command.clone())).await;
            let status = match result {
                Ok(config) => return Ok(config),
                Err(s) => s,
            };
            self.note_failure(target, &status);
            let mut hinted = false;
            match status.code() {
                Code::Unavailable => {
                    if let Some(DetailKind::NotLeader(nl)) = detail(&status) {
                        if !nl.leader_addr.is_empty() && nl.leader_addr != self.addrs[target] {
                            self.leader = match self.addrs.iter().position(|a| *a == nl.leader_addr)
                            {
                                Some(i) => i,
                                None => {
                                    self.addrs.push(nl.leader_addr.clone());
                                    self.addrs.len() - 1
                                }
                            };
                            hinted = true;
                        }
                    }
                    if !hinted {
                        self.leader = (target + 1) % self.addrs.len();
                    }
                }
                // The outcome is unknown: try again (maybe elsewhere) with the same id.
                Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                    self.leader = (target + 1) % self.addrs.len();
                }
                _ => return Err(status),
            }
            last = status;
            let pause = if hinted {
                Duration::from_millis(5)
            } else {
                backoff
            };
            tokio::time::sleep(pause).await;
            if !hinted {
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        Err(Status::new(
            last.code(),
            format!(
                "gave up after {attempts} attempts in {:?}; last error: {}",
                start.elapsed(),
                last.message()
            ),
        ))
    }

    pub async fn join(&mut self, groups: Vec<Group>) -> Result<Config, Status> {
        self.execute(Command::Join(JoinRequest { groups, id: None }))
            .await
    }

    pub async fn leave(&mut self, gids: Vec<u64>) -> Result<Config, Status> {
        self.execute(Command::Leave(LeaveRequest { gids, id: None }))
            .await
    }

    pub async fn move_range(&mut self, key: &[u8], gid: u64) -> Result<Config, Status> {
        self.execute(Command::Move(MoveRequest {
            key: key.to_vec(),
            gid,
            id: None,
        }))
        .await
    }

    pub async fn split(&mut self, key: &[u8]) -> Result<Config, Status> {
        self.execute(Command::Split(SplitRequest {
            key: key.to_vec(),
            id: None,
        }))
        .await
    }

    pub async fn add_node(&mut self, gid: u64, node: Node) -> Result<Config, Status> {
        self.execute(Command::AddNode(AddNodeRequest {
            gid,
            node: Some(node),
            id: None,
        }))
        .await
    }

    pub async fn remove_node(&mut self, gid: u64, node_id: u64) -> Result<Config, Status> {
        self.execute(Command::RemoveNode(RemoveNodeRequest {
            gid,
            node_id,
            id: None,
        }))
        .await
    }

    /// Query(num) at the replica believed to be leader, retrying UNAVAILABLE and
    /// time-outs on the other replicas. (A follower that answers serves what it applied.)
    pub async fn query(&mut self, num: Option<u64>) -> Result<Config, Status> {
        let start = Instant::now();
        let mut last = Status::unavailable("no attempt made");
        for _ in 0..200 {
            if start.elapsed() >= self.deadline {
                break;
            }
            let target = self.leader;
            let mut client = self.client_of(target);
            match rpc(client.query(QueryRequest { num })).await {
                Ok(c) => return Ok(c.into_inner()),
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
                    ) =>
                {
                    self.note_failure(target, &s);
                    last = s;
                    self.leader = (self.leader + 1) % self.addrs.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

async fn send_command(
    client: &mut ShardMasterClient<Channel>,
    command: Command,
) -> Result<Config, Status> {
    let reply = match command {
        Command::Join(r) => client.join(r).await,
        Command::Leave(r) => client.leave(r).await,
        Command::Move(r) => client.r#move(r).await,
        Command::Split(r) => client.split(r).await,
        Command::AddNode(r) => client.add_node(r).await,
        Command::RemoveNode(r) => client.remove_node(r).await,
    }?;
    reply
        .into_inner()
        .config
        .ok_or_else(|| Status::internal("ConfigReply without a config"))
}

/// Sets the request id carried by `command`.
pub fn set_request_id(command: &mut Command, id: RequestId) {
    let slot = match command {
        Command::Join(r) => &mut r.id,
        Command::Leave(r) => &mut r.id,
        Command::Move(r) => &mut r.id,
        Command::Split(r) => &mut r.id,
        Command::AddNode(r) => &mut r.id,
        Command::RemoveNode(r) => &mut r.id,
    };
    *slot = Some(id);
}

// ---------------------------------------------------------------------------
// Configurations.

/// A group of `nodes` made-up members with addresses unique to (gid, node id).
/// Nothing listens there: the shard master only records them.
pub fn fake_group(gid: u64, nodes: u64) -> Group {
    Group {
        gid,
        nodes: (1..=nodes)
            .map(|id| Node {
                id,
                addr: format!("192.0.2.{}:{}", id % 250 + 1, 10_000 + gid),
            })
            .collect(),
    }
}

/// Asserts the invariants every configuration keeps: ranges ordered and contiguous
/// from the empty start to the empty (+infinity) end, groups sorted and unique, and
/// every range owned by a group of the configuration (or by 0 only when there is none).
pub fn check_config(c: &Config) {
    let ctx = format!("config {}", c.num);
    assert!(!c.ranges.is_empty(), "{ctx}: no ranges");
    let gids: Vec<u64> = c.groups.iter().map(|g| g.gid).collect();
    let set: HashSet<u64> = gids.iter().copied().collect();
    assert_eq!(set.len(), gids.len(), "{ctx}: duplicate groups {gids:?}");
    assert!(!set.contains(&0), "{ctx}: group 0 listed");
    for g in &c.groups {
        assert!(!g.nodes.is_empty(), "{ctx}: group {} has no nodes", g.gid);
    }
    let mut expected_start: Vec<u8> = Vec::new();
    for (i, r) in c.ranges.iter().enumerate() {
        let range = r
            .range
            .as_ref()
            .unwrap_or_else(|| panic!("{ctx}: range {i} has no bounds"));
        assert_eq!(
            range.start,
            expected_start,
            "{ctx}: range {i} starts at {:?}, expected {:?} (gap or overlap)",
            String::from_utf8_lossy(&range.start),
            String::from_utf8_lossy(&expected_start)
        );
        let last = i + 1 == c.ranges.len();
        if last {
            assert!(
                range.end.is_empty(),
                "{ctx}: last range does not reach +infinity"
            );
        } else {
            assert!(
                range.end > range.start,
                "{ctx}: range {i} is empty or reversed: [{:?}, {:?})",
                String::from_utf8_lossy(&range.start),
                String::from_utf8_lossy(&range.end)
            );
        }
        if c.groups.is_empty() {
            assert_eq!(
                r.gid, 0,
                "{ctx}: range {i} owned by {} with no groups",
                r.gid
            );
        } else {
            assert!(
                set.contains(&r.gid),
                "{ctx}: range {i} owned by {}, not a group of {gids:?}",
                r.gid
            );
        }
        expected_start = range.end.clone();
    }
}

/// Ranges owned per group (every group of the config, possibly 0).
pub fn range_counts(c: &Config) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = c.groups.iter().map(|g| (g.gid, 0)).collect();
    for r in &c.ranges {
        *counts.entry(r.gid).or_default() += 1;
    }
    counts
}

/// Asserts the per-group range counts differ by at most one.
pub fn check_balanced(c: &Config) {
    let counts = range_counts(c);
    if let (Some(lo), Some(hi)) = (counts.values().min(), counts.values().max()) {
        assert!(
            hi - lo <= 1,
            "config {} is unbalanced: ranges per group {counts:?}",
            c.num
        );
    }
}
