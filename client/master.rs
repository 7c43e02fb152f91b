//! A client of the shard master's replicas: finds the leader (following not-leader
//! hints), retries transient failures with backoff under a deadline.

use super::retry::{backoff, is_transient};
use crate::proto::error_detail::Kind;
use crate::proto::shard_master_client::ShardMasterClient;
use crate::proto::{Config, QueryRequest};
use crate::status;
use backon::Retryable;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// Connections to every shard-master replica (opened lazily, reused).
pub struct MasterClient {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    /// The replica tried first: the last known leader.
    preferred: AtomicUsize,
    deadline: Duration,
}

impl MasterClient {
    /// A client of the replicas at `addrs` (host:port). Calls give up after `deadline`.
    pub fn new(addrs: &[String], deadline: Duration) -> anyhow::Result<MasterClient> {
        anyhow::ensure!(!addrs.is_empty(), "no shard master address given");
        let channels = addrs
            .iter()
            .map(|a| {
                Ok(Endpoint::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(5))
                    .connect_lazy())
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(MasterClient {
            addrs: addrs.to_vec(),
            channels,
            preferred: AtomicUsize::new(0),
            deadline,
        })
    }

    /// Runs `call` against the leader, retrying transient failures at other replicas
    /// until it succeeds, fails for good, or the deadline passes.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(ShardMasterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let attempt = || async {
            let i = self.preferred.load(Ordering::Relaxed) % self.channels.len();
            let result = call(ShardMasterClient::new(self.channels[i].clone())).await;
            if let Err(e) = &result {
                self.redirect(i, e);
            }
            result
        };
        let retried = attempt.retry(backoff()).when(is_transient);
        match tokio::time::timeout(self.deadline, retried).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no shard master replica of {} answered within {:?}",
                self.addrs.join(","),
                self.deadline
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
