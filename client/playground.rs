//! `shardctl playground`: a whole local cluster as separate OS processes — shard
//! masters, kv groups and the HTTP router — with logs and data under one folder.
//! Any process can be killed by its pid; Ctrl-C stops them all.

use crate::client::master::MasterClient;
use crate::proto::kv_client::KvClient;
use crate::proto::{Group, JoinRequest, Node, NodeStatusRequest, RangeState, SplitRequest};
use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

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
    /// Shard master replicas (ports 7001, 7002, ...).
    #[arg(long, default_value_t = 3)]
    pub replicas: u64,
    /// Keys at which the key space is pre-split so every group owns data at once.
    #[arg(long, value_delimiter = ',', default_value = "g,n,t")]
    pub split: Vec<String>,
    /// Address of the HTTP router.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub router: String,
    /// How long to wait for the cluster to become healthy, in seconds.
    #[arg(long, default_value_t = 60)]
    pub startup_timeout: u64,
}

/// One started process.
struct Proc {
    name: String,
    addr: String,
    log: PathBuf,
    child: Child,
}

fn master_addr(i: u64) -> String {
    format!("127.0.0.1:{}", 7000 + i)
}

fn kv_addr(gid: u64, id: u64) -> String {
    format!("127.0.0.1:{}", 8000 + gid * 100 + id)
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

fn spawn(mut command: Command, name: String, addr: String, dir: &Path) -> anyhow::Result<Proc> {
    let log = dir.join("logs").join(format!("{name}.log"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    // The command line, so a killed process can be restarted by hand.
    let std = command.as_std();
    let line: Vec<String> = std::iter::once(std.get_program())
        .chain(std.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    writeln!(file, "# started: {}", line.join(" "))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name,
        addr,
        log,
        child,
    })
}

/// Runs the playground until Ctrl-C.
pub async fn run(opts: PlaygroundOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.replicas >= 1 && opts.groups >= 1 && opts.nodes_per_group >= 1);
    std::fs::create_dir_all(opts.dir.join("logs"))?;
    std::fs::create_dir_all(opts.dir.join("data"))?;
    let dir = opts.dir.canonicalize()?;
    let masters: Vec<String> = (1..=opts.replicas).map(master_addr).collect();
    let master_peers = (1..=opts.replicas)
        .map(|i| format!("{i}={}", master_addr(i)))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    for i in 1..=opts.replicas {
        let mut c = server_command("shardmaster")?;
        c.args([
            "--id",
            &i.to_string(),
            "--peers",
            &master_peers,
            "--data-dir",
        ])
        .arg(dir.join("data").join(format!("master{i}")));
        procs.push(spawn(c, format!("master{i}"), master_addr(i), &dir)?);
    }
    for gid in 1..=opts.groups {
        let peers = (1..=opts.nodes_per_group)
            .map(|id| format!("{id}={}", kv_addr(gid, id)))
            .collect::<Vec<_>>()
            .join(",");
        for id in 1..=opts.nodes_per_group {
            let mut c = server_command("kvnode")?;
            c.args(["--gid", &gid.to_string(), "--id", &id.to_string()])
                .args(["--peers", &peers, "--masters", &masters.join(",")])
                .arg("--data-dir")
                .arg(dir.join("data").join(format!("g{gid}-n{id}")));
            procs.push(spawn(c, format!("g{gid}-n{id}"), kv_addr(gid, id), &dir)?);
        }
    }
    let mut router = Command::new(std::env::current_exe()?);
    router.args([
        "--masters",
        &masters.join(","),
        "router",
        "--listen",
        &opts.router,
    ]);
    procs.push(spawn(router, "router".into(), opts.router.clone(), &dir)?);

    let deadline = Instant::now() + Duration::from_secs(opts.startup_timeout);
    let result = bootstrap(&opts, &masters, deadline).await;
    if let Err(e) = result {
        stop(&mut procs).await;
        let logs = dir.join("logs");
        return Err(e.context(format!(
            "the playground did not start; logs are in {}",
            logs.display()
        )));
    }
    print_summary(&procs, &dir, &masters);
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping every process of the playground...");
    stop(&mut procs).await;
    Ok(())
}

/// Joins the groups and pre-splits the key space on a new cluster, then waits until
/// every group serves its ranges.
async fn bootstrap(
    opts: &PlaygroundOptions,
    masters: &[String],
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = MasterClient::new(masters, Duration::from_secs(5))?;
    let config = retry_until(deadline, "the shard master to elect a leader", || {
        client.query(None)
    })
    .await?;
    if config.groups.is_empty() {
        for key in &opts.split {
            let key = key.clone().into_bytes();
            retry_until(deadline, "a split", || {
                client.call(|mut c| {
                    let key = key.clone();
                    async move { c.split(SplitRequest { key, id: None }).await }
                })
            })
            .await?;
        }
        let groups: Vec<Group> = (1..=opts.groups)
            .map(|gid| Group {
                gid,
                nodes: (1..=opts.nodes_per_group)
                    .map(|id| Node {
                        id,
                        addr: kv_addr(gid, id),
                    })
                    .collect(),
            })
            .collect();
        retry_until(deadline, "the groups to join", || {
            client.call(|mut c| {
                let groups = groups.clone();
                async move { c.join(JoinRequest { groups, id: None }).await }
            })
        })
        .await?;
    }
    let latest = client.query(None).await?;
    for group in &latest.groups {
        retry_until(deadline, "every group to serve its ranges", || {
            group_serves(group, latest.num)
        })
        .await?;
    }
    Ok(())
}

/// Succeeds when some node of `group` leads it at configuration `num` with every range
/// it holds serving.
async fn group_serves(group: &Group, num: u64) -> Result<(), tonic::Status> {
    for node in &group.nodes {
        let Ok(mut client) = KvClient::connect(format!("http://{}", node.addr)).await else {
            continue;
        };
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
    Err(tonic::Status::unavailable(format!(
        "group {} is not serving yet",
        group.gid
    )))
}

async fn retry_until<T, F, Fut>(deadline: Instant, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("timed out waiting for {what}: {}", e.message())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn print_summary(procs: &[Proc], dir: &Path, masters: &[String]) {
    println!("shardkv playground is up. Data and logs: {}", dir.display());
    println!();
    println!("{:<10} {:<18} {:>8}  LOG", "PROCESS", "ADDRESS", "PID");
    for p in procs {
        println!(
            "{:<10} {:<18} {:>8}  {}",
            p.name,
            p.addr,
            p.child.id().map(|id| id.to_string()).unwrap_or_default(),
            p.log.display()
        );
    }
    println!();
    println!("Try:");
    println!("  curl -X PUT -d \"value-for-apple\" http://localhost:7070/keys/apple");
    println!("  curl http://localhost:7070/keys/apple");
    println!("  export SHARDKV_MASTERS={}", masters.join(","));
    println!("  shardctl status");
    println!();
    println!("Kill any process with `kill -9 PID`; Ctrl-C stops them all.");
}

/// Asks every process to stop (SIGTERM), then kills what is still running.
async fn stop(procs: &mut [Proc]) {
    for p in procs.iter() {
        if let Some(pid) = p.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for p in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
    }
}
