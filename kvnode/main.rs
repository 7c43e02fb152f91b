//! `kvnode`: one member of a kv replica group.

use anyhow::Context;
use clap::Parser;
use shardkv::client::master::MasterClient;
use shardkv::kvnode::{self, KvService, KvState, Limits, TransferService};
use shardkv::node::{self, NodeSpec};
use shardkv::proto::kv_server::KvServer;
use shardkv::proto::range_transfer_server::RangeTransferServer;
use shardkv::server;
use shardkv::transport::MAX_MESSAGE_BYTES;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One member of a kv replica group (run 3 per group).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The replica group this node belongs to (non-zero).
    #[arg(long)]
    gid: u64,
    /// This node's id within its group: one of the ids in --peers.
    #[arg(long)]
    id: u64,
    /// The group's members as ID=HOST:PORT,... (used when the data directory is new;
    /// afterwards membership lives in the data directory).
    #[arg(long)]
    peers: String,
    /// Shard master replicas as HOST:PORT,...
    #[arg(long, env = "SHARDKV_MASTERS", value_delimiter = ',')]
    masters: Vec<String>,
    /// Address to listen on; defaults to this node's address in --peers.
    #[arg(long)]
    listen: Option<String>,
    /// Directory of this node's data. It is bound to this node's id, group and cluster.
    #[arg(long)]
    data_dir: PathBuf,
    /// Cluster name, recorded in the data directory.
    #[arg(long, default_value = "shardkv")]
    cluster: String,
    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_value_bytes: usize,
    /// Raft tick in milliseconds (elections take 10-20 ticks).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// Compact the Raft log once it holds this many applied entries.
    #[arg(long, default_value_t = 10_000)]
    compact_threshold: u64,
    /// How often the leader checks for a new configuration and transfer work, in ms.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.gid != 0, "--gid 0 is reserved");
    let peers = node::parse_peers(&args.peers)?;
    let listen = match args.listen {
        Some(l) => l,
        None => peers
            .get(&args.id)
            .cloned()
            .with_context(|| format!("--peers has no address for id {}", args.id))?,
    };
    let logger = server::logger(&args.log_level, format!("kv-{}-{}", args.gid, args.id));
    let masters = Arc::new(MasterClient::new(&args.masters, Duration::from_secs(2))?);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let node = node::start(
        NodeSpec {
            cluster: args.cluster,
            role: "kvnode",
            group: args.gid,
            id: args.id,
            data_dir: args.data_dir,
            initial_peers: peers,
            tick: Duration::from_millis(args.tick_ms),
            compact_threshold: args.compact_threshold,
        },
        KvState::new(args.gid),
        logger.clone(),
    )?;
    tokio::spawn(kvnode::run_migrations(
        node.replica.clone(),
        masters,
        Duration::from_millis(args.poll_ms),
        logger.clone(),
    ));
    let limits = Limits {
        max_value_bytes: args.max_value_bytes,
        ..Limits::default()
    };
    let kv = KvServer::new(KvService::new(node.replica.clone(), limits))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let transfer = RangeTransferServer::new(TransferService::new(node.replica))
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    slog::info!(logger, "kvnode serving"; "listen" => &listen, "gid" => args.gid);
    let routes = tonic::service::Routes::new(kv)
        .add_service(transfer)
        .add_service(node.raft_service);
    server::serve(
        listener,
        routes,
        kvnode::SERVICE_NAMES,
        server::shutdown_signal(),
    )
    .await
}
