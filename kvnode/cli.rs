//! Command line and start-up of a kvnode (the `kvnode` binary;
//! `shardctl` can start one too, for the playground).

use crate::client::master::MasterClient;
use crate::kvnode::{self, KvService, KvState, Limits, TransferService};
use crate::logging::Process;
use crate::node::{self, NodeSpec};
use crate::observability::ObservabilityArgs;
use crate::proto::internal::range_transfer_server::RangeTransferServer;
use crate::proto::kv_server::KvServer;
use crate::server;
use crate::transport::MAX_MESSAGE_BYTES;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One member of a kv replica group (run 3 per group).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The replica group this node belongs to (non-zero).
    #[arg(long)]
    pub gid: u64,
    /// This node's id within its group: one of the ids in --peers.
    #[arg(long)]
    pub id: u64,
    /// The group's members as ID=HOST:PORT,... Needed only the first time the data
    /// directory is used; afterwards membership lives in the data directory, and
    /// --listen gives this node's address.
    #[arg(long)]
    pub peers: Option<String>,
    /// Start as a new, empty member of an existing group, which the group's leader adds
    /// (`shardctl node add`). Needs --listen.
    #[arg(long, conflicts_with = "peers", requires = "listen")]
    pub join: bool,
    /// Shard master replicas as HOST:PORT,...
    #[arg(long, env = "SHARDKV_MASTERS", value_delimiter = ',')]
    pub masters: Vec<String>,
    /// Address to listen on; defaults to this node's address in --peers.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other nodes and clients reach this node at (a DNS name is fine);
    /// defaults to its address in --peers, else --listen. Needed with --listen
    /// 0.0.0.0:PORT.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory of this node's data. It is bound to this node's id, group and cluster.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Cluster name, recorded in the data directory.
    #[arg(long, default_value = "shardkv")]
    pub cluster: String,
    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_value_bytes: usize,
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
    /// How often the leader checks for a new configuration and transfer work, in ms.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// Pull ranges this group gains at no more than this many MiB/s, leaving CPU and
    /// disk to the ranges that keep serving during a move (0: no limit).
    #[arg(long, env = "SHARDKV_MOVE_RATE_MIB", default_value_t = 32)]
    pub move_rate_mib: u32,
    /// KiB of records per transfer call and per Raft entry that installs them: smaller
    /// chunks hold the destination's log for less time each, larger ones cost fewer
    /// rounds (4 to 65536).
    #[arg(long, env = "SHARDKV_MOVE_CHUNK_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(4..=65536))]
    pub move_chunk_kib: u32,
    /// How often to report to the shard master, in ms.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// Test only: serve the `Faults` service, which cuts, drops and delays this
    /// node's outbound Raft traffic on request. Hidden from --help.
    #[arg(long = crate::faults::FLAG, hide = true)]
    pub enable_fault_injection: bool,
    /// Test only, unsafe: serve gets from followers with no read barrier (the
    /// leader sends readers to a follower), so reads can be stale. For showing that
    /// `shardctl verify` catches a broken server. Needs --enable-fault-injection;
    /// hidden from --help.
    #[arg(long, hide = true, requires = "enable_fault_injection")]
    pub unsafe_stale_reads: bool,
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
    check_peers(&args)?;
    anyhow::ensure!(args.gid != 0, "--gid 0 is reserved");
    let node::Addresses {
        peers,
        listen,
        advertise,
    } = node::resolve_addresses(args.id, args.peers.as_deref(), args.listen, args.advertise)?;
    let logger = args
        .observability
        .start(Process::Replica {
            role: "kvnode",
            group: args.gid,
            node: args.id,
        })
        .await?;
    let security = args.security.load()?;
    let masters = Arc::new(MasterClient::new(
        &args.masters,
        Duration::from_secs(2),
        security.dialer(),
    )?);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let node = node::start(
        NodeSpec {
            cluster: args.cluster,
            role: "kvnode",
            group: args.gid,
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
        KvState::new(args.gid),
        logger.clone(),
    )?;
    tokio::spawn(kvnode::run_migrations(
        node.replica.clone(),
        masters.clone(),
        Duration::from_millis(args.poll_ms),
        kvnode::MovePacing::new(args.move_rate_mib, args.move_chunk_kib),
        logger.clone(),
        node.faults.clone(),
        security.dialer().clone(),
    ));
    kvnode::report_range_metrics(node.replica.clone());
    tokio::spawn(kvnode::run_heartbeats(
        node.replica.clone(),
        masters,
        advertise.clone(),
        Duration::from_millis(args.heartbeat_ms),
        logger.clone(),
    ));
    let limits = Limits {
        max_value_bytes: args.max_value_bytes,
        ..Limits::default()
    };
    if args.unsafe_stale_reads {
        slog::warn!(logger, "--unsafe-stale-reads: gets are served by followers without a read barrier and are NOT linearizable");
    }
    let kv = KvServer::new(
        KvService::new(node.replica.clone(), limits).with_stale_reads(args.unsafe_stale_reads),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let transfer = RangeTransferServer::new(TransferService::new(node.replica.clone()))
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    slog::info!(logger, "kvnode serving"; "listen" => &listen, "advertise" => &advertise, "gid" => args.gid);
    let shutdown = node.shutdown();
    let routes = node.add_services(tonic::service::Routes::new(kv).add_service(transfer));
    let mut names = kvnode::SERVICE_NAMES.to_vec();
    if node.faults.is_some() {
        names.push(crate::faults::SERVICE_NAME);
    }
    server::serve(listener, routes, &names, &security, shutdown).await?;
    if node.replica.status().removed {
        // Planned (`shardctl node remove`): not an error.
        slog::info!(logger, "this node was removed from its group and has stopped; its data directory cannot be used again";
            "gid" => args.gid, "id" => args.id);
        return Ok(());
    }
    node.exit_status()
}

/// --peers may be left out once the data directory holds the membership; then
/// --listen says where this node listens.
fn check_peers(args: &Args) -> anyhow::Result<()> {
    if args.peers.is_some() || args.join {
        return Ok(());
    }
    anyhow::ensure!(
        !is_new_dir(&args.data_dir),
        "--peers is needed the first time a data directory is used ({} is new): \
         give the group's members as ID=HOST:PORT,..., or --join to join an existing group",
        args.data_dir.display()
    );
    anyhow::ensure!(
        args.listen.is_some(),
        "give this node's address with --listen HOST:PORT (or --peers, as the first time)"
    );
    Ok(())
}

/// True if `dir` does not exist or is empty: a node that has never run there.
fn is_new_dir(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none())
}
