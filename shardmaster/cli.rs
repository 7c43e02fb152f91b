//! Command line and start-up of a shard master replica (the `shardmaster` binary;
//! `shardctl` can start one too, for the playground).

use crate::logging::Process;
use crate::node::{self, NodeSpec};
use crate::observability::ObservabilityArgs;
use crate::server;
use crate::shardmaster::{self, MasterService, MasterState, MoveLimits};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

/// One replica of the shard master (run 3 or 5 of them).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// This replica's id: one of the ids in --peers.
    #[arg(long)]
    pub id: u64,
    /// All replicas of the shard master as ID=HOST:PORT,... (used when the data
    /// directory is new; afterwards membership lives in the data directory).
    #[arg(long, env = "SHARDKV_MASTER_PEERS", required_unless_present = "join")]
    pub peers: Option<String>,
    /// Start as a new, empty member of an existing group, which the group's leader adds
    /// (`shardctl node add`). Needs --listen.
    #[arg(long, conflicts_with = "peers", requires = "listen")]
    pub join: bool,
    /// Address to listen on; defaults to this replica's address in --peers.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other nodes and clients reach this replica at (a DNS name is fine);
    /// defaults to its address in --peers, else --listen. Needed with --listen
    /// 0.0.0.0:PORT.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory of this replica's data. It is bound to this replica's id and cluster.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Cluster name, recorded in the data directory.
    #[arg(long, default_value = "shardkv")]
    pub cluster: String,
    /// Raft tick in milliseconds (elections take 10-20 ticks).
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Compact the Raft log once it holds this many applied entries.
    #[arg(long, default_value_t = 10_000)]
    pub compact_threshold: u64,
    /// Also compact the Raft log once its applied entries hold this many MiB, as far as
    /// every live member has them (a move's large entries then never reach a table).
    #[arg(long, default_value_t = 16)]
    pub compact_log_mib: u64,
    /// A kvnode silent for this long (no heartbeat) is reported DOWN, in ms.
    #[arg(long, default_value_t = 5000)]
    pub down_after_ms: u64,
    /// Cancel a live move whose destination reports no progress for this long, in ms
    /// (the source keeps serving the range).
    #[arg(long, default_value_t = 20_000)]
    pub move_stall_ms: u64,
    /// Cancel a live move whose cutover (the source has stopped serving the range)
    /// has not completed for this long, in ms: the source serves it again.
    #[arg(long, default_value_t = 3000)]
    pub move_cutover_stall_ms: u64,
    /// Cancel a live move that has been catching up for this long, in ms, without
    /// getting close enough to cut over (the writes to the range outpace the copy;
    /// the source keeps serving it).
    #[arg(long, default_value_t = 60_000)]
    pub move_catch_up_ms: u64,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// Test only: serve the `Faults` service, which cuts, drops and delays this
    /// node's outbound Raft traffic on request. Hidden from --help.
    #[arg(long = crate::faults::FLAG, hide = true)]
    pub enable_fault_injection: bool,
    /// Test only, a clock-rate fault: this node's Raft clock ticks this many times as
    /// fast as --tick-ms says. Needs the fault-injection flag. Hidden from --help.
    #[arg(long = crate::faults::TICK_MULTIPLIER_FLAG, hide = true, default_value_t = 1.0,
          requires = "enable_fault_injection", value_parser = crate::faults::parse_tick_multiplier)]
    pub test_tick_multiplier: f64,
    #[command(flatten)]
    pub security: crate::security::ServerArgs,
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let node::Addresses {
        peers,
        listen,
        advertise,
    } = node::resolve_addresses(args.id, args.peers.as_deref(), args.listen, args.advertise)?;
    let logger = args
        .observability
        .start(Process::Replica {
            role: "shardmaster",
            group: 0,
            node: args.id,
        })
        .await?;
    let security = args.security.load()?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let node = node::start(
        NodeSpec {
            cluster: args.cluster,
            role: "shardmaster",
            group: 0,
            id: args.id,
            addr: advertise.clone(),
            data_dir: args.data_dir,
            initial_peers: peers,
            tick: Duration::from_millis(args.tick_ms),
            tick_multiplier: args.test_tick_multiplier,
            compact_threshold: args.compact_threshold,
            compact_log_bytes: args.compact_log_mib << 20,
            fault_injection: args.enable_fault_injection,
            dialer: security.dialer().clone(),
        },
        MasterState::new(),
        logger.clone(),
    )?;
    tokio::spawn(shardmaster::run_move_watchdog(
        node.replica.clone(),
        MoveLimits {
            stall: Duration::from_millis(args.move_stall_ms),
            cutover_stall: Duration::from_millis(args.move_cutover_stall_ms),
            catch_up: Duration::from_millis(args.move_catch_up_ms),
        },
        logger.clone(),
    ));
    slog::info!(logger, "shard master replica serving"; "listen" => &listen, "advertise" => &advertise);
    let shutdown = node.shutdown();
    let service = MasterService::new(
        node.replica.clone(),
        Duration::from_millis(args.down_after_ms),
    );
    service.report_metrics();
    tokio::spawn(service.scheduler(logger.clone()));
    let routes = node.add_services(tonic::service::Routes::new(shardmaster::server(service)));
    let mut names = vec![shardmaster::SERVICE_NAME];
    if node.faults.is_some() {
        names.push(crate::faults::SERVICE_NAME);
    }
    server::serve(listener, routes, &names, &security, shutdown).await?;
    node.exit_status()
}
