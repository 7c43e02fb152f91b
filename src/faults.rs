//! Test-only network fault injection on the outbound Raft traffic of one server.
//!
//! A server started with the hidden flag `--enable-fault-injection` owns one
//! [`Faults`] table, shared by its [`GrpcTransport`](crate::transport::GrpcTransport) and
//! the `Faults` gRPC service ([`FaultsService`]); a kvnode's range-transfer worker
//! shares it too. Before the transport sends a batch of Raft messages or a snapshot
//! to a peer, and before the worker calls another group's node (Pull, Release), it
//! asks [`Faults::decide`]: send, drop (a cut link, or a loss drawn with the
//! fault's probability), or wait and then send. Faults are per destination address, so a one-way cut is a fault
//! on one side and a partition is faults on both sides. The server's own faults
//! ([`NodeFaults`]) model a slow disk (the replica stalls before each persist that
//! writes) and a snapshot read that fails part way.
//!
//! Without the flag there is no table (`Option<Arc<Faults>>` is `None`) and no
//! service: the only cost on the hot path is that `None` check. With the flag but
//! no fault set, it is one relaxed atomic load.

use crate::proto::testing::faults_server::{self, FaultsServer};
use crate::proto::testing::{
    ClearFaultsRequest, FaultsReply, GetFaultsRequest, LinkFault, NodeFaults, SetFaultsRequest,
};
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The hidden command-line flag that enables fault injection.
pub const FLAG: &str = "enable-fault-injection";
/// The hidden clock-rate fault: the node's Raft clock ticks this many times as
/// often as `--tick-ms` says (its lease still counts in `--tick-ms`). Accepted only
/// together with [`FLAG`].
pub const TICK_MULTIPLIER_FLAG: &str = "test-tick-multiplier";

/// Parses a `--test-tick-multiplier` value: a factor in [0.1, 10].
pub fn parse_tick_multiplier(s: &str) -> Result<f64, String> {
    let m: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if !(0.1..=10.0).contains(&m) {
        return Err(format!("{m} is outside 0.1..=10"));
    }
    Ok(m)
}

/// The fault of one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rule {
    pub blocked: bool,
    pub drop_probability: f64,
    pub delay: Duration,
}

impl Rule {
    fn is_noop(&self) -> bool {
        !self.blocked && self.drop_probability <= 0.0 && self.delay.is_zero()
    }
}

/// What to do with one outbound batch or snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// The link is cut: fail the send as if the peer were unreachable.
    Blocked,
    /// Lost on the way: the sender does not learn of it.
    Lost,
    /// Send after waiting this long.
    Delay(Duration),
}

/// The fault table of one server.
#[derive(Debug, Default)]
pub struct Faults {
    /// True while any rule is set: the fast path when none is.
    active: AtomicBool,
    /// Rules by destination address; "" is the default for other destinations.
    rules: RwLock<BTreeMap<String, Rule>>,
    dropped: AtomicU64,
    delayed: AtomicU64,
    /// The server's own faults (not of a link): a slow disk, a failing snapshot read.
    node: RwLock<NodeFaults>,
    /// Set by a request to fire the election timer; taken by the replica's next tick.
    fire_election_timer: AtomicBool,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Decides the fate of one batch (or snapshot) to `peer_addr`.
    pub fn decide(&self, peer_addr: &str) -> Verdict {
        if !self.active.load(Ordering::Relaxed) {
            return Verdict::Send;
        }
        let rule = {
            let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
            match rules.get(peer_addr).or_else(|| rules.get("")) {
                Some(r) => *r,
                None => return Verdict::Send,
            }
        };
        if rule.blocked {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Verdict::Blocked;
        }
        if rule.drop_probability > 0.0 && rand::rng().random_bool(rule.drop_probability.min(1.0)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Verdict::Lost;
        }
        if !rule.delay.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            return Verdict::Delay(rule.delay);
        }
        Verdict::Send
    }

    /// Sets (or, for a no-op rule, removes) the rule of `peer_addr`.
    pub fn set(&self, peer_addr: &str, rule: Rule) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        if rule.is_noop() {
            rules.remove(peer_addr);
        } else {
            rules.insert(peer_addr.to_owned(), rule);
        }
        self.active.store(!rules.is_empty(), Ordering::Relaxed);
    }

    /// Removes every rule and the node's own faults.
    pub fn clear(&self) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        rules.clear();
        self.active.store(false, Ordering::Relaxed);
        self.set_node(NodeFaults::default());
    }

    /// Replaces the server's own faults.
    pub fn set_node(&self, mut node: NodeFaults) {
        let fire = std::mem::take(&mut node.fire_election_timer);
        self.fire_election_timer.store(fire, Ordering::Relaxed);
        *self.node.write().unwrap_or_else(|e| e.into_inner()) = node;
    }

    /// True once after a request to fire the election timer.
    pub fn take_election_timer_fire(&self) -> bool {
        self.fire_election_timer.swap(false, Ordering::Relaxed)
    }

    fn node(&self) -> NodeFaults {
        *self.node.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a Raft persist that writes must stall first, if at all.
    pub fn persist_delay(&self) -> Option<Duration> {
        let ms = self.node().persist_delay_ms;
        (ms > 0).then(|| Duration::from_millis(ms.into()))
    }

    /// True if an outgoing snapshot that has sent `chunks` chunks must fail now
    /// (counted as dropped).
    pub fn fails_snapshot_read(&self, chunks: usize) -> bool {
        let after = self.node().snapshot_fail_after_chunks as usize;
        let fails = after > 0 && chunks >= after;
        if fails {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    /// The rules in force, by destination address.
    pub fn rules(&self) -> BTreeMap<String, Rule> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn reply(&self) -> FaultsReply {
        FaultsReply {
            faults: self
                .rules()
                .into_iter()
                .map(|(peer_addr, r)| LinkFault {
                    peer_addr,
                    blocked: r.blocked,
                    drop_probability: r.drop_probability,
                    delay_ms: r.delay.as_millis().try_into().unwrap_or(u32::MAX),
                })
                .collect(),
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            node: Some(self.node()),
        }
    }
}

/// The test-only `Faults` gRPC service over a server's fault table.
pub struct FaultsService {
    faults: Arc<Faults>,
}

impl FaultsService {
    pub fn server(faults: Arc<Faults>) -> FaultsServer<FaultsService> {
        FaultsServer::new(FaultsService { faults })
    }
}

/// The fully-qualified service name, for the health service.
pub const SERVICE_NAME: &str = "shardkv.testing.v1.Faults";

#[tonic::async_trait]
impl faults_server::Faults for FaultsService {
    async fn set_faults(
        &self,
        request: Request<SetFaultsRequest>,
    ) -> Result<Response<FaultsReply>, Status> {
        let request = request.into_inner();
        let mut rules = Vec::new();
        for f in request.faults {
            if !(0.0..=1.0).contains(&f.drop_probability) {
                return Err(Status::invalid_argument(format!(
                    "drop_probability {} is not within 0.0..=1.0",
                    f.drop_probability
                )));
            }
            let rule = Rule {
                blocked: f.blocked,
                drop_probability: f.drop_probability,
                delay: Duration::from_millis(f.delay_ms.into()),
            };
            rules.push((f.peer_addr, rule));
        }
        if request.replace {
            self.faults.clear();
        }
        for (addr, rule) in rules {
            self.faults.set(&addr, rule);
        }
        if let Some(node) = request.node {
            self.faults.set_node(node);
        }
        Ok(Response::new(self.faults.reply()))
    }

    async fn clear_faults(
        &self,
        _request: Request<ClearFaultsRequest>,
    ) -> Result<Response<FaultsReply>, Status> {
        self.faults.clear();
        Ok(Response::new(self.faults.reply()))
    }

    async fn get_faults(
        &self,
        _request: Request<GetFaultsRequest>,
    ) -> Result<Response<FaultsReply>, Status> {
        Ok(Response::new(self.faults.reply()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_multiplier_must_be_a_sane_factor() {
        assert_eq!(parse_tick_multiplier("2.5"), Ok(2.5));
        assert_eq!(parse_tick_multiplier("0.1"), Ok(0.1));
        for bad in ["0", "-1", "11", "NaN", "inf", "fast"] {
            assert!(parse_tick_multiplier(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn no_rule_sends_and_rules_apply_per_destination() {
        let f = Faults::new();
        assert_eq!(f.decide("a:1"), Verdict::Send);
        f.set(
            "a:1",
            Rule {
                blocked: true,
                ..Rule::default()
            },
        );
        f.set(
            "b:2",
            Rule {
                delay: Duration::from_millis(5),
                ..Rule::default()
            },
        );
        assert_eq!(f.decide("a:1"), Verdict::Blocked);
        assert_eq!(f.decide("b:2"), Verdict::Delay(Duration::from_millis(5)));
        assert_eq!(f.decide("c:3"), Verdict::Send);
        // A no-op rule removes the destination's fault.
        f.set("a:1", Rule::default());
        assert_eq!(f.decide("a:1"), Verdict::Send);
        assert_eq!(f.reply().dropped, 1);
        assert_eq!(f.reply().delayed, 1);
        f.clear();
        assert!(!f.active.load(Ordering::Relaxed));
        assert_eq!(f.decide("b:2"), Verdict::Send);
    }

    #[test]
    fn default_rule_covers_other_destinations_and_loss_is_probabilistic() {
        let f = Faults::new();
        f.set(
            "",
            Rule {
                drop_probability: 0.5,
                ..Rule::default()
            },
        );
        f.set(
            "safe:1",
            Rule {
                delay: Duration::from_millis(1),
                ..Rule::default()
            },
        );
        let lost = (0..2000)
            .filter(|_| f.decide("x:9") == Verdict::Lost)
            .count();
        assert!((700..1300).contains(&lost), "lost {lost} of 2000 at p=0.5");
        assert!((0..100).all(|_| f.decide("safe:1") != Verdict::Lost));
        f.set(
            "",
            Rule {
                drop_probability: 1.0,
                ..Rule::default()
            },
        );
        assert!((0..100).all(|_| f.decide("y:1") == Verdict::Lost));
    }
}
