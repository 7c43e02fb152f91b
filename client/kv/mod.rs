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

mod routing;
mod scan;
mod session;

pub use crate::client::Error;
pub use scan::Scanner;

use super::master::MasterClient;
use crate::config::MAX_KEY_BYTES;
use crate::proto::batch_op::Op;
use crate::proto::batch_result::Result as OpResult;
use crate::proto::{CompareAndSwapRequest, Config, DeleteRequest, GetRequest, PutRequest};
use crate::security::Dialer;
use routing::{unexpected, Server};
use scan::ScanCursor;
use session::{Session, WriteTicket};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Most writes of one client whose seq may be outstanding at once (from the lowest
/// unanswered one to the newest). Servers remember the replies of at most this many
/// writes per client; keeping within it means a retried write is always recognised.
pub const MAX_WRITES_IN_FLIGHT: u64 = 256;

/// Interval of HTTP/2 pings on a connection, and how long a ping may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Most pairs the servers return in one scan page.
pub const MAX_SCAN_PAGE: u32 = 10_000;

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
    pub async fn connect(masters: &[String]) -> Result<Client, Error> {
        Client::connect_with(masters, ClientOptions::default()).await
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with(masters: &[String], options: ClientOptions) -> Result<Client, Error> {
        if !(1..=MAX_SCAN_PAGE).contains(&options.scan_page_size) {
            return Err(Error::invalid(
                "scan_page_size",
                format!("must be between 1 and {MAX_SCAN_PAGE}"),
                MAX_SCAN_PAGE.into(),
            ));
        }
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
            Ok(Err(e)) => return Err(e),
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
