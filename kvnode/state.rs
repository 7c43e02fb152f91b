//! A kv group's replicated state machine: the ordered data, the configuration the
//! group has applied, the ranges it holds (and their transfer state), and the client
//! sessions that make retried writes apply once.
//!
//! Stored keys: `d` + user key -> value; `s` + client id -> `ClientSession`;
//! `mconfig` -> `Config`; `mheld` -> `HeldRanges`; `mmoves` -> `MoveStates`;
//! `r` + plan id + log index + position -> `MoveDelta` (writes recorded at a live
//! move's source). Data keys sort before session keys, so a range transfer streams a
//! range's data and then the sessions, in key order.
//!
//! Live moves (plans in the configuration): the source serves the range and records
//! the result of every write to it, in the same apply batch as the write; the
//! destination installs a copy of the range and then those results, in order, until
//! the source freezes the range and the last of them arrives. A copy read while
//! writes go on may mix old and new values, but every write applied after the plan
//! is recorded, so replaying the results over it in order ends in the source's state.

use super::stats::{RangeStatsTable, SeedJob};
use crate::proto::storage::kv_command::Command;
use crate::proto::storage::write::Op;
use crate::proto::storage::write_result::Result as Effect;
use crate::proto::storage::{
    ClientSession, CompareAndSwapResult, DeleteResult, HeldRanges, KvCommand, MoveChunk, MoveDelta,
    MoveStates, PutResult, RangeOp, RequestId, SessionEntry, WriteResult,
};
use crate::proto::{Config, HeldRange, KeyRange, KeyValue, MoveState, RangeState, RangeStats};
use crate::replica::{StateMachine, UnknownCommand};
use crate::storage::{ApplyBatch, KeyBounds, SmStore, StoreView};
use prost::Message;
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Mutex;

const DATA: u8 = b'd';
const SESSION: u8 = b's';
const KEY_CONFIG: &[u8] = b"mconfig";
const KEY_HELD: &[u8] = b"mheld";
const KEY_MOVES: &[u8] = b"mmoves";
const DELTA: u8 = b'r';
/// Replies remembered per client (its writes in flight at once).
const MAX_SESSION_ENTRIES: usize = 256;
/// A client silent for this many log entries is forgotten.
const SESSION_TTL_ENTRIES: u64 = 1_000_000;
/// Every this many entries, idle sessions are expired.
const SESSION_SWEEP_EVERY: u64 = 8192;
/// Keys deleted per garbage-collection command.
pub const DELETE_CHUNK_KEYS: usize = 1024;

/// Why a write was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The key is not served by this group in its configuration `config_num`;
    /// `moving_to` is the destination of a live move whose cutover froze it (0: none).
    WrongGroup { config_num: u64, moving_to: u64 },
    /// The client already acknowledged this write's reply, so this is a stale copy.
    Superseded { seq: u64 },
    /// The client has more unacknowledged writes than the server remembers replies for.
    TooManyInFlight { limit: usize },
}

/// A client write's result, or why it was not applied.
pub type WriteOutcome = Result<WriteResult, KvError>;

/// One page of a scan: the pairs and where to resume (empty when done).
pub type ScanPage = (Vec<KeyValue>, Vec<u8>);

/// A read of stored records prepared under the state lock and run without it, so a
/// chunk of a range's copy does not hold up the writes being applied meanwhile.
pub struct MoveRead {
    view: StoreView,
    segments: Vec<KeyBounds>,
    /// Deltas: the source had frozen the range when the read was prepared.
    pub frozen: bool,
    /// Deltas: the bytes recorded when the read was prepared.
    pub recorded_bytes: u64,
}

impl MoveRead {
    /// The records, in order, up to about `max_bytes`; and whether they are all.
    pub fn run(&self, max_bytes: usize) -> anyhow::Result<(Vec<KeyValue>, bool)> {
        let mut records = Vec::new();
        let mut bytes = 0;
        for bounds in &self.segments {
            for item in self.view.range(bounds.clone()) {
                let (key, value) = item?;
                bytes += key.len() + value.len();
                records.push(KeyValue { key, value });
                if bytes >= max_bytes {
                    return Ok((records, false));
                }
            }
        }
        Ok((records, true))
    }
}

/// The bounds of a range's records after `cursor`: its data, then every session.
fn range_segments(range: &KeyRange, cursor: &[u8]) -> Vec<KeyBounds> {
    let (data_start, data_end) = data_bounds(range);
    vec![
        (after_cursor(data_start, cursor), data_end),
        (
            after_cursor(vec![SESSION], cursor),
            Bound::Excluded(vec![SESSION + 1]),
        ),
    ]
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA);
    k.extend_from_slice(key);
    k
}

fn session_key(client: u64) -> Vec<u8> {
    let mut k = vec![SESSION];
    k.extend_from_slice(&client.to_be_bytes());
    k
}

/// Storage-key bounds of a user key range's data.
fn data_bounds(range: &KeyRange) -> (Vec<u8>, Bound<Vec<u8>>) {
    let end = if range.end.is_empty() {
        Bound::Excluded(vec![DATA + 1])
    } else {
        Bound::Excluded(data_key(&range.end))
    };
    (data_key(&range.start), end)
}

/// Prefix of the deltas recorded for plan `plan`.
fn delta_prefix(plan: u64) -> Vec<u8> {
    let mut k = vec![DELTA];
    k.extend_from_slice(&plan.to_be_bytes());
    k
}

/// The key of the `pos`-th delta recorded while applying entry `index`.
fn delta_key(plan: u64, index: u64, pos: u32) -> Vec<u8> {
    let mut k = delta_prefix(plan);
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

/// Keys of `prefix` strictly after `cursor` (all of them when it is empty).
fn after_cursor(lower: Vec<u8>, cursor: &[u8]) -> Bound<Vec<u8>> {
    if !cursor.is_empty() && cursor >= lower.as_slice() {
        Bound::Excluded(cursor.to_vec())
    } else {
        Bound::Included(lower)
    }
}

fn plan_range(m: &MoveState) -> KeyRange {
    m.plan
        .as_ref()
        .and_then(|p| p.range.clone())
        .unwrap_or_default()
}

fn plan_id(m: &MoveState) -> u64 {
    m.plan.as_ref().map_or(0, |p| p.id)
}

fn same_range(a: &Option<KeyRange>, b: &KeyRange) -> bool {
    a.as_ref() == Some(b)
}

/// The state of one kv group.
pub struct KvState {
    gid: u64,
    store: Option<SmStore>,
    config: Config,
    held: Vec<HeldRange>,
    /// Live moves this group is the source or the destination of.
    moves: Vec<MoveState>,
    /// Plans that ended whose recorded deltas are still to be deleted (source).
    ended: Vec<u64>,
    /// (entry index, deltas recorded so far in it): positions within one entry.
    delta_pos: (u64, u32),
    /// Source: the view each outgoing plan's copy reads, taken at its first copy
    /// read. A fixed view lets the copy end however fast the range is written (the
    /// writes after it arrive as deltas); a live read would chase new keys ahead of
    /// its cursor. Not persisted: after a restart the copy resumes on a new view.
    copy_views: Mutex<HashMap<u64, StoreView>>,
    /// Size and load of the ranges the applied configuration gives this group (in
    /// memory: reads count through `&self`).
    stats: Mutex<RangeStatsTable>,
}

impl KvState {
    pub fn new(gid: u64) -> KvState {
        KvState {
            gid,
            store: None,
            config: Config::initial(),
            held: Vec::new(),
            moves: Vec::new(),
            ended: Vec::new(),
            delta_pos: (0, 0),
            copy_views: Mutex::default(),
            stats: Mutex::default(),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, RangeStatsTable> {
        self.stats.lock().expect("poisoned")
    }

    /// Follows the ranges the applied configuration gives this group.
    fn follow_stats(&self) {
        let gid = self.gid;
        let owned = self.config.ranges.iter().filter(|r| r.gid == gid);
        self.stats().follow(owned.filter_map(|r| r.range.as_ref()));
    }

    /// The statistics of the ranges this group owns, each with the state of the held
    /// range containing it.
    pub fn range_stats(&self) -> Vec<RangeStats> {
        let mut out = self.stats().report();
        for s in &mut out {
            let start = s
                .range
                .as_ref()
                .map(|r| r.start.as_slice())
                .unwrap_or_default();
            s.state = self
                .held
                .iter()
                .find(|h| h.range.as_ref().is_some_and(|r| r.contains(start)))
                .map_or(0, |h| h.state);
        }
        out
    }

    /// The ranges whose size must be counted, and one view to count them in (taken
    /// now, under the state lock: writes from here on are counted on top of it).
    pub fn seed_jobs(&self) -> (Vec<SeedJob>, StoreView) {
        (self.stats().seed_jobs(), self.store().view())
    }

    /// The result of a seed job (see [`count_range`]); a failed count is tried again.
    pub fn seeded(&self, job: &SeedJob, count: anyhow::Result<RangeCount>) {
        match count {
            Ok(c) => self.stats().seeded(job, c.keys, c.bytes, c.middle),
            Err(_) => self.stats().invalidate(&job.range),
        }
    }

    fn store(&self) -> &SmStore {
        self.store.as_ref().expect("restored before use")
    }

    /// The store, for reads that must not hold the state lock (long scans).
    pub fn store_handle(&self) -> SmStore {
        self.store().clone()
    }

    /// This group's id.
    pub fn gid(&self) -> u64 {
        self.gid
    }

    /// The configuration this group has applied.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ranges this group holds data for, in key order.
    pub fn held(&self) -> &[HeldRange] {
        &self.held
    }

    /// The live moves this group takes part in.
    pub fn moves(&self) -> &[MoveState] {
        &self.moves
    }

    /// Plans whose recorded deltas are still to be deleted.
    pub fn ended_plans(&self) -> &[u64] {
        &self.ended
    }

    fn is_source(&self, m: &MoveState) -> bool {
        m.plan.as_ref().is_some_and(|p| p.source == self.gid)
    }

    /// The source side of plan `id`.
    fn outgoing(&self, id: u64) -> Option<usize> {
        self.moves
            .iter()
            .position(|m| plan_id(m) == id && self.is_source(m))
    }

    /// The destination side of plan `id`.
    fn incoming(&self, id: u64) -> Option<usize> {
        self.moves
            .iter()
            .position(|m| plan_id(m) == id && !self.is_source(m))
    }

    /// True if `key` is in a range copied here that becomes ours with the cutover
    /// configuration: a request for it is worth holding for a moment. From the end
    /// of the copy, not of the deltas: a client sent here by the frozen source (its
    /// wrong-group answer names this group) may come before the last deltas.
    pub fn arriving(&self, key: &[u8]) -> bool {
        self.moves
            .iter()
            .any(|m| m.copy_done && !self.is_source(m) && plan_range(m).contains(key))
    }

    /// True when every held range is served and every previous owner has been told to
    /// drop its copy: the group may move to the next configuration.
    pub fn settled(&self) -> bool {
        self.held
            .iter()
            .all(|h| h.state() == RangeState::Serving && !h.release_pending)
    }

    /// The served range containing `key`, or the wrong-group error.
    pub fn serving_range(&self, key: &[u8]) -> Result<&KeyRange, KvError> {
        let frozen_for = self
            .moves
            .iter()
            .find(|m| m.frozen && plan_range(m).contains(key))
            .map(|m| m.plan.as_ref().map_or(0, |p| p.dest));
        self.held
            .iter()
            .filter(|_| frozen_for.is_none())
            .filter(|h| h.state() == RangeState::Serving)
            .filter_map(|h| h.range.as_ref())
            .find(|r| r.contains(key))
            .ok_or(KvError::WrongGroup {
                config_num: self.config.num,
                moving_to: frozen_for.unwrap_or(0),
            })
    }

    /// Reads `key` (the caller has established a linearizable read point).
    pub fn get(&self, key: &[u8]) -> anyhow::Result<Result<Option<Vec<u8>>, KvError>> {
        if let Err(e) = self.serving_range(key) {
            return Ok(Err(e));
        }
        self.stats().read(key);
        Ok(Ok(self.store().get(&data_key(key))?))
    }

    /// Up to `limit` pairs (and about `max_bytes`) of `[start, end)` within the served
    /// range containing `start`, and where to resume (empty when `[start, end)` is
    /// exhausted). An empty `start` is the beginning of the key space.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Result<ScanPage, KvError>> {
        let range = match self.serving_range(start) {
            Ok(r) => r.clone(),
            Err(e) => return Ok(Err(e)),
        };
        self.stats().read(start);
        // Stop at whichever comes first: the request's end or the range's.
        let (stop, resume_at_range_end) = match (end.is_empty(), range.end.is_empty()) {
            (_, true) => (end.to_vec(), false),
            (true, false) => (range.end.clone(), true),
            (false, false) if range.end.as_slice() < end => (range.end.clone(), true),
            (false, false) => (end.to_vec(), false),
        };
        let bounds = data_bounds(&KeyRange {
            start: start.to_vec(),
            end: stop,
        });
        let mut pairs = Vec::new();
        let mut bytes = 0;
        for item in self.store().range((Bound::Included(bounds.0), bounds.1)) {
            let (k, value) = item?;
            if pairs.len() == limit || bytes >= max_bytes {
                // Resume at the first key not returned.
                return Ok(Ok((pairs, k[1..].to_vec())));
            }
            bytes += k.len() + value.len();
            pairs.push(KeyValue {
                key: k[1..].to_vec(),
                value,
            });
        }
        let resume = if resume_at_range_end {
            range.end
        } else {
            Vec::new()
        };
        Ok(Ok((pairs, resume)))
    }

    /// The records of a FROZEN range after `cursor`, for its new owner: the range's
    /// data, then every client session. `Err` says why the range cannot be pulled.
    pub fn pull(
        &self,
        config_num: u64,
        range: &KeyRange,
        cursor: &[u8],
        max_bytes: usize,
    ) -> anyhow::Result<Result<(Vec<KeyValue>, bool), String>> {
        let frozen = self.held.iter().any(|h| {
            h.state() == RangeState::Frozen
                && h.config_num == config_num
                && same_range(&h.range, range)
        });
        if !frozen {
            return Ok(Err(if self.config.num < config_num {
                format!(
                    "group {} has not applied configuration {config_num} yet",
                    self.gid
                )
            } else {
                format!(
                    "group {} holds no frozen range {range} of configuration {config_num}",
                    self.gid
                )
            }));
        }
        Ok(Ok(self.range_records(range, cursor, max_bytes)?))
    }

    /// The records of a range after `cursor`: its data, then every client session;
    /// and whether they are all.
    fn range_records(
        &self,
        range: &KeyRange,
        cursor: &[u8],
        max_bytes: usize,
    ) -> anyhow::Result<(Vec<KeyValue>, bool)> {
        self.move_read(self.store().view(), range_segments(range, cursor))
            .run(max_bytes)
    }

    fn move_read(&self, view: StoreView, segments: Vec<KeyBounds>) -> MoveRead {
        MoveRead {
            view,
            segments,
            frozen: false,
            recorded_bytes: 0,
        }
    }

    fn no_plan(&self, id: u64) -> String {
        format!(
            "group {} is not the source of move plan {id} (configuration {}: not applied yet, or the plan ended)",
            self.gid, self.config.num
        )
    }

    /// Live move: a read of the current records of the range of plan `id` after
    /// `cursor` (its data, then the client sessions), for the destination's copy.
    pub fn copy(&self, id: u64, cursor: &[u8]) -> Result<MoveRead, String> {
        let m = self.outgoing(id).ok_or_else(|| self.no_plan(id))?;
        // Every entry before the plan's is committed once the plan is applied, so
        // the view holds all the range's writes that no delta records.
        let view = self
            .copy_views
            .lock()
            .expect("poisoned")
            .entry(id)
            .or_insert_with(|| self.store().view())
            .clone();
        Ok(self.move_read(view, range_segments(&plan_range(&self.moves[m]), cursor)))
    }

    /// Live move: a read of the deltas recorded for plan `id` after `cursor`.
    pub fn deltas(&self, id: u64, cursor: &[u8]) -> Result<MoveRead, String> {
        let m = self.outgoing(id).ok_or_else(|| self.no_plan(id))?;
        let segments = vec![(
            after_cursor(delta_prefix(id), cursor),
            Bound::Excluded(delta_prefix(id + 1)),
        )];
        // Taken before the records are read: if frozen now, every delta exists.
        let m = &self.moves[m];
        Ok(MoveRead {
            frozen: m.frozen,
            recorded_bytes: m.recorded_bytes,
            ..self.move_read(self.store().view(), segments)
        })
    }

    /// True if this replica has applied the freeze of plan `id` (`None`: no such plan).
    pub fn frozen(&self, id: u64) -> Option<bool> {
        self.outgoing(id).map(|m| self.moves[m].frozen)
    }

    fn session(&self, client: u64, batch: &ApplyBatch) -> anyhow::Result<ClientSession> {
        Ok(match batch.get(&session_key(client))? {
            Some(raw) => ClientSession::decode(raw.as_slice())?,
            None => ClientSession::default(),
        })
    }

    fn save_moves(&self, batch: &mut ApplyBatch) {
        batch.put(
            KEY_MOVES,
            MoveStates {
                moves: self.moves.clone(),
                ended: self.ended.clone(),
            }
            .encode_to_vec(),
        );
    }

    /// Records the result of a write to `key` (already staged in `batch`) if the key
    /// is in a range this group is the source of a live move of.
    fn record(
        &mut self,
        index: u64,
        key: &[u8],
        session: Option<(u64, u64, SessionEntry)>,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let gid = self.gid;
        let Some(m) = self.moves.iter().position(|m| {
            m.plan.as_ref().is_some_and(|p| p.source == gid) && plan_range(m).contains(key)
        }) else {
            return Ok(());
        };
        let pos = if self.delta_pos.0 == index {
            self.delta_pos.1
        } else {
            0
        };
        self.delta_pos = (index, pos + 1);
        let (client_id, first_incomplete, entry) = session.unwrap_or_default();
        let delta = MoveDelta {
            key: key.to_vec(),
            value: batch.get(&data_key(key))?,
            client_id,
            first_incomplete,
            entry: (client_id != 0).then_some(entry),
        }
        .encode_to_vec();
        self.moves[m].recorded_bytes += delta.len() as u64;
        batch.put(delta_key(plan_id(&self.moves[m]), index, pos), delta);
        self.save_moves(batch);
        Ok(())
    }

    fn save_held(&self, batch: &mut ApplyBatch) {
        batch.put(
            KEY_HELD,
            HeldRanges {
                ranges: self.held.clone(),
            }
            .encode_to_vec(),
        );
    }

    /// Runs `write` of `key` and adds what it changed to the range's statistics.
    fn counted_write(
        &self,
        key: &[u8],
        batch: &mut ApplyBatch,
        write: impl FnOnce(&mut ApplyBatch) -> anyhow::Result<Effect>,
    ) -> anyhow::Result<WriteResult> {
        let stored = data_key(key);
        let before = batch.get(&stored)?.map(|v| v.len());
        let result = WriteResult {
            result: Some(write(batch)?),
        };
        let after = batch.get(&stored)?.map(|v| v.len());
        self.stats().wrote(key, before, after);
        Ok(result)
    }

    /// Applies a client write: checks ownership, answers a retry from the session,
    /// otherwise runs `write` and remembers its result.
    fn client_write(
        &mut self,
        index: u64,
        key: &[u8],
        id: Option<RequestId>,
        batch: &mut ApplyBatch,
        write: impl FnOnce(&mut ApplyBatch) -> anyhow::Result<Effect>,
    ) -> anyhow::Result<WriteOutcome> {
        if let Err(e) = self.serving_range(key) {
            return Ok(Err(e));
        }
        let id = id.unwrap_or_default();
        if id.client_id == 0 {
            let result = self.counted_write(key, batch, write)?;
            self.record(index, key, None, batch)?;
            return Ok(Ok(result));
        }
        let mut session = self.session(id.client_id, batch)?;
        if id.seq < session.first_incomplete {
            return Ok(Err(KvError::Superseded { seq: id.seq }));
        }
        if let Some(entry) = session.entries.iter().find(|e| e.seq == id.seq) {
            return Ok(Ok(entry.result.clone().unwrap_or_default()));
        }
        session.first_incomplete = session.first_incomplete.max(id.first_incomplete);
        let floor = session.first_incomplete;
        session.entries.retain(|e| e.seq >= floor);
        // Forgetting an unacknowledged reply would let its retry apply twice: refuse.
        if session.entries.len() >= MAX_SESSION_ENTRIES {
            return Ok(Err(KvError::TooManyInFlight {
                limit: MAX_SESSION_ENTRIES,
            }));
        }
        let result = self.counted_write(key, batch, write)?;
        let entry = SessionEntry {
            seq: id.seq,
            result: Some(result.clone()),
        };
        session.entries.push(entry.clone());
        session.last_index = index;
        batch.put(session_key(id.client_id), session.encode_to_vec());
        let recorded = (id.client_id, session.first_incomplete, entry);
        self.record(index, key, Some(recorded), batch)?;
        Ok(Ok(result))
    }

    /// Applies one client write of a `WriteBatch`.
    fn apply_write(
        &mut self,
        index: u64,
        key: Vec<u8>,
        id: Option<RequestId>,
        op: Op,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<WriteOutcome> {
        let stored = data_key(&key);
        self.client_write(index, &key, id, batch, |batch| match op {
            Op::Put(put) => {
                batch.put(stored, put.value);
                Ok(Effect::Put(PutResult {}))
            }
            Op::Delete(_) => {
                let existed = batch.get(&stored)?.is_some();
                batch.delete(stored);
                Ok(Effect::Delete(DeleteResult { existed }))
            }
            Op::Cas(cas) => {
                let current = batch.get(&stored)?;
                if current != cas.expected {
                    return Ok(Effect::Cas(CompareAndSwapResult {
                        swapped: false,
                        found: current.is_some(),
                        current: current.unwrap_or_default(),
                    }));
                }
                match &cas.value {
                    Some(v) => batch.put(stored, v.clone()),
                    None => batch.delete(stored),
                }
                Ok(Effect::Cas(CompareAndSwapResult {
                    swapped: true,
                    found: cas.value.is_some(),
                    current: cas.value.unwrap_or_default(),
                }))
            }
        })
    }

    /// Applies one of the group's own commands (not a client write), which cannot fail.
    fn apply_command(
        &mut self,
        index: u64,
        command: Command,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let done = Ok(());
        match command {
            Command::Config(next) => {
                self.apply_config(next, batch)?;
                done
            }
            Command::Writes(_) => unreachable!("`apply` applies client writes"),
            Command::Install(chunk) => {
                let range = chunk.range.unwrap_or_default();
                let Some(h) = self.find_held(RangeState::Pulling, chunk.config_num, &range) else {
                    return done; // a duplicate, or a chunk of a finished transfer
                };
                let Some(last) = chunk.records.last() else {
                    return done;
                };
                let cursor = last.key.clone();
                self.stats().invalidate(&range);
                for record in chunk.records {
                    match record.key.first() {
                        Some(&DATA) if range.contains(&record.key[1..]) => {
                            batch.put(record.key, record.value)
                        }
                        Some(&SESSION) => self.merge_session(index, record, batch)?,
                        _ => {} // not part of this range: ignore rather than corrupt
                    }
                }
                self.held[h].cursor = cursor;
                self.save_held(batch);
                done
            }
            Command::FinishPull(op) => {
                if let Some(h) = self.find_op(RangeState::Pulling, &op) {
                    let held = &mut self.held[h];
                    held.set_state(RangeState::Serving);
                    held.cursor.clear();
                    held.release_pending = true;
                    self.save_held(batch);
                }
                done
            }
            Command::Release(op) => {
                if let Some(h) = self.find_op(RangeState::Frozen, &op) {
                    self.held[h].set_state(RangeState::Garbage);
                    self.save_held(batch);
                }
                done
            }
            Command::Released(op) => {
                let range = op.range.unwrap_or_default();
                if let Some(h) = self.held.iter().position(|h| {
                    h.release_pending
                        && h.config_num == op.config_num
                        && same_range(&h.range, &range)
                }) {
                    // The transfer is over: the range no longer has a peer.
                    let held = &mut self.held[h];
                    held.release_pending = false;
                    held.peer_gid = 0;
                    held.peer_nodes.clear();
                    self.save_held(batch);
                }
                done
            }
            Command::MoveCopy(chunk) => {
                self.install_copy(index, chunk, batch)?;
                done
            }
            Command::MoveDeltas(chunk) => {
                self.install_deltas(index, chunk, batch)?;
                done
            }
            Command::FreezeMove(id) => {
                if let Some(m) = self.outgoing(id) {
                    self.moves[m].frozen = true;
                    self.save_moves(batch);
                }
                done
            }
            Command::DropDeltas(id) => {
                if !self.ended.contains(&id) {
                    return done;
                }
                let keys: Vec<Vec<u8>> = self
                    .store()
                    .prefix(&delta_prefix(id))
                    .take(DELETE_CHUNK_KEYS)
                    .map(|item| item.map(|(k, _)| k))
                    .collect::<Result<_, _>>()?;
                if keys.len() < DELETE_CHUNK_KEYS {
                    self.ended.retain(|e| *e != id);
                    self.save_moves(batch);
                }
                for key in keys {
                    batch.delete(key);
                }
                done
            }
            Command::DeleteChunk(op) => {
                let Some(h) = self.find_op(RangeState::Garbage, &op) else {
                    return done;
                };
                let (start, end) = data_bounds(self.held[h].range.as_ref().expect("set"));
                let keys: Vec<Vec<u8>> = self
                    .store()
                    .range((Bound::Included(start), end))
                    .take(DELETE_CHUNK_KEYS)
                    .map(|item| item.map(|(k, _)| k))
                    .collect::<Result<_, _>>()?;
                let finished = keys.len() < DELETE_CHUNK_KEYS;
                for key in keys {
                    batch.delete(key);
                }
                if finished {
                    self.held.remove(h);
                    self.save_held(batch);
                }
                done
            }
        }
    }

    /// Live move, destination: installs copied records of the range (ignored once the
    /// copy is complete, so a late duplicate cannot undo a delta).
    fn install_copy(
        &mut self,
        index: u64,
        chunk: MoveChunk,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let Some(m) = self.incoming(chunk.plan_id) else {
            return Ok(());
        };
        if self.moves[m].copy_done {
            return Ok(());
        }
        let range = plan_range(&self.moves[m]);
        let mut bytes = 0;
        let mut cursor = None;
        for record in chunk.records {
            bytes += (record.key.len() + record.value.len()) as u64;
            cursor = Some(record.key.clone());
            match record.key.first() {
                Some(&DATA) if range.contains(&record.key[1..]) => {
                    batch.put(record.key, record.value)
                }
                Some(&SESSION) => self.merge_session(index, record, batch)?,
                _ => {} // not part of this range: ignore rather than corrupt
            }
        }
        let state = &mut self.moves[m];
        if let Some(cursor) = cursor {
            state.copy_cursor = cursor;
        }
        state.bytes_installed += bytes;
        state.copy_done = chunk.last;
        self.save_moves(batch);
        Ok(())
    }

    /// Live move, destination: replays the source's recorded write results in order,
    /// skipping any at or before the cursor (a duplicate proposal).
    fn install_deltas(
        &mut self,
        index: u64,
        chunk: MoveChunk,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let Some(m) = self.incoming(chunk.plan_id) else {
            return Ok(());
        };
        if !self.moves[m].copy_done || self.moves[m].ready {
            return Ok(());
        }
        let range = plan_range(&self.moves[m]);
        let mut cursor = self.moves[m].delta_cursor.clone();
        let mut bytes = 0;
        for record in chunk.records {
            if !cursor.is_empty() && record.key <= cursor {
                continue;
            }
            bytes += record.value.len() as u64;
            let delta = MoveDelta::decode(record.value.as_slice())?;
            cursor = record.key;
            if !range.contains(&delta.key) {
                continue;
            }
            match delta.value {
                Some(v) => batch.put(data_key(&delta.key), v),
                None => batch.delete(data_key(&delta.key)),
            }
            if let Some(entry) = delta.entry.filter(|_| delta.client_id != 0) {
                let session = ClientSession {
                    first_incomplete: delta.first_incomplete,
                    entries: vec![entry],
                    last_index: index,
                };
                let record = KeyValue {
                    key: session_key(delta.client_id),
                    value: session.encode_to_vec(),
                };
                self.merge_session(index, record, batch)?;
            }
        }
        let state = &mut self.moves[m];
        state.delta_cursor = cursor;
        state.bytes_installed += bytes;
        state.delta_bytes += bytes;
        state.ready = chunk.last;
        self.save_moves(batch);
        Ok(())
    }

    fn find_held(&self, state: RangeState, config_num: u64, range: &KeyRange) -> Option<usize> {
        self.held.iter().position(|h| {
            h.state() == state && h.config_num == config_num && same_range(&h.range, range)
        })
    }

    fn find_op(&self, state: RangeState, op: &RangeOp) -> Option<usize> {
        self.find_held(state, op.config_num, op.range.as_ref()?)
    }

    /// Merges a client session pulled from a range's previous owner: a write answered
    /// there must not be applied again here.
    fn merge_session(
        &self,
        index: u64,
        record: KeyValue,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let Ok(client) = <[u8; 8]>::try_from(&record.key[1..]) else {
            return Ok(());
        };
        let client = u64::from_be_bytes(client);
        let incoming = ClientSession::decode(record.value.as_slice())?;
        let mut session = self.session(client, batch)?;
        session.first_incomplete = session.first_incomplete.max(incoming.first_incomplete);
        for entry in incoming.entries {
            if !session.entries.iter().any(|e| e.seq == entry.seq) {
                session.entries.push(entry);
            }
        }
        let floor = session.first_incomplete;
        session.entries.retain(|e| e.seq >= floor);
        session.entries.sort_by_key(|e| e.seq);
        let excess = session.entries.len().saturating_sub(MAX_SESSION_ENTRIES);
        session.entries.drain(..excess);
        session.last_index = index;
        batch.put(record.key, session.encode_to_vec());
        Ok(())
    }

    /// Moves to configuration `next` if it is the one after ours and every transfer of
    /// the current one is complete. The held ranges are recomputed from the two
    /// configurations alone, so both sides of a transfer cut identical ranges.
    fn apply_config(&mut self, next: Config, batch: &mut ApplyBatch) -> anyhow::Result<()> {
        if next.num != self.config.num + 1 || !self.settled() {
            return Ok(()); // a duplicate or stale proposal
        }
        self.held = held_ranges(self.gid, &self.config, &next);
        self.follow_plans(&next, batch)?;
        self.config = next;
        self.follow_stats();
        batch.put(KEY_CONFIG, self.config.encode_to_vec());
        self.save_held(batch);
        self.save_moves(batch);
        Ok(())
    }

    /// Starts and ends this group's side of live moves as configuration `next` says,
    /// after `held` was computed for it.
    fn follow_plans(&mut self, next: &Config, batch: &mut ApplyBatch) -> anyhow::Result<()> {
        let gid = self.gid;
        let (kept, ended): (Vec<MoveState>, Vec<MoveState>) = std::mem::take(&mut self.moves)
            .into_iter()
            .partition(|m| next.moves.iter().any(|p| Some(p) == m.plan.as_ref()));
        self.moves = kept;
        for m in ended {
            let plan = m.plan.clone().unwrap_or_default();
            self.copy_views.lock().expect("poisoned").remove(&plan.id);
            if plan.source == gid {
                // Done or cancelled, the recorded deltas are of no more use. A
                // cancelled plan's range is served again; a done one is FROZEN in
                // `held` until the new owner releases it.
                self.ended.push(plan.id);
                continue;
            }
            let range = plan_range(&m);
            let arrived = self
                .held
                .iter_mut()
                .find(|h| h.state() == RangeState::Pulling && h.range.as_ref() == Some(&range));
            match arrived {
                // The cutover: everything is here already, nothing to pull.
                Some(h) if m.ready => {
                    h.set_state(RangeState::Serving);
                    h.release_pending = true;
                }
                _ => self.discard_copy(&range, next.num, batch)?,
            }
        }
        for plan in next.moves.iter().filter(|p| !p.queued) {
            let ours = plan.source == gid || plan.dest == gid;
            if ours && !self.moves.iter().any(|m| m.plan.as_ref() == Some(plan)) {
                self.moves.push(MoveState {
                    plan: Some(plan.clone()),
                    ..Default::default()
                });
            }
        }
        Ok(())
    }

    /// The copy of a cancelled move goes: as GARBAGE, deleted in chunks through the
    /// log, unless the range is held again already (given to this group directly in
    /// the same configuration): then at once, before the pull writes over it.
    fn discard_copy(
        &mut self,
        range: &KeyRange,
        config_num: u64,
        batch: &mut ApplyBatch,
    ) -> anyhow::Result<()> {
        let overlaps = self.held.iter().any(|h| {
            h.range.as_ref().is_some_and(|r| {
                (r.end.is_empty() || range.start < r.end)
                    && (range.end.is_empty() || r.start < range.end)
            })
        });
        if !overlaps {
            self.held.push(HeldRange {
                range: Some(range.clone()),
                state: RangeState::Garbage as i32,
                config_num,
                ..Default::default()
            });
            self.held.sort_by(|a, b| {
                a.range
                    .as_ref()
                    .map(|r| &r.start)
                    .cmp(&b.range.as_ref().map(|r| &r.start))
            });
            return Ok(());
        }
        let (start, end) = data_bounds(range);
        for item in self.store().range((Bound::Included(start), end)) {
            batch.delete(item?.0);
        }
        Ok(())
    }

    fn sweep_sessions(&self, index: u64, batch: &mut ApplyBatch) -> anyhow::Result<()> {
        for item in self.store().prefix(&[SESSION]) {
            let (key, value) = item?;
            let session = ClientSession::decode(&*value)?;
            if session.last_index + SESSION_TTL_ENTRIES < index {
                batch.delete(key);
            }
        }
        Ok(())
    }
}

/// What one scan of a range counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RangeCount {
    pub keys: u64,
    /// Keys plus values.
    pub bytes: u64,
    /// A key near the middle by bytes (empty when the range holds fewer than two keys).
    pub middle: Vec<u8>,
}

/// Keys at most this many per count of a range: the middle is chosen among them.
const MIDDLE_SAMPLES: usize = 128;

/// Counts `range` in `view` in one pass with bounded memory: the keys at every
/// `step` bytes are remembered, and when there are too many every other one is
/// dropped and the step doubles.
pub fn count_range(view: &StoreView, range: &KeyRange) -> anyhow::Result<RangeCount> {
    let (start, end) = data_bounds(range);
    let mut count = RangeCount::default();
    let mut marks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut step = 1u64;
    for item in view.range((Bound::Included(start), end)) {
        let (k, v) = item?;
        if count.keys > 0 && marks.last().is_none_or(|(at, _)| count.bytes >= at + step) {
            marks.push((count.bytes, k[1..].to_vec()));
            if marks.len() > MIDDLE_SAMPLES {
                marks = marks.into_iter().step_by(2).collect();
                step *= 2;
            }
        }
        count.keys += 1;
        count.bytes += (k.len() - 1 + v.len()) as u64;
    }
    let half = count.bytes / 2;
    count.middle = marks
        .into_iter()
        .min_by_key(|(at, _)| at.abs_diff(half))
        .map(|(_, k)| k)
        .unwrap_or_default();
    Ok(count)
}

/// The ranges group `gid` holds in configuration `next`, coming from `prev`.
pub fn held_ranges(gid: u64, prev: &Config, next: &Config) -> Vec<HeldRange> {
    // Cut the key space at every bound of either configuration; each piece then has
    // one owner before and one after.
    let mut bounds: Vec<&[u8]> = prev
        .ranges
        .iter()
        .chain(&next.ranges)
        .filter_map(|r| r.range.as_ref())
        .map(|r| r.start.as_slice())
        .collect();
    bounds.sort();
    bounds.dedup();
    let mut held: Vec<HeldRange> = Vec::new();
    for (i, start) in bounds.iter().enumerate() {
        let end = bounds.get(i + 1).map(|b| b.to_vec()).unwrap_or_default();
        let (old, new) = (prev.owner(start).1, next.owner(start).1);
        let (state, peer) = match (old == gid, new == gid) {
            (true, true) => (RangeState::Serving, 0),
            (true, false) => (RangeState::Frozen, new),
            (false, true) if old == 0 => (RangeState::Serving, 0),
            (false, true) => (RangeState::Pulling, old),
            (false, false) => continue,
        };
        let peer_config = if state == RangeState::Frozen {
            next
        } else {
            prev
        };
        let piece = HeldRange {
            range: Some(KeyRange {
                start: start.to_vec(),
                end,
            }),
            state: state as i32,
            config_num: next.num,
            peer_gid: peer,
            peer_nodes: peer_config
                .group(peer)
                .map(|g| g.nodes.clone())
                .unwrap_or_default(),
            cursor: Vec::new(),
            release_pending: false,
        };
        // Merge with the previous piece when it is contiguous and identical in kind.
        if let Some(last) = held.last_mut() {
            let last_range = last.range.as_mut().expect("set");
            if last_range.end.as_slice() == *start
                && last.state == piece.state
                && last.peer_gid == piece.peer_gid
            {
                last_range.end = piece.range.expect("set").end;
                continue;
            }
        }
        held.push(piece);
    }
    held
}

impl From<Command> for KvCommand {
    fn from(command: Command) -> KvCommand {
        KvCommand {
            command: Some(command),
        }
    }
}

impl StateMachine for KvState {
    type Command = KvCommand;
    /// For a `WriteBatch`, one outcome per write, in order; for the group's own
    /// commands, which cannot fail, none.
    type Response = Vec<WriteOutcome>;

    fn apply(
        &mut self,
        index: u64,
        command: KvCommand,
        batch: &mut ApplyBatch,
    ) -> Result<Vec<WriteOutcome>, UnknownCommand> {
        let unknown = |what: &str| UnknownCommand::new(index, what);
        let command = command
            .command
            .ok_or_else(|| unknown("a command of no kind this build knows"))?;
        // A storage failure here cannot be answered deterministically: stop the node.
        const STORAGE: &str = "storage failure while applying a command";
        let sweep = |state: &mut KvState, batch: &mut ApplyBatch| {
            if index.is_multiple_of(SESSION_SWEEP_EVERY) {
                state
                    .sweep_sessions(index, batch)
                    .expect("storage failure while expiring sessions");
            }
        };
        match command {
            Command::Writes(writes) => {
                // Refuse an unknown op before applying any write of the batch.
                let writes = writes
                    .writes
                    .into_iter()
                    .map(|w| match w.op {
                        Some(op) => Ok((w.key, w.id, op)),
                        None => Err(unknown("a write of no op this build knows")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                sweep(self, batch);
                // In order, each seeing the ones before it (through the batch).
                Ok(writes
                    .into_iter()
                    .map(|(key, id, op)| {
                        self.apply_write(index, key, id, op, batch).expect(STORAGE)
                    })
                    .collect())
            }
            command => {
                sweep(self, batch);
                self.apply_command(index, command, batch).expect(STORAGE);
                Ok(Vec::new())
            }
        }
    }

    fn restore(&mut self, store: &SmStore) -> anyhow::Result<()> {
        self.config = match store.get(KEY_CONFIG)? {
            Some(raw) => Config::decode(raw.as_slice())?,
            None => Config::initial(),
        };
        self.held = match store.get(KEY_HELD)? {
            Some(raw) => HeldRanges::decode(raw.as_slice())?.ranges,
            None => Vec::new(),
        };
        let moves = match store.get(KEY_MOVES)? {
            Some(raw) => MoveStates::decode(raw.as_slice())?,
            None => MoveStates::default(),
        };
        self.moves = moves.moves;
        self.ended = moves.ended;
        self.delta_pos = (0, 0);
        self.copy_views.lock().expect("poisoned").clear();
        self.store = Some(store.clone());
        *self.stats() = RangeStatsTable::default();
        self.follow_stats();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::storage::{CompareAndSwap, Delete, InstallChunk, Put, Write, WriteBatch};
    use crate::proto::{Group, Node};
    use crate::storage::{Engine, Identity};

    /// A kv state on a fresh store; commands are applied as the driver does.
    struct Harness {
        _dir: tempfile::TempDir,
        store: SmStore,
        state: KvState,
        index: u64,
    }

    impl Harness {
        fn new(gid: u64) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let identity = Identity {
                cluster: "t".into(),
                role: "kvnode".into(),
                group: gid,
                node: 1,
            };
            let (_, store) = Engine::open(dir.path(), &identity)
                .unwrap()
                .into_stores()
                .unwrap();
            let mut state = KvState::new(gid);
            state.restore(&store).unwrap();
            Harness {
                _dir: dir,
                store,
                state,
                index: 10,
            }
        }

        /// Applies `command` as one log entry: its outcomes, one per client write.
        fn apply_entry(&mut self, command: Command) -> Vec<WriteOutcome> {
            self.index += 1;
            let mut batch = self.store.batch();
            let results = self
                .state
                .apply(self.index, command.into(), &mut batch)
                .expect("a known command");
            self.store.commit(batch, (self.index, 1), None).unwrap();
            results
        }

        /// Applies one of the group's own commands, which answers nothing.
        fn exec(&mut self, command: Command) {
            assert_eq!(self.apply_entry(command), []);
        }

        /// Applies one client write, as a batch of one.
        fn write(&mut self, write: Write) -> WriteOutcome {
            let mut results = self.apply_entry(Command::Writes(WriteBatch {
                writes: vec![write],
            }));
            assert_eq!(results.len(), 1);
            results.pop().unwrap()
        }

        fn put(&mut self, key: &str, value: &[u8], id: Option<RequestId>) -> WriteOutcome {
            self.write(put(key, value, id))
        }

        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.state.get(key.as_bytes()).unwrap().unwrap()
        }
    }

    fn put(key: &str, value: &[u8], id: Option<RequestId>) -> Write {
        Write {
            key: key.into(),
            id,
            op: Some(Op::Put(Put {
                value: value.to_vec(),
            })),
        }
    }

    fn delete(key: &str, id: Option<RequestId>) -> Write {
        Write {
            key: key.into(),
            id,
            op: Some(Op::Delete(Delete {})),
        }
    }

    fn id(client_id: u64, seq: u64, first_incomplete: u64) -> Option<RequestId> {
        Some(RequestId {
            client_id,
            seq,
            first_incomplete,
        })
    }

    #[test]
    fn scan_pages_stop_at_the_byte_budget_and_resume() {
        let mut h = Harness::new(1);
        h.exec(Command::Config(config(1, &[], &[1])));
        for k in ["a", "b", "c", "d", "e"] {
            h.put(k, &[b'x'; 1000], None).unwrap();
        }
        let (pairs, resume) = h.state.scan(b"", b"", 100, 2500).unwrap().unwrap();
        let keys: Vec<&[u8]> = pairs.iter().map(|p| p.key.as_slice()).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        assert_eq!(resume, b"d");
        let (pairs, resume) = h.state.scan(b"d", b"", 100, 1 << 20).unwrap().unwrap();
        assert_eq!(pairs.len(), 2);
        assert!(resume.is_empty());
    }

    #[test]
    fn range_stats_are_seeded_once_then_follow_the_writes() {
        let mut h = Harness::new(1);
        h.exec(Command::Config(config(1, &["n"], &[1, 2])));
        for i in 0..100u32 {
            h.put(&format!("a{i:03}"), &[b'x'; 96], None).unwrap();
        }
        let (jobs, view) = h.state.seed_jobs();
        assert_eq!(jobs.len(), 1, "only [\"\", n) is group 1's");
        // Written after the view: counted on top of the seed, not in it.
        h.put("a000", &[b'x'; 10], None).unwrap();
        h.write(delete("a001", None)).unwrap();
        let count = count_range(&view, &jobs[0].range).unwrap();
        assert_eq!((count.keys, count.bytes), (100, 100 * 100));
        let middle = String::from_utf8(count.middle.clone()).unwrap();
        assert!(("a048".."a053").contains(&middle.as_str()), "{middle}");
        h.state.seeded(&jobs[0], Ok(count));
        h.get("a002");
        let stats = h.state.range_stats();
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert!(s.sized);
        assert_eq!((s.keys, s.bytes), (99, 100 * 100 - 86 - 100));
        assert_eq!(s.state(), RangeState::Serving);
        assert!(
            h.state.seed_jobs().0.is_empty(),
            "no scan while the counts hold"
        );
    }

    #[test]
    fn sessions_answer_retries_and_refuse_to_forget_unacknowledged_replies() {
        let mut h = Harness::new(1);
        h.exec(Command::Config(config(1, &[], &[1])));
        h.put("k", b"v1", id(7, 1, 1)).unwrap();
        h.put("k", b"v2", id(7, 2, 1)).unwrap();
        // A retry of seq 1 is answered from the session, not applied again.
        h.put("k", b"v1", id(7, 1, 1)).unwrap();
        assert_eq!(h.get("k").as_deref(), Some(&b"v2"[..]));
        // Once the client acknowledged seq 1, a stale copy of it is refused.
        h.put("other", b"x", id(7, 3, 2)).unwrap();
        assert_eq!(
            h.put("k", b"v1", id(7, 1, 2)),
            Err(KvError::Superseded { seq: 1 })
        );
        // Seqs 2..=257 unacknowledged fill the session: the next one is refused.
        for seq in 4..=MAX_SESSION_ENTRIES as u64 + 1 {
            h.put("k", b"fill", id(7, seq, 2)).unwrap();
        }
        let next = MAX_SESSION_ENTRIES as u64 + 2;
        assert_eq!(
            h.put("k", b"late", id(7, next, 2)),
            Err(KvError::TooManyInFlight {
                limit: MAX_SESSION_ENTRIES
            })
        );
        assert_eq!(h.get("k").as_deref(), Some(&b"fill"[..]));
    }

    #[test]
    fn writes_of_one_entry_apply_in_order_and_each_sees_the_ones_before() {
        let mut h = Harness::new(1);
        h.exec(Command::Config(config(1, &["n"], &[1, 2])));
        let cas = |expected: &[u8], value: &[u8], seq| Write {
            key: b"k".to_vec(),
            id: id(7, seq, 1),
            op: Some(Op::Cas(CompareAndSwap {
                expected: Some(expected.to_vec()),
                value: Some(value.to_vec()),
            })),
        };
        let writes = vec![
            put("k", b"a", id(7, 1, 1)),
            cas(b"a", b"b", 2),
            // The same seq again (a retry in the same entry): the first result, no effect.
            cas(b"a", b"b", 2),
            cas(b"a", b"c", 3),
            delete("k", id(7, 4, 1)),
            // Group 2 serves [n, ..): refused, and the rest still applies.
            delete("z", id(7, 5, 1)),
            put("j", b"after", id(7, 6, 1)),
        ];
        let results = h.apply_entry(Command::Writes(WriteBatch { writes }));
        let swapped = |swapped, current: &[u8]| {
            Ok(WriteResult {
                result: Some(Effect::Cas(CompareAndSwapResult {
                    swapped,
                    found: true,
                    current: current.to_vec(),
                })),
            })
        };
        let put = Ok(WriteResult {
            result: Some(Effect::Put(PutResult {})),
        });
        assert_eq!(
            results,
            vec![
                put.clone(),
                swapped(true, b"b"),
                swapped(true, b"b"),
                swapped(false, b"b"),
                Ok(WriteResult {
                    result: Some(Effect::Delete(DeleteResult { existed: true })),
                }),
                Err(KvError::WrongGroup {
                    config_num: 1,
                    moving_to: 0
                }),
                put,
            ]
        );
        assert_eq!(h.get("k"), None);
        assert_eq!(h.get("j").as_deref(), Some(&b"after"[..]));
        // The session remembered every seq: a later retry is answered, not reapplied.
        assert_eq!(h.write(cas(b"a", b"b", 2)), swapped(true, b"b"));
        assert_eq!(h.get("k"), None);
    }

    /// A command or op this build does not know stops the replica with a typed
    /// error, before the batch's known writes are applied.
    #[test]
    fn unknown_commands_and_ops_are_refused_not_skipped() {
        let mut h = Harness::new(1);
        h.exec(Command::Config(config(1, &[], &[1])));
        let mut batch = h.store.batch();
        assert_eq!(
            h.state.apply(20, KvCommand { command: None }, &mut batch),
            Err(UnknownCommand::new(
                20,
                "a command of no kind this build knows"
            ))
        );
        let writes = WriteBatch {
            writes: vec![
                put("k", b"v", None),
                Write {
                    key: b"k".to_vec(),
                    id: None,
                    op: None,
                },
            ],
        };
        assert_eq!(
            h.state
                .apply(21, Command::Writes(writes).into(), &mut batch),
            Err(UnknownCommand::new(21, "a write of no op this build knows"))
        );
        assert_eq!(batch.get(&data_key(b"k")).unwrap(), None, "nothing applied");
        // The next release's command: a field number this build does not know.
        let next_release = [0xa2, 0x06, 0x00]; // field 100, empty message
        let command = KvCommand::decode(&next_release[..]).unwrap();
        assert!(h.state.apply(22, command, &mut batch).is_err());
        // The previous release's Put of key "kv" (field 1): reserved, so unknown too.
        let old_put = [0x0a, 0x04, 0x0a, 0x02, b'k', b'v'];
        let command = KvCommand::decode(&old_put[..]).unwrap();
        assert!(h.state.apply(23, command, &mut batch).is_err());
    }

    #[test]
    fn a_moved_range_is_pulled_installed_once_and_collected_at_the_source() {
        let (c1, c2) = (config(1, &["n"], &[1, 1]), config(2, &["n"], &[1, 2]));
        let mut source = Harness::new(1);
        let mut dest = Harness::new(2);
        source.exec(Command::Config(c1.clone()));
        dest.exec(Command::Config(c1));
        for k in ["apple", "melon", "pear", "zebra"] {
            source.put(k, k.as_bytes(), None).unwrap();
        }
        source.put("zebra", b"zebra-2", id(9, 1, 1)).unwrap();
        source.exec(Command::Config(c2.clone()));
        dest.exec(Command::Config(c2));
        assert_eq!(
            source.state.get(b"zebra").unwrap(),
            Err(KvError::WrongGroup {
                config_num: 2,
                moving_to: 0
            })
        );
        let moving = dest.state.held()[0].clone();
        assert_eq!(moving.state(), RangeState::Pulling);
        let range = moving.range.clone().unwrap();
        // Pull in small chunks, installing each; then install the first chunk again.
        let mut cursor = Vec::new();
        let mut first_chunk = None;
        for _ in 0..100 {
            let (records, done) = source.state.pull(2, &range, &cursor, 1).unwrap().unwrap();
            if let Some(last) = records.last() {
                cursor = last.key.clone();
            }
            let chunk = InstallChunk {
                config_num: 2,
                range: Some(range.clone()),
                records,
            };
            first_chunk.get_or_insert_with(|| chunk.clone());
            dest.exec(Command::Install(chunk));
            if done {
                break;
            }
        }
        let op = RangeOp {
            config_num: 2,
            range: Some(range.clone()),
        };
        dest.exec(Command::FinishPull(op.clone()));
        dest.exec(Command::Install(first_chunk.unwrap()));
        assert_eq!(dest.get("zebra").as_deref(), Some(&b"zebra-2"[..]));
        assert_eq!(dest.get("pear").as_deref(), Some(&b"pear"[..]));
        // The write the source answered is remembered at the destination.
        dest.put("zebra", b"zebra-2", id(9, 1, 1)).unwrap();
        dest.put("zebra", b"zebra-3", id(9, 2, 1)).unwrap();
        dest.put("zebra", b"zebra-2", id(9, 1, 1)).unwrap();
        assert_eq!(dest.get("zebra").as_deref(), Some(&b"zebra-3"[..]));
        // The source drops its copy through its log.
        source.exec(Command::Release(op.clone()));
        for _ in 0..10 {
            source.exec(Command::DeleteChunk(op.clone()));
        }
        assert_eq!(source.state.held().len(), 1, "only [\"\", n) is left");
        let (start, end) = data_bounds(&range);
        let left = source.store.range((Bound::Included(start), end)).count();
        assert_eq!(left, 0, "the moved range's data is gone from the source");
        assert!(dest.state.held()[0].release_pending);
        dest.exec(Command::Released(op));
        assert!(dest.state.settled());
        assert_eq!(
            dest.state.held()[0].peer_gid,
            0,
            "a finished transfer has no peer"
        );
    }

    #[test]
    fn a_live_move_copies_replays_recorded_results_and_cuts_over() {
        let c1 = config(1, &["n"], &[1, 2]);
        let mut c2 = config(2, &["n"], &[1, 2]);
        let range = c2.ranges[0].range.clone().unwrap();
        let plan = crate::proto::MovePlan {
            id: 2,
            range: Some(range.clone()),
            source: 1,
            dest: 2,
            ..Default::default()
        };
        c2.moves.push(plan.clone());
        let c3 = config(3, &["n"], &[2, 2]);
        let (mut source, mut dest) = (Harness::new(1), Harness::new(2));
        for c in [&c1, &c2] {
            source.exec(Command::Config(c.clone()));
            dest.exec(Command::Config(c.clone()));
        }
        source.put("apple", b"1", None).unwrap();
        source.put("berry", b"1", id(9, 1, 1)).unwrap();
        // The copy reads the first record, then writes go on at the source.
        let (first, _) = source.state.copy(2, b"").unwrap().run(1).unwrap();
        source.put("apple", b"2", id(9, 2, 1)).unwrap();
        source.write(delete("berry", id(9, 3, 1))).unwrap();
        let cursor = first.last().unwrap().key.clone();
        let (rest, done) = source.state.copy(2, &cursor).unwrap().run(1 << 20).unwrap();
        assert!(done);
        for (records, last) in [(first, false), (rest, true)] {
            dest.exec(Command::MoveCopy(MoveChunk {
                plan_id: 2,
                records,
                last,
            }));
        }
        // Catch up: everything recorded so far, then the source freezes.
        let read = source.state.deltas(2, b"").unwrap();
        let (deltas, _) = read.run(1 << 20).unwrap();
        assert!(!read.frozen && read.recorded_bytes > 0);
        assert_eq!(
            deltas.len(),
            4,
            "every write to the range since the plan is recorded"
        );
        let cursor = deltas.last().unwrap().key.clone();
        dest.exec(Command::MoveDeltas(MoveChunk {
            plan_id: 2,
            records: deltas.clone(),
            last: false,
        }));
        source.put("cherry", b"1", id(9, 4, 1)).unwrap();
        source.exec(Command::FreezeMove(2));
        // Frozen, the source names the group the range is going to.
        assert_eq!(
            source.state.get(b"apple").unwrap(),
            Err(KvError::WrongGroup {
                config_num: 2,
                moving_to: 2
            })
        );
        let read = source.state.deltas(2, &cursor).unwrap();
        let (last, all) = read.run(1 << 20).unwrap();
        assert!(read.frozen && all);
        assert_eq!(last.len(), 1);
        dest.exec(Command::MoveDeltas(MoveChunk {
            plan_id: 2,
            records: last,
            last: true,
        }));
        // A duplicate of an earlier round changes nothing.
        dest.exec(Command::MoveDeltas(MoveChunk {
            plan_id: 2,
            records: deltas,
            last: false,
        }));
        assert!(dest.state.arriving(b"apple"));
        dest.exec(Command::Config(c3.clone()));
        assert_eq!(dest.get("apple").as_deref(), Some(&b"2"[..]));
        assert_eq!(dest.get("berry"), None);
        assert_eq!(dest.get("cherry").as_deref(), Some(&b"1"[..]));
        let held = dest.state.held()[0].clone();
        assert_eq!(held.state(), RangeState::Serving);
        assert!(held.release_pending, "the source is told to drop its copy");
        // A retry of a write the source answered is answered, not applied again.
        dest.put("apple", b"2", id(9, 2, 1)).unwrap();
        dest.put("apple", b"3", id(9, 5, 1)).unwrap();
        dest.put("apple", b"2", id(9, 2, 1)).unwrap();
        assert_eq!(dest.get("apple").as_deref(), Some(&b"3"[..]));
        // The source: FROZEN until released, its recorded deltas deleted.
        source.exec(Command::Config(c3));
        assert_eq!(source.state.held()[0].state(), RangeState::Frozen);
        assert_eq!(source.state.ended_plans(), [2]);
        source.exec(Command::DropDeltas(2));
        assert!(source.state.ended_plans().is_empty());
        assert_eq!(source.store.prefix(&delta_prefix(2)).count(), 0);
    }

    #[test]
    fn a_live_copy_reads_the_range_as_of_its_start_and_ends_while_writes_go_on() {
        let mut c2 = config(2, &["n"], &[1, 2]);
        let range = c2.ranges[0].range.clone().unwrap();
        c2.moves.push(crate::proto::MovePlan {
            id: 2,
            range: Some(range),
            source: 1,
            dest: 2,
            ..Default::default()
        });
        let mut source = Harness::new(1);
        source.exec(Command::Config(config(1, &["n"], &[1, 2])));
        source.exec(Command::Config(c2));
        source.put("a-000", b"old", None).unwrap();
        let (first, done) = source.state.copy(2, b"").unwrap().run(1).unwrap();
        assert!(!done);
        // Writers keep adding keys ahead of the cursor and rewriting copied ones.
        for i in 1..50 {
            source.put(&format!("a-{i:03}"), b"new", None).unwrap();
        }
        source.put("a-000", b"rewritten", None).unwrap();
        let cursor = first.last().unwrap().key.clone();
        let (rest, done) = source.state.copy(2, &cursor).unwrap().run(1 << 20).unwrap();
        assert!(done);
        let copied: Vec<_> = first.iter().chain(&rest).map(|r| r.key.clone()).collect();
        assert!(
            !copied.contains(&data_key(b"a-001")),
            "the copy reads the range as of its first read, not the writes after it"
        );
        let (deltas, _) = source.state.deltas(2, b"").unwrap().run(1 << 20).unwrap();
        assert_eq!(
            deltas.len(),
            51,
            "the writes after it are recorded as deltas"
        );
    }

    #[test]
    fn a_cancelled_move_serves_again_at_the_source_and_drops_the_copy() {
        let c1 = config(1, &["n"], &[1, 2]);
        let mut c2 = config(2, &["n"], &[1, 2]);
        c2.moves.push(crate::proto::MovePlan {
            id: 2,
            range: c2.ranges[0].range.clone(),
            source: 1,
            dest: 2,
            ..Default::default()
        });
        let c3 = config(3, &["n"], &[1, 2]);
        let (mut source, mut dest) = (Harness::new(1), Harness::new(2));
        for c in [&c1, &c2] {
            source.exec(Command::Config(c.clone()));
            dest.exec(Command::Config(c.clone()));
        }
        source.put("apple", b"1", None).unwrap();
        let (records, _) = source.state.copy(2, b"").unwrap().run(1 << 20).unwrap();
        dest.exec(Command::MoveCopy(MoveChunk {
            plan_id: 2,
            records,
            last: true,
        }));
        source.exec(Command::FreezeMove(2));
        source.exec(Command::Config(c3.clone()));
        dest.exec(Command::Config(c3));
        assert_eq!(source.get("apple").as_deref(), Some(&b"1"[..]));
        source.put("apple", b"2", None).unwrap();
        let garbage: Vec<_> = dest
            .state
            .held()
            .iter()
            .filter(|h| h.state() == RangeState::Garbage)
            .cloned()
            .collect();
        assert_eq!(garbage.len(), 1, "{:?}", dest.state.held());
        dest.exec(Command::DeleteChunk(RangeOp {
            config_num: 3,
            range: garbage[0].range.clone(),
        }));
        assert!(dest.state.settled());
        assert_eq!(dest.store.get(&data_key(b"apple")).unwrap(), None);
    }

    fn config(num: u64, bounds: &[&str], owners: &[u64]) -> Config {
        let groups = [1u64, 2, 3]
            .iter()
            .map(|gid| Group {
                gid: *gid,
                leaving: false,
                nodes: vec![Node {
                    id: 1,
                    addr: format!("127.0.0.1:{gid}"),
                }],
            })
            .collect();
        Config {
            groups,
            ..Config::cut_at(num, bounds, owners)
        }
    }

    fn summary(held: &[HeldRange]) -> Vec<(String, RangeState, u64)> {
        held.iter()
            .map(|h| (h.range.as_ref().unwrap().to_string(), h.state(), h.peer_gid))
            .collect()
    }

    #[test]
    fn first_configuration_serves_without_pulling() {
        let held = held_ranges(1, &Config::initial(), &config(1, &[], &[1]));
        assert_eq!(
            summary(&held),
            vec![("[\"\", +inf)".into(), RangeState::Serving, 0)]
        );
    }

    #[test]
    fn moved_ranges_freeze_at_the_source_and_pull_at_the_destination() {
        let before = config(4, &["g", "n", "t"], &[1, 1, 1, 1]);
        let after = config(5, &["g", "n", "t"], &[1, 2, 1, 2]);
        let source = held_ranges(1, &before, &after);
        let dest = held_ranges(2, &before, &after);
        let frozen: Vec<_> = summary(&source)
            .into_iter()
            .filter(|s| s.1 == RangeState::Frozen)
            .collect();
        let pulling: Vec<_> = summary(&dest)
            .into_iter()
            .map(|(r, _, _)| (r, RangeState::Frozen, 2))
            .collect();
        assert_eq!(frozen, pulling, "both sides must cut identical ranges");
        assert_eq!(dest.len(), 2);
        assert!(dest
            .iter()
            .all(|h| h.state() == RangeState::Pulling && h.peer_gid == 1));
        assert_eq!(dest[0].peer_nodes[0].addr, "127.0.0.1:1");
    }

    #[test]
    fn a_split_keeps_serving_and_merges_identical_pieces() {
        let before = config(1, &[], &[1]);
        let after = config(2, &["m"], &[1, 1]);
        assert_eq!(
            summary(&held_ranges(1, &before, &after)),
            vec![("[\"\", +inf)".into(), RangeState::Serving, 0)]
        );
    }
}
