//! Assembles one replica process: storage, Raft transport and the replica driver.
//! Shared by the shard master and kvnode binaries.

use crate::faults::{Faults, FaultsService};
use crate::membership::MembershipService;
use crate::proto::internal::raft_server::RaftServer;
use crate::proto::internal::RaftTiming;
use crate::proto::membership_server::MembershipServer;
use crate::proto::testing::faults_server::FaultsServer;
use crate::replica::{self, Replica, ReplicaOptions, StateMachine};
use crate::storage::{Engine, Identity};
use crate::transport::{GrpcTransport, RaftService, EVENT_QUEUE, MAX_MESSAGE_BYTES};
use anyhow::Context;
use raft::prelude::ConfState;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002` into node id -> address.
pub fn parse_peers(spec: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("peer id {id:?} is not a number"))?;
        anyhow::ensure!(id != 0, "peer id 0 is reserved");
        anyhow::ensure!(
            peers.insert(id, addr.to_owned()).is_none(),
            "peer {id} given twice"
        );
    }
    Ok(peers)
}

/// Where a replica listens and the address it gives the others (`--listen`,
/// `--advertise`, `--peers`).
#[derive(Debug, PartialEq)]
pub struct Addresses {
    /// The initial members, from `--peers` (empty without it).
    pub peers: BTreeMap<u64, String>,
    /// The socket address to bind: `--listen`, else the advertised address.
    pub listen: String,
    /// How the others reach this node: `--advertise`, else its entry in `--peers`,
    /// else `--listen`. A DNS name (a Compose service, a Kubernetes headless
    /// Service) is kept as given and resolved by each peer when it connects, so a
    /// container that comes back with another IP is found again.
    pub advertise: String,
}

/// Works out [`Addresses`] from the flags. An advertised address that no other host
/// could dial (`0.0.0.0`, `[::]`) is refused: it would be stored in the group's
/// membership and routing.
pub fn resolve_addresses(
    id: u64,
    peers: Option<&str>,
    listen: Option<String>,
    advertise: Option<String>,
) -> anyhow::Result<Addresses> {
    let peers = match peers {
        Some(spec) => parse_peers(spec)?,
        None => BTreeMap::new(),
    };
    let advertise = match (advertise, peers.get(&id), &listen) {
        (Some(a), _, _) => a,
        (None, Some(a), _) => a.clone(),
        (None, None, Some(l)) => l.clone(),
        (None, None, None) => anyhow::bail!("--peers has no address for id {id}"),
    };
    if let Ok(addr) = advertise.parse::<std::net::SocketAddr>() {
        anyhow::ensure!(
            !addr.ip().is_unspecified(),
            "{advertise} cannot be dialled by other nodes: give the address they reach \
             this node at with --advertise HOST:PORT"
        );
    }
    let listen = listen.unwrap_or_else(|| advertise.clone());
    Ok(Addresses {
        peers,
        listen,
        advertise,
    })
}

/// What a replica process needs to start.
pub struct NodeSpec {
    pub cluster: String,
    pub role: &'static str,
    pub group: u64,
    pub id: u64,
    /// The address other members reach this node at.
    pub addr: String,
    pub data_dir: PathBuf,
    /// The initial members (id -> address) of a new group; used only the first time the
    /// data directory is opened. Empty for a node that joins an existing group.
    pub initial_peers: BTreeMap<u64, String>,
    pub tick: Duration,
    /// Test-only clock-rate fault (`--test-tick-multiplier`): 1.0 otherwise.
    pub tick_multiplier: f64,
    pub compact_threshold: u64,
    pub compact_log_bytes: u64,
    /// Test-only: build a fault table into the transport and offer the `Faults`
    /// service (hidden flag `--enable-fault-injection`).
    pub fault_injection: bool,
    /// Opens the connections to the other members (TLS when configured).
    pub dialer: crate::security::Dialer,
}

/// A started replica and the services to mount on the node's gRPC server.
pub struct Node<S: StateMachine> {
    pub replica: Replica<S>,
    pub raft_service: RaftServer<RaftService>,
    pub membership_service: MembershipServer<MembershipService<S>>,
    /// The test-only fault table and `Faults` service, only when fault injection is
    /// enabled.
    pub faults: Option<Arc<Faults>>,
    pub faults_service: Option<FaultsServer<FaultsService>>,
    /// Set on shutdown: ends the Raft streams peers hold open to this node.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<S: StateMachine> Node<S> {
    /// `routes` plus the Raft and Membership services, and the `Faults` service when
    /// fault injection is enabled.
    pub fn add_services(&self, routes: tonic::service::Routes) -> tonic::service::Routes {
        let routes = routes
            .add_service(self.raft_service.clone())
            .add_service(self.membership_service.clone());
        match &self.faults_service {
            Some(faults) => routes.add_service(faults.clone()),
            None => routes,
        }
    }
}

impl<S: StateMachine> Node<S> {
    /// Resolves on Ctrl-C, SIGTERM, or when the replica stops (removed from its group).
    pub fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let replica = self.replica.clone();
        let stopping = self.stopping.clone();
        async move {
            tokio::select! {
                _ = crate::server::shutdown_signal() => {}
                _ = replica.stopped() => {}
            }
            stopping.send_replace(true);
        }
    }

    /// After the server has stopped: an error if the replica stopped on its own.
    pub fn exit_status(&self) -> anyhow::Result<()> {
        let status = self.replica.status();
        anyhow::ensure!(
            !status.removed,
            "node {} was removed from its group and has stopped",
            status.id
        );
        Ok(())
    }
}

/// Opens storage (refusing another node's directory), bootstraps a new group's
/// membership on first start, and starts the transport and the replica driver.
pub fn start<S: StateMachine>(
    spec: NodeSpec,
    state_machine: S,
    logger: slog::Logger,
) -> anyhow::Result<Node<S>> {
    let identity = Identity {
        cluster: spec.cluster,
        role: spec.role.to_owned(),
        group: spec.group,
        node: spec.id,
    };
    let engine = Engine::open(&spec.data_dir, &identity)?;
    let fresh = engine.is_fresh();
    crate::metrics::metrics().set_storage(engine.stats());
    let (raft_store, sm_store) = engine.into_stores()?;
    if fresh && !spec.initial_peers.is_empty() {
        anyhow::ensure!(
            spec.initial_peers.contains_key(&spec.id),
            "--peers must include this node's own id {}",
            spec.id
        );
        let conf_state = ConfState {
            voters: spec.initial_peers.keys().copied().collect(),
            ..Default::default()
        };
        raft_store.bootstrap(&conf_state, &spec.initial_peers)?;
    }
    let (events_tx, events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let faults = spec.fault_injection.then(Faults::new);
    if faults.is_some() {
        slog::warn!(logger, "fault injection is enabled (test only): the Faults service can cut and slow this node's links");
    }
    let mut options = ReplicaOptions::new(spec.id, spec.group);
    options.tick = spec.tick;
    options.tick_multiplier = spec.tick_multiplier;
    options.compact_threshold = spec.compact_threshold;
    options.compact_log_bytes = spec.compact_log_bytes;
    let timing = RaftTiming {
        tick_ms: spec.tick.as_millis() as u64,
        election_ticks: options.election_ticks as u32,
    };
    let transport = GrpcTransport::new(
        spec.group,
        (spec.id, spec.addr.clone()),
        timing,
        events_tx.clone(),
        faults.clone(),
        spec.dialer,
    );
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let raft_service = RaftServer::new(RaftService::new(
        spec.group,
        events_tx,
        transport.clone(),
        sm_store.clone(),
        stopping_rx,
        logger.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let replica = replica::start(
        options,
        raft_store,
        sm_store,
        state_machine,
        transport,
        events,
        logger.clone(),
    )?;
    tokio::spawn(report_until_member(replica.clone(), logger));
    Ok(Node {
        membership_service: MembershipServer::new(MembershipService::new(replica.clone())),
        faults_service: faults.clone().map(FaultsService::server),
        faults,
        replica,
        raft_service,
        stopping: Arc::new(stopping),
    })
}

/// A node started with --join does nothing until the group adds it: say so, so an
/// operator who forgot `shardctl node add` finds out.
async fn report_until_member<S: StateMachine>(replica: Replica<S>, logger: slog::Logger) {
    let mut interval = tokio::time::interval(Duration::from_secs(10));
    loop {
        interval.tick().await;
        let status = replica.status();
        let cs = &status.conf_state;
        if cs.voters.contains(&status.id) || cs.learners.contains(&status.id) || status.removed {
            return;
        }
        slog::warn!(logger, "waiting to be added to the group: run `shardctl node add` (or Membership/AddMember at the group's leader) for this node");
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_peers, resolve_addresses};

    #[test]
    fn parses_and_rejects_peer_lists() {
        let peers = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[&2], "127.0.0.1:7002");
        assert!(parse_peers("1=a,1=b").is_err());
        assert!(parse_peers("0=a").is_err());
        assert!(parse_peers("x=a").is_err());
        assert!(parse_peers("127.0.0.1:7001").is_err());
    }

    #[test]
    fn advertised_address_is_flag_then_peers_then_listen() {
        let peers = Some("1=kv-1-1:8101,2=kv-1-2:8101");
        // In a container: bind every interface, give the others the DNS name.
        let a = resolve_addresses(1, peers, Some("0.0.0.0:8101".into()), None).unwrap();
        assert_eq!(
            (a.listen.as_str(), a.advertise.as_str()),
            ("0.0.0.0:8101", "kv-1-1:8101")
        );
        assert_eq!(a.peers.len(), 2);
        let a = resolve_addresses(
            2,
            None,
            Some("0.0.0.0:8101".into()),
            Some("kv-1-2.kv-1:8101".into()),
        )
        .unwrap();
        assert_eq!(a.advertise, "kv-1-2.kv-1:8101");
        // Without --listen, bind what is advertised (as on one machine).
        let a = resolve_addresses(1, peers, None, None).unwrap();
        assert_eq!(
            (a.listen.as_str(), a.advertise.as_str()),
            ("kv-1-1:8101", "kv-1-1:8101")
        );
        let a = resolve_addresses(4, None, Some("127.0.0.1:8104".into()), None).unwrap();
        assert_eq!(a.advertise, "127.0.0.1:8104");
    }

    #[test]
    fn an_address_nobody_can_dial_is_not_advertised() {
        for listen in ["0.0.0.0:8101", "[::]:8101"] {
            let e = resolve_addresses(4, None, Some(listen.into()), None).unwrap_err();
            assert!(e.to_string().contains("--advertise"), "{e}");
        }
        assert!(resolve_addresses(3, Some("1=a:1"), None, None).is_err());
    }
}
