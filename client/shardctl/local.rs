//! Commands that run servers on this machine: the playground and the HTTP router;
//! and, hidden, `shardctl serve-shardmaster|serve-kvnode ARGS`, the shard master and
//! kvnode servers, which the playground starts from this binary when their own
//! binaries were not built (`cargo run --bin shardctl` builds only shardctl).

use crate::playground::{self, PlaygroundArgs};
use crate::router::{self, RouterOptions};
use crate::Ctx;
use clap::Subcommand;
use shardkv::logging::Process;
use shardkv::{kvnode, shardmaster};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a whole local cluster (3 shard masters, 2 groups of 3 kvnodes, the HTTP
    /// router on 127.0.0.1:7070) as separate processes; Ctrl-C stops it. `shardctl
    /// playground restart NAME` restarts one of its processes.
    Playground(PlaygroundArgs),
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
    // Not `env::args`: it panics on arguments that are not UTF-8 (a binary key).
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let which = args.get(1)?.to_str()?.to_owned();
    match which.as_str() {
        "serve-shardmaster" | "serve-kvnode" => {
            args.remove(1);
        }
        _ => return None,
    }
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
        Command::Playground(args) => playground::main(args).await?,
        Command::Router(options) => {
            let logger = options
                .observability
                .start(Process::Other { role: "router" })
                .await?;
            router::run(
                ctx.masters().to_vec(),
                ctx.client_options(),
                options,
                logger,
            )
            .await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
