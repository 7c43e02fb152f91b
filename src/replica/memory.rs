//! Test only: an in-memory [`Transport`], so the driver runs in unit tests with no
//! network. The replicas of one group share a [`MemoryNetwork`], whose links can be
//! cut one way or all of a node's at once.

use super::{NetEvent, Transport};
use crate::faults::Faults;
use crate::proto::testing::NodeFaults;
use crate::storage::{OutgoingSnapshot, SmStore};
use raft::prelude::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// The links between the replicas of one group.
#[derive(Clone, Default)]
pub struct MemoryNetwork(Arc<Mutex<Links>>);

#[derive(Default)]
struct Links {
    nodes: HashMap<u64, Endpoint>,
    /// Nodes cut off from every other: what they send and what is sent to them is lost.
    isolated: HashSet<u64>,
    /// (from, to): what `from` sends to `to` is lost.
    cut: HashSet<(u64, u64)>,
}

/// Where a node receives: its driver's events, and the store a snapshot is written to.
#[derive(Clone)]
struct Endpoint {
    events: mpsc::Sender<NetEvent>,
    store: SmStore,
    /// The node's own faults (the election timer it is told to fire).
    faults: Arc<Faults>,
}

impl MemoryNetwork {
    /// Connects node `id`: what is sent to it goes to `events`, and snapshots sent to
    /// it are written into `store`. Must be called inside a tokio runtime, which
    /// runs the snapshot transfers.
    pub fn connect(
        &self,
        id: u64,
        events: mpsc::Sender<NetEvent>,
        store: SmStore,
    ) -> Arc<MemoryTransport> {
        let faults = Faults::new();
        let endpoint = Endpoint {
            events,
            store,
            faults: faults.clone(),
        };
        self.links().nodes.insert(id, endpoint);
        Arc::new(MemoryTransport {
            id,
            network: self.clone(),
            runtime: tokio::runtime::Handle::current(),
            faults,
        })
    }

    /// Disconnects node `id` (it stopped), releasing its store.
    pub fn disconnect(&self, id: u64) {
        self.links().nodes.remove(&id);
    }

    /// Cuts the links between `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        let mut links = self.links();
        links.cut.insert((a, b));
        links.cut.insert((b, a));
    }

    /// Makes node `id` campaign at its next tick, as if its clock jumped.
    pub fn fire_election_timer(&self, id: u64) {
        let links = self.links();
        let node = &links.nodes[&id];
        node.faults.set_node(NodeFaults {
            fire_election_timer: true,
            ..Default::default()
        });
    }

    /// Cuts every link of node `id`.
    pub fn isolate(&self, id: u64) {
        self.links().isolated.insert(id);
    }

    /// Restores the links of node `id`.
    pub fn heal(&self, id: u64) {
        self.links().isolated.remove(&id);
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.0.lock().expect("poisoned")
    }

    /// The receiving end of `to`, if the link from `from` is up.
    fn link(&self, from: u64, to: u64) -> Option<Endpoint> {
        let links = self.links();
        if links.isolated.contains(&from)
            || links.isolated.contains(&to)
            || links.cut.contains(&(from, to))
        {
            return None;
        }
        links.nodes.get(&to).cloned()
    }

    fn own_events(&self, id: u64) -> Option<mpsc::Sender<NetEvent>> {
        self.links().nodes.get(&id).map(|e| e.events.clone())
    }
}

/// One node's side of a [`MemoryNetwork`].
pub struct MemoryTransport {
    id: u64,
    network: MemoryNetwork,
    runtime: tokio::runtime::Handle,
    faults: Arc<Faults>,
}

impl Transport for MemoryTransport {
    /// Nodes are reached by id: addresses do not matter.
    fn set_peer(&self, _id: u64, _addr: &str) {}

    fn remove_peer(&self, _id: u64) {}

    fn send(&self, msg: Message) {
        let to = msg.to;
        match self.network.link(self.id, to) {
            Some(dest) => {
                let _ = dest.events.try_send(NetEvent::Message(msg));
            }
            // As the gRPC transport reports a cut link.
            None => {
                if let Some(own) = self.network.own_events(self.id) {
                    let _ = own.try_send(NetEvent::Unreachable(to));
                }
            }
        }
    }

    fn send_snapshot(&self, msg: Message, snapshot: OutgoingSnapshot) {
        let to = msg.to;
        let link = self.network.link(self.id, to);
        let Some(own) = self.network.own_events(self.id) else {
            return;
        };
        self.runtime.spawn(async move {
            let ok = match link {
                Some(dest) => deliver_snapshot(dest, msg, snapshot).await.is_ok(),
                None => false,
            };
            let _ = own.send(NetEvent::SnapshotSent { to, ok }).await;
        });
    }

    fn dropped(&self) -> u64 {
        0
    }

    fn faults(&self) -> Option<&Arc<Faults>> {
        Some(&self.faults)
    }
}

/// Writes `snapshot` into the destination's store, as the gRPC receiver does, and
/// waits until its driver has handled it.
async fn deliver_snapshot(
    dest: Endpoint,
    message: Message,
    snapshot: OutgoingSnapshot,
) -> anyhow::Result<()> {
    let mut writer = dest.store.receive_snapshot()?;
    writer.write(snapshot.records().collect::<Result<Vec<_>, _>>()?)?;
    let staged = writer.finish(snapshot.index);
    let (done, handled) = oneshot::channel();
    dest.events
        .send(NetEvent::Snapshot {
            message,
            staged,
            done,
        })
        .await?;
    handled.await?;
    Ok(())
}
