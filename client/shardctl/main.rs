//! `shardctl`: administer a shardkv cluster and read and write its keys.
//!
//! Subcommands come in groups, one module each (`admin`, `members`, `info`, `data`,
//! `local`); each module has its own clap `Command` enum, flattened into
//! [`Commands`]. To add a group: write a module with a `Command` enum and an `async fn run(&Ctx, Command)`,
//! then add one variant to [`Commands`] and one arm to [`run`].

/// `println!` that returns write errors (a closed pipe) instead of panicking; use in
/// functions returning `anyhow::Result`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

mod admin;
mod bench;
mod data;
mod etcd;
mod info;
mod local;
mod members;
mod output;
mod verify;

use clap::{Args, Parser, Subcommand};
use output::Output;
use shardkv::client::master::MasterClient;
use shardkv::client::{Client, ClientOptions};
use std::process::ExitCode;
use std::time::Duration;
use tonic::{Code, Status};

/// Deadline of one request when --timeout is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Administer a shardkv cluster and read and write its keys.
#[derive(Parser, Debug)]
#[command(
    name = "shardctl",
    version,
    after_help = "Exit status: 0 on success; 1 when `get` finds no key or `cas` does not swap; \
                  2 on an error (the message on stderr says what went wrong)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Commands,
}

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
struct Global {
    /// Shard master replicas as HOST:PORT,...
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SHARDKV_MASTERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    masters: Vec<String>,
    /// How to print results.
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Give up after this many seconds (a request, retries included: default 10;
    /// the wait of `leave`: default 600).
    #[arg(long, global = true, help_heading = "Global options", value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("must be more than 0".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Commands {
    #[command(flatten)]
    Admin(admin::Command),
    #[command(flatten)]
    Info(info::Command),
    #[command(flatten)]
    Data(data::Command),
    #[command(flatten)]
    Members(members::Command),
    #[command(flatten)]
    Local(local::Command),
    /// Measure throughput and latency with a closed-loop workload.
    Bench(bench::BenchArgs),
    /// Check the cluster for linearizability: run a recorded concurrent workload on
    /// scratch keys, check the history, print the verdict (exit status 1 if violated).
    Verify(verify::VerifyArgs),
}

/// What every command can use: the global options and ways to reach the cluster.
pub struct Ctx {
    masters: Vec<String>,
    output: Output,
    timeout: Option<Duration>,
}

impl Ctx {
    /// The deadline of one request.
    pub fn deadline(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// --timeout, or `default` when it was not given.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout.unwrap_or(default)
    }

    pub fn output(&self) -> Output {
        self.output
    }

    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    pub fn masters_text(&self) -> String {
        self.masters.join(",")
    }

    /// A client of the shard master replicas.
    pub fn master(&self) -> anyhow::Result<MasterClient> {
        MasterClient::new(&self.masters, self.deadline())
    }

    /// An error from the shard master, in words.
    pub fn master_error(&self, status: Status) -> anyhow::Error {
        match status.code() {
            Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled | Code::Unknown => {
                anyhow::anyhow!(
                    "cannot reach the shard master at {}: no replica answered within {:?}",
                    self.masters_text(),
                    self.deadline()
                )
            }
            _ => anyhow::anyhow!("{}", status.message()),
        }
    }

    /// A data client connected to the cluster.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let defaults = ClientOptions::default();
        let options = ClientOptions {
            call_deadline: self.deadline(),
            attempt_timeout: defaults.attempt_timeout.min(self.deadline()),
            ..defaults
        };
        Client::connect_with(&self.masters, options).await
    }
}

async fn run(ctx: &Ctx, command: Commands) -> anyhow::Result<ExitCode> {
    match command {
        Commands::Admin(c) => admin::run(ctx, c).await,
        Commands::Info(c) => info::run(ctx, c).await,
        Commands::Data(c) => data::run(ctx, c).await,
        Commands::Members(c) => members::run(ctx, c).await,
        Commands::Local(c) => local::run(ctx, c).await,
        Commands::Bench(a) => bench::run(ctx, a).await,
        Commands::Verify(a) => verify::run(ctx, a).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(served) = local::serve_if_asked().await {
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let cli = Cli::parse();
    let ctx = Ctx {
        masters: cli
            .global
            .masters
            .into_iter()
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect(),
        output: cli.global.output,
        timeout: cli.global.timeout,
    };
    if ctx.masters.is_empty() {
        eprintln!("error: --masters: no shard master address given");
        return ExitCode::from(2);
    }
    match run(&ctx, cli.command).await {
        Ok(code) => code,
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// True if the error is stdout's reader going away (`shardctl scan | head`).
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeouts_are_positive_seconds() {
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("x").is_err());
    }
}
