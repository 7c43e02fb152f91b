//! The one helper that finds a Raft group's leader: every caller that talks to the
//! replicas of one group (the shard master's, or a kv group's for membership changes
//! and range transfers) goes through [`Replicas::call`] or [`Replicas::call_each`].
//! It tries the last replica that answered first, follows not-leader hints, moves on
//! to the next replica after a failure, and waits with [`backoff`] between tries.

use super::error::{transport_message, Error};
use super::retry::{backoff, is_transient};
use crate::proto::error_detail::Kind;
use crate::security::{Dialer, SecureChannel};
use crate::status;
use backon::Retryable;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;
use tonic::Status;

/// Connections to the replicas of one Raft group (opened lazily, reused), and the
/// replica to try first.
pub struct Replicas {
    /// The group in messages: "the shard master", "group 3".
    name: String,
    /// The addresses given.
    addrs: Vec<String>,
    /// The replicas given, then any leader a not-leader hint named that was not
    /// among them (a replica added since the caller learnt the addresses).
    known: RwLock<Vec<Target>>,
    dialer: Dialer,
    attempt_timeout: Option<Duration>,
    /// The index in `known` of the replica tried first: the last known leader.
    preferred: AtomicUsize,
    /// Set once any replica has answered.
    reached: AtomicBool,
    /// See [`Replicas::fail_fast_when_refused`].
    fail_fast: bool,
    /// Said when no replica ever answered: the TLS settings a secured cluster needs.
    unanswered_hint: &'static str,
}

/// One attempt's replica: its address and a channel to it.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub channel: SecureChannel,
}

impl Replicas {
    /// The replicas of `name` at `addrs` (HOST:PORT each), connecting through
    /// `dialer`; an attempt at one replica gives up after `attempt_timeout` (`None`:
    /// only the call's deadline bounds it, for calls that wait, such as adding a
    /// member that must catch up).
    pub fn new(
        name: &str,
        addrs: &[String],
        dialer: &Dialer,
        attempt_timeout: Option<Duration>,
    ) -> Result<Replicas, Error> {
        if addrs.is_empty() {
            return Err(Error::invalid(
                "addresses",
                format!("none given for {name}"),
                1,
            ));
        }
        let known = addrs
            .iter()
            .map(|a| {
                check_addr(a)?;
                target(dialer, attempt_timeout, a)
            })
            .collect::<Result<_, Error>>()?;
        Ok(Replicas {
            name: name.to_owned(),
            addrs: addrs.to_vec(),
            known: RwLock::new(known),
            dialer: dialer.clone(),
            attempt_timeout,
            preferred: AtomicUsize::new(0),
            reached: AtomicBool::new(false),
            fail_fast: false,
            unanswered_hint: dialer.unanswered_hint(),
        })
    }

    /// Until a replica has answered, a round in which every replica refuses the
    /// connection ends a call at once: for addresses a user typed, where nothing
    /// listening (a typo, or a cluster that is not running) is worth saying at once
    /// rather than after the deadline. Once one has answered, refusals are retried:
    /// replicas that were reached before are restarting.
    pub fn fail_fast_when_refused(mut self) -> Replicas {
        self.fail_fast = true;
        self
    }

    /// The replicas' addresses, as given.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Runs `call` against the leader, retrying transient failures (at the hinted
    /// leader, else the next replica) until it succeeds, fails for good, or
    /// `deadline` passes.
    pub async fn call<T, F, Fut>(&self, deadline: Duration, call: F) -> Result<T, Status>
    where
        F: Fn(Target) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        // Replicas that refused the connection in this call, one bit each.
        let refused = AtomicU64::new(0);
        // The last failure, so a deadline says why (a TLS handshake refused, say).
        let last_error = Mutex::new(None::<String>);
        let all_refused = || {
            let n = self.known.read().expect("poisoned").len();
            let everyone = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
            self.fail_fast
                && !self.reached.load(Ordering::Relaxed)
                && refused.load(Ordering::Relaxed) == everyone
        };
        let attempt = || async {
            let (i, result) = self.attempt(&call).await;
            match &result {
                Err(e) if connection_refused(e) => {
                    refused.fetch_or(1 << (i % 64), Ordering::Relaxed);
                }
                // A transport failure or a timeout: not an answer.
                Err(e) if is_transient(e) && status::detail(e).is_none() => {}
                Err(_) | Ok(_) => self.reached.store(true, Ordering::Relaxed),
            }
            if let Err(e) = &result {
                *last_error.lock().expect("poisoned") = Some(transport_message(e));
            }
            result
        };
        let retried = attempt
            .retry(backoff())
            .when(|e| is_transient(e) && !all_refused());
        match tokio::time::timeout(deadline, retried).await {
            Ok(Err(_)) if all_refused() => Err(Status::unavailable(format!(
                "connection refused at {} (is {} running there?)",
                self.addrs.join(", "),
                self.name
            ))),
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no replica answered within {deadline:?}{}{}",
                match last_error.into_inner().expect("poisoned") {
                    Some(e) => format!("; the last error: {e}"),
                    None => String::new(),
                },
                if self.reached.load(Ordering::Relaxed) {
                    ""
                } else {
                    self.unanswered_hint
                }
            ))),
        }
    }

    /// Runs `call` once at each replica at most (the hinted leader, else the next
    /// one), moving on after any error: for calls any replica may answer, made by a
    /// caller that retries on its own schedule (the kvnode's transfer worker).
    pub async fn call_each<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Target) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let attempt = || async { self.attempt(&call).await.1 };
        attempt
            .retry(backoff().with_max_times(self.addrs.len() - 1))
            .await
    }

    /// One attempt at the preferred replica; after an error, prefers the next one.
    async fn attempt<T, F, Fut>(&self, call: &F) -> (usize, Result<T, Status>)
    where
        F: Fn(Target) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let (i, target) = {
            let known = self.known.read().expect("poisoned");
            let i = self.preferred.load(Ordering::Relaxed) % known.len();
            (i, known[i].clone())
        };
        let result = call(target).await;
        if let Err(e) = &result {
            self.redirect(i, e);
        }
        (i, result)
    }

    /// After an error from replica `i`, picks the replica to try next.
    fn redirect(&self, i: usize, error: &Status) {
        let mut known = self.known.write().expect("poisoned");
        let hinted = match status::detail(error) {
            Some(Kind::NotLeader(hint)) if !hint.leader_addr.is_empty() => {
                match known.iter().position(|t| t.addr == hint.leader_addr) {
                    Some(h) => Some(h),
                    None => target(&self.dialer, self.attempt_timeout, &hint.leader_addr)
                        .ok()
                        .map(|t| {
                            known.push(t);
                            known.len() - 1
                        }),
                }
            }
            _ => None,
        };
        let next = hinted.unwrap_or((i + 1) % known.len());
        let _ = self
            .preferred
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A lazy channel to `addr`.
fn target(dialer: &Dialer, attempt_timeout: Option<Duration>, addr: &str) -> Result<Target, Error> {
    let endpoint = dialer
        .endpoint(addr)
        .map_err(|e| Error::invalid(&format!("{addr:?}"), e.to_string(), 0))?
        .connect_timeout(Duration::from_secs(1));
    Ok(Target {
        addr: addr.to_owned(),
        channel: dialer.connect_lazy(match attempt_timeout {
            Some(t) => endpoint.timeout(t),
            None => endpoint,
        }),
    })
}

/// Checks that `addr` is HOST:PORT (a host name or IP address, a colon, a port
/// number), so a malformed address is refused at once instead of failing to
/// connect until a deadline.
pub fn check_addr(addr: &str) -> Result<(), Error> {
    let malformed = || {
        Error::invalid(
            &format!("{addr:?}"),
            "is not an address: expected HOST:PORT, e.g. 127.0.0.1:7001",
            0,
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(malformed)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
            || host.split('.').all(|l| {
                !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(malformed())
    }
}

/// True if the call failed because the server's address refused the TCP connection.
fn connection_refused(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_host_colon_port() {
        for ok in [
            "127.0.0.1:7001",
            "localhost:1",
            "db-1.example.com:7001",
            "[::1]:7001",
        ] {
            assert!(check_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "garbage",
            "127.0.0.1",
            ":7001",
            "host:",
            "host:port",
            "host:0",
            "a b:1",
            "http://h:1",
        ] {
            let e = check_addr(bad).unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
