//! `kvnode`: one member of a kv replica group.

use clap::Parser;

/// One member of a kv replica group (run 3 per group).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: shardkv::kvnode::cli::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shardkv::kvnode::cli::run(Cli::parse().args).await
}
