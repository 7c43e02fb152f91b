//! `shardctl bench`: a closed-loop load generator over the client library. Each of
//! `--concurrency` tasks issues one request at a time for the run's duration (or op
//! count), after a warm-up; latencies go into HDR histograms per operation type.
//! With `--etcd` the same workload goes to an etcd cluster instead, for comparison.

use crate::etcd::EtcdKv;
use crate::output::{print_json, Output, Table};
use crate::Ctx;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::distr::Distribution;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shardkv::client::{Client, ClientOptions, Error};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Share of reads per workload.
#[derive(ValueEnum, Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Puts only.
    WriteOnly,
    /// Gets only (of preloaded keys).
    ReadOnly,
    /// Half gets, half puts.
    Mixed,
    /// 95% gets, 5% puts.
    ReadMostly,
}

impl Workload {
    fn read_ratio(self) -> f64 {
        match self {
            Workload::WriteOnly => 0.0,
            Workload::ReadOnly => 1.0,
            Workload::Mixed => 0.5,
            Workload::ReadMostly => 0.95,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyChoice {
    Uniform,
    /// Zipfian over the key space (exponent --zipf-exponent): a few keys are hot.
    Zipfian,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Mix of operations.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    workload: Workload,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// How keys are picked.
    #[arg(long, value_enum, default_value_t = KeyChoice::Uniform)]
    distribution: KeyChoice,
    #[arg(long, default_value_t = 0.99)]
    zipf_exponent: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Requests in flight at once (one per task).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Client instances the tasks are spread over (each has its own connections).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Batch calls in flight per server and client instance, each carrying the
    /// requests waiting at the time (0: one call per request). Not used with --etcd.
    #[arg(long, default_value_t = ClientOptions::default().batch_calls_per_server)]
    batch_calls: usize,
    /// Measured run time in seconds (ignored with --ops).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many measured operations instead of after --duration.
    #[arg(long)]
    ops: Option<u64>,
    /// Unmeasured run time before measuring, in seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Write every key once before the run (needed for reads to find data).
    #[arg(long)]
    preload: bool,
    /// Keys start with one of these (default: the letters a..z), e.g. to load one
    /// range, or to load every range but one.
    #[arg(long, value_delimiter = ',')]
    prefixes: Vec<String>,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send the workload to these etcd members (HOST:PORT,...) instead of shardkv;
    /// client instance i connects to member i mod N.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Keep the keys the run wrote. Without it they are deleted after the report,
    /// so a benchmark leaves the cluster's key space as it found it (with --etcd they
    /// are always kept).
    #[arg(long)]
    keep: bool,
    /// List every measured request that took at least this many milliseconds (or
    /// failed after that long), with the wall-clock time it started, so slow requests
    /// can be matched with what the cluster was doing (a move's cutover, say).
    #[arg(long)]
    slow_ms: Option<u64>,
}

/// Slow requests kept per run at most (the slowest, when there are more).
const SLOW_KEPT: usize = 1000;

/// The keys (by index) a run has written, so they can be deleted afterwards.
struct Written {
    bits: Vec<AtomicU64>,
}

impl Written {
    fn new(keys: u64) -> Written {
        Written {
            bits: (0..keys.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, i: u64) {
        self.bits[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    fn indexes(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.bits.iter().enumerate() {
            let word = word.load(Ordering::Relaxed);
            out.extend(
                (0..64)
                    .filter(|b| word & (1 << b) != 0)
                    .map(|b| w as u64 * 64 + b),
            );
        }
        out
    }
}

/// Where the load goes: shardkv through its client library, or etcd.
#[derive(Clone)]
enum Target {
    Shardkv(Client),
    Etcd(EtcdKv),
}

impl Target {
    async fn connect(ctx: &Ctx, args: &BenchArgs, i: usize) -> anyhow::Result<Target> {
        if args.etcd.is_empty() {
            let options = ClientOptions {
                call_deadline: ctx.deadline(),
                batch_calls_per_server: args.batch_calls,
                dialer: ctx.dialer().clone(),
                ..ClientOptions::default()
            };
            Ok(Target::Shardkv(
                Client::connect_with(ctx.masters(), options).await?,
            ))
        } else {
            let endpoint = &args.etcd[i % args.etcd.len()];
            Ok(Target::Etcd(
                EtcdKv::connect(endpoint, ctx.deadline()).await?,
            ))
        }
    }

    /// Runs one operation; on failure, the kind of error.
    async fn run(&self, op: Op, key: &[u8], value: &[u8]) -> Result<(), String> {
        match (self, op) {
            (Target::Shardkv(c), Op::Get) => {
                c.get(key).await.map(|_| ()).map_err(|e| error_kind(&e))
            }
            (Target::Shardkv(c), Op::Put) => c.put(key, value).await.map_err(|e| error_kind(&e)),
            (Target::Etcd(c), Op::Get) => c.get(key).await.map_err(|s| etcd_error_kind(&s)),
            (Target::Etcd(c), Op::Put) => c.put(key, value).await.map_err(|s| etcd_error_kind(&s)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Get,
    Put,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

/// What one task measured.
#[derive(Default)]
struct Tally {
    latencies: BTreeMap<Op, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    slow: Vec<SlowRequest>,
}

/// One request over `--slow-ms`.
#[derive(Serialize)]
struct SlowRequest {
    /// When it started, in milliseconds since the Unix epoch.
    started_unix_ms: u64,
    op: &'static str,
    ms: f64,
    /// The error kind, if it failed.
    error: Option<String>,
}

impl Tally {
    fn record(&mut self, op: Op, took: Duration) {
        let histogram = self
            .latencies
            .entry(op)
            .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"));
        // Microseconds, clamped to the histogram's range.
        let _ = histogram.record((took.as_micros() as u64).clamp(1, 60_000_000));
    }

    fn merge(&mut self, other: Tally) {
        for (op, h) in other.latencies {
            match self.latencies.get_mut(&op) {
                Some(mine) => mine.add(&h).expect("same bounds"),
                None => {
                    self.latencies.insert(op, h);
                }
            }
        }
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.slow.extend(other.slow);
    }
}

fn error_kind(e: &Error) -> String {
    match e {
        Error::InvalidArgument { .. } => "invalid-argument",
        Error::Unavailable(_) => "unavailable",
        Error::DeadlineExceeded(_) => "deadline-exceeded",
        Error::Refused(_) => "refused",
        Error::Internal(_) => "internal",
    }
    .to_owned()
}

fn etcd_error_kind(s: &tonic::Status) -> String {
    format!("etcd-{:?}", s.code()).to_lowercase()
}

struct KeyPicker {
    keys: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
    prefixes: Vec<String>,
}

impl KeyPicker {
    fn new(args: &BenchArgs) -> anyhow::Result<KeyPicker> {
        anyhow::ensure!(args.keys > 0, "--keys must be at least 1");
        let zipf = match args.distribution {
            KeyChoice::Uniform => None,
            KeyChoice::Zipfian => {
                Some(rand_distr::Zipf::new(args.keys as f64, args.zipf_exponent)?)
            }
        };
        let prefixes = if args.prefixes.is_empty() {
            (b'a'..=b'z').map(|c| char::from(c).to_string()).collect()
        } else {
            args.prefixes.clone()
        };
        anyhow::ensure!(
            prefixes.iter().all(|p| !p.is_empty()),
            "--prefixes must not contain an empty prefix"
        );
        Ok(KeyPicker {
            keys: args.keys,
            zipf,
            prefixes,
        })
    }

    /// Key `i` of the run: under one of the prefixes, picked from `i`. By default
    /// the prefixes are the letters a..z, so keys spread over a key space split at
    /// letters (the playground splits at g, n and t) instead of landing in one range.
    fn key(&self, i: u64) -> Vec<u8> {
        let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let prefix = &self.prefixes[(hash % self.prefixes.len() as u64) as usize];
        format!("{prefix}/bench/{i:012}").into_bytes()
    }

    fn pick(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            // Zipf ranks start at 1; spread the hot ranks over the key space so they do
            // not all land in one range.
            Some(z) => (z.sample(rng) as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.keys,
            None => rng.random_range(0..self.keys),
        }
    }
}

#[derive(Serialize)]
struct OpReport {
    op: &'static str,
    count: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Report {
    workload: Workload,
    distribution: KeyChoice,
    keys: u64,
    value_size: usize,
    concurrency: usize,
    clients: usize,
    /// Batch calls per server and client (shardkv only; 0: one call per request).
    batch_calls: usize,
    /// "shardkv", or "etcd" with `--etcd`.
    target: &'static str,
    seconds: f64,
    total_ops: u64,
    ops_per_sec: f64,
    operations: Vec<OpReport>,
    errors: BTreeMap<String, u64>,
    /// With --slow-ms: the requests over it, in the order they started.
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_requests: Option<Vec<SlowRequest>>,
}

pub async fn run(ctx: &Ctx, args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.concurrency > 0 && args.clients > 0,
        "--concurrency and --clients must be at least 1"
    );
    let picker = Arc::new(KeyPicker::new(&args)?);
    let mut clients = Vec::new();
    for i in 0..args.clients {
        clients.push(Target::connect(ctx, &args, i).await?);
    }
    let value = vec![b'v'; args.value_size];
    let written = Arc::new(Written::new(args.keys));
    if args.preload {
        preload(&clients, &args, &picker, &value).await?;
        (0..args.keys).for_each(|i| written.mark(i));
    }
    let counted = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let client = clients[t % clients.len()].clone();
        let picker = picker.clone();
        let (counted, measuring, stop) = (counted.clone(), measuring.clone(), stop.clone());
        let value = value.clone();
        let read_ratio = args.workload.read_ratio();
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(t as u64));
        let (ops_limit, slow_ms) = (args.ops, args.slow_ms);
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                let i = picker.pick(&mut rng);
                let k = picker.key(i);
                let op = if rng.random_bool(read_ratio) {
                    Op::Get
                } else {
                    written.mark(i);
                    Op::Put
                };
                let (started, started_wall) = (Instant::now(), SystemTime::now());
                let result = client.run(op, &k, &value).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                let took = started.elapsed();
                // With --ops, operations that finish after the limit was reached
                // (they were in flight on other tasks) are not counted.
                let done = counted.fetch_add(1, Ordering::Relaxed) + 1;
                if ops_limit.is_some_and(|limit| done > limit) {
                    break;
                }
                if slow_ms.is_some_and(|ms| took >= Duration::from_millis(ms)) {
                    tally.slow.push(SlowRequest {
                        started_unix_ms: started_wall
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                        op: op.name(),
                        ms: took.as_secs_f64() * 1000.0,
                        error: result.as_ref().err().cloned(),
                    });
                }
                match result {
                    Ok(()) => tally.record(op, took),
                    Err(kind) => *tally.errors.entry(kind).or_default() += 1,
                }
                if ops_limit.is_some_and(|limit| done >= limit) {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let bar = progress(&args);
    let limit = Duration::from_secs_f64(args.duration);
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            // Ctrl-C ends the run early; what was measured is still reported.
            _ = &mut interrupted => stop.store(true, Ordering::Relaxed),
        }
        let done = counted.load(Ordering::Relaxed);
        match args.ops {
            Some(ops) => bar.set_position(done.min(ops)),
            None => {
                bar.set_position(started.elapsed().as_millis() as u64);
                if started.elapsed() >= limit {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
        bar.set_message(format!("{done} ops"));
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    let report = report(&args, seconds, tally);
    match ctx.output() {
        Output::Json => print_json(&report)?,
        Output::Table => print_report(&report)?,
    }
    if args.keep || !args.etcd.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let Target::Shardkv(client) = &clients[0] else {
        return Ok(ExitCode::SUCCESS);
    };
    let keys: Vec<Vec<u8>> = written
        .indexes()
        .into_iter()
        .map(|i| picker.key(i))
        .collect();
    delete_keys(client, keys, args.concurrency).await?;
    Ok(ExitCode::SUCCESS)
}

/// Deletes the keys a run wrote, `concurrency` at a time, and says so on stderr.
async fn delete_keys(
    client: &Client,
    keys: Vec<Vec<u8>>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(keys.len() as u64)
        .with_message("deleting the keys the run wrote (--keep keeps them)");
    bar.set_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len}")?);
    let total = keys.len();
    let keys = Arc::new(keys);
    let client = client.clone();
    each_index(total as u64, concurrency, &bar, move |_, i| {
        let (client, keys) = (client.clone(), keys.clone());
        async move {
            client
                .delete(&keys[i as usize])
                .await
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("deleting the benchmark's keys: {e}"))
        }
    })
    .await?;
    eprintln!("deleted the {total} keys this run wrote (--keep keeps them)");
    Ok(())
}

/// Writes every key once, `concurrency` at a time.
async fn preload(
    clients: &[Target],
    args: &BenchArgs,
    picker: &Arc<KeyPicker>,
    value: &[u8],
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(args.keys).with_message("preloading");
    bar.set_style(ProgressStyle::with_template(
        "{msg} {bar:40} {pos}/{len} ({eta})",
    )?);
    let (clients, picker, value) = (
        Arc::new(clients.to_vec()),
        picker.clone(),
        Arc::new(value.to_vec()),
    );
    each_index(args.keys, args.concurrency, &bar, move |task, i| {
        let client = clients[task % clients.len()].clone();
        let (key, value) = (picker.key(i), value.clone());
        async move {
            client
                .run(Op::Put, &key, &value)
                .await
                .map_err(|kind| anyhow::anyhow!("preloading failed: {kind}"))
        }
    })
    .await
}

/// Runs `op(task, i)` for every `i` in `0..count` on `concurrency` tasks, advancing
/// `bar` for each; stops at the first error.
async fn each_index<F, Fut>(
    count: u64,
    concurrency: usize,
    bar: &ProgressBar,
    op: F,
) -> anyhow::Result<()>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let op = Arc::new(op);
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let (next, bar, op) = (next.clone(), bar.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                op(task, i).await?;
                bar.inc(1);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    bar.finish_and_clear();
    Ok(())
}

fn progress(args: &BenchArgs) -> ProgressBar {
    let (len, template) = match args.ops {
        Some(ops) => (ops, "{bar:40} {pos}/{len} ops {msg}"),
        None => (
            (args.duration * 1000.0) as u64,
            "{bar:40} {elapsed} of the run, {msg}",
        ),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("template"));
    bar
}

fn report(args: &BenchArgs, seconds: f64, mut tally: Tally) -> Report {
    let ms = |us: u64| us as f64 / 1000.0;
    let operations: Vec<OpReport> = tally
        .latencies
        .iter()
        .map(|(op, h)| OpReport {
            op: op.name(),
            count: h.len(),
            ops_per_sec: h.len() as f64 / seconds,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
        .collect();
    let total_ops: u64 = operations.iter().map(|o| o.count).sum();
    let slow_requests = args.slow_ms.map(|_| {
        tally.slow.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        tally.slow.truncate(SLOW_KEPT);
        tally.slow.sort_by_key(|s| s.started_unix_ms);
        tally.slow
    });
    Report {
        workload: args.workload,
        distribution: args.distribution,
        keys: args.keys,
        value_size: args.value_size,
        concurrency: args.concurrency,
        clients: args.clients,
        batch_calls: if args.etcd.is_empty() {
            args.batch_calls
        } else {
            0
        },
        target: if args.etcd.is_empty() {
            "shardkv"
        } else {
            "etcd"
        },
        seconds,
        total_ops,
        ops_per_sec: total_ops as f64 / seconds,
        operations,
        errors: tally.errors,
        slow_requests,
    }
}

fn print_report(r: &Report) -> anyhow::Result<()> {
    outln!(
        "{}: {:?} workload, {} keys ({:?}), {}-byte values, {} in flight over {} client(s)",
        r.target,
        r.workload,
        r.keys,
        r.distribution,
        r.value_size,
        r.concurrency,
        r.clients
    );
    outln!(
        "{} operations in {:.1} s: {:.0} ops/s",
        r.total_ops,
        r.seconds,
        r.ops_per_sec
    );
    let mut t = Table::new(&[
        "OP", "COUNT", "OPS/S", "P50 MS", "P95 MS", "P99 MS", "P99.9 MS", "MAX MS",
    ]);
    for o in &r.operations {
        t.row(vec![
            o.op.to_owned(),
            o.count.to_string(),
            format!("{:.0}", o.ops_per_sec),
            format!("{:.2}", o.p50_ms),
            format!("{:.2}", o.p95_ms),
            format!("{:.2}", o.p99_ms),
            format!("{:.2}", o.p999_ms),
            format!("{:.2}", o.max_ms),
        ]);
    }
    t.print()?;
    if r.errors.is_empty() {
        outln!("no errors");
    } else {
        for (kind, n) in &r.errors {
            outln!("errors: {n} {kind}");
        }
    }
    if let Some(slow) = &r.slow_requests {
        outln!("{} request(s) over --slow-ms:", slow.len());
        for s in slow {
            let outcome = s.error.as_deref().unwrap_or("ok");
            outln!(
                "  started at {} ms (Unix): {} took {:.1} ms, {outcome}",
                s.started_unix_ms,
                s.op,
                s.ms
            );
        }
    }
    Ok(())
}
