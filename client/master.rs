//! A client of the shard master's replicas: finds the leader (following not-leader
//! hints), retries transient failures with backoff under a deadline.

use super::kv::transport_message;
use super::retry::{backoff, is_transient};
use crate::proto::error_detail::Kind;
use crate::proto::shard_master_client::ShardMasterClient;
use crate::proto::{Config, QueryRequest};
use crate::security::{Dialer, SecureChannel};
use crate::status;
use backon::Retryable;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tonic::Status;

/// Connections to every shard-master replica (opened lazily, reused).
pub struct MasterClient {
    addrs: Vec<String>,
    channels: Vec<SecureChannel>,
    /// The replica tried first: the last known leader.
    preferred: AtomicUsize,
    deadline: Duration,
    /// Set once any replica has answered. Until then, a round in which every replica
    /// refuses the connection ends the call at once: nothing listens at those
    /// addresses (a typo, or a cluster that is not running), and waiting out the
    /// deadline would only hide that. Afterwards refusals are retried: replicas that
    /// were reached before are restarting.
    reached: AtomicBool,
    /// Said when no replica ever answered: the TLS settings a secured cluster needs.
    unanswered_hint: &'static str,
}

impl MasterClient {
    /// A client of the replicas at `addrs` (host:port), connecting through `dialer`.
    /// Calls give up after `deadline`.
    pub fn new(
        addrs: &[String],
        deadline: Duration,
        dialer: &Dialer,
    ) -> anyhow::Result<MasterClient> {
        anyhow::ensure!(!addrs.is_empty(), "no shard master address given");
        let channels = addrs
            .iter()
            .map(|a| {
                check_addr(a)?;
                Ok(dialer.connect_lazy(
                    dialer
                        .endpoint(a)?
                        .connect_timeout(Duration::from_secs(1))
                        .timeout(Duration::from_secs(5)),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(MasterClient {
            addrs: addrs.to_vec(),
            channels,
            preferred: AtomicUsize::new(0),
            deadline,
            reached: AtomicBool::new(false),
            unanswered_hint: dialer.unanswered_hint(),
        })
    }

    /// Runs `call` against the leader, retrying transient failures at other replicas
    /// until it succeeds, fails for good, or the deadline passes.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(ShardMasterClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        // Replicas that refused the connection in this call, one bit each.
        let refused = AtomicU64::new(0);
        // The last failure, so a deadline says why (a TLS handshake refused, say).
        let last_error = std::sync::Mutex::new(None::<String>);
        let everyone = if self.channels.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.channels.len()) - 1
        };
        let all_refused =
            || !self.reached.load(Ordering::Relaxed) && refused.load(Ordering::Relaxed) == everyone;
        let attempt = || async {
            let i = self.preferred.load(Ordering::Relaxed) % self.channels.len();
            let result = call(ShardMasterClient::new(self.channels[i].clone())).await;
            match &result {
                Err(e) if connection_refused(e) => {
                    refused.fetch_or(1 << (i % 64), Ordering::Relaxed);
                }
                // A transport failure or a timeout: not an answer.
                Err(e) if is_transient(e) && status::detail(e).is_none() => {}
                Err(_) | Ok(_) => self.reached.store(true, Ordering::Relaxed),
            }
            if let Err(e) = &result {
                self.redirect(i, e);
                *last_error.lock().expect("poisoned") = Some(transport_message(e));
            }
            result
        };
        let retried = attempt
            .retry(backoff())
            .when(|e| is_transient(e) && !all_refused());
        match tokio::time::timeout(self.deadline, retried).await {
            Ok(Err(_)) if all_refused() => Err(Status::unavailable(format!(
                "connection refused at {} (is the shard master running there?)",
                self.addrs.join(", ")
            ))),
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no replica answered within {:?}{}{}",
                self.deadline,
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

    /// After an error from replica `i`, picks the replica to try next.
    fn redirect(&self, i: usize, error: &Status) {
        let hinted = match status::detail(error) {
            Some(Kind::NotLeader(hint)) => self.addrs.iter().position(|a| *a == hint.leader_addr),
            _ => None,
        };
        let next = hinted.unwrap_or((i + 1) % self.channels.len());
        let _ = self
            .preferred
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Configuration `num`, or the latest when `None`.
    pub async fn query(&self, num: Option<u64>) -> Result<Config, Status> {
        self.call(|mut c| async move { Ok(c.query(QueryRequest { num }).await?.into_inner()) })
            .await
    }
}

/// Checks that `addr` is HOST:PORT (a host name or IP address, a colon, a port
/// number), so a malformed address is refused at once instead of failing to
/// connect until a deadline.
pub fn check_addr(addr: &str) -> anyhow::Result<()> {
    let malformed =
        || anyhow::anyhow!("{addr:?} is not an address: expected HOST:PORT, e.g. 127.0.0.1:7001");
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
