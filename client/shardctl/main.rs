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
mod playground;
mod router;
mod scheduler;
mod verify;

use clap::{Args, Parser, Subcommand};
use output::Output;
use shardkv::client::master::MasterClient;
use shardkv::client::{Client, ClientOptions};
use std::process::ExitCode;
use std::time::Duration;

/// The shard masters of a default playground.
const DEFAULT_MASTERS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

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
    /// Shard master replicas as HOST:PORT,... [default: $SHARDKV_MASTERS if set,
    /// else 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003]
    // Read by hand rather than with clap's `env`: clap shows an option given through
    // the environment in every usage line, as if it were required.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_delimiter = ','
    )]
    masters: Option<Vec<String>>,
    /// How to print results.
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Give up after this many seconds (a request, retries included: default 10;
    /// the wait of `leave`: default 600).
    #[arg(long, global = true, help_heading = "Global options", value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    #[command(flatten)]
    security: shardkv::security::ClientArgs,
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
    /// The placement scheduler: automatic splits, merges and moves (show, set, history).
    #[command(subcommand)]
    Scheduler(scheduler::Command),
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
    /// How every connection is made (--tls-ca, --tls-cert, --token-file).
    dialer: shardkv::security::Dialer,
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

    pub fn dialer(&self) -> &shardkv::security::Dialer {
        &self.dialer
    }

    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    pub fn masters_text(&self) -> String {
        self.masters.join(",")
    }

    /// A client of the shard master replicas.
    pub fn master(&self) -> anyhow::Result<MasterClient> {
        Ok(MasterClient::new(
            &self.masters,
            self.deadline(),
            &self.dialer,
        )?)
    }

    /// The client library's options for --timeout.
    pub fn client_options(&self) -> ClientOptions {
        let defaults = ClientOptions::default();
        ClientOptions {
            call_deadline: self.deadline(),
            attempt_timeout: defaults.attempt_timeout.min(self.deadline()),
            dialer: self.dialer.clone(),
            ..defaults
        }
    }

    /// A data client connected to the cluster.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect_with(&self.masters, self.client_options()).await?)
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
        Commands::Scheduler(c) => scheduler::run(ctx, c).await,
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
    let masters = match masters(cli.global.masters) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: --masters: {e}");
            return ExitCode::from(2);
        }
    };
    let dialer = match cli.global.security.dialer() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx {
        masters,
        output: cli.global.output,
        timeout: cli.global.timeout,
        dialer,
    };
    match run(&ctx, cli.command).await {
        Ok(code) => code,
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The shard master addresses: --masters, else $SHARDKV_MASTERS, else the
/// playground's; each checked to be HOST:PORT before anything is sent.
fn masters(flag: Option<Vec<String>>) -> anyhow::Result<Vec<String>> {
    let given = flag.unwrap_or_else(|| {
        let env = std::env::var("SHARDKV_MASTERS").unwrap_or_default();
        let env = if env.trim().is_empty() {
            DEFAULT_MASTERS.to_owned()
        } else {
            env
        };
        env.split(',').map(str::to_owned).collect()
    });
    let masters: Vec<String> = given
        .iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    anyhow::ensure!(!masters.is_empty(), "no shard master address given");
    for m in &masters {
        shardkv::client::master::check_addr(m)?;
    }
    Ok(masters)
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
