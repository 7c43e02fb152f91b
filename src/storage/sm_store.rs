//! The state machine's view of storage: one keyspace per generation, shared between
//! the replica driver (which writes the applied index, conf state and peers) and the
//! state machine (which owns every key that does not start with a 0 byte).

use super::{decode_u64, sm_keyspace_name, Result, StorageError};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch, Readable};
use protobuf::Message as _;
use raft::prelude::ConfState;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// Keys starting with this byte are the replica driver's; the state machine must not
/// write them.
pub const RESERVED_PREFIX: u8 = 0;
const KEY_APPLIED: &[u8] = b"\0applied";
const KEY_CONF_STATE: &[u8] = b"\0conf_state";
const PEER_PREFIX: &[u8] = b"\0peer/";

/// Handle to the current state-machine keyspace. Cloning is cheap.
#[derive(Clone)]
pub struct SmStore {
    db: Database,
    current: Arc<RwLock<(u64, Keyspace)>>,
}

/// A point-in-time view of the state machine's data (see [`SmStore::view`]).
#[derive(Clone)]
pub struct StoreView {
    snapshot: fjall::Snapshot,
    keyspace: Keyspace,
}

/// Key bounds of a range read.
pub type KeyBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Records in key order, as owned pairs; reversible (`next_back` gives the last).
pub trait Records: DoubleEndedIterator<Item = Result<(Vec<u8>, Vec<u8>)>> {}
impl<I: DoubleEndedIterator<Item = Result<(Vec<u8>, Vec<u8>)>>> Records for I {}

fn records(iter: fjall::Iter) -> impl Records {
    iter.map(|item| {
        let (k, v) = item.into_inner()?;
        Ok((k.to_vec(), v.to_vec()))
    })
}

impl StoreView {
    /// The records within `bounds`, in key order.
    pub fn range(&self, bounds: KeyBounds) -> impl Records {
        records(self.snapshot.range::<Vec<u8>, _>(&self.keyspace, bounds))
    }

    /// The records whose key starts with `prefix`, in key order.
    pub fn prefix(&self, prefix: &[u8]) -> impl Records {
        records(self.snapshot.prefix(&self.keyspace, prefix))
    }

    /// Reads one key as of the view.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snapshot.get(&self.keyspace, key)?.map(|v| v.to_vec()))
    }

    /// The driver's state as of the view.
    pub(crate) fn applied_state(&self) -> Result<AppliedState> {
        read_applied_state(&self.snapshot, &self.keyspace)
    }

    /// Every record (the driver's keys too), for a snapshot sent to a follower.
    pub(crate) fn all(&self) -> impl Records {
        records(self.snapshot.iter(&self.keyspace))
    }
}

/// A snapshot being received (see [`SmStore::receive_snapshot`]). Dropped before
/// [`SnapshotWriter::finish`], what it wrote is never installed: it is cleared by
/// the next snapshot or dropped at the next start.
pub struct SnapshotWriter {
    db: Database,
    gen: u64,
    keyspace: Keyspace,
}

impl SnapshotWriter {
    /// Writes one chunk of the snapshot's records, in one engine batch.
    pub fn write(&mut self, records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<()> {
        let mut batch = self.db.batch();
        for (key, value) in records {
            batch.insert(&self.keyspace, key, value);
        }
        batch.commit()?;
        Ok(())
    }

    /// Ends a complete stream: the snapshot at log index `index` is ready to install.
    pub fn finish(self, index: u64) -> StagedSnapshot {
        StagedSnapshot {
            index,
            gen: self.gen,
            keyspace: self.keyspace,
        }
    }
}

/// A received snapshot written to disk, waiting for Raft to install it.
pub struct StagedSnapshot {
    index: u64,
    gen: u64,
    keyspace: Keyspace,
}

impl StagedSnapshot {
    /// The log index the snapshot was taken at.
    pub fn index(&self) -> u64 {
        self.index
    }

    pub(super) fn generation(&self) -> u64 {
        self.gen
    }
}

/// Writes of one apply step, committed atomically together with the applied index.
/// Reads through the batch ([`ApplyBatch::get`]) see its staged writes, so each of
/// several commands applied in one step sees the effects of those before it.
pub struct ApplyBatch {
    /// Key -> new value, or `None` for a removal. The last write of a key wins.
    staged: HashMap<Vec<u8>, Option<Vec<u8>>>,
    keyspace: Keyspace,
}

impl ApplyBatch {
    /// Stages `key = value`. `key` must not start with [`RESERVED_PREFIX`].
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let key = key.into();
        debug_assert!(key.first() != Some(&RESERVED_PREFIX), "reserved key");
        self.staged.insert(key, Some(value.into()));
    }

    /// Stages the removal of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        debug_assert!(key.first() != Some(&RESERVED_PREFIX), "reserved key");
        self.staged.insert(key, None);
    }

    /// Reads one state-machine key as it will be once this batch is committed.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.staged.get(key) {
            Some(staged) => Ok(staged.clone()),
            None => Ok(self.keyspace.get(key)?.map(|v| v.to_vec())),
        }
    }
}

/// What the replica driver keeps next to the state machine's data.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    /// Node id -> address of every peer that has been a member.
    pub peers: BTreeMap<u64, String>,
}

impl SmStore {
    pub(super) fn new(db: Database, gen: u64, keyspace: Keyspace) -> SmStore {
        SmStore {
            db,
            current: Arc::new(RwLock::new((gen, keyspace))),
        }
    }

    /// The current keyspace. Readers take it once per operation: a snapshot install
    /// replaces it.
    pub(super) fn keyspace(&self) -> Keyspace {
        self.current.read().expect("poisoned").1.clone()
    }

    fn generation(&self) -> u64 {
        self.current.read().expect("poisoned").0
    }

    /// A read-only view of the data as committed now, unchanged by later writes.
    /// Holding it pins that version in the engine.
    pub fn view(&self) -> StoreView {
        StoreView {
            snapshot: self.db.snapshot(),
            keyspace: self.keyspace(),
        }
    }

    /// Reads one state-machine key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.keyspace().get(key)?.map(|v| v.to_vec()))
    }

    /// The records within `bounds` as committed now, in key order. Each call reads
    /// its own version: take a [`SmStore::view`] for several consistent reads.
    pub fn range(&self, bounds: KeyBounds) -> impl Records {
        records(self.keyspace().range::<Vec<u8>, _>(bounds))
    }

    /// The records whose key starts with `prefix` as committed now, in key order.
    pub fn prefix(&self, prefix: &[u8]) -> impl Records {
        records(self.keyspace().prefix(prefix))
    }

    /// Starts a batch of state-machine writes.
    pub fn batch(&self) -> ApplyBatch {
        ApplyBatch {
            staged: HashMap::new(),
            keyspace: self.keyspace(),
        }
    }

    /// Commits `batch` together with the new applied position (and, after a conf
    /// change, the new conf state and peer address). Not fsynced: the Raft log is.
    pub(crate) fn commit(
        &self,
        batch: ApplyBatch,
        applied: (u64, u64),
        conf: Option<(&ConfState, Option<(u64, &str)>)>,
    ) -> Result<()> {
        let ks = batch.keyspace;
        let mut writes = self.db.batch();
        for (key, value) in batch.staged {
            match value {
                Some(value) => writes.insert(&ks, key, value),
                None => writes.remove(&ks, key),
            }
        }
        stage_applied(&mut writes, &ks, applied, conf.map(|(cs, _)| cs));
        if let Some((_, Some((id, addr)))) = conf {
            stage_peer(&mut writes, &ks, id, addr);
        }
        writes.commit()?;
        Ok(())
    }

    /// Reads the driver's state as of the last committed apply.
    pub(crate) fn applied_state(&self) -> Result<AppliedState> {
        self.view().applied_state()
    }

    /// Starts receiving a snapshot from the leader into the next generation, apart
    /// from the live data until [`RaftStore::install_snapshot`] makes it current.
    /// One snapshot is received at a time.
    ///
    /// [`RaftStore::install_snapshot`]: super::RaftStore::install_snapshot
    pub fn receive_snapshot(&self) -> Result<SnapshotWriter> {
        let gen = self.generation() + 1;
        let name = sm_keyspace_name(gen);
        let leftover = self.db.keyspace_exists(&name);
        let keyspace = self.db.keyspace(&name, KeyspaceCreateOptions::default)?;
        // A leftover of an earlier, abandoned transfer: start it afresh.
        if leftover {
            keyspace.clear()?;
        }
        Ok(SnapshotWriter {
            db: self.db.clone(),
            gen,
            keyspace,
        })
    }

    /// Makes `keyspace` (generation `gen`) current and drops the old generation. The
    /// caller has already made the switch durable in the `raft` keyspace.
    pub(super) fn switch_to(&self, staged: StagedSnapshot) -> Result<()> {
        let old = {
            let mut current = self.current.write().expect("poisoned");
            std::mem::replace(&mut *current, (staged.gen, staged.keyspace)).1
        };
        self.db.delete_keyspace(old)?;
        Ok(())
    }
}

/// Adds the driver's keys (applied position, and after a membership change the conf
/// state) to `batch`.
pub(crate) fn stage_applied(
    batch: &mut WriteBatch,
    ks: &Keyspace,
    applied: (u64, u64),
    conf_state: Option<&ConfState>,
) {
    let mut pos = Vec::with_capacity(16);
    pos.extend_from_slice(&applied.0.to_be_bytes());
    pos.extend_from_slice(&applied.1.to_be_bytes());
    batch.insert(ks, KEY_APPLIED, pos);
    if let Some(cs) = conf_state {
        batch.insert(ks, KEY_CONF_STATE, cs.write_to_bytes().expect("encode"));
    }
}

/// Adds the address of member `id` to `batch`.
pub(crate) fn stage_peer(batch: &mut WriteBatch, ks: &Keyspace, id: u64, addr: &str) {
    batch.insert(ks, peer_key(id), addr.as_bytes());
}

fn read_applied_state(view: &impl Readable, ks: &Keyspace) -> Result<AppliedState> {
    let mut state = AppliedState::default();
    if let Some(raw) = view.get(ks, KEY_APPLIED)? {
        if raw.len() != 16 {
            return Err(StorageError::Corrupt {
                what: "applied index",
                detail: format!("{} bytes", raw.len()),
            });
        }
        state.index = decode_u64(&raw[..8], "applied index")?;
        state.term = decode_u64(&raw[8..], "applied term")?;
    }
    if let Some(raw) = view.get(ks, KEY_CONF_STATE)? {
        state.conf_state =
            ConfState::parse_from_bytes(&raw).map_err(|e| StorageError::Corrupt {
                what: "conf state",
                detail: e.to_string(),
            })?;
    }
    for item in view.prefix(ks, PEER_PREFIX) {
        let (key, value) = item.into_inner()?;
        let id = decode_u64(&key[PEER_PREFIX.len()..], "peer id")?;
        state
            .peers
            .insert(id, String::from_utf8_lossy(&value).into_owned());
    }
    Ok(state)
}

fn peer_key(id: u64) -> Vec<u8> {
    let mut key = PEER_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}
