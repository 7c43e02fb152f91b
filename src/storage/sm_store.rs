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

impl StoreView {
    /// The records within `bounds`, in key order.
    pub fn range(
        &self,
        bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>),
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
        self.snapshot
            .range::<Vec<u8>, _>(&self.keyspace, bounds)
            .map(|item| {
                let (k, v) = item.into_inner()?;
                Ok((k.to_vec(), v.to_vec()))
            })
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
    pub fn keyspace(&self) -> Keyspace {
        self.current.read().expect("poisoned").1.clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.current.read().expect("poisoned").0
    }

    pub(crate) fn database(&self) -> &Database {
        &self.db
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
        read_applied_state(&self.db.snapshot(), &self.keyspace())
    }

    /// Creates the keyspace of the next generation, for a snapshot being received.
    pub(crate) fn create_staging(&self) -> Result<(u64, Keyspace)> {
        let gen = self.generation() + 1;
        let name = sm_keyspace_name(gen);
        // A leftover of an earlier, abandoned transfer: start it afresh.
        if self.db.keyspace_exists(&name) {
            let stale = self.db.keyspace(&name, KeyspaceCreateOptions::default)?;
            stale.clear()?;
            return Ok((gen, stale));
        }
        Ok((
            gen,
            self.db.keyspace(&name, KeyspaceCreateOptions::default)?,
        ))
    }

    /// Makes `keyspace` (generation `gen`) current and drops the old generation. The
    /// caller has already made the switch durable in the `raft` keyspace.
    pub(crate) fn switch_to(&self, gen: u64, keyspace: Keyspace) -> Result<()> {
        let old = {
            let mut current = self.current.write().expect("poisoned");
            std::mem::replace(&mut *current, (gen, keyspace)).1
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

pub(crate) fn read_applied_state(view: &impl Readable, ks: &Keyspace) -> Result<AppliedState> {
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
