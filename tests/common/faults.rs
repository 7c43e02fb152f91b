//! Fault injection and history checking for end-to-end tests (Jepsen style).
//!
//! - [`start_faulty`] starts a [`KvCluster`] whose shard masters and kvnodes run with
//!   the hidden `--enable-fault-injection` flag, so their `Faults` service can cut,
//!   drop and delay their outbound Raft traffic (and a kvnode's range-transfer calls).
//! - [`At`] names one server; `KvCluster::{cut, partition, partition_group, isolate,
//!   set_loss, heal_all}` set faults on the servers that are up. Faults live in a
//!   server's memory: a killed and restarted server has none; a paused one keeps its.
//! - [`Workload`] runs concurrent recorded clients of two kinds on the same few hot
//!   keys (Get / Put / Delete / CAS): raw test clients, one request per call (plus
//!   Puts of unique keys), and tasks sharing one product `Client`, whose requests
//!   coalesce into Batch calls and go through its retries and write window
//!   (`shardkv::verify::workload`). Both record into one history. In
//!   [`Workload::finish`] it reads every key back, checks the history with
//!   `shardkv::verify` (printing the smallest offending per-key history on
//!   failure) and checks that no acknowledged write was lost.
//! - [`seed`] picks the test's seed (`SHARDKV_SEED` replays one) and prints it.

use super::{recorded_random_op, rpc, wait_until};
use super::{KvCluster, KvOptions, KvTestClient, MasterCluster, MasterOptions, RPC_TIMEOUT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardkv::client::{Client, ClientOptions};
use shardkv::proto::testing::faults_client::FaultsClient;
use shardkv::proto::testing::{
    ClearFaultsRequest, FaultsReply, GetFaultsRequest, LinkFault, NodeFaults, SetFaultsRequest,
};
use shardkv::verify::workload::{self, Seen, Stats};
use shardkv::verify::{check, CheckResult, Input, Operation, Output, Recorder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Status;

/// The hidden flag that gives a server the `Faults` service.
pub const FAULT_FLAG: &str = "--enable-fault-injection";
/// Environment variable that replays a seed.
pub const SEED_ENV: &str = "SHARDKV_SEED";
/// How long a fault call to an up server is retried before the test fails. Generous:
/// a server restarted a moment ago on a loaded machine (the soak restarts many at
/// once) can take more than 10 s to serve.
const FAULT_CALL_WAIT: Duration = Duration::from_secs(30);

/// The test's seed: `SHARDKV_SEED` if set, else random. Printed either way.
pub fn seed() -> u64 {
    let seed = match std::env::var(SEED_ENV) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s:?} is not a number")),
        Err(_) => rand::random(),
    };
    println!("seed {seed} (replay with {SEED_ENV}={seed})");
    seed
}

/// Starts masters and groups `1..=options.groups` (none joined), every server with
/// fault injection enabled.
pub fn start_faulty(mut options: KvOptions) -> KvCluster {
    let masters = MasterCluster::start_with(MasterOptions {
        replicas: options.masters,
        tick_ms: options.tick_ms,
        extra_args: [FAULT_FLAG.to_string()]
            .into_iter()
            .chain(options.master_args.iter().cloned())
            .collect(),
        ..Default::default()
    });
    options.extra_args.push(FAULT_FLAG.to_string());
    let groups = options.groups;
    let mut cluster = KvCluster {
        groups: BTreeMap::new(),
        channels: Mutex::new(HashMap::new()),
        options,
        masters,
    };
    for gid in 1..=groups {
        cluster.add_group(gid);
    }
    cluster
}

/// One server of a [`KvCluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum At {
    /// Shard-master replica index.
    Master(usize),
    /// Node index `.1` of kv group `.0`.
    Kv(u64, usize),
}

/// A fault that cuts the link to `addr`.
pub fn blocked(addr: &str) -> LinkFault {
    LinkFault {
        peer_addr: addr.to_owned(),
        blocked: true,
        ..Default::default()
    }
}

impl KvCluster {
    pub fn node_addr(&self, at: At) -> String {
        match at {
            At::Master(i) => self.masters.addr(i).to_owned(),
            At::Kv(gid, i) => self.addr(gid, i).to_owned(),
        }
    }

    /// True if the server is started and not paused.
    pub fn is_node_up(&self, at: At) -> bool {
        match at {
            At::Master(i) => self.masters.is_up(i),
            At::Kv(gid, i) => self.group(gid).proc(i).is_up(),
        }
    }

    /// Every server: the masters, then each group's nodes.
    pub fn all_nodes(&self) -> Vec<At> {
        let mut all: Vec<At> = (0..self.masters.len()).map(At::Master).collect();
        for gid in self.gids() {
            all.extend((0..self.group(gid).len()).map(|i| At::Kv(gid, i)));
        }
        all
    }

    /// The nodes of kv group `gid`.
    pub fn group_nodes(&self, gid: u64) -> Vec<At> {
        (0..self.group(gid).len()).map(|i| At::Kv(gid, i)).collect()
    }

    fn faults_client(&self, at: At) -> FaultsClient<Channel> {
        FaultsClient::new(self.channel(&self.node_addr(at)))
    }

    fn forget_channel_of(&self, at: At) {
        match at {
            At::Master(i) => self.masters.forget_channel(i),
            At::Kv(gid, i) => self.forget_node(gid, i),
        }
    }

    /// The server's faults and counters.
    pub async fn get_faults(&self, at: At) -> Result<FaultsReply, Status> {
        let r = rpc(self.faults_client(at).get_faults(GetFaultsRequest {})).await;
        if r.is_err() {
            self.forget_channel_of(at);
        }
        r.map(|r| r.into_inner())
    }

    /// Sets `faults` on `at` (with `replace`, removing its others first). A server
    /// that is down or paused is skipped (false); one that is up must accept within
    /// a bounded wait.
    pub async fn set_faults(&self, at: At, faults: Vec<LinkFault>, replace: bool) -> bool {
        let request = SetFaultsRequest {
            faults,
            replace,
            node: None,
        };
        self.send_set_faults(at, request).await
    }

    /// Replaces the server's own faults (slow disk, failing snapshot reads, a jump of
    /// its clock); skipped (false) if it is down or paused.
    pub async fn set_node_faults(&self, at: At, node: NodeFaults) -> bool {
        let request = SetFaultsRequest {
            node: Some(node),
            ..Default::default()
        };
        self.send_set_faults(at, request).await
    }

    async fn send_set_faults(&self, at: At, request: SetFaultsRequest) -> bool {
        if !self.is_node_up(at) {
            return false;
        }
        let last = Mutex::new(String::new());
        let ok = wait_until(FAULT_CALL_WAIT, || async {
            let request = request.clone();
            match rpc(self.faults_client(at).set_faults(request)).await {
                Ok(_) => true,
                Err(e) => {
                    self.forget_channel_of(at);
                    *last.lock().unwrap() = e.to_string();
                    false
                }
            }
        })
        .await;
        assert!(ok, "SetFaults on {at:?}: {}", last.lock().unwrap());
        true
    }

    /// Removes every fault of `at` (skipped if it is down or paused).
    pub async fn clear_faults(&self, at: At) {
        if !self.is_node_up(at) {
            return;
        }
        let last = Mutex::new(String::new());
        let ok = wait_until(FAULT_CALL_WAIT, || async {
            match rpc(self.faults_client(at).clear_faults(ClearFaultsRequest {})).await {
                Ok(_) => true,
                Err(e) => {
                    self.forget_channel_of(at);
                    *last.lock().unwrap() = e.to_string();
                    false
                }
            }
        })
        .await;
        assert!(ok, "ClearFaults on {at:?}: {}", last.lock().unwrap());
    }

    /// Cuts the link from `from` to `to` only (one way).
    pub async fn cut(&self, from: At, to: At) {
        let addr = self.node_addr(to);
        self.set_faults(from, vec![blocked(&addr)], false).await;
    }

    /// Cuts every link between servers on different `sides`, both ways. Servers on
    /// no side are not affected.
    pub async fn partition(&self, sides: &[Vec<At>]) {
        for (s, side) in sides.iter().enumerate() {
            let others: Vec<LinkFault> = sides
                .iter()
                .enumerate()
                .filter(|(o, _)| *o != s)
                .flat_map(|(_, other)| other.iter().map(|&at| blocked(&self.node_addr(at))))
                .collect();
            for &at in side {
                self.set_faults(at, others.clone(), false).await;
            }
        }
        println!("partitioned {sides:?}");
    }

    /// Partitions kv group `gid` into `sides` (node indexes).
    pub async fn partition_group(&self, gid: u64, sides: &[&[usize]]) {
        let sides: Vec<Vec<At>> = sides
            .iter()
            .map(|side| side.iter().map(|&i| At::Kv(gid, i)).collect())
            .collect();
        self.partition(&sides).await;
    }

    /// Cuts `at` off from every other server, both ways.
    pub async fn isolate(&self, at: At) {
        let rest: Vec<At> = self.all_nodes().into_iter().filter(|&o| o != at).collect();
        self.partition(&[vec![at], rest]).await;
    }

    /// Every up server drops each outbound batch with `probability` and delays the
    /// rest by `delay_ms` (on every link without a fault of its own).
    pub async fn set_loss(&self, probability: f64, delay_ms: u32) {
        let fault = LinkFault {
            peer_addr: String::new(),
            blocked: false,
            drop_probability: probability,
            delay_ms,
        };
        for at in self.all_nodes() {
            self.set_faults(at, vec![fault.clone()], false).await;
        }
        println!("loss {probability} and delay {delay_ms} ms on every link");
    }

    /// Removes every fault of every up server (resume paused servers first: a paused
    /// server keeps its faults).
    pub async fn heal_all(&self) {
        for at in self.all_nodes() {
            self.clear_faults(at).await;
        }
        println!("healed every link");
    }

    /// Batches and calls dropped by fault injection so far, over the up servers.
    pub async fn faults_dropped(&self) -> u64 {
        let mut total = 0;
        for at in self.all_nodes() {
            if self.is_node_up(at) {
                total += self.get_faults(at).await.map_or(0, |r| r.dropped);
            }
        }
        total
    }
}

// ---------------------------------------------------------------------------
// Recorded concurrent clients.

/// How a [`Workload`] behaves.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Raw test clients, ids `0..clients`.
    pub clients: u64,
    /// Tasks sharing one product `Client`, ids from [`PRODUCT_TASK_IDS`].
    pub product_tasks: u64,
    /// The hot keys every client reads and writes.
    pub keys: Vec<Vec<u8>>,
    pub seed: u64,
    /// A client gives up on one operation after this long (its outcome is then unknown).
    pub op_deadline: Duration,
    /// Percent of a raw client's operations that Put a fresh unique key (`u/<client>/<n>`).
    pub unique_percent: u32,
}

/// The first history id of the product client's tasks (raw clients count from 0).
pub const PRODUCT_TASK_IDS: u64 = 1000;

impl WorkloadOptions {
    pub fn new(keys: &[&str], seed: u64) -> WorkloadOptions {
        WorkloadOptions {
            clients: 4,
            product_tasks: 8,
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            seed,
            op_deadline: Duration::from_secs(3),
            unique_percent: 10,
        }
    }
}

/// What one raw client did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientStats {
    /// Operations on the hot keys.
    pub ops: Stats,
    /// Unique-key Puts acknowledged.
    pub unique_acked: u64,
}

/// The outcome of [`Workload::finish`].
#[derive(Clone, Debug)]
pub struct Report {
    /// The raw test clients.
    pub raw: ClientStats,
    /// The tasks of the product client.
    pub product: Stats,
    pub operations: usize,
    pub violations: usize,
    pub lost_writes: usize,
    pub check_time: Duration,
}

/// Concurrent recorded clients on hot keys (see the module docs).
pub struct Workload {
    recorder: Recorder,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<ClientStats>>,
    product: workload::Workload,
    /// Acknowledged unique keys and their values.
    acked_unique: AckedUnique,
    masters: Vec<String>,
    keys: Vec<Vec<u8>>,
}

/// Acknowledged unique keys and their values, shared by the clients.
type AckedUnique = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>)>>>;

/// Prefix of the unique keys; [`UNIQUE_END`] bounds them.
pub const UNIQUE_PREFIX: &str = "u/";
const UNIQUE_END: &[u8] = b"u0";

impl Workload {
    /// Starts the clients against the cluster whose masters are `masters`.
    pub async fn start(masters: Vec<String>, options: WorkloadOptions) -> Workload {
        let recorder = Recorder::new();
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let acked_unique = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..options.clients)
            .map(|client| {
                let mut kv = KvTestClient::new(masters.clone());
                kv.deadline = options.op_deadline;
                kv.attempt_timeout = RPC_TIMEOUT.min(options.op_deadline);
                tokio::spawn(run_client(
                    client,
                    kv,
                    options.clone(),
                    recorder.clone(),
                    stop.clone(),
                    completed.clone(),
                    acked_unique.clone(),
                ))
            })
            .collect();
        let client = Client::connect_with(
            &masters,
            ClientOptions {
                call_deadline: options.op_deadline,
                attempt_timeout: RPC_TIMEOUT.min(options.op_deadline),
                ..ClientOptions::default()
            },
        )
        .await
        .expect("product client connects");
        let product = workload::Workload::start(
            &client,
            &recorder,
            &workload::WorkloadOptions {
                keys: options.keys.clone(),
                tasks: options.product_tasks,
                seed: options.seed,
                first_task: PRODUCT_TASK_IDS,
            },
        );
        Workload {
            recorder,
            stop,
            completed,
            tasks,
            product,
            acked_unique,
            masters,
            keys: options.keys,
        }
    }

    /// Operations completed (acknowledged) so far, by both kinds of client.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed) + self.product.completed()
    }

    /// Waits until `more` operations have completed after the call (true), or
    /// `timeout` passes (false).
    pub async fn progress(&self, more: u64, timeout: Duration) -> bool {
        let target = self.completed() + more;
        wait_until(timeout, || async { self.completed() >= target }).await
    }

    /// [`Workload::progress`], failing the test on time-out.
    pub async fn expect_progress(&self, more: u64, timeout: Duration, what: &str) {
        assert!(
            self.progress(more, timeout).await,
            "clients completed fewer than {more} operations within {timeout:?} {what}"
        );
    }

    /// Stops the clients, reads every hot key and every acknowledged unique key back
    /// (call it once the cluster is healed and settled), checks the history for
    /// linearizability and for lost acknowledged writes, prints a summary ending in
    /// "violations: N, lost writes: M", and fails the test if either is not 0.
    pub async fn finish(self, what: &str) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut raw = ClientStats::default();
        for (client, t) in self.tasks.into_iter().enumerate() {
            let s = t.await.expect("client task panicked");
            println!("raw client {client}: {s:?}");
            raw.ops.add(&s.ops);
            raw.unique_acked += s.unique_acked;
        }
        let product = self.product.stop().await;

        // Final reads, recorded: a lost or stale value shows in the history.
        let mut kv = KvTestClient::new(self.masters.clone());
        kv.deadline = Duration::from_secs(30);
        let reader = u64::MAX;
        let mut final_values = BTreeMap::new();
        for key in &self.keys {
            let h = self.recorder.invoke(reader, Input::get(key.clone()));
            let v = kv
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("{what}: final read of {}: {e}", show(key)));
            self.recorder.complete(h, Output::Get(v.clone()));
            final_values.insert(key.clone(), v);
        }
        let mut lost = Vec::new();
        let unique = kv
            .scan_all(UNIQUE_PREFIX.as_bytes(), UNIQUE_END, 0)
            .await
            .unwrap_or_else(|e| panic!("{what}: final scan of the unique keys: {e}"));
        let found: HashMap<Vec<u8>, Vec<u8>> =
            unique.into_iter().map(|kv| (kv.key, kv.value)).collect();
        for (k, v) in self.acked_unique.lock().unwrap().iter() {
            if found.get(k) != Some(v) {
                lost.push(format!(
                    "acknowledged Put {} = {} reads back as {:?}",
                    show(k),
                    show(v),
                    found.get(k).map(|v| show(v))
                ));
            }
        }

        let history = self.recorder.into_history();
        for (key, value) in &final_values {
            if let Some(why) = lost_write(&history, key, value) {
                lost.push(why);
            }
        }
        let started = Instant::now();
        let result = check(&history);
        let check_time = started.elapsed();
        let violations = usize::from(!result.is_ok());
        println!(
            "{what}: {} operations, checked in {check_time:?}; {} unique keys acknowledged",
            history.len(),
            raw.unique_acked
        );
        for (kind, s) in [("raw test clients", &raw.ops), ("product client", &product)] {
            println!(
                "{what}: {kind}: {} completed, {} unknown; {} gets, {} puts, {} deletes, \
                 {} cas of which {} swapped",
                s.completed, s.unknown, s.gets, s.puts, s.deletes, s.cas, s.swapped
            );
        }
        println!(
            "{what}: violations: {violations}, lost writes: {}",
            lost.len()
        );
        for l in &lost {
            println!("  lost: {l}");
        }
        match &result {
            CheckResult::Ok => {}
            // Display prints the smallest offending per-key history the checker found.
            other => panic!("{what}: history is not linearizable: {other}"),
        }
        assert!(
            lost.is_empty(),
            "{what}: lost acknowledged writes: {lost:#?}"
        );
        // Both kinds of client must have been checked, not only recorded.
        assert!(
            raw.ops.completed > 0 && product.completed > 0,
            "{what}: a kind of client completed nothing (raw {}, product {})",
            raw.ops.completed,
            product.completed
        );
        Report {
            raw,
            product,
            operations: history.len(),
            violations,
            lost_writes: lost.len(),
            check_time,
        }
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The value a write leaves (None: absent), or None if the op writes nothing
/// (a Get, or a CAS that did not swap).
fn written(op: &Operation) -> Option<Option<Vec<u8>>> {
    let unknown = op.ret.is_none();
    match (&op.input, &op.output) {
        (Input::Put { value, .. }, _) => Some(Some(value.clone())),
        (Input::Delete { .. }, _) => Some(None),
        (Input::Cas { new, .. }, Output::Cas(true)) => Some(new.clone()),
        (Input::Cas { new, .. }, _) if unknown => Some(new.clone()),
        _ => None,
    }
}

/// Checks that `value`, read after everything, could be the last write to `key`: the
/// effect of a write (acknowledged or of unknown outcome) that no acknowledged write
/// strictly follows, or absence when no write was acknowledged. Otherwise an
/// acknowledged write was lost (or a value came from nowhere); returns why.
pub fn lost_write(history: &[Operation], key: &[u8], value: &Option<Vec<u8>>) -> Option<String> {
    let ops: Vec<&Operation> = history.iter().filter(|o| o.input.key() == key).collect();
    // The call time of the latest-invoked acknowledged write.
    let last_acked_call = ops
        .iter()
        .filter(|o| o.ret.is_some() && written(o).is_some())
        .map(|o| o.call)
        .max();
    let mut candidates: BTreeSet<Option<Vec<u8>>> = BTreeSet::new();
    if last_acked_call.is_none() {
        candidates.insert(None);
    }
    for o in &ops {
        let Some(effect) = written(o) else { continue };
        let superseded = match (o.ret, last_acked_call) {
            (Some(ret), Some(call)) => call > ret,
            _ => false,
        };
        if !superseded {
            candidates.insert(effect);
        }
    }
    if candidates.contains(value) {
        return None;
    }
    Some(format!(
        "key {} finally reads {:?}, but the last acknowledged writes left one of {:?}",
        show(key),
        value.as_deref().map(show),
        candidates
            .iter()
            .map(|c| c.as_deref().map(show))
            .collect::<Vec<_>>()
    ))
}

async fn run_client(
    client: u64,
    mut kv: KvTestClient,
    options: WorkloadOptions,
    recorder: Recorder,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    acked_unique: AckedUnique,
) -> ClientStats {
    let mut rng = StdRng::seed_from_u64(options.seed ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = ClientStats::default();
    let mut seen = Seen::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let dice = rng.random_range(0..100);
        if dice < options.unique_percent {
            let key = format!("{UNIQUE_PREFIX}{client}/{n}").into_bytes();
            if kv.put(&key, &key).await.is_ok() {
                acked_unique.lock().unwrap().push((key.clone(), key));
                stats.unique_acked += 1;
                completed.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let key = options.keys[rng.random_range(0..options.keys.len())].clone();
        let value = format!("c{client}-{n}").into_bytes();
        let dice = rng.random_range(0..100);
        let (input, out) =
            recorded_random_op(&mut kv, &recorder, client, &mut seen, key, value, dice).await;
        stats.ops.count(&input, out.as_ref());
        if out.is_some() {
            completed.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats
}
