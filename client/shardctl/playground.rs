//! `shardctl playground`: a whole local cluster as separate OS processes — shard
//! masters, kv groups and the HTTP router — with logs and data under one folder.
//! Any process can be killed by its pid; Ctrl-C stops them all.
//!
//! The playground supervises its processes: it reaps each one that exits and says
//! so with its exit status, restarts it when asked (`shardctl playground restart
//! NAME`, over a Unix socket in the playground's folder) or by itself with
//! `--auto-restart`, and on Ctrl-C stops every process it runs, restarted ones too.

use anyhow::Context;
use shardkv::client::master::MasterClient;
use shardkv::client::Error;
use shardkv::proto::kv_client::KvClient;
use shardkv::proto::{Group, JoinRequest, Node, NodeStatusRequest, RangeState, SplitRequest};
use shardkv::security::pki::{Pki, PkiFiles};
use shardkv::security::ClientArgs;
use shardkv::security::Dialer;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

/// Layout and size of the playground cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct PlaygroundOptions {
    /// Folder for data and logs (reused if it exists: the cluster restarts with its data).
    #[arg(long, default_value = "playground")]
    pub dir: PathBuf,
    /// Number of kv groups.
    #[arg(long, default_value_t = 2)]
    pub groups: u64,
    /// kvnodes per group.
    #[arg(long, default_value_t = 3)]
    pub nodes_per_group: u64,
    /// Shard master replicas (ports --master-port, --master-port + 1, ...).
    #[arg(long, default_value_t = 3)]
    pub replicas: u64,
    /// Port of the first shard master; replica I listens on this port + I - 1.
    #[arg(long, default_value_t = 7001, value_name = "PORT")]
    pub master_port: u16,
    /// Port of node 1 of group 1; node N of group G listens on this port
    /// + 100 * (G - 1) + (N - 1) (so 8101-8103, 8201-8203, ... by default).
    #[arg(long, default_value_t = 8101, value_name = "PORT")]
    pub kv_port: u16,
    /// Keys at which the key space is pre-split so every group owns data at once.
    #[arg(long, value_delimiter = ',', default_value = "g,n,t")]
    pub split: Vec<String>,
    /// Address of the HTTP router.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "HOST:PORT")]
    pub router: String,
    /// How long to wait for the cluster to become healthy, in seconds.
    #[arg(long, default_value_t = 60)]
    pub startup_timeout: u64,
    /// Restart a process that dies (killed or crashed) after a second. One that
    /// stops on purpose (exit status 0, e.g. a node removed from its group) stays
    /// stopped; one that fails again right after each restart is given up on.
    #[arg(long)]
    pub auto_restart: bool,
    /// Run everything over mutual TLS: a throwaway CA and certificates (OU server,
    /// admin, data) are made in DIR/tls and kept for the next run; servers refuse
    /// clients without one, and admin calls need the admin certificate.
    #[arg(long)]
    pub tls: bool,
}

/// `shardctl playground [OPTIONS] [restart NAME]`.
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlaygroundArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    #[command(flatten)]
    pub options: PlaygroundOptions,
}

/// Requests to a running playground.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Action {
    /// Restart one process of the playground running in --dir (stopping it first if
    /// it runs), e.g. `shardctl playground restart g1-n2`.
    Restart {
        /// The process, as named in the playground's table (master1, g1-n2, router).
        name: String,
        /// The folder of the running playground.
        #[arg(long, default_value = "playground")]
        dir: PathBuf,
    },
}

/// Runs `shardctl playground ...`: the playground itself, or a request to one.
pub async fn main(args: PlaygroundArgs) -> anyhow::Result<()> {
    match args.action {
        None => run(args.options).await,
        Some(Action::Restart { name, dir }) => {
            let reply = request(&dir, &format!("restart {name}")).await?;
            println!("{reply}");
            Ok(())
        }
    }
}

/// How to start a process, again if need be.
struct Launch {
    program: PathBuf,
    args: Vec<OsString>,
}

impl Launch {
    fn from(command: &Command) -> Launch {
        let std = command.as_std();
        Launch {
            program: std.get_program().into(),
            args: std.get_args().map(OsString::from).collect(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }

    /// The command line as a person would type it.
    fn line(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One process of the playground.
struct Proc {
    name: String,
    addr: String,
    /// Where it serves Prometheus metrics (`--metrics-listen`).
    metrics: String,
    log: PathBuf,
    launch: Launch,
    /// The current (or last) instance.
    pid: u32,
    started: Instant,
    /// The current instance's exit status, once it has exited (and been reaped).
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Set while the playground itself stops the process: its exit is expected.
    stopping: bool,
    /// Restarts in a row after which it failed again within [`FAILED_AT_START`].
    quick_failures: u32,
}

/// A process that exits within this time of being started failed to start.
const FAILED_AT_START: Duration = Duration::from_secs(10);
/// `--auto-restart` gives up on a process that failed to start this many times in a row.
const MAX_QUICK_FAILURES: u32 = 3;
/// How long a process gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The control socket's file in the playground's folder.
const SOCKET: &str = "playground.sock";

/// An instance of a process has exited (and was reaped).
struct Exited {
    index: usize,
    pid: u32,
    status: ExitStatus,
}

impl Proc {
    fn running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Starts a new instance; its exit is reported on `exits`.
    fn start(&mut self, index: usize, exits: &mpsc::UnboundedSender<Exited>) -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        // The command line, for the curious: restart with `shardctl playground restart`.
        writeln!(file, "# started: {}", self.launch.line())?;
        let mut child = self
            .launch
            .command()
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        let pid = child.id().context("the process has no pid")?;
        let (tx, rx) = watch::channel(None);
        let exits = exits.clone();
        // Waiting reaps the process as soon as it exits: no zombies.
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = tx.send(Some(status));
                let _ = exits.send(Exited { index, pid, status });
            }
        });
        self.pid = pid;
        self.exit = rx;
        self.started = Instant::now();
        self.stopping = false;
        Ok(())
    }

    /// Sends SIGTERM to the running instance.
    fn terminate(&mut self) {
        if self.running() {
            self.stopping = true;
            signal(self.pid, "TERM");
        }
    }

    /// Waits for the instance to exit after [`Proc::terminate`]; kills it after the grace time.
    async fn wait_stopped(&mut self) {
        let mut exit = self.exit.clone();
        let exited = exit.wait_for(Option::is_some);
        if tokio::time::timeout(STOP_GRACE, exited).await.is_err() && self.running() {
            signal(self.pid, "KILL");
            let _ = exit.wait_for(Option::is_some).await;
        }
    }
}

/// Sends `sig` to `pid` with kill(1) (the playground only signals its own children,
/// whose pids cannot be reused before it has reaped them).
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Ports between the first nodes of two consecutive groups.
const GROUP_PORT_STRIDE: u64 = 100;

/// Where every process of the playground listens, checked for sense.
#[derive(Debug, Clone)]
struct Layout {
    replicas: u64,
    groups: u64,
    nodes_per_group: u64,
    master_port: u16,
    kv_port: u16,
    router: std::net::SocketAddr,
}

impl Layout {
    /// Checks the options: at least one of everything, every port in range, none
    /// used twice. Does not check that the ports are free (see [`Layout::check_free`]).
    fn new(opts: &PlaygroundOptions) -> anyhow::Result<Layout> {
        anyhow::ensure!(opts.replicas >= 1, "--replicas must be at least 1");
        anyhow::ensure!(opts.groups >= 1, "--groups must be at least 1");
        anyhow::ensure!(
            (1..GROUP_PORT_STRIDE).contains(&opts.nodes_per_group),
            "--nodes-per-group must be between 1 and {} (each group has a block of {GROUP_PORT_STRIDE} ports)",
            GROUP_PORT_STRIDE - 1
        );
        anyhow::ensure!(opts.master_port > 0, "--master-port must not be 0");
        anyhow::ensure!(opts.kv_port > 0, "--kv-port must not be 0");
        let router: std::net::SocketAddr = opts.router.parse().with_context(|| {
            format!(
                "--router {:?}: expected IP:PORT, e.g. 127.0.0.1:7070",
                opts.router
            )
        })?;
        anyhow::ensure!(router.port() > 0, "--router: the port must not be 0");
        let last_master = opts.master_port as u64 + opts.replicas - 1;
        anyhow::ensure!(
            last_master <= u16::MAX as u64,
            "--master-port {} with {} replicas needs ports up to {last_master}, past 65535",
            opts.master_port,
            opts.replicas
        );
        let last_kv = opts.kv_port as u64
            + GROUP_PORT_STRIDE * (opts.groups - 1)
            + (opts.nodes_per_group - 1);
        anyhow::ensure!(
            last_kv <= u16::MAX as u64,
            "--kv-port {} with {} groups needs ports up to {last_kv}, past 65535",
            opts.kv_port,
            opts.groups
        );
        let layout = Layout {
            replicas: opts.replicas,
            groups: opts.groups,
            nodes_per_group: opts.nodes_per_group,
            master_port: opts.master_port,
            kv_port: opts.kv_port,
            router,
        };
        let mut seen: std::collections::HashMap<u16, String> = Default::default();
        for (name, port) in layout.ports() {
            if let Some(other) = seen.insert(port, name.clone()) {
                anyhow::bail!(
                    "port {port} would be used by both {other} and {name}: \
                     choose --master-port, --kv-port and --router so they do not overlap"
                );
            }
        }
        Ok(layout)
    }

    fn master_port(&self, i: u64) -> u16 {
        (self.master_port as u64 + i - 1) as u16
    }

    fn master_addr(&self, i: u64) -> String {
        format!("127.0.0.1:{}", self.master_port(i))
    }

    fn kv_port(&self, gid: u64, id: u64) -> u16 {
        (self.kv_port as u64 + GROUP_PORT_STRIDE * (gid - 1) + (id - 1)) as u16
    }

    fn kv_addr(&self, gid: u64, id: u64) -> String {
        format!("127.0.0.1:{}", self.kv_port(gid, id))
    }

    /// Every process's name and port.
    fn ports(&self) -> Vec<(String, u16)> {
        let masters = (1..=self.replicas).map(|i| (format!("master{i}"), self.master_port(i)));
        let kv = (1..=self.groups).flat_map(|gid| {
            (1..=self.nodes_per_group)
                .map(move |id| (format!("g{gid}-n{id}"), self.kv_port(gid, id)))
        });
        masters
            .chain(kv)
            .chain(std::iter::once(("router".to_owned(), self.router.port())))
            .collect()
    }

    /// Fails with a clear message if a port is taken (another playground, usually),
    /// before any process is started.
    fn check_free(&self) -> anyhow::Result<()> {
        for (name, port) in self.ports() {
            let ip = if name == "router" {
                self.router.ip()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            };
            if let Err(e) = std::net::TcpListener::bind((ip, port)) {
                anyhow::bail!(
                    "port {port} (for {name}) is not free on {ip}: {e}; is another playground \
                     running? Stop it, or choose other ports with --master-port, --kv-port and --router"
                );
            }
        }
        Ok(())
    }
}

/// The program that runs `server` ("shardmaster" or "kvnode"): its binary next to this
/// one if it was built, otherwise this binary's hidden `serve-*` subcommand.
fn server_command(server: &str) -> anyhow::Result<Command> {
    let me = std::env::current_exe().context("cannot locate the shardctl binary")?;
    let sibling = me.with_file_name(server);
    Ok(if sibling.exists() {
        Command::new(sibling)
    } else {
        let mut c = Command::new(me);
        c.arg(format!("serve-{server}"));
        c
    })
}

/// The processes of the playground and what it does when one exits.
struct Supervisor {
    procs: Vec<Proc>,
    exits_tx: mpsc::UnboundedSender<Exited>,
    exits: mpsc::UnboundedReceiver<Exited>,
    auto_restart: bool,
}

impl Supervisor {
    fn new(auto_restart: bool) -> Supervisor {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Supervisor {
            procs: Vec::new(),
            exits_tx,
            exits,
            auto_restart,
        }
    }

    /// Starts `command` as the process `name`, logging into `dir/logs/NAME.log`,
    /// with its metrics on a free loopback port (kept across restarts).
    fn spawn(
        &mut self,
        mut command: Command,
        name: String,
        addr: String,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let metrics = free_loopback_addr()?;
        command.args(["--metrics-listen", &metrics]);
        let (_, exit) = watch::channel(None);
        let mut proc = Proc {
            log: dir.join("logs").join(format!("{name}.log")),
            name,
            addr,
            metrics,
            launch: Launch::from(&command),
            pid: 0,
            started: Instant::now(),
            exit,
            stopping: false,
            quick_failures: 0,
        };
        proc.start(self.procs.len(), &self.exits_tx)?;
        self.procs.push(proc);
        Ok(())
    }

    /// Says that a process exited (unless the playground stopped it) and, with
    /// --auto-restart, restarts it.
    async fn exited(&mut self, e: Exited) {
        let auto_restart = self.auto_restart;
        let p = &mut self.procs[e.index];
        if p.pid != e.pid || p.stopping {
            return;
        }
        let quick = p.started.elapsed() < FAILED_AT_START;
        eprintln!(
            "{} (pid {}) exited: {}; its log: {}",
            p.name,
            e.pid,
            e.status,
            p.log.display()
        );
        if !auto_restart {
            eprintln!("restart it with `shardctl playground restart {}`", p.name);
            return;
        }
        if e.status.success() {
            eprintln!("{} stopped on purpose: not restarting it", p.name);
            return;
        }
        p.quick_failures = if quick { p.quick_failures + 1 } else { 0 };
        if p.quick_failures >= MAX_QUICK_FAILURES {
            eprintln!(
                "{} failed {} times right after starting: not restarting it again (see its log)",
                p.name, p.quick_failures
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        match self.restart(e.index).await {
            Ok(reply) => eprintln!("{reply}"),
            Err(err) => eprintln!("{err:#}"),
        }
    }

    /// Stops process `index` if it runs, then starts it again.
    async fn restart(&mut self, index: usize) -> anyhow::Result<String> {
        let p = &mut self.procs[index];
        p.terminate();
        p.wait_stopped().await;
        p.start(index, &self.exits_tx)?;
        Ok(format!("{} restarted: pid {}", p.name, p.pid))
    }

    /// Handles one request from `shardctl playground restart`.
    async fn serve(&mut self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut read = BufReader::new(read);
        let request = read.read_line(&mut line);
        if tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .is_err()
        {
            return;
        }
        let reply = match line.trim().split_once(' ') {
            Some(("restart", name)) => match self.procs.iter().position(|p| p.name == name) {
                Some(index) => self.restart(index).await.map_err(|e| format!("{e:#}")),
                None => Err(format!(
                    "no process {name:?} in this playground; its processes: {}",
                    self.procs
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            _ => Err(format!("unknown request {:?}", line.trim())),
        };
        let text = match reply {
            Ok(ok) => {
                eprintln!("{ok} (asked with `shardctl playground restart`)");
                format!("ok {ok}\n")
            }
            Err(e) => format!("error {e}\n"),
        };
        let _ = write.write_all(text.as_bytes()).await;
    }

    /// Asks every process to stop (SIGTERM), then kills what is still running.
    async fn stop(&mut self) {
        for p in &mut self.procs {
            p.terminate();
        }
        for p in &mut self.procs {
            p.wait_stopped().await;
        }
    }
}

/// Sends `request` to the playground running in `dir`; its answer, or the error it gave.
async fn request(dir: &Path, request: &str) -> anyhow::Result<String> {
    let path = dir.join(SOCKET);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no playground is running in {} (cannot connect to {})",
            dir.display(),
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    match reply.trim_end().split_once(' ') {
        Some(("ok", text)) => Ok(text.to_owned()),
        Some(("error", text)) => anyhow::bail!("{text}"),
        _ => anyhow::bail!("the playground gave no answer"),
    }
}

/// Listens on the control socket in `dir`, refusing to if another playground
/// answers there.
async fn control_socket(dir: &Path) -> anyhow::Result<UnixListener> {
    let path = dir.join(SOCKET);
    if UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!(
            "another playground is running in {}: stop it first (Ctrl-C in its terminal)",
            dir.display()
        );
    }
    // Left by a playground that was killed.
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Runs the playground until Ctrl-C (SIGINT) or SIGTERM, then stops every process it
/// started.
pub async fn run(opts: PlaygroundOptions) -> anyhow::Result<()> {
    let layout = Layout::new(&opts)?;
    std::fs::create_dir_all(opts.dir.join("logs"))?;
    std::fs::create_dir_all(opts.dir.join("data"))?;
    let dir = opts.dir.canonicalize()?;
    let control = control_socket(&dir).await?;
    layout.check_free()?;
    // Before the first child starts: a signal that came while starting would otherwise
    // kill this process with its default action and leave the children running.
    let mut stop_requested = StopSignals::install()?;
    let masters: Vec<String> = (1..=opts.replicas).map(|i| layout.master_addr(i)).collect();
    let master_peers = (1..=opts.replicas)
        .map(|i| format!("{i}={}", layout.master_addr(i)))
        .collect::<Vec<_>>()
        .join(",");
    let tls = opts.tls.then(|| playground_pki(&dir)).transpose()?;
    // The playground itself calls as an admin (splits, joins).
    let dialer = match &tls {
        Some(files) => ClientArgs::for_files(&files.ca, &files.admin).dialer()?,
        None => Dialer::default(),
    };
    let mut procs = Supervisor::new(opts.auto_restart);
    let started = start_all(
        &opts,
        &layout,
        (&masters, &master_peers),
        tls.as_ref(),
        &dir,
        &mut procs,
    );
    if let Err(e) = started {
        procs.stop().await;
        return Err(e);
    }

    let deadline = Instant::now() + Duration::from_secs(opts.startup_timeout);
    let result = tokio::select! {
        r = bootstrap(&opts, &layout, &masters, &dialer, deadline) => r,
        _ = stop_requested.recv() => {
            eprintln!("interrupted while starting: stopping every process of the playground...");
            procs.stop().await;
            anyhow::bail!("interrupted before the playground was up");
        }
    };
    if let Err(e) = result {
        procs.stop().await;
        let logs = dir.join("logs");
        return Err(e.context(format!(
            "the playground did not start; logs are in {}",
            logs.display()
        )));
    }
    print_summary(&procs.procs, &dir, &masters, &layout, tls.as_ref());
    loop {
        tokio::select! {
            _ = stop_requested.recv() => break,
            Some(exited) = procs.exits.recv() => procs.exited(exited).await,
            Ok((stream, _)) = control.accept() => procs.serve(stream).await,
        }
    }
    eprintln!("stopping every process of the playground...");
    procs.stop().await;
    let _ = std::fs::remove_file(dir.join(SOCKET));
    eprintln!("the playground has stopped");
    Ok(())
}

/// SIGINT (Ctrl-C) and SIGTERM, listened for from the moment they are installed.
struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Returns once either signal has arrived (also one that arrived before the call).
    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The playground's certificates in `dir`/tls: made on the first run with `--tls`,
/// reused afterwards.
fn playground_pki(dir: &Path) -> anyhow::Result<PkiFiles> {
    let tls_dir = dir.join("tls");
    let files = PkiFiles::at(&tls_dir);
    if files.ca.exists() {
        return Ok(files);
    }
    Pki::generate("shardkv playground CA")?.write(&tls_dir)
}

/// The flags that put a server on mutual TLS with the playground's certificates.
fn server_tls_args(files: &PkiFiles) -> Vec<OsString> {
    vec![
        "--tls-cert".into(),
        files.server.0.clone().into(),
        "--tls-key".into(),
        files.server.1.clone().into(),
        "--tls-ca".into(),
        files.ca.clone().into(),
        "--client-cert-auth".into(),
        "--admin-token-file".into(),
        files.admin_token.clone().into(),
    ]
}

/// Starts every server process and the router, appending them to `procs`.
/// `masters`: the shard masters' addresses, and their `--peers` list.
fn start_all(
    opts: &PlaygroundOptions,
    layout: &Layout,
    (masters, master_peers): (&[String], &str),
    tls: Option<&PkiFiles>,
    dir: &Path,
    procs: &mut Supervisor,
) -> anyhow::Result<()> {
    let server_tls = tls.map(server_tls_args).unwrap_or_default();
    for i in 1..=opts.replicas {
        let mut c = server_command("shardmaster")?;
        c.args(&server_tls);
        c.args([
            "--id",
            &i.to_string(),
            "--peers",
            master_peers,
            "--data-dir",
        ])
        .arg(dir.join("data").join(format!("master{i}")));
        procs.spawn(c, format!("master{i}"), layout.master_addr(i), dir)?;
    }
    for gid in 1..=opts.groups {
        let peers = (1..=opts.nodes_per_group)
            .map(|id| format!("{id}={}", layout.kv_addr(gid, id)))
            .collect::<Vec<_>>()
            .join(",");
        for id in 1..=opts.nodes_per_group {
            let mut c = server_command("kvnode")?;
            c.args(&server_tls);
            c.args(["--gid", &gid.to_string(), "--id", &id.to_string()])
                .args(["--peers", &peers, "--masters", &masters.join(",")])
                .arg("--data-dir")
                .arg(dir.join("data").join(format!("g{gid}-n{id}")));
            procs.spawn(c, format!("g{gid}-n{id}"), layout.kv_addr(gid, id), dir)?;
        }
    }
    let mut router = Command::new(std::env::current_exe()?);
    if let Some(files) = tls {
        router.args(ClientArgs::for_files(&files.ca, &files.data).to_args());
    }
    router.args([
        "--masters",
        &masters.join(","),
        "router",
        "--listen",
        &opts.router,
    ]);
    procs.spawn(router, "router".into(), opts.router.clone(), dir)?;
    Ok(())
}

/// A loopback address with a port free now, for a process's metrics. (Another
/// program could take it before the process binds it; the process then fails to
/// start and says why.)
fn free_loopback_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port for metrics")?;
    Ok(listener.local_addr()?.to_string())
}

/// Joins the groups and pre-splits the key space on a new cluster, then waits until
/// every group serves its ranges.
async fn bootstrap(
    opts: &PlaygroundOptions,
    layout: &Layout,
    masters: &[String],
    dialer: &Dialer,
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = MasterClient::new(masters, Duration::from_secs(5), dialer)?;
    let config = retry_until(deadline, "the shard master to elect a leader", || {
        client.query(None)
    })
    .await?;
    if config.groups.is_empty() {
        for key in &opts.split {
            let key = key.clone().into_bytes();
            retry_until(deadline, "a split", || {
                client.split(SplitRequest {
                    key: key.clone(),
                    id: None,
                })
            })
            .await?;
        }
        let groups: Vec<Group> = (1..=opts.groups)
            .map(|gid| Group {
                gid,
                leaving: false,
                nodes: (1..=opts.nodes_per_group)
                    .map(|id| Node {
                        id,
                        addr: layout.kv_addr(gid, id),
                    })
                    .collect(),
            })
            .collect();
        // Nobody owns a range yet: every group gets its ranges at once.
        retry_until(deadline, "the groups to join", || {
            client.join(JoinRequest {
                groups: groups.clone(),
                id: None,
                immediate: false,
            })
        })
        .await?;
    }
    let latest = client.query(None).await?;
    for group in &latest.groups {
        retry_until(deadline, "every group to serve its ranges", || {
            group_serves(dialer, group, latest.num)
        })
        .await?;
    }
    Ok(())
}

/// Succeeds when some node of `group` leads it at configuration `num` with every range
/// it holds serving.
async fn group_serves(dialer: &Dialer, group: &Group, num: u64) -> Result<(), Error> {
    for node in &group.nodes {
        let Ok(endpoint) = dialer.endpoint(&node.addr) else {
            continue;
        };
        let mut client =
            KvClient::new(dialer.connect_lazy(endpoint.connect_timeout(Duration::from_secs(1))));
        let Ok(status) = client.node_status(NodeStatusRequest {}).await else {
            continue;
        };
        let status = status.into_inner();
        let leads = status.replica.is_some_and(|r| r.role == "leader");
        let serving = status
            .ranges
            .iter()
            .all(|r| r.state() == RangeState::Serving && !r.release_pending);
        if leads && status.config_num >= num && serving {
            return Ok(());
        }
    }
    Err(Error::Unavailable(format!(
        "group {} is not serving yet",
        group.gid
    )))
}

async fn retry_until<T, F, Fut>(deadline: Instant, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("timed out waiting for {what}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn print_summary(
    procs: &[Proc],
    dir: &Path,
    masters: &[String],
    layout: &Layout,
    tls: Option<&PkiFiles>,
) {
    println!("shardkv playground is up. Data and logs: {}", dir.display());
    println!();
    println!(
        "{:<10} {:<18} {:>8}  {:<37} LOG",
        "PROCESS", "ADDRESS", "PID", "METRICS"
    );
    for p in procs {
        println!(
            "{:<10} {:<18} {:>8}  {:<37} {}",
            p.name,
            p.addr,
            p.pid,
            format!("http://{}/metrics", p.metrics),
            p.log.display()
        );
    }
    println!();
    println!("Try:");
    let router = if layout.router.ip().is_loopback() {
        format!("localhost:{}", layout.router.port())
    } else {
        layout.router.to_string()
    };
    println!("  curl -X PUT -d \"value-for-apple\" http://{router}/keys/apple");
    println!("  curl http://{router}/keys/apple");
    println!("  export SHARDKV_MASTERS={}", masters.join(","));
    if let Some(files) = tls {
        let (ca, (cert, key)) = (files.ca.display(), &files.admin);
        let (cert, key) = (cert.display(), key.display());
        println!("  export SHARDKV_TLS_CA={ca} SHARDKV_TLS_CERT={cert} SHARDKV_TLS_KEY={key}");
        println!("  shardctl status");
        println!(
            "  grpcurl -cacert {ca} -cert {cert} -key {key} {} shardkv.v1.ShardMaster/Query",
            masters[0]
        );
        println!(
            "  (or, instead of the admin certificate, the admin token: --token-file {})",
            files.admin_token.display()
        );
    } else {
        println!("  shardctl status");
    }
    println!();
    println!("Kill any process with `kill -9 PID`; the playground says when one exits.");
    println!(
        "Restart one with `shardctl playground restart NAME --dir {}`; Ctrl-C stops them all.",
        dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: PlaygroundOptions,
    }

    fn layout(args: &[&str]) -> anyhow::Result<Layout> {
        let cli = Cli::try_parse_from(std::iter::once("playground").chain(args.iter().copied()))?;
        Layout::new(&cli.opts)
    }

    #[test]
    fn default_ports_are_the_documented_ones() {
        let l = layout(&[]).unwrap();
        assert_eq!(l.master_addr(1), "127.0.0.1:7001");
        assert_eq!(l.master_addr(3), "127.0.0.1:7003");
        assert_eq!(l.kv_addr(1, 1), "127.0.0.1:8101");
        assert_eq!(l.kv_addr(2, 3), "127.0.0.1:8203");
        assert_eq!(l.router.port(), 7070);
        assert_eq!(l.ports().len(), 3 + 6 + 1);
    }

    #[test]
    fn ports_move_with_the_flags() {
        let l = layout(&[
            "--master-port",
            "20001",
            "--kv-port",
            "21101",
            "--router",
            "127.0.0.1:20070",
        ])
        .unwrap();
        assert_eq!(l.master_addr(2), "127.0.0.1:20002");
        assert_eq!(l.kv_addr(2, 1), "127.0.0.1:21201");
    }

    #[test]
    fn nonsense_layouts_are_refused_with_a_reason() {
        let e = layout(&["--master-port", "65534"]).unwrap_err();
        assert!(e.to_string().contains("past 65535"), "{e}");
        let e = layout(&["--kv-port", "7002"]).unwrap_err();
        assert!(e.to_string().contains("port 7002"), "{e}");
        let e = layout(&["--router", "127.0.0.1:8101"]).unwrap_err();
        assert!(e.to_string().contains("both g1-n1 and router"), "{e}");
        let e = layout(&["--router", "localhost"]).unwrap_err();
        assert!(e.to_string().contains("IP:PORT"), "{e}");
        let e = layout(&["--nodes-per-group", "100"]).unwrap_err();
        assert!(e.to_string().contains("--nodes-per-group"), "{e}");
        let e = layout(&["--master-port", "0"]).unwrap_err();
        assert!(e.to_string().contains("must not be 0"), "{e}");
        assert!(layout(&["--kv-port", "65500", "--groups", "2"]).is_err());
    }
}
