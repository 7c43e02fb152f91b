//! The shardkv client library: reads and writes keys anywhere in the cluster.
//!
//! A [`Client`] caches the latest configuration from the shard master, sends each
//! request to the leader of the replica group that owns the key, and hides the
//! cluster's moving parts: it follows not-leader hints, tries the other members of a
//! group when one is down, refreshes the configuration when a range has moved, and
//! retries with backoff until the call's deadline ([`ClientOptions::call_deadline`]).
//!
//! Writes are deduplicated by the servers: every write carries this client's
//! random id and a sequence number that a retry reuses, so a write whose reply was
//! lost is applied once even though it was sent twice.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use shardkv::client::kv::Client;
//! let client = Client::connect(&["127.0.0.1:7001".to_owned()]).await?;
//! client.put(b"apple", b"red").await?;
//! assert_eq!(client.get(b"apple").await?, Some(b"red".to_vec()));
//! for (key, value) in client.scan(b"a", b"b", 100).await? {
//!     println!("{key:?} = {value:?}");
//! }
//! # Ok(())
//! # }
//! ```

use super::coalesce::Coalescer;
use super::master::MasterClient;
use super::retry::backoff;
use crate::config::MAX_KEY_BYTES;
use crate::proto::batch_op::Op;
use crate::proto::batch_result::Result as OpResult;
use crate::proto::error_detail::Kind;
use crate::proto::kv_client::KvClient;
use crate::proto::{
    CompareAndSwapRequest, Config, DeleteRequest, GetRequest, PutRequest, RequestId, ScanRequest,
};
use crate::security::{Dialer, SecureChannel};
use crate::status;
use backon::BackoffBuilder;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::{Code, Status};

/// Most writes of one client whose seq may be outstanding at once (from the lowest
/// unanswered one to the newest). Servers remember the replies of at most this many
/// writes per client; keeping within it means a retried write is always recognised.
pub const MAX_WRITES_IN_FLIGHT: u64 = 256;

/// Interval of HTTP/2 pings on a connection, and how long a ping may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Most pairs the servers return in one scan page.
pub const MAX_SCAN_PAGE: u32 = 10_000;

/// Errors of the data calls. Each message says what happened in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request broke a rule (nothing was changed): `field` is the request field
    /// at fault, `reason` what was wrong with it and `limit` the limit broken, if any
    /// (bytes or a count; 0 when there is none).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, e.g. `key`.
        field: String,
        /// What was wrong, e.g. `must not be empty`.
        reason: String,
        /// The limit broken, in bytes or items; 0 when there is none.
        limit: u64,
    },
    /// The servers that could answer were unreachable (or no group owns the key)
    /// until the deadline passed. A write's outcome is unknown.
    #[error("{0}")]
    Unavailable(String),
    /// Servers answered, but the call did not complete before its deadline (an
    /// election, a range transfer or a lost quorum took too long). A write's outcome is
    /// unknown.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// An unexpected answer; retrying does not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    fn invalid(field: &str, reason: impl Into<String>, limit: u64) -> Error {
        Error::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
            limit,
        }
    }
}

/// One key and its value, as a scan returns them.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Tuning of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long one call (a get, a put, one scan page, ...) may take in all, retries
    /// included, before it fails. Default 10 s.
    pub call_deadline: Duration,
    /// How long one attempt at one server may take before the next attempt. Default
    /// 6 s (a server gives up on a request it cannot complete after 5 s).
    pub attempt_timeout: Duration,
    /// How long opening a connection may take. Default 1 s.
    pub connect_timeout: Duration,
    /// Pairs asked for per scan request (at most [`MAX_SCAN_PAGE`]). Default 1000.
    pub scan_page_size: u32,
    /// Largest reply accepted, in bytes. Default 64 MiB. A scan page larger than this
    /// is asked for again with fewer pairs.
    pub max_reply_bytes: usize,
    /// Gets, puts, deletes and compare-and-swaps outstanding to the same server go
    /// out together in one Batch call, with at most this many such calls in flight
    /// per server; 0 sends each request as its own call. Default 2.
    pub batch_calls_per_server: usize,
    /// How connections are made: plaintext by default; TLS trusting a CA, a client
    /// certificate and a bearer token with [`Dialer::with_ca_pem`],
    /// [`Dialer::with_identity_pem`] and [`Dialer::with_token`].
    pub dialer: Dialer,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_secs(1),
            scan_page_size: 1000,
            max_reply_bytes: 64 << 20,
            batch_calls_per_server: 2,
            dialer: Dialer::default(),
        }
    }
}

/// The result of [`Client::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// True if the key had the expected value (or absence) and was changed.
    pub swapped: bool,
    /// The key's value after the call (`None`: the key does not exist).
    pub current: Option<Vec<u8>>,
}

/// A connection to a shardkv cluster. Cheap to clone (clones share connections,
/// the cached configuration and the write session) and usable from many tasks at
/// once.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    masters: MasterClient,
    master_addrs: String,
    options: ClientOptions,
    config: RwLock<Arc<Config>>,
    /// Held while asking the shard master, so concurrent callers share one query.
    refreshing: tokio::sync::Mutex<()>,
    /// Per group: the address tried first (the last known leader).
    preferred: Mutex<HashMap<u64, String>>,
    servers: Mutex<HashMap<String, Server>>,
    session: Session,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("masters", &self.inner.master_addrs)
            .field("client_id", &self.inner.session.client_id)
            .field("config_num", &self.config().num)
            .finish()
    }
}

impl Client {
    /// Connects to the cluster whose shard-master replicas are at `masters`
    /// (`host:port` each) with default [`ClientOptions`], and fetches the latest
    /// configuration. Fails if no shard master answers within the call deadline.
    pub async fn connect(masters: &[String]) -> anyhow::Result<Client> {
        Client::connect_with(masters, ClientOptions::default()).await
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with(
        masters: &[String],
        options: ClientOptions,
    ) -> anyhow::Result<Client> {
        anyhow::ensure!(!masters.is_empty(), "no shard master address given");
        anyhow::ensure!(
            (1..=MAX_SCAN_PAGE).contains(&options.scan_page_size),
            "scan_page_size must be between 1 and {MAX_SCAN_PAGE}"
        );
        let client = Client {
            inner: Arc::new(Inner {
                masters: MasterClient::new(masters, options.call_deadline, &options.dialer)?,
                master_addrs: masters.join(","),
                options,
                config: RwLock::new(Arc::new(Config::initial())),
                refreshing: tokio::sync::Mutex::new(()),
                preferred: Mutex::new(HashMap::new()),
                servers: Mutex::new(HashMap::new()),
                session: Session::new(random_client_id()),
            }),
        };
        client.refresh().await?;
        Ok(client)
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The random id that identifies this client's writes to the servers.
    pub fn client_id(&self) -> u64 {
        self.inner.session.client_id
    }

    /// The cached configuration (the latest this client has seen; calls refresh it
    /// when servers say it is out of date).
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.read().expect("config lock").clone()
    }

    /// Fetches the latest configuration from the shard master, caches it and returns it.
    pub async fn refresh(&self) -> Result<Arc<Config>, Error> {
        let seen = self.config().num;
        // The shard master client stops at the call deadline itself, saying why no
        // replica answered (a refused TLS handshake, say): let it end first.
        let grace = Duration::from_millis(500);
        let deadline = Instant::now() + self.inner.options.call_deadline + grace;
        self.refresh_after(seen, deadline).await
    }

    /// Refreshes the configuration unless another caller already moved past `seen`.
    async fn refresh_after(&self, seen: u64, deadline: Instant) -> Result<Arc<Config>, Error> {
        let _one_at_a_time = self.inner.refreshing.lock().await;
        let current = self.config();
        if current.num > seen {
            return Ok(current);
        }
        let query = self.inner.masters.query(None);
        let fresh = match tokio::time::timeout_at(deadline, query).await {
            Ok(Ok(config)) => config,
            Ok(Err(e)) => return Err(self.master_error(&e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "cannot reach the shard master at {}: no answer before the deadline",
                    self.inner.master_addrs
                )))
            }
        };
        let mut cached = self.inner.config.write().expect("config lock");
        if fresh.num >= cached.num {
            *cached = Arc::new(fresh);
        }
        Ok(cached.clone())
    }

    fn master_error(&self, e: &Status) -> Error {
        match e.code() {
            Code::DeadlineExceeded => Error::Unavailable(format!(
                "cannot reach the shard master at {}: {}",
                self.inner.master_addrs,
                e.message()
            )),
            Code::Unavailable | Code::Cancelled | Code::Unknown => Error::Unavailable(format!(
                "cannot reach the shard master at {}: {}",
                self.inner.master_addrs,
                transport_message(e)
            )),
            _ => Error::Internal(format!("the shard master answered: {}", e.message())),
        }
    }

    /// The value of `key`, or `None` if it does not exist. Linearizable.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        check_key("key", key)?;
        let op = || Op::Get(GetRequest { key: key.to_vec() });
        match self.call_op(key, "get", op).await? {
            OpResult::Get(reply) => Ok(reply.found.then_some(reply.value)),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `value`. Applied exactly once even if retried.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        check_key("key", key)?;
        let ticket = self.begin_write().await?;
        let op = || {
            Op::Put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                id: Some(ticket.id()),
            })
        };
        match self.call_op(key, "put", op).await? {
            OpResult::Put(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, Error> {
        check_key("key", key)?;
        let ticket = self.begin_write().await?;
        let op = || {
            Op::Delete(DeleteRequest {
                key: key.to_vec(),
                id: Some(ticket.id()),
            })
        };
        match self.call_op(key, "delete", op).await? {
            OpResult::Delete(reply) => Ok(reply.existed),
            other => Err(unexpected(other)),
        }
    }

    /// Atomically: if `key`'s value is `expected` (`None`: the key does not exist),
    /// sets it to `new` (`None`: deletes it). The outcome says whether it swapped and
    /// the key's value afterwards.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, Error> {
        check_key("key", key)?;
        let ticket = self.begin_write().await?;
        let op = || {
            Op::Cas(CompareAndSwapRequest {
                key: key.to_vec(),
                expected: expected.map(<[u8]>::to_vec),
                value: new.map(<[u8]>::to_vec),
                id: Some(ticket.id()),
            })
        };
        match self.call_op(key, "compare-and-swap", op).await? {
            OpResult::Cas(reply) => Ok(CasOutcome {
                swapped: reply.swapped,
                current: reply.found.then_some(reply.current),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The pairs with keys in `[start, end)` in key order, across ranges and groups;
    /// an empty `start` is the beginning of the key space, an empty `end` is its end.
    /// At most `limit` pairs (0: no limit — mind memory; see [`Client::scan_pages`]).
    ///
    /// Each page is a linearizable read of its part of the key space; the scan as a
    /// whole is not a snapshot (writes made while it runs may or may not be seen).
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, Error> {
        let mut scanner = self.scan_pages(start, end, limit);
        let mut all = Vec::new();
        while let Some(page) = scanner.next_page().await? {
            all.extend(page);
        }
        Ok(all)
    }

    /// Like [`Client::scan`], one page at a time, holding one page in memory: call
    /// [`Scanner::next_page`] until it returns `None`, or turn it into a stream with
    /// [`Scanner::into_stream`]. Pages hold at most
    /// [`ClientOptions::scan_page_size`] pairs.
    pub fn scan_pages(&self, start: &[u8], end: &[u8], limit: usize) -> Scanner {
        Scanner {
            client: self.clone(),
            cursor: ScanCursor::new(start, end, limit),
            page_size: self.inner.options.scan_page_size,
        }
    }

    /// Waits for room in the write window, then takes the next seq.
    async fn begin_write(&self) -> Result<WriteTicket, Error> {
        let deadline = Instant::now() + self.inner.options.call_deadline;
        match tokio::time::timeout_at(deadline, self.inner.session.begin()).await {
            Ok(ticket) => Ok(WriteTicket {
                client: self.clone(),
                seq: ticket,
            }),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "{MAX_WRITES_IN_FLIGHT} earlier writes of this client are still unanswered"
            ))),
        }
    }

    /// The connection to `addr` (made on first use, then shared by every call).
    fn server(&self, addr: &str) -> Result<Server, Error> {
        let mut servers = self.inner.servers.lock().expect("servers lock");
        if let Some(server) = servers.get(addr) {
            return Ok(server.clone());
        }
        let options = &self.inner.options;
        let endpoint = options
            .dialer
            .endpoint(addr)
            .map_err(|e| Error::Internal(format!("bad server address {addr:?}: {e}")))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            // Notice a server that stopped answering (hung, or its host gone) without
            // waiting for the attempt timeout.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel = options.dialer.connect_lazy(endpoint);
        let kv = KvClient::new(channel)
            .max_decoding_message_size(options.max_reply_bytes)
            .max_encoding_message_size(usize::MAX);
        let coalescer = (options.batch_calls_per_server > 0).then(|| {
            Coalescer::start(
                kv.clone(),
                options.batch_calls_per_server,
                options.attempt_timeout,
            )
        });
        let server = Server { kv, coalescer };
        servers.insert(addr.to_owned(), server.clone());
        Ok(server)
    }

    /// The address to try first in group `gid`.
    fn pick(&self, gid: u64, config: &Config) -> Option<String> {
        let preferred = self.inner.preferred.lock().expect("preferred lock");
        if let Some(addr) = preferred.get(&gid) {
            return Some(addr.clone());
        }
        config.group(gid)?.nodes.first().map(|n| n.addr.clone())
    }

    fn prefer(&self, gid: u64, addr: &str) {
        let mut preferred = self.inner.preferred.lock().expect("preferred lock");
        preferred.insert(gid, addr.to_owned());
    }

    /// After `addr` failed, moves group `gid` on to its next member (unless another
    /// task already did).
    fn skip(&self, gid: u64, addr: &str, config: &Config) {
        let Some(group) = config.group(gid) else {
            return;
        };
        let mut preferred = self.inner.preferred.lock().expect("preferred lock");
        if preferred.get(&gid).is_some_and(|p| p != addr) {
            return;
        }
        let next = match group.nodes.iter().position(|n| n.addr == addr) {
            Some(i) => &group.nodes[(i + 1) % group.nodes.len()],
            None => &group.nodes[0],
        };
        preferred.insert(gid, next.addr.clone());
    }

    /// Runs the single-key request `op` makes at the leader of the group owning
    /// `key`, as [`Client::call`] does.
    async fn call_op(
        &self,
        key: &[u8],
        what: &str,
        op: impl Fn() -> Op,
    ) -> Result<OpResult, Error> {
        self.call(key, what, |server| server.run(op())).await
    }

    /// Runs `op` at the leader of the group owning `key`, retrying until it succeeds,
    /// fails for good, or the call deadline passes.
    async fn call<T, F, Fut>(&self, key: &[u8], what: &str, op: F) -> Result<T, Error>
    where
        F: Fn(Server) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let options = &self.inner.options;
        let deadline = Instant::now() + options.call_deadline;
        let mut delays = backoff().build();
        let mut last;
        let mut quick_hops = 0;
        // The group a frozen source sent us to, for the next attempt only.
        let mut hinted: Option<u64> = None;
        loop {
            let config = self.config();
            let owner = config.owner(key).1;
            let gid = hinted.take().unwrap_or(owner);
            let mut wait = true;
            let mut cutover = false;
            if gid == 0 {
                last = Failure::NoOwner(config.num);
                if let Err(e) = self.refresh_after(config.num, deadline).await {
                    last = Failure::Master(e);
                }
                if self.config().num > config.num {
                    wait = false;
                }
            } else if let Some(addr) = self.pick(gid, &config) {
                let attempt = options
                    .attempt_timeout
                    .min(deadline.saturating_duration_since(Instant::now()));
                let result = match self.server(&addr) {
                    Ok(server) => tokio::time::timeout(attempt, op(server)).await,
                    Err(e) => return Err(e),
                };
                let status = match result {
                    Ok(Ok(reply)) => {
                        self.prefer(gid, &addr);
                        if gid != owner {
                            // Served by the group a cutover handed the range to: our
                            // configuration is behind, so learn the new one.
                            let (client, seen) = (self.clone(), config.num);
                            let by = Instant::now() + options.attempt_timeout;
                            tokio::spawn(async move { client.refresh_after(seen, by).await });
                        }
                        return Ok(reply);
                    }
                    Ok(Err(status)) => status,
                    Err(_) => Status::deadline_exceeded(format!("no answer within {attempt:?}")),
                };
                match classify(&status) {
                    Action::Fail(e) => return Err(e),
                    Action::Redirect(hint) => {
                        last = Failure::Busy(gid, addr.clone(), status.message().to_owned());
                        if hint != addr && quick_hops < 3 {
                            // Go straight to the hinted leader.
                            quick_hops += 1;
                            wait = false;
                        }
                        self.prefer(gid, &hint);
                    }
                    Action::NextNode { reached } => {
                        last = if reached {
                            Failure::Busy(gid, addr.clone(), status.message().to_owned())
                        } else {
                            Failure::Unreachable(gid, addr.clone(), transport_message(&status))
                        };
                        self.skip(gid, &addr, &config);
                        if !reached {
                            // The group may have left and been shut down: no node of
                            // it will ever answer wrong-group, so ask the shard master.
                            // Best effort, bounded like one attempt: an unreachable
                            // master must not hold up trying the group's other nodes.
                            let by = deadline.min(Instant::now() + options.attempt_timeout);
                            if let Ok(fresh) = self.refresh_after(config.num, by).await {
                                if fresh.owner(key).1 != gid {
                                    wait = false;
                                }
                            }
                        }
                    }
                    Action::WrongGroup {
                        num,
                        moving_to: Some(dest),
                    } if dest != gid && config.group(dest).is_some() => {
                        // A live move's cutover froze the range here: its destination
                        // holds requests until it serves them, so go there now rather
                        // than wait for the shard master to say so.
                        last = Failure::Moving(gid, num);
                        hinted = Some(dest);
                        cutover = true;
                        if quick_hops < 3 {
                            quick_hops += 1;
                            wait = false;
                        }
                    }
                    Action::WrongGroup { num, .. } => {
                        last = Failure::Moving(gid, num);
                        if num >= config.num {
                            // The configuration moved on: ask the shard master.
                            match self.refresh_after(config.num, deadline).await {
                                Ok(fresh) if fresh.owner(key).1 != gid => wait = false,
                                // A live move's source has frozen the range: the
                                // configuration that gives it away is a few ms off.
                                Ok(fresh) if moving(&fresh, key) => cutover = true,
                                Ok(_) => {} // the range is still arriving: wait
                                Err(e) => last = Failure::Master(e),
                            }
                        }
                        // Otherwise the node is behind our configuration: wait for it.
                    }
                }
            } else {
                return Err(Error::Internal(format!(
                    "configuration {} assigns a range to group {gid}, which has no members",
                    config.num
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(last.into_error(what, options.call_deadline));
            }
            if wait {
                quick_hops = 0;
                let delay = if cutover {
                    CUTOVER_RETRY
                } else {
                    delays.next().unwrap_or(Duration::from_millis(500))
                };
                tokio::time::sleep_until((now + delay).min(deadline)).await;
                if Instant::now() >= deadline {
                    return Err(last.into_error(what, options.call_deadline));
                }
            }
        }
    }
}

/// Between two tries of a key whose range is in a live move's cutover.
const CUTOVER_RETRY: Duration = Duration::from_millis(5);

/// True if `config` has a live move of the range holding `key`.
fn moving(config: &Config, key: &[u8]) -> bool {
    config
        .moves
        .iter()
        .any(|p| p.range.as_ref().is_some_and(|r| r.contains(key)))
}

/// One server's connection, and its request coalescer unless batching is off.
#[derive(Clone)]
struct Server {
    kv: KvClient<SecureChannel>,
    coalescer: Option<Coalescer>,
}

impl Server {
    /// Sends one single-key request, batched with others if batching is on.
    async fn run(self, op: Op) -> Result<OpResult, Status> {
        if let Some(coalescer) = &self.coalescer {
            return coalescer.call(op).await;
        }
        let mut kv = self.kv;
        Ok(match op {
            Op::Get(r) => OpResult::Get(kv.get(r).await?.into_inner()),
            Op::Put(r) => OpResult::Put(kv.put(r).await?.into_inner()),
            Op::Delete(r) => OpResult::Delete(kv.delete(r).await?.into_inner()),
            Op::Cas(r) => OpResult::Cas(kv.compare_and_swap(r).await?.into_inner()),
        })
    }
}

fn unexpected(result: OpResult) -> Error {
    Error::Internal(format!("the server answered with {result:?}"))
}

/// What went wrong last in a retried call, for the error at the deadline.
enum Failure {
    NoOwner(u64),
    Master(Error),
    Unreachable(u64, String, String),
    Busy(u64, String, String),
    Moving(u64, u64),
}

impl Failure {
    fn into_error(self, what: &str, deadline: Duration) -> Error {
        let within = format!("{what} did not complete within {deadline:?}");
        match self {
            Failure::NoOwner(num) => Error::Unavailable(format!(
                "{within}: no replica group serves the key (configuration {num} has no groups; join one first)"
            )),
            Failure::Master(e) => e,
            Failure::Unreachable(gid, addr, e) => Error::Unavailable(format!(
                "{within}: cannot reach group {gid} (last tried {addr}: {e})"
            )),
            Failure::Busy(gid, addr, e) => Error::DeadlineExceeded(format!(
                "{within}: group {gid} did not answer (last tried {addr}: {e})"
            )),
            Failure::Moving(gid, num) => Error::DeadlineExceeded(format!(
                "{within}: the key's range is moving to or from group {gid} (it is at configuration {num})"
            )),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Give up with this error.
    Fail(Error),
    /// Retry at the hinted leader.
    Redirect(String),
    /// Retry at the group's next member; `reached` is false for a transport failure.
    NextNode { reached: bool },
    /// The server does not serve the key; it has applied configuration `num`. A live
    /// move's frozen source names the group the key's range is going to.
    WrongGroup { num: u64, moving_to: Option<u64> },
}

fn classify(status: &Status) -> Action {
    match status::detail(status) {
        Some(Kind::NotLeader(hint)) if !hint.leader_addr.is_empty() => {
            return Action::Redirect(hint.leader_addr)
        }
        Some(Kind::NotLeader(_)) => return Action::NextNode { reached: true },
        Some(Kind::WrongGroup(w)) => {
            return Action::WrongGroup {
                num: w.config_num,
                moving_to: (w.moving_to != 0).then_some(w.moving_to),
            }
        }
        Some(Kind::InvalidArgument(a)) => {
            return Action::Fail(Error::InvalidArgument {
                field: a.field,
                reason: a.reason,
                limit: a.limit,
            })
        }
        None => {}
    }
    match status.code() {
        Code::InvalidArgument => Action::Fail(Error::invalid("request", status.message(), 0)),
        // The server's transport refused a message larger than it accepts.
        Code::OutOfRange => Action::Fail(Error::invalid(
            "request",
            format!("refused by the server: {}", status.message()),
            0,
        )),
        Code::Unavailable if is_transport(status) => Action::NextNode { reached: false },
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => {
            Action::NextNode { reached: true }
        }
        Code::Unknown => Action::NextNode { reached: false },
        _ => Action::Fail(Error::Internal(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

/// True if the status was made by the client's transport (the server was not reached).
fn is_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some() || status.message().contains("transport error")
}

/// A transport status's message with its causes ("tcp connect error: Connection refused").
/// `status`'s message with the causes under it (a refused TLS handshake says why there).
pub(crate) fn transport_message(status: &Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) && text != "transport error" {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

fn check_key(field: &str, key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid(field, "must not be empty", 1));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, longer than {MAX_KEY_BYTES}", key.len()),
            MAX_KEY_BYTES as u64,
        ));
    }
    Ok(())
}

fn random_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

// ---------------------------------------------------------------------------
// Write sessions.

/// Sequence numbers of one client's writes, and which are still unanswered.
struct Session {
    client_id: u64,
    state: Mutex<SeqWindow>,
    room: Notify,
}

impl Session {
    fn new(client_id: u64) -> Session {
        Session {
            client_id,
            state: Mutex::new(SeqWindow::new(MAX_WRITES_IN_FLIGHT)),
            room: Notify::new(),
        }
    }

    async fn begin(&self) -> u64 {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(seq) = self.state.lock().expect("session lock").begin() {
                return seq;
            }
            room.await;
        }
    }

    fn finish(&self, seq: u64) {
        self.state.lock().expect("session lock").finish(seq);
        self.room.notify_waiters();
    }

    fn request_id(&self, seq: u64) -> RequestId {
        RequestId {
            client_id: self.client_id,
            seq,
            first_incomplete: self.state.lock().expect("session lock").first_incomplete(),
        }
    }
}

/// The seq of one write; when dropped (answered, failed or abandoned) the write no
/// longer holds back `first_incomplete`.
struct WriteTicket {
    client: Client,
    seq: u64,
}

impl WriteTicket {
    fn id(&self) -> RequestId {
        self.client.inner.session.request_id(self.seq)
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.client.inner.session.finish(self.seq);
    }
}

/// Pure seq bookkeeping: seqs start at 1 and increase; `first_incomplete` is the
/// lowest seq in flight, or the next seq when none is, so it never decreases; at
/// most `window` seqs (from `first_incomplete` up) are outstanding.
#[derive(Debug)]
struct SeqWindow {
    next: u64,
    in_flight: BTreeSet<u64>,
    window: u64,
}

impl SeqWindow {
    fn new(window: u64) -> SeqWindow {
        SeqWindow {
            next: 1,
            in_flight: BTreeSet::new(),
            window,
        }
    }

    /// The next seq, or `None` while the window is full.
    fn begin(&mut self) -> Option<u64> {
        if self.next - self.first_incomplete() >= self.window {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        self.in_flight.insert(seq);
        Some(seq)
    }

    fn finish(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
    }

    fn first_incomplete(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

// ---------------------------------------------------------------------------
// Scans.

/// A scan in progress, page by page; made by [`Client::scan_pages`].
#[derive(Debug)]
pub struct Scanner {
    client: Client,
    cursor: ScanCursor,
    page_size: u32,
}

impl Scanner {
    /// Asks for at most `page_size` pairs per request (1..=[`MAX_SCAN_PAGE`]).
    pub fn with_page_size(mut self, page_size: u32) -> Scanner {
        self.page_size = page_size.clamp(1, MAX_SCAN_PAGE);
        self
    }

    /// The next non-empty page of pairs in key order, or `None` when the scan is done.
    /// Each page is fetched within the call deadline; after an error, calling again
    /// retries the same page.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Pair>>, Error> {
        while let Some(request) = self.cursor.request(self.page_size)? {
            let (pairs, resume) = self.fetch(request).await?;
            let page = self.cursor.advance(pairs, resume)?;
            if !page.is_empty() {
                return Ok(Some(page));
            }
        }
        Ok(None)
    }

    /// The pages as a stream; it ends after the last page or the first error.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Vec<Pair>, Error>> + Send {
        futures::stream::unfold(Some(self), |scanner| async move {
            let mut scanner = scanner?;
            match scanner.next_page().await {
                Ok(Some(page)) => Some((Ok(page), Some(scanner))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// One scan request at the owner of its start; a reply too large to accept is
    /// asked for again with fewer pairs.
    async fn fetch(&mut self, request: ScanRequest) -> Result<(Vec<Pair>, Vec<u8>), Error> {
        let limit = std::sync::atomic::AtomicU32::new(request.limit);
        let start = request.start.clone();
        let reply = self
            .client
            .call(&start, "scan", |server| {
                let mut kv = server.kv;
                let mut request = request.clone();
                let limit = &limit;
                async move {
                    loop {
                        request.limit = limit.load(std::sync::atomic::Ordering::Relaxed);
                        match kv.scan(request.clone()).await {
                            Err(s) if s.code() == Code::OutOfRange && request.limit > 1 => {
                                limit.store(request.limit / 2, std::sync::atomic::Ordering::Relaxed)
                            }
                            result => return Ok(result?.into_inner()),
                        }
                    }
                }
            })
            .await?;
        let shrunk = limit.into_inner();
        if shrunk < self.page_size {
            self.page_size = shrunk.max(1);
        }
        let pairs = reply
            .pairs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        Ok((pairs, reply.resume))
    }
}

/// Pure scan bookkeeping: where the next request starts, and checks that the pages
/// the servers return fit together (in order, inside the scan, always advancing).
#[derive(Debug, Clone)]
struct ScanCursor {
    /// Start of the next request; empty means the beginning of the key space.
    next: Vec<u8>,
    end: Vec<u8>,
    /// Pairs still wanted (`None`: no limit).
    remaining: Option<usize>,
    done: bool,
    /// Checked by the first request: an `end` not after `start` is refused.
    invalid: Option<Error>,
}

impl ScanCursor {
    fn new(start: &[u8], end: &[u8], limit: usize) -> ScanCursor {
        let invalid = if !end.is_empty() && end <= start {
            Some(Error::invalid("end", "must be after start", 0))
        } else if start.len() > MAX_KEY_BYTES {
            check_key("start", start).err()
        } else {
            None
        };
        ScanCursor {
            next: start.to_vec(),
            end: end.to_vec(),
            remaining: (limit != 0).then_some(limit),
            done: false,
            invalid,
        }
    }

    /// The next request to send, or `None` when the scan is complete.
    fn request(&mut self, page_size: u32) -> Result<Option<ScanRequest>, Error> {
        if let Some(e) = self.invalid.take() {
            self.done = true;
            return Err(e);
        }
        if self.done || self.remaining == Some(0) {
            self.done = true;
            return Ok(None);
        }
        let start = self.next.clone();
        if !self.end.is_empty() && self.end <= start {
            self.done = true;
            return Ok(None);
        }
        let limit = match self.remaining {
            Some(r) => page_size.min(u32::try_from(r).unwrap_or(u32::MAX)),
            None => page_size,
        };
        Ok(Some(ScanRequest {
            start,
            end: self.end.clone(),
            limit,
        }))
    }

    /// Takes in a server's page; returns the pairs to hand out.
    fn advance(&mut self, mut pairs: Vec<Pair>, resume: Vec<u8>) -> Result<Vec<Pair>, Error> {
        let start = if self.next.is_empty() {
            vec![0]
        } else {
            self.next.clone()
        };
        let mut previous: Option<&[u8]> = None;
        for (key, _) in &pairs {
            let in_order = previous.is_none_or(|p| p < key.as_slice());
            let inside = key.as_slice() >= start.as_slice()
                && (self.end.is_empty() || key.as_slice() < self.end.as_slice());
            if !in_order || !inside {
                self.done = true;
                return Err(Error::Internal(format!(
                    "a scan page holds key {:?} out of order or outside the scan",
                    String::from_utf8_lossy(key)
                )));
            }
            previous = Some(key);
        }
        if let Some(remaining) = &mut self.remaining {
            pairs.truncate(*remaining);
            *remaining -= pairs.len();
        }
        if resume.is_empty() {
            self.done = true;
            return Ok(pairs);
        }
        let after_page = pairs
            .last()
            .is_none_or(|(k, _)| k.as_slice() < resume.as_slice());
        if resume <= start || !after_page {
            self.done = true;
            return Err(Error::Internal(format!(
                "a scan page says to resume at {:?}, which does not advance the scan",
                String::from_utf8_lossy(&resume)
            )));
        }
        self.next = resume;
        Ok(pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_incomplete_is_the_lowest_unanswered_seq() {
        let mut w = SeqWindow::new(256);
        assert_eq!(w.first_incomplete(), 1);
        let (a, b, c) = (w.begin().unwrap(), w.begin().unwrap(), w.begin().unwrap());
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(w.first_incomplete(), 1);
        w.finish(b);
        assert_eq!(w.first_incomplete(), 1, "an older write is still in flight");
        w.finish(a);
        assert_eq!(w.first_incomplete(), 3);
        w.finish(c);
        assert_eq!(w.first_incomplete(), 4, "none in flight: the next seq");
        assert_eq!(w.begin(), Some(4));
    }

    #[test]
    fn first_incomplete_never_decreases() {
        let mut w = SeqWindow::new(8);
        let mut in_flight = Vec::new();
        let mut last = 0;
        // A deterministic interleaving of begins and out-of-order finishes.
        for step in 0u64..500 {
            if step % 3 != 2 {
                if let Some(seq) = w.begin() {
                    in_flight.push(seq);
                }
            } else if !in_flight.is_empty() {
                let i = (step as usize * 7) % in_flight.len();
                w.finish(in_flight.swap_remove(i));
            }
            let fi = w.first_incomplete();
            assert!(fi >= last, "first_incomplete went back from {last} to {fi}");
            assert!(in_flight.iter().all(|&s| s >= fi));
            last = fi;
        }
    }

    #[test]
    fn the_window_bounds_outstanding_seqs() {
        let mut w = SeqWindow::new(3);
        let first = w.begin().unwrap();
        w.begin().unwrap();
        w.begin().unwrap();
        assert_eq!(w.begin(), None, "three outstanding from seq 1");
        w.finish(3);
        assert_eq!(w.begin(), None, "seq 1 still holds the window back");
        w.finish(first);
        assert_eq!(w.begin(), Some(4));
    }

    #[tokio::test]
    async fn a_full_window_waits_for_an_answer() {
        let session = Arc::new(Session {
            client_id: 7,
            state: Mutex::new(SeqWindow::new(2)),
            room: Notify::new(),
        });
        assert_eq!(session.begin().await, 1);
        assert_eq!(session.begin().await, 2);
        let waiter = tokio::spawn({
            let session = session.clone();
            async move { session.begin().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert_eq!(session.request_id(2).first_incomplete, 1);
        session.finish(1);
        assert_eq!(waiter.await.unwrap(), 3);
        let id = session.request_id(3);
        assert_eq!((id.client_id, id.seq, id.first_incomplete), (7, 3, 2));
    }

    fn pairs(keys: &[&str]) -> Vec<Pair> {
        keys.iter()
            .map(|k| (k.as_bytes().to_vec(), b"v".to_vec()))
            .collect()
    }

    /// Runs a scan against fake servers: `pages` maps a request start to the page.
    fn run_scan(
        start: &str,
        end: &str,
        limit: usize,
        page_size: u32,
        server: impl Fn(&ScanRequest) -> (Vec<Pair>, Vec<u8>),
    ) -> Result<Vec<String>, Error> {
        let mut cursor = ScanCursor::new(start.as_bytes(), end.as_bytes(), limit);
        let mut out = Vec::new();
        let mut requests = 0;
        while let Some(request) = cursor.request(page_size)? {
            requests += 1;
            assert!(requests < 100, "the scan does not end");
            assert!(request.limit >= 1 && request.limit <= page_size);
            let (page, resume) = server(&request);
            for (k, _) in cursor.advance(page, resume)? {
                out.push(String::from_utf8(k).unwrap());
            }
        }
        Ok(out)
    }

    /// A fake cluster: keys a..z in two groups split at "n"; a page stops at the
    /// group's range end or the limit.
    fn two_groups(request: &ScanRequest) -> (Vec<Pair>, Vec<u8>) {
        let keys: Vec<String> = ('a'..='z').map(|c| c.to_string()).collect();
        let range_end: &[u8] = if request.start.as_slice() < b"n".as_slice() {
            b"n"
        } else {
            b""
        };
        let stop = match (request.end.is_empty(), range_end.is_empty()) {
            (true, _) => range_end.to_vec(),
            (false, true) => request.end.clone(),
            (false, false) => request.end.clone().min(range_end.to_vec()),
        };
        let mut page = Vec::new();
        for k in keys.iter().map(|k| k.as_bytes()) {
            if k < request.start.as_slice() || (!stop.is_empty() && k >= stop.as_slice()) {
                continue;
            }
            if page.len() == request.limit as usize {
                return (page, k.to_vec());
            }
            page.push((k.to_vec(), b"v".to_vec()));
        }
        let resume = if stop == range_end && !range_end.is_empty() {
            range_end.to_vec()
        } else {
            Vec::new()
        };
        (page, resume)
    }

    #[test]
    fn scan_stitches_pages_across_groups_in_order() {
        let all: Vec<String> = ('a'..='z').map(|c| c.to_string()).collect();
        assert_eq!(run_scan("", "", 0, 4, two_groups).unwrap(), all);
        assert_eq!(run_scan("", "", 0, 1000, two_groups).unwrap(), all);
        assert_eq!(
            run_scan("k", "q", 0, 2, two_groups).unwrap(),
            ["k", "l", "m", "n", "o", "p"]
        );
        assert_eq!(
            run_scan("b", "", 5, 3, two_groups).unwrap(),
            ["b", "c", "d", "e", "f"]
        );
        assert_eq!(run_scan("m", "", 2, 10, two_groups).unwrap(), ["m", "n"]);
    }

    #[test]
    fn scan_starts_at_the_beginning_and_skips_empty_pages() {
        let out = run_scan("", "", 0, 10, |r| match r.start.as_slice() {
            b"" => (Vec::new(), b"g".to_vec()),
            b"g" => (pairs(&["h"]), b"t".to_vec()),
            b"t" => (Vec::new(), Vec::new()),
            other => panic!("unexpected start {other:?}"),
        })
        .unwrap();
        assert_eq!(out, ["h"]);
    }

    #[test]
    fn scan_refuses_bad_bounds_and_broken_pages() {
        assert!(matches!(
            run_scan("b", "a", 0, 10, two_groups),
            Err(Error::InvalidArgument { ref field, .. }) if field == "end"
        ));
        assert!(matches!(
            run_scan("a", "", 0, 10, |_| (pairs(&["c", "b"]), Vec::new())),
            Err(Error::Internal(_))
        ));
        assert!(matches!(
            run_scan("a", "", 0, 10, |r| (Vec::new(), r.start.clone())),
            Err(Error::Internal(_))
        ));
        assert!(matches!(
            run_scan("a", "f", 0, 10, |_| (pairs(&["g"]), Vec::new())),
            Err(Error::Internal(_))
        ));
    }

    #[test]
    fn statuses_map_to_actions() {
        let invalid = status::invalid_argument("key", "must not be empty", 1);
        assert_eq!(
            classify(&invalid),
            Action::Fail(Error::invalid("key", "must not be empty", 1))
        );
        assert_eq!(
            Error::invalid("key", "must not be empty", 1).to_string(),
            "key: must not be empty"
        );
        assert_eq!(
            classify(&status::wrong_group(4, 0, "moved".into())),
            Action::WrongGroup {
                num: 4,
                moving_to: None
            }
        );
        assert_eq!(
            classify(&status::wrong_group(4, 2, "frozen".into())),
            Action::WrongGroup {
                num: 4,
                moving_to: Some(2)
            }
        );
        assert_eq!(
            classify(&Status::unavailable("no leader")),
            Action::NextNode { reached: true }
        );
        assert!(matches!(
            classify(&Status::internal("boom")),
            Action::Fail(Error::Internal(_))
        ));
    }
}
