//! Commands that run servers on this machine: the playground and the HTTP router;
//! and, hidden, `shardctl serve-shardmaster|serve-kvnode ARGS`, the shard master and
//! kvnode servers, which the playground starts from this binary when their own
//! binaries were not built (`cargo run --bin shardctl` builds only shardctl).

use crate::Ctx;
use backon::Retryable;
use clap::Subcommand;
use shardkv::client::playground::{self, PlaygroundOptions};
use shardkv::client::retry::backoff;
use shardkv::client::router::{self, RouterOptions};
use shardkv::{kvnode, server, shardmaster};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a whole local cluster (3 shard masters, 2 groups of 3 kvnodes, the HTTP
    /// router on 127.0.0.1:7070) as separate processes; Ctrl-C stops it.
    Playground(PlaygroundOptions),
    /// Serve the HTTP gateway: PUT/GET/DELETE /keys/{key} with plain-text bodies.
    Router(RouterOptions),
}

#[derive(clap::Parser)]
struct ServeShardmaster {
    #[command(flatten)]
    args: shardmaster::cli::Args,
}

#[derive(clap::Parser)]
struct ServeKvnode {
    #[command(flatten)]
    args: kvnode::cli::Args,
}

/// Runs a server if the command line is `serve-shardmaster ...` or `serve-kvnode ...`.
/// These are parsed apart from the rest of the CLI: the servers' own flags (such as
/// kvnode's `--masters`) must not meet shardctl's global ones.
pub async fn serve_if_asked() -> Option<anyhow::Result<()>> {
    use clap::Parser;
    let mut args: Vec<String> = std::env::args().collect();
    let which = args.get(1)?.clone();
    args.remove(1);
    match which.as_str() {
        "serve-shardmaster" => {
            Some(shardmaster::cli::run(ServeShardmaster::parse_from(args).args).await)
        }
        "serve-kvnode" => Some(kvnode::cli::run(ServeKvnode::parse_from(args).args).await),
        _ => None,
    }
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Playground(options) => playground::run(options).await?,
        Command::Router(options) => {
            let logger = server::logger("info", "router".into());
            // The router may start before the cluster answers: keep trying.
            let connect = || ctx.client();
            let client = connect
                .retry(backoff().with_max_delay(Duration::from_secs(2)))
                .notify(|e, _| slog::warn!(logger, "waiting for the cluster"; "error" => %e))
                .await?;
            router::run(client, options, logger).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
