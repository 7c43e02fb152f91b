//! Assembles one replica process: storage, Raft transport and the replica driver.
//! Shared by the shard master and kvnode binaries.

use crate::proto::raft_server::RaftServer;
use crate::replica::{self, Replica, ReplicaOptions, StateMachine};
use crate::storage::{Engine, Identity};
use crate::transport::{RaftService, Transport, EVENT_QUEUE, MAX_MESSAGE_BYTES};
use anyhow::Context;
use raft::prelude::ConfState;
use std::collections::BTreeMap;
use std::path::PathBuf;
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

/// What a replica process needs to start.
pub struct NodeSpec {
    pub cluster: String,
    pub role: &'static str,
    pub group: u64,
    pub id: u64,
    pub data_dir: PathBuf,
    /// The initial members (id -> address) of a new group; used only the first time the
    /// data directory is opened. Empty for a node that joins an existing group.
    pub initial_peers: BTreeMap<u64, String>,
    pub tick: Duration,
    pub compact_threshold: u64,
}

/// A started replica and the Raft service to mount on the node's gRPC server.
pub struct Node<S: StateMachine> {
    pub replica: Replica<S>,
    pub raft_service: RaftServer<RaftService>,
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
    let transport = Transport::new(spec.group, events_tx.clone());
    let raft_service = RaftServer::new(RaftService::new(spec.group, events_tx, sm_store.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut options = ReplicaOptions::new(spec.id, spec.group);
    options.tick = spec.tick;
    options.compact_threshold = spec.compact_threshold;
    let replica = replica::start(
        options,
        raft_store,
        sm_store,
        state_machine,
        transport,
        events,
        logger,
    )?;
    Ok(Node {
        replica,
        raft_service,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_peers;

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
}
