//! Prometheus metrics: every metric a server exports is declared here, with its
//! name, unit and help, and recorded by the module that owns the event (the replica
//! driver, the transport, the move workers). `serve` answers `GET /metrics` in the
//! Prometheus text format on `--metrics-listen`.
//!
//! One set per process, in a static: a process runs one replica, and recording costs
//! an atomic add (a short mutex for a histogram) whether or not anyone scrapes. The
//! request layer resolves a method's counters once, so a request formats no label
//! and allocates nothing for its metrics.

use crate::logging::Process;
use crate::proto::RangeStats;
use crate::replica::Role;
use axum::response::IntoResponse;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::http;

/// Latency buckets, in seconds: 100 µs to about 13 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    service: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcCodeLabels {
    service: String,
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpMethodLabels {
    method: &'static str,
}

// One-label sets; their values are fixed strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    role: &'static str,
    group: String,
    node: String,
}

/// The Raft replica's gauges and counters (`src/replica/driver.rs`).
pub struct RaftMetrics {
    pub term: Gauge,
    /// 1 for the replica's current role, 0 for the others.
    roles: Family<RoleLabels, Gauge>,
    role_gauges: [Gauge; 4],
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    proposals: Family<KindLabels, Counter>,
    pub proposed_commands: Counter,
    pub proposed_membership_changes: Counter,
    pub leader_changes: Counter,
    reads: Family<KindLabels, Counter>,
    pub read_index_reads: Counter,
    pub lease_reads: Counter,
    snapshots_sent: Family<ResultLabels, Counter>,
    pub snapshots_sent_ok: Counter,
    pub snapshots_sent_failed: Counter,
    pub snapshots_received: Counter,
}

const ROLES: [Role; 4] = [
    Role::Follower,
    Role::PreCandidate,
    Role::Candidate,
    Role::Leader,
];

impl RaftMetrics {
    fn new() -> RaftMetrics {
        let roles = Family::<RoleLabels, Gauge>::default();
        let role_gauges =
            ROLES.map(|r| roles.get_or_create_owned(&RoleLabels { role: r.as_str() }));
        let proposals = Family::<KindLabels, Counter>::default();
        let reads = Family::<KindLabels, Counter>::default();
        let snapshots_sent = Family::<ResultLabels, Counter>::default();
        RaftMetrics {
            term: Gauge::default(),
            role_gauges,
            roles,
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            proposed_commands: proposals.get_or_create_owned(&KindLabels { kind: "command" }),
            proposed_membership_changes: proposals
                .get_or_create_owned(&KindLabels { kind: "membership" }),
            proposals,
            leader_changes: Counter::default(),
            read_index_reads: reads.get_or_create_owned(&KindLabels { kind: "read_index" }),
            lease_reads: reads.get_or_create_owned(&KindLabels { kind: "lease" }),
            reads,
            snapshots_sent_ok: snapshots_sent.get_or_create_owned(&ResultLabels { result: "ok" }),
            snapshots_sent_failed: snapshots_sent
                .get_or_create_owned(&ResultLabels { result: "failed" }),
            snapshots_sent,
            snapshots_received: Counter::default(),
        }
    }

    /// Records the replica's role.
    pub fn set_role(&self, role: Role) {
        for (r, gauge) in ROLES.iter().zip(&self.role_gauges) {
            gauge.set(i64::from(*r == role));
        }
    }
}

/// Range moves: bytes a destination pulled, by phase, and how long its live moves
/// took (`kvnode/migration.rs`); the shard master's moves by phase.
pub struct MoveMetrics {
    bytes: Family<PhaseLabels, Counter>,
    /// A whole range pulled after a configuration change (not a live move).
    pub pulled_bytes: Counter,
    /// A live move's copy of the range.
    pub copied_bytes: Counter,
    /// A live move's writes recorded at the source during the copy.
    pub catch_up_bytes: Counter,
    /// Live moves as the destination's leader drove them, first step to cutover.
    pub duration: Histogram,
    /// The shard master's live moves, by phase.
    plans: Family<PhaseLabels, Gauge>,
}

impl MoveMetrics {
    fn new() -> MoveMetrics {
        let bytes = Family::<PhaseLabels, Counter>::default();
        MoveMetrics {
            pulled_bytes: bytes.get_or_create_owned(&PhaseLabels { phase: "pull" }),
            copied_bytes: bytes.get_or_create_owned(&PhaseLabels { phase: "copy" }),
            catch_up_bytes: bytes.get_or_create_owned(&PhaseLabels { phase: "catch_up" }),
            bytes,
            // 10 ms to about 20 min.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
            plans: Family::default(),
        }
    }

    /// Sets the number of the shard master's live moves in `phase` ("queued",
    /// "copying", "catching_up", "cutting_over").
    pub fn set_plans(&self, phase: &'static str, n: usize) {
        self.plans
            .get_or_create(&PhaseLabels { phase })
            .set(n as i64);
    }
}

/// The shard master's view of the cluster, set at each scrape
/// (`MasterService::report_metrics`).
pub struct MasterMetrics {
    pub config_num: Gauge,
    /// kvnodes by liveness, on the leader (it holds the heartbeat table).
    nodes: Family<StateLabels, Gauge>,
    /// Ranges each group owns in the latest configuration.
    group_ranges: Family<GroupLabels, Gauge>,
    /// Bytes of those ranges, as their leaders last reported them (leader only).
    group_bytes: Family<GroupLabels, Gauge>,
}

impl MasterMetrics {
    /// Sets the number of kvnodes in `state` ("up", "down", "unknown").
    pub fn set_nodes(&self, state: &'static str, n: usize) {
        self.nodes
            .get_or_create(&StateLabels { state })
            .set(n as i64);
    }

    /// Sets each group's ranges and bytes; a group no longer in the configuration
    /// loses its series.
    pub fn set_groups(&self, groups: impl Iterator<Item = (u64, usize, u64)>) {
        self.group_ranges.clear();
        self.group_bytes.clear();
        for (gid, ranges, bytes) in groups {
            let labels = GroupLabels {
                group: gid.to_string(),
            };
            self.group_ranges.get_or_create(&labels).set(ranges as i64);
            self.group_bytes.get_or_create(&labels).set(bytes as i64);
        }
    }
}

/// Every metric of this process.
pub struct Metrics {
    grpc_requests: Family<GrpcCodeLabels, Counter>,
    grpc_duration: Family<GrpcLabels, Histogram>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpMethodLabels, Histogram>,
    pub raft: RaftMetrics,
    transport_dropped: Family<KindLabels, Counter>,
    /// Raft messages dropped because a peer's outbound queue was full.
    pub dropped_outbound: Counter,
    /// Raft messages dropped because the driver's inbound queue was full.
    pub dropped_inbound: Counter,
    pub moves: MoveMetrics,
    pub master: MasterMetrics,
    node_info: Family<NodeLabels, Gauge>,
    storage: OnceLock<crate::storage::StorageStats>,
    ranges: OnceLock<RangeSource>,
    /// Run before each scrape, to set gauges whose values live elsewhere.
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
}

type ScrapeHook = Box<dyn Fn() + Send + Sync>;
type RangeSource = Box<dyn Fn() -> Vec<RangeStats> + Send + Sync>;

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let transport_dropped = Family::<KindLabels, Counter>::default();
    Metrics {
        grpc_requests: Family::default(),
        grpc_duration: Family::new_with_constructor(latency_histogram),
        http_requests: Family::default(),
        http_duration: Family::new_with_constructor(latency_histogram),
        raft: RaftMetrics::new(),
        dropped_outbound: transport_dropped.get_or_create_owned(&KindLabels { kind: "outbound" }),
        dropped_inbound: transport_dropped.get_or_create_owned(&KindLabels { kind: "inbound" }),
        transport_dropped,
        moves: MoveMetrics::new(),
        master: MasterMetrics {
            config_num: Gauge::default(),
            nodes: Family::default(),
            group_ranges: Family::default(),
            group_bytes: Family::default(),
        },
        node_info: Family::default(),
        storage: OnceLock::new(),
        ranges: OnceLock::new(),
        scrape_hooks: Mutex::new(Vec::new()),
    }
});

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Says which process this is (`shardkv_node_info`).
    pub fn set_process(&self, process: Process) {
        let labels = match process {
            Process::Replica { role, group, node } => NodeLabels {
                role,
                group: group.to_string(),
                node: node.to_string(),
            },
            Process::Other { role } => NodeLabels {
                role,
                group: String::new(),
                node: String::new(),
            },
        };
        self.node_info.get_or_create(&labels).set(1);
    }

    /// Runs `hook` before each scrape: for gauges that are cheaper to read when
    /// asked for than to keep current (the shard master's view of the cluster).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.scrape_hooks
            .lock()
            .expect("poisoned")
            .push(Box::new(hook));
    }

    /// The storage engine whose sizes are read at each scrape.
    pub fn set_storage(&self, stats: crate::storage::StorageStats) {
        let _ = self.storage.set(stats);
    }

    /// Where the scrape reads the size and load of the ranges this process reports
    /// (a kvnode's leader: those its group owns).
    pub fn set_ranges(&self, source: impl Fn() -> Vec<RangeStats> + Send + Sync + 'static) {
        let _ = self.ranges.set(Box::new(source));
    }

    /// The metrics that apply to a process of `role` ("kvnode", "shardmaster",
    /// "router").
    fn registry(&self, role: &str) -> Registry {
        let mut r = Registry::with_prefix("shardkv");
        r.register(
            "node_info",
            "The process: its role and, for a replica, its group and node id",
            self.node_info.clone(),
        );
        if role == "router" {
            r.register(
                "http_requests",
                "HTTP requests served by the router, by method and status code",
                self.http_requests.clone(),
            );
            r.register_with_unit(
                "http_request_duration",
                "Time the router took to answer a request",
                Unit::Seconds,
                self.http_duration.clone(),
            );
            return r;
        }
        r.register(
            "grpc_requests",
            "gRPC calls served, by service, method and status code",
            self.grpc_requests.clone(),
        );
        r.register_with_unit(
            "grpc_request_duration",
            "Time from a call's arrival to its response headers (a unary call's whole handling)",
            Unit::Seconds,
            self.grpc_duration.clone(),
        );
        let raft = &self.raft;
        r.register(
            "raft_term",
            "The replica's current Raft term",
            raft.term.clone(),
        );
        r.register(
            "raft_role",
            "1 for the replica's current Raft role, 0 for the others",
            raft.roles.clone(),
        );
        r.register(
            "raft_commit_index",
            "The highest log index known committed",
            raft.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The highest log index applied to the state machine",
            raft.applied_index.clone(),
        );
        r.register(
            "raft_proposals",
            "Entries proposed to the Raft log by this replica as leader, by kind",
            raft.proposals.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Times this replica saw a new leader",
            raft.leader_changes.clone(),
        );
        r.register(
            "raft_reads",
            "Linearizable reads served by this leader: through a ReadIndex round or on its lease",
            raft.reads.clone(),
        );
        r.register(
            "raft_snapshots_sent",
            "Snapshots streamed to followers, by result",
            raft.snapshots_sent.clone(),
        );
        r.register(
            "raft_snapshots_received",
            "Snapshots received and installed",
            raft.snapshots_received.clone(),
        );
        r.register(
            "transport_dropped_messages",
            "Raft messages dropped because a queue was full (outbound: to one peer; inbound: to the driver); Raft retransmits",
            self.transport_dropped.clone(),
        );
        r.register_collector(Box::new(StorageCollector));
        if role == "kvnode" {
            r.register_collector(Box::new(RangeCollector));
            r.register_with_unit(
                "range_move",
                "Bytes of range data this group pulled as a move's destination, by phase",
                Unit::Bytes,
                self.moves.bytes.clone(),
            );
            r.register_with_unit(
                "range_move_duration",
                "Live moves this group's leader drove as destination, from its first step to the cutover",
                Unit::Seconds,
                self.moves.duration.clone(),
            );
        }
        if role == "shardmaster" {
            r.register(
                "range_moves",
                "Live moves in the shard master's configuration, by phase",
                self.moves.plans.clone(),
            );
            r.register(
                "shardmaster_config_num",
                "The number of the latest configuration applied",
                self.master.config_num.clone(),
            );
            r.register(
                "shardmaster_nodes",
                "kvnodes by liveness (up: heartbeat within --down-after-ms), on the shard master's leader",
                self.master.nodes.clone(),
            );
            r.register(
                "shardmaster_group_ranges",
                "Ranges each group owns in the latest configuration",
                self.master.group_ranges.clone(),
            );
            r.register_with_unit(
                "shardmaster_group_size",
                "Bytes of the ranges each group owns, as its leader last reported them (0 on a follower, which receives no reports)",
                Unit::Bytes,
                self.master.group_bytes.clone(),
            );
        }
        r
    }
}

/// Reads the storage engine's sizes at scrape time: nothing on the write path.
#[derive(Debug)]
struct StorageCollector;

impl prometheus_client::collector::Collector for StorageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = metrics().storage.get() else {
            return Ok(());
        };
        let s = stats.sample();
        let gauges = [
            (
                "storage_disk",
                "Disk space of the node's database (tables and journals)",
                Some(Unit::Bytes),
                s.disk_bytes,
            ),
            (
                "storage_memtable",
                "Bytes in the write buffers (memtables) not yet flushed",
                Some(Unit::Bytes),
                s.memtable_bytes,
            ),
            (
                "storage_journals",
                "Journal files on disk",
                None,
                s.journals,
            ),
            (
                "storage_active_compactions",
                "Compactions running now",
                None,
                s.active_compactions,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric =
                encoder.encode_descriptor(name, help, unit.as_ref(), gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let counter = ConstCounter::new(s.compactions_completed);
        let metric = encoder.encode_descriptor(
            "storage_compactions",
            "Compactions completed since the process started",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// A range's labels: its bounds, bytes escaped as in a Rust byte string (an empty
/// end is +infinity).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RangeLabels {
    start: String,
    end: String,
}

impl RangeLabels {
    fn of(stats: &RangeStats) -> RangeLabels {
        let escape = |b: &[u8]| b.escape_ascii().to_string();
        let range = stats.range.clone().unwrap_or_default();
        RangeLabels {
            start: escape(&range.start),
            end: escape(&range.end),
        }
    }
}

/// Reads the ranges' size and load at scrape time from the table the placement
/// statistics keep (`kvnode/stats.rs`): one series per range this leader owns,
/// gone with the range once it splits or moves.
#[derive(Debug)]
struct RangeCollector;

type RangeGauge = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&RangeStats) -> Option<f64>,
);

impl prometheus_client::collector::Collector for RangeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = metrics().ranges.get() else {
            return Ok(());
        };
        let ranges = source();
        let labels: Vec<RangeLabels> = ranges.iter().map(RangeLabels::of).collect();
        let gauges: [RangeGauge; 4] = [
            (
                "range_keys",
                "Keys in a range this group's leader owns (once counted)",
                None,
                |s| s.sized.then_some(s.keys as f64),
            ),
            (
                "range_size",
                "Bytes of keys and values in a range this group's leader owns (once counted)",
                Some(Unit::Bytes),
                |s| s.sized.then_some(s.bytes as f64),
            ),
            (
                "range_reads_per_second",
                "Reads of a range over the last 10 s (each key of a Get or Batch, each Scan page)",
                None,
                |s| Some(s.reads_per_sec),
            ),
            (
                "range_writes_per_second",
                "Client writes applied to a range over the last 10 s",
                None,
                |s| Some(s.writes_per_sec),
            ),
        ];
        for (name, help, unit, value) in gauges {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (stats, labels) in ranges.iter().zip(&labels) {
                if let Some(v) = value(stats) {
                    ConstGauge::new(v).encode(metric.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` in the background, with the metrics of a
/// process of `role`; returns the address bound (`addr` may have port 0).
pub async fn serve(addr: SocketAddr, role: &str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-listen): {e}"))?;
    let bound = listener.local_addr()?;
    let registry = std::sync::Arc::new(metrics().registry(role));
    let app = axum::Router::new().route(
        "/metrics",
        // axum clones the handler, and with it the registry's Arc, per request.
        axum::routing::get(move || async move {
            for hook in metrics().scrape_hooks.lock().expect("poisoned").iter() {
                hook();
            }
            let mut body = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
                Ok(()) => (
                    [(
                        http::header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    body,
                )
                    .into_response(),
                Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

// ---------------------------------------------------------------------------
// gRPC requests: a tower layer on every gRPC server.

/// One method's series, created on first use so that the scrape lists only the
/// methods and codes that occurred.
struct MethodMetrics {
    labels: GrpcLabels,
    duration: OnceLock<Histogram>,
    /// By gRPC status code (0..=16).
    codes: [OnceLock<Counter>; 17],
}

impl MethodMetrics {
    fn new(service: &str, method: &str) -> MethodMetrics {
        MethodMetrics {
            labels: GrpcLabels {
                service: service.to_owned(),
                method: method.to_owned(),
            },
            duration: OnceLock::new(),
            codes: Default::default(),
        }
    }

    fn record(&self, code: tonic::Code, elapsed: f64) {
        let m = metrics();
        self.duration
            .get_or_init(|| m.grpc_duration.get_or_create_owned(&self.labels))
            .observe(elapsed);
        let i = (code as usize).min(self.codes.len() - 1);
        self.codes[i]
            .get_or_init(|| {
                m.grpc_requests.get_or_create_owned(&GrpcCodeLabels {
                    service: self.labels.service.clone(),
                    method: self.labels.method.clone(),
                    code: code_name(code),
                })
            })
            .inc();
    }
}

/// The canonical name of a gRPC status code, as other exporters label it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Every method a server here can serve, by path (`/shardkv.v1.Kv/Put`), read from
/// the compiled descriptors; any other path counts as `other`.
static METHODS: LazyLock<(HashMap<String, MethodMetrics>, MethodMetrics)> = LazyLock::new(|| {
    use prost::Message;
    let mut methods = HashMap::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set).expect("compiled descriptor set");
        for file in set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{full}/{}", method.name());
                    methods.insert(path, MethodMetrics::new(&full, method.name()));
                }
            }
        }
    }
    (methods, MethodMetrics::new("other", "other"))
});

fn method_metrics(path: &str) -> &'static MethodMetrics {
    let (known, other) = &*METHODS;
    known.get(path).unwrap_or(other)
}

/// Counts and times every call of the gRPC server it wraps.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Timed<S::Future> {
        Timed {
            method: method_metrics(request.uri().path()),
            start: Instant::now(),
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future, recording the call when it resolves.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        method: &'static MethodMetrics,
        start: Instant,
    }
}

impl<F, RB, E> Future for Timed<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        // A failed call is answered trailers-only: its status is in the headers.
        // Without one the call succeeded (or is a stream, whose status comes later).
        let code = match &result {
            Ok(response) => response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from),
            Err(_) => tonic::Code::Unknown,
        };
        this.method.record(code, this.start.elapsed().as_secs_f64());
        Poll::Ready(result)
    }
}

// ---------------------------------------------------------------------------
// HTTP requests: an axum middleware on the router.

/// Counts and times one request of the HTTP router.
pub async fn http_middleware(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = match *request.method() {
        http::Method::GET => "GET",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::POST => "POST",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let start = Instant::now();
    let response = next.run(request).await;
    let m = metrics();
    m.http_duration
        .get_or_create(&HttpMethodLabels { method })
        .observe(start.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            method,
            code: response.status().as_u16(),
        })
        .inc();
    response
}
