//! Routing: each request goes to the leader of the group that owns its key; failed
//! attempts are classified and retried (the next member, the hinted leader, a fresh
//! configuration, a live move's destination) with backoff until the call deadline.

use super::{Client, Error, KEEPALIVE};
use crate::client::coalesce::Coalescer;
use crate::client::error::transport_message;
use crate::client::retry::backoff;
use crate::proto::batch_op::Op;
use crate::proto::batch_result::Result as OpResult;
use crate::proto::error_detail::Kind;
use crate::proto::kv_client::KvClient;
use crate::proto::Config;
use crate::security::SecureChannel;
use crate::status;
use backon::BackoffBuilder;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Code, Status};

impl Client {
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
    pub(super) async fn call_op(
        &self,
        key: &[u8],
        what: &str,
        op: impl Fn() -> Op,
    ) -> Result<OpResult, Error> {
        self.call(key, what, |server| server.run(op())).await
    }

    /// Runs `op` at the leader of the group owning `key`, retrying until it succeeds,
    /// fails for good, or the call deadline passes.
    pub(super) async fn call<T, F, Fut>(&self, key: &[u8], what: &str, op: F) -> Result<T, Error>
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
pub(super) struct Server {
    pub(super) kv: KvClient<SecureChannel>,
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

pub(super) fn unexpected(result: OpResult) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;

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
