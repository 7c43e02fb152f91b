//! The Raft log, hard state and snapshots: implements `raft::Storage`.

use super::sm_store::{stage_applied, stage_peer, Records, SmStore, StagedSnapshot, StoreView};
use super::{decode_u64, Result, StorageError, KEY_SM_GEN};
use fjall::{Database, Keyspace, PersistMode};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

const KEY_HARD_STATE: &[u8] = b"hard_state";
/// Index (and term) at which a new group's log starts.
pub const INIT_INDEX: u64 = 5;
const KEY_TRUNCATED: &[u8] = b"truncated";
/// Outgoing snapshots kept at once (one per follower that needs one).
const MAX_OUTGOING_SNAPSHOTS: usize = 8;

/// A consistent, point-in-time view of the state machine, being streamed to one
/// follower. Holding it pins that version of the data in the engine.
#[derive(Clone)]
pub struct OutgoingSnapshot {
    pub index: u64,
    view: StoreView,
}

impl OutgoingSnapshot {
    /// Iterates every record of the snapshot in key order.
    pub fn records(&self) -> impl Records {
        self.view.all()
    }
}

#[derive(Default)]
struct LogState {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry compacted away (or of the installed snapshot).
    truncated: (u64, u64),
    last_index: u64,
    /// A running total of the log's encoded bytes at each index from `truncated.0` to
    /// `last_index`: the size of any stretch of the log is one subtraction.
    ends: VecDeque<u64>,
}

impl LogState {
    /// Forgets the whole log: it now starts after `index`.
    fn reset_to(&mut self, index: u64, term: u64) {
        self.truncated = (index, term);
        self.last_index = index;
        self.ends = VecDeque::from([0]);
    }

    /// Bytes of the entries after the first index's predecessor, through `index`.
    fn bytes_through(&self, index: u64) -> u64 {
        self.ends[(index - self.truncated.0) as usize] - self.ends[0]
    }

    fn push_end(&mut self, entry_bytes: usize) {
        let total = self.ends.back().expect("never empty") + entry_bytes as u64;
        self.ends.push_back(total);
    }
}

/// Raft log storage of one node. Cloning shares it.
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    raft: Keyspace,
    log: Keyspace,
    sm: SmStore,
    state: Mutex<LogState>,
    outgoing: Mutex<HashMap<u64, OutgoingSnapshot>>,
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn corrupt(what: &'static str, e: impl ToString) -> StorageError {
    StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn to_raft_error(e: StorageError) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(e)))
}

impl RaftStore {
    pub(super) fn open(
        db: Database,
        raft: Keyspace,
        log: Keyspace,
        sm: SmStore,
    ) -> Result<RaftStore> {
        let mut state = LogState::default();
        if let Some(raw) = raft.get(KEY_HARD_STATE)? {
            state.hard_state =
                HardState::parse_from_bytes(&raw).map_err(|e| corrupt("hard state", e))?;
        }
        if let Some(raw) = raft.get(KEY_TRUNCATED)? {
            state.truncated = (
                decode_u64(&raw[..8], "truncated index")?,
                decode_u64(&raw[8..], "truncated term")?,
            );
        }
        let (index, term) = state.truncated;
        state.reset_to(index, term);
        for item in log.range(log_key(index + 1)..) {
            let (key, raw) = item.into_inner()?;
            state.last_index = decode_u64(&key, "log index")?;
            state.push_end(raw.len());
        }
        let expected = state.last_index - state.truncated.0 + 1;
        if state.ends.len() as u64 != expected {
            return Err(corrupt(
                "log",
                format!("gap after index {}", state.truncated.0),
            ));
        }
        state.conf_state = sm.applied_state()?.conf_state;
        Ok(RaftStore {
            inner: Arc::new(Inner {
                db,
                raft,
                log,
                sm,
                state: Mutex::new(state),
                outgoing: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.state.lock().expect("poisoned")
    }

    pub fn first_index(&self) -> u64 {
        self.state().truncated.0 + 1
    }

    pub fn last_index(&self) -> u64 {
        self.state().last_index
    }

    /// Encoded bytes of the log's entries from its first index through `index`.
    pub fn bytes_through(&self, index: u64) -> u64 {
        let state = self.state();
        state.bytes_through(index.clamp(state.truncated.0, state.last_index))
    }

    /// Durably appends `entries` (replacing any conflicting suffix) and records `hard_state`,
    /// with one fsync. This is the one durable write per Raft Ready.
    ///
    /// A Ready that only advances the commit index is written without an fsync: a lost
    /// commit index is learned again from the leader (as in [`Self::set_commit`]), and
    /// syncing it would put a second fsync between a write's replication and its reply.
    /// It still precedes, in the one journal, the applied state written after it, so a
    /// recovered applied index never exceeds the recovered commit index.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut state = self.state();
        let vote_changed = hard_state
            .is_some_and(|hs| hs.term != state.hard_state.term || hs.vote != state.hard_state.vote);
        let sync = !entries.is_empty() || vote_changed;
        let mut batch = self
            .inner
            .db
            .batch()
            .durability(sync.then_some(PersistMode::SyncData));
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            assert!(
                first.index > state.truncated.0,
                "append of compacted index {} (compacted up to {})",
                first.index,
                state.truncated.0
            );
            // Entries after the new last one belong to a deposed leader's term.
            for stale in last.index + 1..=state.last_index {
                batch.remove(&self.inner.log, log_key(stale));
            }
            let kept = (first.index - state.truncated.0) as usize;
            state.ends.truncate(kept);
            for e in entries {
                let raw = e.write_to_bytes().expect("encode");
                state.push_end(raw.len());
                batch.insert(&self.inner.log, log_key(e.index), raw);
            }
            state.last_index = last.index;
        }
        if let Some(hs) = hard_state {
            batch.insert(
                &self.inner.raft,
                KEY_HARD_STATE,
                hs.write_to_bytes().expect("encode"),
            );
            state.hard_state = hs.clone();
        }
        batch.commit()?;
        Ok(())
    }

    /// Records the commit index learned after a Ready was advanced (not fsynced: a lost
    /// commit index is learned again from the leader).
    pub fn set_commit(&self, commit: u64) -> Result<()> {
        let mut state = self.state();
        state.hard_state.commit = commit;
        self.inner.raft.insert(
            KEY_HARD_STATE,
            state.hard_state.write_to_bytes().expect("encode"),
        )?;
        Ok(())
    }

    /// Writes the initial state of a brand-new group: its members, and a log that
    /// starts after [`INIT_INDEX`] as if a snapshot had been taken there. A node added
    /// later starts with an empty log, so the leader must send it a snapshot — which
    /// carries the membership that was never a log entry. (TiKV does the same.)
    pub fn bootstrap(&self, conf_state: &ConfState, peers: &BTreeMap<u64, String>) -> Result<()> {
        let mut state = self.state();
        let ks = self.inner.sm.keyspace();
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        let hs = HardState {
            term: INIT_INDEX,
            commit: INIT_INDEX,
            ..Default::default()
        };
        batch.insert(
            &self.inner.raft,
            KEY_HARD_STATE,
            hs.write_to_bytes().expect("encode"),
        );
        batch.insert(
            &self.inner.raft,
            KEY_TRUNCATED,
            encode_pos(INIT_INDEX, INIT_INDEX),
        );
        stage_applied(&mut batch, &ks, (INIT_INDEX, INIT_INDEX), Some(conf_state));
        for (id, addr) in peers {
            stage_peer(&mut batch, &ks, *id, addr);
        }
        batch.commit()?;
        state.hard_state = hs;
        state.reset_to(INIT_INDEX, INIT_INDEX);
        state.conf_state = conf_state.clone();
        Ok(())
    }

    /// Records, durably, that this node was removed from its group: it must never
    /// start again on this data directory (it would vote with a stale view).
    pub fn mark_removed(&self) -> Result<()> {
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&self.inner.raft, super::KEY_REMOVED, b"1");
        batch.commit()?;
        Ok(())
    }

    /// Remembers the conf state after a conf change was applied.
    pub fn set_conf_state(&self, cs: ConfState) {
        self.state().conf_state = cs;
    }

    /// Drops log entries up to and including `index` (which must be applied).
    pub fn compact_to(&self, index: u64) -> Result<()> {
        let mut state = self.state();
        if index <= state.truncated.0 {
            return Ok(());
        }
        assert!(index <= state.last_index, "compact past the last index");
        let term = self.entry_term(index)?;
        let mut batch = self.inner.db.batch();
        for i in state.truncated.0 + 1..=index {
            batch.remove(&self.inner.log, log_key(i));
        }
        batch.insert(&self.inner.raft, KEY_TRUNCATED, encode_pos(index, term));
        batch.commit()?;
        let dropped = (index - state.truncated.0) as usize;
        state.ends.drain(..dropped);
        state.truncated = (index, term);
        Ok(())
    }

    /// Makes a received snapshot current: its staged state-machine generation
    /// becomes the live one, the log is emptied and the hard state moves to the
    /// snapshot, all in one synced write.
    pub fn install_snapshot(&self, snapshot: &Snapshot, staged: StagedSnapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        let mut state = self.state();
        let mut batch = self
            .inner
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        for i in state.truncated.0 + 1..=state.last_index {
            batch.remove(&self.inner.log, log_key(i));
        }
        let mut hs = state.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        batch.insert(
            &self.inner.raft,
            KEY_HARD_STATE,
            hs.write_to_bytes().expect("encode"),
        );
        batch.insert(
            &self.inner.raft,
            KEY_TRUNCATED,
            encode_pos(meta.index, meta.term),
        );
        batch.insert(
            &self.inner.raft,
            KEY_SM_GEN,
            staged.generation().to_be_bytes(),
        );
        batch.commit()?;
        state.hard_state = hs;
        state.reset_to(meta.index, meta.term);
        state.conf_state = meta.get_conf_state().clone();
        drop(state);
        self.inner.sm.switch_to(staged)
    }

    /// Takes the snapshot prepared for follower `to`, to stream it.
    pub fn take_outgoing(&self, to: u64) -> Option<OutgoingSnapshot> {
        self.inner.outgoing.lock().expect("poisoned").remove(&to)
    }

    fn entry_term(&self, index: u64) -> Result<u64> {
        let raw = self
            .inner
            .log
            .get(log_key(index))?
            .ok_or_else(|| corrupt("log", format!("missing entry {index}")))?;
        let e = Entry::parse_from_bytes(&raw).map_err(|e| corrupt("log entry", e))?;
        Ok(e.term)
    }
}

fn encode_pos(index: u64, term: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&index.to_be_bytes());
    v.extend_from_slice(&term.to_be_bytes());
    v
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let state = self.state();
        Ok(RaftState::new(
            state.hard_state.clone(),
            state.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        {
            let state = self.state();
            if low <= state.truncated.0 {
                return Err(raft::Error::Store(RaftStorageError::Compacted));
            }
            assert!(high <= state.last_index + 1, "entries past the last index");
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for item in self.inner.log.range(log_key(low)..log_key(high)) {
            let (_, raw) = item.into_inner().map_err(|e| to_raft_error(e.into()))?;
            size += raw.len() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(
                Entry::parse_from_bytes(&raw)
                    .map_err(|e| to_raft_error(corrupt("log entry", e)))?,
            );
        }
        if out.len() as u64 != high - low && size <= max_size {
            return Err(to_raft_error(corrupt(
                "log",
                format!("gap in [{low}, {high})"),
            )));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (truncated, last) = {
            let state = self.state();
            (state.truncated, state.last_index)
        };
        if idx == truncated.0 {
            return Ok(truncated.1);
        }
        if idx < truncated.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        self.entry_term(idx).map_err(to_raft_error)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(RaftStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(RaftStore::last_index(self))
    }

    /// Builds a snapshot of the state machine as of its applied index. The returned
    /// Raft snapshot carries only metadata; the data is streamed separately from the
    /// pinned engine snapshot registered for `to`.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let view = self.inner.sm.view();
        let applied = view.applied_state().map_err(to_raft_error)?;
        if applied.index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = applied.index;
        meta.term = applied.term;
        meta.set_conf_state(applied.conf_state);
        let mut outgoing = self.inner.outgoing.lock().expect("poisoned");
        if outgoing.len() >= MAX_OUTGOING_SNAPSHOTS && !outgoing.contains_key(&to) {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        outgoing.insert(
            to,
            OutgoingSnapshot {
                index: applied.index,
                view,
            },
        );
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Engine, Identity};

    fn open(dir: &std::path::Path) -> RaftStore {
        let identity = Identity {
            cluster: "test".into(),
            role: "kvnode".into(),
            group: 1,
            node: 1,
        };
        Engine::open(dir, &identity)
            .unwrap()
            .into_stores()
            .unwrap()
            .0
    }

    fn entry(index: u64, term: u64, bytes: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![7; bytes].into(),
            ..Default::default()
        }
    }

    fn size(e: &Entry) -> u64 {
        e.write_to_bytes().unwrap().len() as u64
    }

    #[test]
    fn the_logs_byte_count_follows_appends_overwrites_compactions_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        store.bootstrap(&cs, &BTreeMap::new()).unwrap();
        let first: Vec<Entry> = (6..=10).map(|i| entry(i, 6, 100 * i as usize)).collect();
        store.persist(&first, None).unwrap();
        let total = |es: &[Entry]| es.iter().map(size).sum::<u64>();
        assert_eq!(store.bytes_through(10), total(&first));
        assert_eq!(store.bytes_through(7), total(&first[..2]));
        // A new leader's entry 9 replaces the old 9 and 10.
        let replaced = entry(9, 7, 5000);
        store
            .persist(std::slice::from_ref(&replaced), None)
            .unwrap();
        assert_eq!(store.last_index(), 9);
        assert_eq!(store.bytes_through(9), total(&first[..3]) + size(&replaced));
        store.compact_to(7).unwrap();
        let kept = size(&first[2]) + size(&replaced);
        assert_eq!(store.bytes_through(9), kept);
        drop(store);
        let reopened = open(dir.path());
        assert_eq!(reopened.first_index(), 8);
        assert_eq!(reopened.bytes_through(9), kept);
        assert_eq!(reopened.bytes_through(u64::MAX), kept);
    }
}
