//! `shardmaster`: one replica of the shard master's Raft group.

use clap::Parser;

/// One replica of the shard master (run 3 or 5 of them).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: shardkv::shardmaster::cli::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shardkv::shardmaster::cli::run(Cli::parse().args).await
}
