//! Shared end-to-end test fixture: real server processes on loopback ports, each
//! with its own data directory and log file inside one temporary directory.
//!
//! - [`Proc`] is one server process (any binary): start, `kill -9`, restart with the
//!   same arguments, SIGSTOP/SIGCONT. Dropping it kills the process; if the test is
//!   panicking it first prints the tail of the process's log.
//! - [`MasterCluster`] runs N `shardmaster` replicas (replica index `i` has Raft id
//!   `i + 1`) and offers the gRPC helpers tests need ([`MasterCluster::status`],
//!   [`MasterCluster::query`], [`MasterCluster::wait_leader`], ...).
//! - [`MasterClient`] sends shard-master writes to the leader through the client
//!   library's `Replicas` (NotLeader hints, backoff), retrying transient failures
//!   with the same [`RequestId`], so a retried write is applied once.
//! - [`wait_until`] is the bounded polling helper every wait is built on.
//!
//! - [`KvCluster`] is a [`MasterCluster`] plus kv replica groups (`kvnode`
//!   processes), in the masters' temporary directory: join groups through the master,
//!   kill/restart/pause any node, wait until a group (or every group) serves the
//!   latest configuration, read a node's `NodeStatus`.
//! - [`KvTestClient`] is a routing test client of wire-level requests: config from
//!   the masters, key -> gid -> leader (the library's `Replicas`; WrongGroup
//!   refreshes), bounded retries with one [`RequestId`] per write, and a scan that
//!   follows `resume` across groups.
#![allow(dead_code)]

pub mod faults;
pub mod netns;
pub mod user;

use shardkv::client::leader::Replicas;
use shardkv::proto::internal::range_transfer_client::RangeTransferClient;
use shardkv::proto::kv_client::KvClient;
use shardkv::proto::shard_master_client::ShardMasterClient;
use shardkv::proto::{
    AddNodeRequest, CancelMoveRequest, CompareAndSwapReply, CompareAndSwapRequest, Config,
    DeleteRequest, FinishMoveRequest, GetRequest, Group, HeldRange, JoinRequest, KeyRange,
    KeyValue, LeaveRequest, MoveRequest, Node, NodeStatusReply, NodeStatusRequest, PutRequest,
    QueryRequest, RangeState, RemoveNodeRequest, RequestId, ScanReply, ScanRequest, SplitRequest,
    StatusReply, StatusRequest,
};
use shardkv::security::{Dialer, SecureChannel};
use shardkv::status::detail;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as OsCommand, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
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
    /// Run each replica in its own network namespace of this [`netns::Net`].
    pub net: Option<Arc<netns::Net>>,
}

impl Default for MasterOptions {
    fn default() -> Self {
        MasterOptions {
            replicas: 3,
            tick_ms: TEST_TICK_MS,
            compact_threshold: None,
            log_level: "info".into(),
            extra_args: Vec::new(),
            net: None,
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
        let names: Vec<String> = (1..=options.replicas)
            .map(|id| format!("master-{id}"))
            .collect();
        let addrs = netns::addrs(options.net.as_deref(), &names);
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
            let name = format!("master-{id}");
            procs.push(netns::spawn(
                options.net.as_deref(),
                name,
                program,
                args,
                log,
            ));
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
    /// The client library's leader-following helper (hints, next replica, backoff).
    replicas: Replicas,
    client_id: u64,
    seq: u64,
    /// Give up on one command after this long.
    pub deadline: Duration,
    /// Time limit of one attempt.
    pub attempt_timeout: Duration,
}

impl MasterClient {
    pub fn new(addrs: Vec<String>) -> MasterClient {
        MasterClient::with_client_id(addrs, rand::random::<u64>() | 1)
    }

    pub fn with_client_id(addrs: Vec<String>, client_id: u64) -> MasterClient {
        MasterClient {
            replicas: test_replicas("the shard master", &addrs),
            client_id,
            seq: 0,
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
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

    /// Sends `command` with a fresh request id.
    pub async fn execute(&mut self, mut command: Change) -> Result<Config, Status> {
        let id = self.next_id();
        set_request_id(&mut command, id);
        self.send(command).await
    }

    /// Sends `command` exactly as given (with whatever request id it carries),
    /// retrying transient failures with the same id.
    pub async fn send(&mut self, command: Change) -> Result<Config, Status> {
        let limit = self.attempt_timeout;
        self.replicas
            .call(self.deadline, |target| {
                let mut client = ShardMasterClient::new(target.channel);
                let command = command.clone();
                async move { rpc_within(limit, send_command(&mut client, command)).await }
            })
            .await
    }

    /// Joins `groups`, giving them their ranges in the next configuration
    /// (`JoinRequest::immediate`).
    pub async fn join(&mut self, groups: Vec<Group>) -> Result<Config, Status> {
        self.execute(Change::Join(JoinRequest {
            groups,
            id: None,
            immediate: true,
        }))
        .await
    }

    /// Joins `groups`; their ranges arrive by live moves, one per group at a time.
    pub async fn join_live(&mut self, groups: Vec<Group>) -> Result<Config, Status> {
        self.execute(Change::Join(JoinRequest {
            groups,
            id: None,
            immediate: false,
        }))
        .await
    }

    /// Removes `gids` and gives their ranges away in the next configuration
    /// (`LeaveRequest::immediate`).
    pub async fn leave(&mut self, gids: Vec<u64>) -> Result<Config, Status> {
        self.execute(Change::Leave(LeaveRequest {
            gids,
            id: None,
            immediate: true,
        }))
        .await
    }

    /// Marks `gids` leaving; their ranges move by live moves, one per group at a time,
    /// and each group is removed once it owns nothing.
    pub async fn leave_live(&mut self, gids: Vec<u64>) -> Result<Config, Status> {
        self.execute(Change::Leave(LeaveRequest {
            gids,
            id: None,
            immediate: false,
        }))
        .await
    }

    /// Gives the range away in the next configuration (`MoveRequest::immediate`).
    pub async fn move_range(&mut self, key: &[u8], gid: u64) -> Result<Config, Status> {
        self.execute(Change::Move(MoveRequest {
            key: key.to_vec(),
            gid,
            id: None,
            immediate: true,
        }))
        .await
    }

    /// Starts a live move: a plan; the source serves until the cutover.
    pub async fn move_live(&mut self, key: &[u8], gid: u64) -> Result<Config, Status> {
        self.execute(Change::Move(MoveRequest {
            key: key.to_vec(),
            gid,
            id: None,
            immediate: false,
        }))
        .await
    }

    pub async fn split(&mut self, key: &[u8]) -> Result<Config, Status> {
        self.execute(Change::Split(SplitRequest {
            key: key.to_vec(),
            id: None,
        }))
        .await
    }

    pub async fn add_node(&mut self, gid: u64, node: Node) -> Result<Config, Status> {
        self.execute(Change::AddNode(AddNodeRequest {
            gid,
            node: Some(node),
            id: None,
        }))
        .await
    }

    pub async fn remove_node(&mut self, gid: u64, node_id: u64) -> Result<Config, Status> {
        self.execute(Change::RemoveNode(RemoveNodeRequest {
            gid,
            node_id,
            id: None,
        }))
        .await
    }

    /// Query(num) at the replica believed to be leader, retrying UNAVAILABLE and
    /// time-outs on the other replicas. (A follower that answers serves what it applied.)
    pub async fn query(&mut self, num: Option<u64>) -> Result<Config, Status> {
        self.replicas
            .call(self.deadline, |target| {
                let mut client = ShardMasterClient::new(target.channel);
                async move { Ok(rpc(client.query(QueryRequest { num })).await?.into_inner()) }
            })
            .await
    }
}

/// A shard-master request that changes the configuration, as tests send it.
#[derive(Debug, Clone)]
pub enum Change {
    Join(JoinRequest),
    Leave(LeaveRequest),
    Move(MoveRequest),
    Split(SplitRequest),
    AddNode(AddNodeRequest),
    RemoveNode(RemoveNodeRequest),
    CancelMove(CancelMoveRequest),
    FinishMove(FinishMoveRequest),
}

/// The client library's [`Replicas`] of `name` at `addrs`, over plaintext; each
/// caller bounds its attempts itself.
pub fn test_replicas(name: &str, addrs: &[String]) -> Replicas {
    Replicas::new(name, addrs, &Dialer::default(), None).expect("HOST:PORT addresses")
}

async fn send_command(
    client: &mut ShardMasterClient<SecureChannel>,
    command: Change,
) -> Result<Config, Status> {
    let reply = match command {
        Change::Join(r) => client.join(r).await,
        Change::Leave(r) => client.leave(r).await,
        Change::Move(r) => client.r#move(r).await,
        Change::Split(r) => client.split(r).await,
        Change::AddNode(r) => client.add_node(r).await,
        Change::RemoveNode(r) => client.remove_node(r).await,
        Change::CancelMove(r) => client.cancel_move(r).await,
        Change::FinishMove(r) => client.finish_move(r).await,
    }?;
    reply
        .into_inner()
        .config
        .ok_or_else(|| Status::internal("ConfigReply without a config"))
}

/// Sets the request id carried by `command`.
pub fn set_request_id(command: &mut Change, id: RequestId) {
    let slot = match command {
        Change::Join(r) => &mut r.id,
        Change::Leave(r) => &mut r.id,
        Change::Move(r) => &mut r.id,
        Change::Split(r) => &mut r.id,
        Change::AddNode(r) => &mut r.id,
        Change::RemoveNode(r) => &mut r.id,
        Change::CancelMove(r) => &mut r.id,
        Change::FinishMove(_) => return,
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
        leaving: false,
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

// ---------------------------------------------------------------------------
// kv replica groups.

/// How often test kvnodes look for a new configuration and transfer work.
pub const TEST_POLL_MS: u64 = 50;
/// Largest reply the fixture's kv clients accept (a scan page of big values).
pub const KV_CLIENT_MAX_MESSAGE: usize = 256 << 20;

/// How to start a [`KvCluster`].
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// Shard-master replicas.
    pub masters: usize,
    /// Groups started at once, gids `1..=groups` (started, not joined: see
    /// [`KvCluster::join`]).
    pub groups: u64,
    /// kvnodes per group; node index `i` has Raft id `i + 1`.
    pub replicas: usize,
    pub tick_ms: u64,
    pub poll_ms: u64,
    pub max_value_bytes: Option<usize>,
    pub compact_threshold: Option<u64>,
    pub log_level: String,
    /// Appended to every kvnode's command line.
    pub extra_args: Vec<String>,
    /// Run each server (masters too) in its own network namespace of this
    /// [`netns::Net`].
    pub net: Option<Arc<netns::Net>>,
    /// Appended to every shard master's command line.
    pub master_args: Vec<String>,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            masters: 3,
            groups: 2,
            replicas: 3,
            tick_ms: TEST_TICK_MS,
            poll_ms: TEST_POLL_MS,
            max_value_bytes: None,
            compact_threshold: None,
            log_level: "info".into(),
            extra_args: Vec::new(),
            net: None,
            master_args: Vec::new(),
        }
    }
}

/// The kvnodes of one replica group. Node index `i` has Raft id `i + 1`.
pub struct KvGroup {
    gid: u64,
    procs: Vec<Proc>,
    addrs: Vec<String>,
}

impl KvGroup {
    pub fn gid(&self) -> u64 {
        self.gid
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    pub fn proc(&self, i: usize) -> &Proc {
        &self.procs[i]
    }

    /// Indexes of the nodes that are started and not paused.
    pub fn up(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.procs[i].is_up()).collect()
    }

    /// The group as the shard master records it (for Join).
    pub fn spec(&self) -> Group {
        Group {
            gid: self.gid,
            leaving: false,
            nodes: self
                .addrs
                .iter()
                .enumerate()
                .map(|(i, a)| Node {
                    id: i as u64 + 1,
                    addr: a.clone(),
                })
                .collect(),
        }
    }
}

/// A shard-master cluster plus kv replica groups, all in the masters' temporary
/// directory (`kv-G-N/` data and `kv-G-N.log` per kvnode).
pub struct KvCluster {
    // Dropped first: kvnodes die (and print their logs) before the masters and the
    // directory go.
    groups: BTreeMap<u64, KvGroup>,
    /// Channels by address, reused across calls; forgotten on kill/restart/pause or a
    /// transport failure.
    channels: Mutex<HashMap<String, Channel>>,
    options: KvOptions,
    masters: MasterCluster,
}

impl KvCluster {
    /// Starts the masters and groups `1..=options.groups` (none joined yet).
    pub fn start(options: KvOptions) -> KvCluster {
        let masters = MasterCluster::start_with(MasterOptions {
            replicas: options.masters,
            tick_ms: options.tick_ms,
            net: options.net.clone(),
            extra_args: options.master_args.clone(),
            ..Default::default()
        });
        let mut cluster = KvCluster {
            groups: BTreeMap::new(),
            channels: Mutex::new(HashMap::new()),
            options: options.clone(),
            masters,
        };
        for gid in 1..=options.groups {
            cluster.add_group(gid);
        }
        cluster
    }

    /// Starts the `options.replicas` kvnodes of a new group `gid` (not joined).
    pub fn add_group(&mut self, gid: u64) {
        self.add_group_with(gid, &[]);
    }

    /// [`KvCluster::add_group`] with extra kvnode arguments for this group only.
    pub fn add_group_with(&mut self, gid: u64, extra: &[&str]) {
        assert!(gid > 0, "gid 0 is reserved");
        assert!(!self.groups.contains_key(&gid), "group {gid} exists");
        let n = self.options.replicas;
        let names: Vec<String> = (1..=n).map(|id| format!("kv-{gid}-{id}")).collect();
        let addrs = netns::addrs(self.options.net.as_deref(), &names);
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let masters = self.masters.addrs().join(",");
        let program = env!("CARGO_BIN_EXE_kvnode");
        let dir = self.masters.dir().to_path_buf();
        let mut procs = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let name = format!("kv-{gid}-{id}");
            let mut args = vec![
                "--gid".to_string(),
                gid.to_string(),
                "--id".into(),
                id.to_string(),
                "--peers".into(),
                peers.clone(),
                "--masters".into(),
                masters.clone(),
                "--data-dir".into(),
                dir.join(&name).display().to_string(),
                "--tick-ms".into(),
                self.options.tick_ms.to_string(),
                "--poll-ms".into(),
                self.options.poll_ms.to_string(),
                "--log-level".into(),
                self.options.log_level.clone(),
            ];
            if let Some(v) = self.options.max_value_bytes {
                args.extend(["--max-value-bytes".to_string(), v.to_string()]);
            }
            if let Some(t) = self.options.compact_threshold {
                args.extend(["--compact-threshold".to_string(), t.to_string()]);
            }
            args.extend(self.options.extra_args.iter().cloned());
            args.extend(extra.iter().map(|s| s.to_string()));
            let log = dir.join(format!("{name}.log"));
            procs.push(netns::spawn(
                self.options.net.as_deref(),
                name,
                program,
                args,
                log,
            ));
        }
        self.groups.insert(gid, KvGroup { gid, procs, addrs });
    }

    pub fn masters(&self) -> &MasterCluster {
        &self.masters
    }

    pub fn masters_mut(&mut self) -> &mut MasterCluster {
        &mut self.masters
    }

    pub fn gids(&self) -> Vec<u64> {
        self.groups.keys().copied().collect()
    }

    pub fn group(&self, gid: u64) -> &KvGroup {
        self.groups
            .get(&gid)
            .unwrap_or_else(|| panic!("no group {gid} in the fixture"))
    }

    fn group_mut(&mut self, gid: u64) -> &mut KvGroup {
        self.groups
            .get_mut(&gid)
            .unwrap_or_else(|| panic!("no group {gid} in the fixture"))
    }

    pub fn addr(&self, gid: u64, i: usize) -> &str {
        self.group(gid).addr(i)
    }

    pub fn kill9(&mut self, gid: u64, i: usize) {
        self.group_mut(gid).procs[i].kill9();
        self.forget_node(gid, i);
    }

    pub fn restart(&mut self, gid: u64, i: usize) {
        self.group_mut(gid).procs[i].restart();
        self.forget_node(gid, i);
    }

    /// Restarts node `i` of `gid` with its arguments changed by `edit` (kept for
    /// later restarts).
    pub fn restart_with(&mut self, gid: u64, i: usize, edit: impl FnOnce(&mut Vec<String>)) {
        let proc = &mut self.group_mut(gid).procs[i];
        let mut args = proc.args().to_vec();
        edit(&mut args);
        proc.set_args(args);
        self.restart(gid, i);
    }

    /// Starts node `i` of `gid` if it is not started.
    pub fn start_node(&mut self, gid: u64, i: usize) {
        if !self.group(gid).procs[i].is_started() {
            self.group_mut(gid).procs[i].start();
        }
        self.forget_node(gid, i);
    }

    pub fn pause(&mut self, gid: u64, i: usize) {
        self.group_mut(gid).procs[i].pause();
        self.forget_node(gid, i);
    }

    pub fn resume(&mut self, gid: u64, i: usize) {
        self.group_mut(gid).procs[i].resume();
        self.forget_node(gid, i);
    }

    /// Kills every node of group `gid`.
    pub fn kill9_group(&mut self, gid: u64) {
        for i in 0..self.group(gid).len() {
            self.kill9(gid, i);
        }
    }

    /// Kills every kvnode and every shard master.
    pub fn kill9_all(&mut self) {
        for gid in self.gids() {
            self.kill9_group(gid);
        }
        self.masters.kill9_all();
    }

    /// Starts every shard master and kvnode that is not started.
    pub fn start_stopped(&mut self) {
        self.masters.start_stopped();
        for gid in self.gids() {
            for i in 0..self.group(gid).len() {
                self.start_node(gid, i);
            }
        }
    }

    /// Kills everything, then starts everything again with the same data.
    pub fn restart_all(&mut self) {
        self.kill9_all();
        self.start_stopped();
    }

    fn forget_node(&self, gid: u64, i: usize) {
        let addr = self.addr(gid, i).to_owned();
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
    }

    fn channel(&self, addr: &str) -> Channel {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr.to_owned())
            .or_insert_with(|| grpc_channel(addr))
            .clone()
    }

    /// A raw `Kv` client of node `i` of `gid` (no routing, no retries).
    pub fn kv(&self, gid: u64, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(self.addr(gid, i)))
            .max_decoding_message_size(KV_CLIENT_MAX_MESSAGE)
    }

    /// A raw `RangeTransfer` client of node `i` of `gid` (what another group's leader
    /// calls to pull a range).
    pub fn transfer(&self, gid: u64, i: usize) -> RangeTransferClient<Channel> {
        RangeTransferClient::new(self.channel(self.addr(gid, i)))
            .max_decoding_message_size(KV_CLIENT_MAX_MESSAGE)
    }

    /// NodeStatus of node `i` of `gid`.
    pub async fn node_status(&self, gid: u64, i: usize) -> Result<NodeStatusReply, Status> {
        let r = rpc(self.kv(gid, i).node_status(NodeStatusRequest {}))
            .await
            .map(|r| r.into_inner());
        if let Err(s) = &r {
            if is_transport_failure(s) {
                self.forget_node(gid, i);
            }
        }
        r
    }

    /// NodeStatus of node `i` of `gid`, which must answer.
    pub async fn must_node_status(&self, gid: u64, i: usize) -> NodeStatusReply {
        self.node_status(gid, i)
            .await
            .unwrap_or_else(|e| panic!("NodeStatus of node {i} of group {gid}: {e}"))
    }

    /// A retrying shard-master writer.
    pub fn master_client(&self) -> MasterClient {
        self.masters.master_client()
    }

    /// Joins `gids` (each with its real node addresses) in one Join.
    pub async fn join(&self, gids: &[u64]) -> Config {
        let groups = gids.iter().map(|&g| self.group(g).spec()).collect();
        self.master_client()
            .join(groups)
            .await
            .unwrap_or_else(|e| panic!("Join {gids:?}: {e}"))
    }

    /// The latest configuration any up shard-master replica has applied (a command
    /// is applied by the replica that answered it before it answers).
    pub async fn latest_config(&self) -> Result<Config, Status> {
        let up = self.masters.up();
        let replies =
            futures::future::join_all(up.iter().map(|&i| self.masters.query(i, None))).await;
        best_config(replies)
    }

    /// A routing kv client with a fresh client id.
    pub fn client(&self) -> KvTestClient {
        KvTestClient::new(self.masters.addrs().to_vec())
    }

    /// NodeStatus of every up node of `gid`: (index, reply or error).
    pub async fn group_statuses(&self, gid: u64) -> Vec<(usize, Result<NodeStatusReply, Status>)> {
        let up = self.group(gid).up();
        let replies = futures::future::join_all(up.iter().map(|&i| self.node_status(gid, i))).await;
        up.into_iter().zip(replies).collect()
    }

    /// One look: the node of `gid` that says it leads (the highest term if several do).
    pub async fn leader(&self, gid: u64) -> Option<usize> {
        let statuses = self.group_statuses(gid).await;
        pick_leader(&statuses).map(|(i, _)| i)
    }

    /// Waits until some up node of `gid` says it leads; returns its index.
    pub async fn wait_leader(&self, gid: u64, timeout: Duration) -> usize {
        let found = Mutex::new(None);
        let ok = wait_until(timeout, || async {
            let l = self.leader(gid).await;
            *found.lock().unwrap() = l;
            l.is_some()
        })
        .await;
        assert!(ok, "group {gid} has no leader after {timeout:?}");
        let l = found.lock().unwrap().expect("found");
        l
    }

    /// `Ok(leader's status)` if `gid`'s leader has applied `config` and holds exactly
    /// the ranges `config` gives it, all SERVING and none release-pending; otherwise
    /// what was seen.
    pub async fn group_serving_view(
        &self,
        gid: u64,
        config: &Config,
    ) -> Result<NodeStatusReply, String> {
        let statuses = self.group_statuses(gid).await;
        let view = statuses
            .iter()
            .map(|(i, s)| match s {
                Ok(s) => format!("node {i}: {}", describe_node(s)),
                Err(e) => format!("node {i}: {:?} {}", e.code(), e.message()),
            })
            .collect::<Vec<_>>()
            .join("; ");
        let Some((_, leader)) = pick_leader(&statuses) else {
            return Err(format!("no leader: {view}"));
        };
        if leader.config_num != config.num {
            return Err(format!(
                "leader at config {}, latest is {}: {view}",
                leader.config_num, config.num
            ));
        }
        if leader
            .ranges
            .iter()
            .any(|h| h.state() != RangeState::Serving || h.release_pending)
        {
            return Err(format!("transfers under way: {view}"));
        }
        let held = merge_ranges(leader.ranges.iter().filter_map(|h| h.range.clone()));
        let owned = merge_ranges(
            config
                .ranges
                .iter()
                .filter(|r| r.gid == gid)
                .filter_map(|r| r.range.clone()),
        );
        if held != owned {
            return Err(format!(
                "leader holds {} but config {} gives it {}: {view}",
                show_ranges(&held),
                config.num,
                show_ranges(&owned)
            ));
        }
        Ok(leader.clone())
    }

    /// Waits until `gid`'s leader is at the shard master's latest configuration with
    /// every held range SERVING, none release-pending, and exactly the ranges that
    /// configuration gives it (none for a group that left). Returns the leader's status.
    pub async fn wait_group_serving(&self, gid: u64, timeout: Duration) -> NodeStatusReply {
        let found = Mutex::new(None);
        let last_view = Mutex::new(String::from("(no look completed)"));
        let ok = wait_until(timeout, || async {
            let config = match self.latest_config().await {
                Ok(c) => c,
                Err(e) => {
                    *last_view.lock().unwrap() = format!("no config from the masters: {e}");
                    return false;
                }
            };
            match self.group_serving_view(gid, &config).await {
                Ok(s) => {
                    *found.lock().unwrap() = Some(s);
                    true
                }
                Err(v) => {
                    *last_view.lock().unwrap() = v;
                    false
                }
            }
        })
        .await;
        assert!(
            ok,
            "group {gid} did not serve the latest configuration within {timeout:?}; last view: {}",
            last_view.lock().unwrap()
        );
        let s = found.lock().unwrap().take().expect("found");
        s
    }

    /// Waits until every group of the latest configuration serves it (see
    /// [`KvCluster::wait_group_serving`]); returns that configuration.
    pub async fn wait_settled(&self, timeout: Duration) -> Config {
        let found = Mutex::new(None);
        let last_view = Mutex::new(String::from("(no look completed)"));
        let ok = wait_until(timeout, || async {
            let config = match self.latest_config().await {
                Ok(c) => c,
                Err(e) => {
                    *last_view.lock().unwrap() = format!("no config from the masters: {e}");
                    return false;
                }
            };
            if !config.moves.is_empty() {
                *last_view.lock().unwrap() = format!("live moves under way: {:?}", config.moves);
                return false;
            }
            for g in &config.groups {
                if let Err(v) = self.group_serving_view(g.gid, &config).await {
                    *last_view.lock().unwrap() = format!("group {}: {v}", g.gid);
                    return false;
                }
            }
            *found.lock().unwrap() = Some(config);
            true
        })
        .await;
        assert!(
            ok,
            "groups did not settle within {timeout:?}; last view: {}",
            last_view.lock().unwrap()
        );
        let c = found.lock().unwrap().take().expect("found");
        c
    }

    /// Waits until node `i` of `gid` has applied the masters' latest configuration and
    /// at least as much of the log as its group's leader (read before it). Returns the
    /// node's status.
    pub async fn wait_caught_up(&self, gid: u64, i: usize, timeout: Duration) -> NodeStatusReply {
        let found = Mutex::new(None);
        let last_view = Mutex::new(String::from("(no look completed)"));
        let ok = wait_until(timeout, || async {
            let config = match self.latest_config().await {
                Ok(c) => c,
                Err(e) => {
                    *last_view.lock().unwrap() = format!("no config from the masters: {e}");
                    return false;
                }
            };
            let statuses = self.group_statuses(gid).await;
            let Some((l, leader)) = pick_leader(&statuses) else {
                *last_view.lock().unwrap() = "no leader".into();
                return false;
            };
            let leader_applied = leader.replica.as_ref().map(|r| r.applied_index);
            let (l, leader_applied) = (l, leader_applied.unwrap_or(u64::MAX));
            let node = match self.node_status(gid, i).await {
                Ok(s) => s,
                Err(e) => {
                    *last_view.lock().unwrap() = format!("node {i}: {e}");
                    return false;
                }
            };
            let applied = node.replica.as_ref().map_or(0, |r| r.applied_index);
            *last_view.lock().unwrap() = format!(
                "node {i}: {}; leader {l} applied {leader_applied}; latest config {}",
                describe_node(&node),
                config.num
            );
            if node.config_num == config.num && applied >= leader_applied {
                *found.lock().unwrap() = Some(node);
                true
            } else {
                false
            }
        })
        .await;
        assert!(
            ok,
            "node {i} of group {gid} did not catch up within {timeout:?}; last view: {}",
            last_view.lock().unwrap()
        );
        let s = found.lock().unwrap().take().expect("found");
        s
    }
}

/// The highest-numbered configuration among `replies` (errors ignored unless all fail).
fn best_config(replies: Vec<Result<Config, Status>>) -> Result<Config, Status> {
    let mut best: Option<Config> = None;
    let mut last_error = Status::unavailable("no shard master replica asked");
    for r in replies {
        match r {
            Ok(c) if best.as_ref().is_none_or(|b| c.num > b.num) => best = Some(c),
            Ok(_) => {}
            Err(e) => last_error = e,
        }
    }
    best.ok_or(last_error)
}

/// The node that says it leads, with the highest term if several do.
fn pick_leader(
    statuses: &[(usize, Result<NodeStatusReply, Status>)],
) -> Option<(usize, &NodeStatusReply)> {
    statuses
        .iter()
        .filter_map(|(i, s)| s.as_ref().ok().map(|s| (*i, s)))
        .filter(|(_, s)| s.replica.as_ref().is_some_and(|r| r.role == "leader"))
        .max_by_key(|(_, s)| s.replica.as_ref().map_or(0, |r| r.term))
}

/// One line about a node: role, term, applied index, config and held ranges.
pub fn describe_node(s: &NodeStatusReply) -> String {
    let r = s.replica.clone().unwrap_or_default();
    format!(
        "id {} {} term {} applied {} config {} held [{}]",
        r.id,
        r.role,
        r.term,
        r.applied_index,
        s.config_num,
        describe_held(&s.ranges)
    )
}

/// Held ranges as `[start, end) STATE(peer)` items.
pub fn describe_held(held: &[HeldRange]) -> String {
    held.iter()
        .map(|h| {
            format!(
                "{} {:?}{}{}",
                h.range.clone().unwrap_or_default(),
                h.state(),
                if h.peer_gid != 0 {
                    format!("(g{})", h.peer_gid)
                } else {
                    String::new()
                },
                if h.release_pending {
                    " release-pending"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sorts ranges and merges adjacent ones (an empty end is +infinity).
pub fn merge_ranges(ranges: impl IntoIterator<Item = KeyRange>) -> Vec<KeyRange> {
    let mut ranges: Vec<KeyRange> = ranges.into_iter().collect();
    ranges.sort_by(|a, b| a.start.cmp(&b.start));
    let mut merged: Vec<KeyRange> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if !last.end.is_empty() && last.end == r.start => last.end = r.end,
            _ => merged.push(r),
        }
    }
    merged
}

pub fn show_ranges(ranges: &[KeyRange]) -> String {
    let parts: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------------
// A routing kv test client.

/// Test scaffolding, not the product client: routes each request by key to the
/// owning group (configuration from the shard masters), finds the group's leader
/// with the client library's [`Replicas`] (NotLeader hints; the next node on
/// UNAVAILABLE), refreshes the configuration on WrongGroup, and retries with
/// backoff until `deadline`. Every write carries a
/// [`RequestId`] (`first_incomplete = seq`: a sequential client) reused across its
/// retries.
pub struct KvTestClient {
    masters: Vec<String>,
    channels: HashMap<String, Channel>,
    config: Option<Config>,
    /// Per gid, its nodes (remade when the members change).
    groups: HashMap<u64, Replicas>,
    client_id: u64,
    seq: u64,
    /// Give up on one call after this long.
    pub deadline: Duration,
    /// Time limit of one attempt.
    pub attempt_timeout: Duration,
    /// The group that answered the last successful call.
    pub last_gid: u64,
}

impl KvTestClient {
    pub fn new(masters: Vec<String>) -> KvTestClient {
        KvTestClient::with_client_id(masters, rand::random::<u64>() | 1)
    }

    pub fn with_client_id(masters: Vec<String>, client_id: u64) -> KvTestClient {
        assert!(!masters.is_empty());
        KvTestClient {
            masters,
            channels: HashMap::new(),
            config: None,
            groups: HashMap::new(),
            client_id,
            seq: 0,
            deadline: Duration::from_secs(20),
            attempt_timeout: RPC_TIMEOUT,
            last_gid: 0,
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// A fresh request id (the next seq; every earlier write counts as answered).
    pub fn next_id(&mut self) -> RequestId {
        self.seq += 1;
        RequestId {
            client_id: self.client_id,
            seq: self.seq,
            first_incomplete: self.seq,
        }
    }

    /// The configuration the client routes by (None before the first call).
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    fn channel(&mut self, addr: &str) -> Channel {
        self.channels
            .entry(addr.to_owned())
            .or_insert_with(|| grpc_channel(addr))
            .clone()
    }

    /// Fetches the latest configuration (the highest any master replica answers).
    pub async fn refresh_config(&mut self) -> Result<&Config, Status> {
        let addrs = self.masters.clone();
        let calls = addrs.iter().map(|a| {
            let mut c = ShardMasterClient::new(self.channel(a));
            async move {
                rpc(c.query(QueryRequest { num: None }))
                    .await
                    .map(|r| r.into_inner())
            }
        });
        let replies = futures::future::join_all(calls).await;
        for (a, r) in addrs.iter().zip(&replies) {
            if let Err(s) = r {
                if is_transport_failure(s) {
                    self.channels.remove(a);
                }
            }
        }
        let best = best_config(replies)?;
        if self.config.as_ref().is_none_or(|c| best.num >= c.num) {
            self.config = Some(best);
        }
        Ok(self.config.as_ref().expect("set"))
    }

    /// Runs `call` at the leader of the group owning `key`, retrying as described on
    /// the type. Errors other than not-leader, unreachable, time-out and wrong-group are
    /// returned at once.
    pub async fn call<T, F, Fut>(&mut self, key: &[u8], what: &str, call: F) -> Result<T, Status>
    where
        F: Fn(KvClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        let mut last = Status::unavailable("no attempt made");
        let mut refresh = self.config.is_none();
        while start.elapsed() < self.deadline {
            attempts += 1;
            let left = self.deadline.saturating_sub(start.elapsed());
            if refresh {
                match rpc_within(left, self.refresh_config()).await {
                    Ok(_) => refresh = false,
                    Err(e) => {
                        last = e;
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        continue;
                    }
                }
            }
            let config = self.config.as_ref().expect("refreshed");
            let gid = config.owner(key).1;
            let nodes: Vec<String> = config
                .group(gid)
                .map(|g| g.nodes.iter().map(|n| n.addr.clone()).collect())
                .unwrap_or_default();
            if gid == 0 || nodes.is_empty() {
                last = Status::unavailable(format!(
                    "no group serves the key in config {}",
                    config.num
                ));
                refresh = true;
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
            if self.groups.get(&gid).is_none_or(|r| r.addrs() != nodes) {
                self.groups
                    .insert(gid, test_replicas(&format!("group {gid}"), &nodes));
            }
            let limit = self
                .attempt_timeout
                .min(left)
                .max(Duration::from_millis(50));
            let result = self.groups[&gid]
                .call(left, |target| {
                    let client = KvClient::new(target.channel)
                        .max_decoding_message_size(KV_CLIENT_MAX_MESSAGE);
                    let reply = call(client);
                    async move { Ok(rpc_within(limit, reply).await?.into_inner()) }
                })
                .await;
            match result {
                Ok(reply) => {
                    self.last_gid = gid;
                    return Ok(reply);
                }
                Err(status) if matches!(detail(&status), Some(DetailKind::WrongGroup(_))) => {
                    last = status;
                    refresh = true;
                }
                Err(status) if is_transport_failure(&status) => last = status,
                Err(status) => return Err(status),
            }
            tokio::time::sleep(backoff.min(self.deadline.saturating_sub(start.elapsed()))).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        Err(Status::with_details(
            last.code(),
            format!(
                "{what}: gave up after {attempts} attempts in {:?}; last error: {}",
                start.elapsed(),
                last.message()
            ),
            last.details().to_vec().into(),
        ))
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let request = GetRequest { key: key.to_vec() };
        let reply = self
            .call(key, "Get", |mut c| {
                let r = request.clone();
                async move { c.get(r).await }
            })
            .await?;
        Ok(reply.found.then_some(reply.value))
    }

    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Status> {
        let id = self.next_id();
        self.put_with_id(key, value, id).await
    }

    /// Put with an explicit request id (reused across this call's retries).
    pub async fn put_with_id(
        &mut self,
        key: &[u8],
        value: &[u8],
        id: RequestId,
    ) -> Result<(), Status> {
        let request = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            id: Some(id),
        };
        self.call(key, "Put", |mut c| {
            let r = request.clone();
            async move { c.put(r).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes `key`; true if it existed.
    pub async fn delete(&mut self, key: &[u8]) -> Result<bool, Status> {
        let id = self.next_id();
        let request = DeleteRequest {
            key: key.to_vec(),
            id: Some(id),
        };
        let reply = self
            .call(key, "Delete", |mut c| {
                let r = request.clone();
                async move { c.delete(r).await }
            })
            .await?;
        Ok(reply.existed)
    }

    pub async fn cas(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<CompareAndSwapReply, Status> {
        let id = self.next_id();
        self.cas_with_id(key, expected, value, id).await
    }

    /// CompareAndSwap with an explicit request id (reused across this call's retries).
    pub async fn cas_with_id(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: Option<&[u8]>,
        id: RequestId,
    ) -> Result<CompareAndSwapReply, Status> {
        let request = CompareAndSwapRequest {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            id: Some(id),
        };
        self.call(key, "CompareAndSwap", |mut c| {
            let r = request.clone();
            async move { c.compare_and_swap(r).await }
        })
        .await
    }

    /// One Scan call, routed by `start`.
    pub async fn scan_page(
        &mut self,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<ScanReply, Status> {
        let request = ScanRequest {
            start: start.to_vec(),
            end: end.to_vec(),
            limit,
        };
        self.call(start, "Scan", |mut c| {
            let r = request.clone();
            async move { c.scan(r).await }
        })
        .await
    }

    /// Every pair in `[start, end)` (empty end: +infinity), following `resume` across
    /// ranges and groups, `page` pairs per call at most (0: the server's maximum).
    /// An empty `start` is sent as `"\0"`, the smallest valid key (the server checks
    /// `start` like a key and refuses an empty one). Fails if `resume` does not advance.
    pub async fn scan_all(
        &mut self,
        start: &[u8],
        end: &[u8],
        page: u32,
    ) -> Result<Vec<KeyValue>, Status> {
        let mut from = if start.is_empty() {
            vec![0]
        } else {
            start.to_vec()
        };
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let reply = self.scan_page(&from, end, page).await?;
            out.extend(reply.pairs);
            if reply.resume.is_empty() {
                return Ok(out);
            }
            if reply.resume <= from || (!end.is_empty() && reply.resume.as_slice() >= end) {
                return Err(Status::internal(format!(
                    "scan from {:?} answered resume {:?} (end {:?})",
                    String::from_utf8_lossy(&from),
                    String::from_utf8_lossy(&reply.resume),
                    String::from_utf8_lossy(end)
                )));
            }
            from = reply.resume;
        }
        Err(Status::internal("scan did not finish in 100000 pages"))
    }
}

/// Issues one operation of a recorded random workload on `key` through the raw test
/// client `kv`, chosen by `dice` (0..100) as the product workload chooses
/// (`shardkv::verify::workload::random_input`; a CAS expects the value this client
/// last saw, kept in `seen`). Recorded in `recorder`: completed on success, outcome
/// unknown on an error (a timed-out write may still take effect). Returns the input
/// and, when it completed, its output.
pub async fn recorded_random_op(
    kv: &mut KvTestClient,
    recorder: &shardkv::verify::Recorder,
    client: u64,
    seen: &mut shardkv::verify::workload::Seen,
    key: Vec<u8>,
    value: Vec<u8>,
    dice: u32,
) -> (shardkv::verify::Input, Option<shardkv::verify::Output>) {
    use shardkv::verify::workload::{random_input, recorded};
    use shardkv::verify::{Input, Output};
    let input = random_input(dice, key, value, seen);
    let output = recorded(recorder, client, seen, input.clone(), |input| async move {
        match &input {
            Input::Get { key } => kv.get(key).await.map(|v| (Output::Get(v.clone()), Some(v))),
            Input::Put { key, value } => kv
                .put(key, value)
                .await
                .map(|()| (Output::Write, Some(Some(value.clone())))),
            Input::Delete { key } => kv.delete(key).await.map(|_| (Output::Write, Some(None))),
            Input::Cas { key, expected, new } => kv
                .cas(key, expected.as_deref(), new.as_deref())
                .await
                .map(|r| (Output::Cas(r.swapped), Some(r.found.then_some(r.current)))),
        }
    })
    .await;
    (input, output)
}
