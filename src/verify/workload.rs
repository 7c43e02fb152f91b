//! A recorded concurrent workload through the product [`Client`]: many tasks
//! share one client (so their requests coalesce into `Kv/Batch` calls, as an
//! application's would) and issue gets, puts, compare-and-swaps and deletes on
//! a few keys, so that their operations overlap and conflict. Every operation
//! goes into a [`Recorder`]; an error leaves its outcome unknown (a timed-out
//! write may still take effect), which the checker allows for.

use super::history::{Input, Output, Recorder};
use crate::client::{Client, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// What a task last saw at each key (`None`: absent). A CAS expects it, which is
/// often still current, so CASes both succeed and fail.
pub type Seen = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The next operation on `key`, by `dice` (0..100): Get 40%, Put 30%, CAS 20%,
/// Delete 10%. `value` is what a Put or CAS writes; make it unique in the history,
/// so that a read shows which write it saw.
pub fn random_input(dice: u32, key: Vec<u8>, value: Vec<u8>, seen: &Seen) -> Input {
    match dice {
        0..40 => Input::Get { key },
        40..70 => Input::Put { key, value },
        70..90 => Input::Cas {
            expected: seen.get(&key).cloned().flatten(),
            key,
            new: Some(value),
        },
        _ => Input::Delete { key },
    }
}

/// What a client saw: the output, and the key's value afterwards as far as the
/// answer tells (for [`Seen`]; `None` when it tells nothing).
pub type Observed = (Output, Option<Option<Vec<u8>>>);

/// Sends `input` through the product `client`.
pub async fn execute(client: &Client, input: &Input) -> Result<Observed, Error> {
    Ok(match input {
        Input::Get { key } => {
            let value = client.get(key).await?;
            (Output::Get(value.clone()), Some(value))
        }
        Input::Put { key, value } => {
            client.put(key, value).await?;
            (Output::Write, Some(Some(value.clone())))
        }
        Input::Delete { key } => {
            client.delete(key).await?;
            (Output::Write, Some(None))
        }
        Input::Cas { key, expected, new } => {
            let outcome = client
                .compare_and_swap(key, expected.as_deref(), new.as_deref())
                .await?;
            (Output::Cas(outcome.swapped), Some(outcome.current))
        }
    })
}

/// Records `input` as task `task`'s, runs it with `run` (e.g. [`execute`]), and
/// records the answer, or an unknown outcome on an error: a write that timed out
/// may still take effect. Returns the output if it completed.
pub async fn recorded<E, Fut>(
    recorder: &Recorder,
    task: u64,
    seen: &mut Seen,
    input: Input,
    run: impl FnOnce(Input) -> Fut,
) -> Option<Output>
where
    Fut: Future<Output = Result<Observed, E>>,
{
    let key = input.key().to_vec();
    let handle = recorder.invoke(task, input.clone());
    match run(input).await {
        Ok((output, after)) => {
            recorder.complete(handle, output.clone());
            if let Some(after) = after {
                seen.insert(key, after);
            }
            Some(output)
        }
        Err(_) => {
            recorder.unknown(handle);
            None
        }
    }
}

/// Counts of what a workload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Operations answered.
    pub completed: u64,
    /// Operations that failed (timeout, unreachable): their outcome is unknown.
    pub unknown: u64,
    pub gets: u64,
    pub puts: u64,
    pub deletes: u64,
    pub cas: u64,
    /// CASes answered "swapped".
    pub swapped: u64,
}

impl Stats {
    /// Counts one operation and its output (`None`: unknown outcome).
    pub fn count(&mut self, input: &Input, output: Option<&Output>) {
        match input {
            Input::Get { .. } => self.gets += 1,
            Input::Put { .. } => self.puts += 1,
            Input::Delete { .. } => self.deletes += 1,
            Input::Cas { .. } => self.cas += 1,
        }
        match output {
            Some(out) => {
                self.completed += 1;
                self.swapped += u64::from(*out == Output::Cas(true));
            }
            None => self.unknown += 1,
        }
    }

    pub fn add(&mut self, o: &Stats) {
        self.completed += o.completed;
        self.unknown += o.unknown;
        self.gets += o.gets;
        self.puts += o.puts;
        self.deletes += o.deletes;
        self.cas += o.cas;
        self.swapped += o.swapped;
    }
}

/// How a [`Workload`] runs.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// The keys every task reads and writes: few, so that operations conflict.
    /// They must be absent when the workload starts (the checker assumes so).
    pub keys: Vec<Vec<u8>>,
    /// Tasks sharing the client, each with one operation in flight.
    pub tasks: u64,
    /// Seed of every task's choices.
    pub seed: u64,
    /// Task ids in the history are `first_task..first_task + tasks`, so that other
    /// recorded clients of the same history can use other ids.
    pub first_task: u64,
}

/// Running tasks of a recorded workload (see the module docs).
pub struct Workload {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Stats>>,
}

impl Workload {
    /// Starts the tasks on `client`, recording into `recorder`.
    pub fn start(client: &Client, recorder: &Recorder, options: &WorkloadOptions) -> Workload {
        assert!(!options.keys.is_empty(), "a workload needs keys");
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let tasks = (options.first_task..options.first_task + options.tasks)
            .map(|task| {
                tokio::spawn(run_task(
                    task,
                    client.clone(),
                    recorder.clone(),
                    options.clone(),
                    stop.clone(),
                    completed.clone(),
                ))
            })
            .collect();
        Workload {
            stop,
            completed,
            tasks,
        }
    }

    /// Operations answered so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Tells the tasks to stop, waits until each has its last operation answered
    /// or failed (at most the client's call deadline), and returns their counts.
    pub async fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        let mut stats = Stats::default();
        for task in self.tasks {
            match task.await {
                Ok(s) => stats.add(&s),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {} // cancelled: the runtime is shutting down
            }
        }
        stats
    }
}

async fn run_task(
    task: u64,
    client: Client,
    recorder: Recorder,
    options: WorkloadOptions,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
) -> Stats {
    let mut rng = StdRng::seed_from_u64(options.seed ^ task.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = Stats::default();
    let mut seen = Seen::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = options.keys[rng.random_range(0..options.keys.len())].clone();
        // Unique in the history: task ids are.
        let value = format!("t{task}-{n}").into_bytes();
        let input = random_input(rng.random_range(0..100), key, value, &seen);
        let output = recorded(&recorder, task, &mut seen, input.clone(), |input| {
            let client = &client;
            async move { execute(client, &input).await }
        })
        .await;
        stats.count(&input, output.as_ref());
        if output.is_some() {
            completed.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats
}
