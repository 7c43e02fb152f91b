//! `shardctl verify`: checks a live cluster for linearizability. Concurrent tasks
//! share one client and run gets, puts, compare-and-swaps and deletes on a few
//! scratch keys (under a prefix no other run uses) for `--duration`, while the
//! user may kill servers; every operation is recorded, then the history is
//! checked (`shardkv::verify`), the verdict printed with the smallest offending
//! history if there is one, and the scratch keys deleted.

use crate::output::{print_json, text, Output};
use crate::Ctx;
use clap::Args;
use serde::Serialize;
use shardkv::verify::workload::{self, Seen, Stats, Workload, WorkloadOptions};
use shardkv::verify::{check, CheckResult, Input, Operation, Recorder};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit status when the history is not linearizable.
const EXIT_VIOLATION: u8 = 1;
/// Exit status when the checker gave up within its search limits.
const EXIT_UNDECIDED: u8 = 3;

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 linearizable; 1 not linearizable (the offending \
                        history is printed); 2 on an error; 3 undecided (the checker's \
                        search limit was reached: run shorter or with more keys)."
)]
pub struct VerifyArgs {
    /// How long to run the workload, in seconds (kill or partition servers meanwhile
    /// to test failover).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Scratch keys the tasks share: few keys make operations conflict.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    keys: u64,
    /// Tasks sharing the one client, each with one operation in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    concurrency: u64,
    /// Scratch keys go under PREFIX<run id>/, a prefix no other run uses.
    #[arg(long, default_value = "verify/")]
    prefix: String,
    /// Seed of the tasks' choices (default: random; printed).
    #[arg(long)]
    seed: Option<u64>,
}

pub async fn run(ctx: &Ctx, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client().await?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let prefix = format!("{}{:016x}/", args.prefix, rand::random::<u64>());
    let keys: Vec<Vec<u8>> = (0..args.keys)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect();
    // The checker assumes every key starts absent.
    let mut end = prefix.clone().into_bytes();
    *end.last_mut().expect("the prefix ends in '/'") += 1;
    let existing = client.scan(prefix.as_bytes(), &end, 1).await?;
    anyhow::ensure!(
        existing.is_empty(),
        "scratch prefix {prefix} already holds keys; pass another --prefix"
    );
    eprintln!(
        "verify: {} tasks on {} keys under {prefix} for {:?} (seed {seed})",
        args.concurrency, args.keys, args.duration
    );

    let recorder = Recorder::new();
    let started = Instant::now();
    let work = Workload::start(
        &client,
        &recorder,
        &WorkloadOptions {
            keys: keys.clone(),
            tasks: args.concurrency,
            seed,
            first_task: 0,
        },
    );
    tokio::select! {
        () = tokio::time::sleep(args.duration) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("verify: interrupted; checking what ran so far"),
    }
    let mut stats = work.stop().await;
    let ran = started.elapsed();
    // A final read of every key, recorded: a write lost near the end shows as stale.
    let mut seen = Seen::new();
    for key in &keys {
        let input = Input::get(key.clone());
        let output = workload::recorded(
            &recorder,
            args.concurrency,
            &mut seen,
            input.clone(),
            |input| {
                let client = &client;
                async move { workload::execute(client, &input).await }
            },
        )
        .await;
        stats.count(&input, output.as_ref());
    }

    let history = recorder.into_history();
    let checking = Instant::now();
    let result = tokio::task::spawn_blocking(move || check(&history)).await?;
    let check_time = checking.elapsed();

    let mut left = 0;
    for key in &keys {
        if let Err(e) = client.delete(key).await {
            left += 1;
            eprintln!("warning: could not delete scratch key {}: {e}", text(key));
        }
    }

    let report = Report {
        stats,
        keys: args.keys,
        prefix,
        tasks: args.concurrency,
        seed,
        ran,
        check_time,
        keys_left: left,
    };
    match ctx.output() {
        Output::Table => report.print_table(&result)?,
        Output::Json => print_json(&report.json(&result))?,
    }
    if let CheckResult::Malformed { .. } = result {
        anyhow::bail!("the recorded history is malformed (a bug in shardctl): {result}");
    }
    anyhow::ensure!(
        stats.completed > 0,
        "no operation completed in {ran:.1?}: is the cluster serving?"
    );
    Ok(match result {
        CheckResult::Ok => ExitCode::SUCCESS,
        CheckResult::Violation(_) => ExitCode::from(EXIT_VIOLATION),
        _ => ExitCode::from(EXIT_UNDECIDED),
    })
}

/// What a run did, for printing.
struct Report {
    stats: Stats,
    keys: u64,
    prefix: String,
    tasks: u64,
    seed: u64,
    ran: Duration,
    check_time: Duration,
    /// Scratch keys that could not be deleted.
    keys_left: u64,
}

fn verdict(result: &CheckResult) -> &'static str {
    match result {
        CheckResult::Ok => "linearizable",
        CheckResult::Violation(_) => "not linearizable",
        CheckResult::Unknown { .. } => "undecided",
        CheckResult::Malformed { .. } => "malformed history",
    }
}

impl Report {
    fn print_table(&self, result: &CheckResult) -> anyhow::Result<()> {
        let s = &self.stats;
        outln!("verdict     {}", verdict(result).to_uppercase());
        outln!(
            "operations  {}: {} answered, {} unknown outcome (timed out or failed)",
            s.completed + s.unknown,
            s.completed,
            s.unknown
        );
        outln!(
            "mix         {} gets, {} puts, {} cas ({} swapped), {} deletes",
            s.gets,
            s.puts,
            s.cas,
            s.swapped,
            s.deletes
        );
        let cleanup = match self.keys_left {
            0 => "deleted".to_owned(),
            n => format!("{n} NOT deleted"),
        };
        outln!(
            "keys        {} under {} ({cleanup})",
            self.keys,
            self.prefix
        );
        outln!(
            "clients     {} tasks sharing one client, seed {}",
            self.tasks,
            self.seed
        );
        outln!(
            "time        {:.1?} run, checked in {:.1?}",
            self.ran,
            self.check_time
        );
        if !matches!(result, CheckResult::Ok) {
            outln!();
            outln!("{result}");
        }
        Ok(())
    }

    fn json(&self, result: &CheckResult) -> ReportJson {
        let (violation, undecided_keys) = match result {
            CheckResult::Violation(v) => (
                Some(ViolationJson {
                    key: text(&v.key),
                    total_ops: v.total_ops,
                    ops: v.ops.iter().map(OpJson::from).collect(),
                }),
                Vec::new(),
            ),
            CheckResult::Unknown { keys } => (None, keys.iter().map(|k| text(k)).collect()),
            _ => (None, Vec::new()),
        };
        ReportJson {
            verdict: verdict(result),
            stats: self.stats,
            keys: self.keys,
            prefix: self.prefix.clone(),
            tasks: self.tasks,
            seed: self.seed,
            run_secs: self.ran.as_secs_f64(),
            check_secs: self.check_time.as_secs_f64(),
            keys_left: self.keys_left,
            violation,
            undecided_keys,
        }
    }
}

#[derive(Serialize)]
struct ReportJson {
    verdict: &'static str,
    #[serde(flatten)]
    stats: Stats,
    keys: u64,
    prefix: String,
    tasks: u64,
    seed: u64,
    run_secs: f64,
    check_secs: f64,
    /// Scratch keys that could not be deleted.
    keys_left: u64,
    /// The smallest offending history found, if the verdict is "not linearizable".
    violation: Option<ViolationJson>,
    /// Keys the checker gave up on, if the verdict is "undecided".
    undecided_keys: Vec<String>,
}

#[derive(Serialize)]
struct ViolationJson {
    key: String,
    /// Operations on the key in the whole history.
    total_ops: usize,
    /// A subset of them that no order explains, by call time.
    ops: Vec<OpJson>,
}

#[derive(Serialize)]
struct OpJson {
    task: u64,
    /// Nanoseconds since the run started.
    call_ns: u64,
    /// `null` when the outcome is unknown.
    return_ns: Option<u64>,
    op: String,
    /// `null` when the outcome is unknown.
    result: Option<String>,
}

impl From<&Operation> for OpJson {
    fn from(op: &Operation) -> OpJson {
        OpJson {
            task: op.client,
            call_ns: op.call,
            return_ns: op.ret,
            op: op.input.to_string(),
            result: op.ret.map(|_| op.output.to_string()),
        }
    }
}
