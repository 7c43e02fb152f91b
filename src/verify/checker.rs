//! The linearizability checker (Jepsen/porcupine style).
//!
//! [`check`] asks whether some total order of a history's operations exists
//! that respects real time (an operation that returned before another was
//! invoked comes first) and explains every observed result on a sequential
//! key-value store whose keys all start absent.
//!
//! Every key is an independent register, and linearizability is compositional,
//! so the history is split by key and each key is checked on its own with the
//! Wing & Gong / Lowe (WGL) search used by porcupine: call and return events
//! sorted by time in a linked list, a depth-first search that linearizes
//! pending calls one at a time and backtracks when a return is reached whose
//! operation has not been linearized, and a cache of (set of linearized
//! operations, store state) that prunes states already explored.
//!
//! Operations whose outcome is unknown (`ret == None`, e.g. a timeout) may have
//! taken effect at any time after their call, or never: the search may
//! linearize them anywhere after their call or leave them out. Unknown ops
//! that no other op could have observed (an unknown `Get`, or a `Put` of a
//! value nobody read) are dropped up front, which does not change the verdict
//! but saves the search from trying every point where they might fit.
//!
//! The search is exponential in the worst case, so it is bounded by
//! [`Limits`]; a key that exceeds them yields [`CheckResult::Unknown`], never a
//! false `Ok`. A violation is shrunk to a small per-key sub-history that is
//! still not linearizable (the witness printed by `Display`).

use super::history::{Bytes, Input, Operation, Output};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Bounds on the work [`check_with_limits`] may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Search steps allowed per key before giving up with
    /// [`CheckResult::Unknown`]. A step visits one call or return event, or
    /// stores one 64-bit word in the search cache, so this bounds memory too
    /// (well under 100 bytes per step). A step takes roughly 0.1–0.2 µs
    /// optimized and 0.5 µs in a debug build.
    pub max_steps_per_key: u64,
    /// Total search steps spent shrinking a violation to a smaller witness;
    /// 0 reports the key's whole history (less unknown-outcome ops nothing
    /// depends on).
    pub max_shrink_steps: u64,
}

impl Default for Limits {
    /// At worst a few seconds and a few hundred MiB per key (more in debug
    /// builds). Enough to refute ~1,000 ops on one key from 10 concurrent
    /// clients; unknown-outcome ops that are read later cost much more.
    fn default() -> Self {
        Limits {
            max_steps_per_key: 10_000_000,
            max_shrink_steps: 5_000_000,
        }
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Every key's history is linearizable.
    Ok,
    /// Some key's history is not linearizable.
    Violation(Violation),
    /// No violation was found, but these keys exceeded [`Limits`] and were
    /// not fully checked.
    Unknown { keys: Vec<Vec<u8>> },
    /// The history itself is inconsistent (a recording bug, not a store bug).
    Malformed {
        /// Index of the offending operation in the history.
        index: usize,
        reason: String,
    },
}

impl CheckResult {
    /// Whether the history was proven linearizable.
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }

    /// The violation, if one was found.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            CheckResult::Violation(v) => Some(v),
            _ => None,
        }
    }
}

/// A non-linearizable key and a small history for it that is still not
/// linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key whose history is not linearizable.
    pub key: Vec<u8>,
    /// Operations on `key` that on their own are not linearizable, sorted by
    /// call time. Shrunk from the full history within
    /// [`Limits::max_shrink_steps`], removing only operations whose absence
    /// cannot create a violation (never the writer a kept read depends on),
    /// so this sub-history alone proves the whole one wrong.
    pub ops: Vec<Operation>,
    /// How many operations the history has on `key`.
    pub total_ops: usize,
}

/// Check `history` with the default [`Limits`].
pub fn check(history: &[Operation]) -> CheckResult {
    check_with_limits(history, &Limits::default())
}

/// Check `history`, keys in byte order, stopping at the first violation.
pub fn check_with_limits(history: &[Operation], limits: &Limits) -> CheckResult {
    if let Err((index, reason)) = validate(history) {
        return CheckResult::Malformed { index, reason };
    }
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.input.key()).or_default().push(op);
    }
    let mut undecided = Vec::new();
    for (key, all_ops) in by_key {
        let total_ops = all_ops.len();
        let ops = drop_unneeded_unknowns(all_ops);
        match check_key(&ops, limits.max_steps_per_key).0 {
            Outcome::Linearizable => {}
            Outcome::Exhausted => undecided.push(key.to_vec()),
            Outcome::Violation => {
                let mut budget = limits.max_shrink_steps;
                let mut witness: Vec<Operation> = shrink(&ops, limits, &mut budget)
                    .into_iter()
                    .cloned()
                    .collect();
                witness.sort_by_key(|op| (op.call, op.ret.unwrap_or(u64::MAX)));
                return CheckResult::Violation(Violation {
                    key: key.to_vec(),
                    ops: witness,
                    total_ops,
                });
            }
        }
    }
    if undecided.is_empty() {
        CheckResult::Ok
    } else {
        CheckResult::Unknown { keys: undecided }
    }
}

/// Rejects histories no real execution could produce, so that a recording
/// bug is not reported as a store bug.
fn validate(history: &[Operation]) -> Result<(), (usize, String)> {
    for (index, op) in history.iter().enumerate() {
        let Some(ret) = op.ret else { continue };
        if ret < op.call {
            return Err((
                index,
                format!("returned at {ret} before its call at {}", op.call),
            ));
        }
        let kinds_match = matches!(
            (&op.input, &op.output),
            (Input::Get { .. }, Output::Get(_))
                | (Input::Put { .. } | Input::Delete { .. }, Output::Write)
                | (Input::Cas { .. }, Output::Cas(_))
        );
        if !kinds_match {
            return Err((
                index,
                format!("output {:?} does not fit {}", op.output, op.input),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------

enum Outcome {
    Linearizable,
    Violation,
    Exhausted,
}

/// Interned value: 0 is "absent", others index the key's distinct values.
type Val = u32;
const ABSENT: Val = 0;

/// What an operation does to, and demands of, the register.
#[derive(Clone, Copy)]
enum Effect {
    /// A completed `Get` that observed this value.
    Read(Val),
    /// `Put` or `Delete`, completed or not.
    Write(Val),
    /// `Cas`; `swapped` is `None` when the outcome is unknown.
    Cas {
        expected: Val,
        new: Val,
        swapped: Option<bool>,
    },
}

/// The sequential specification: the state after applying `effect` to
/// `state`, or `None` if the observed result contradicts `state`.
fn step(state: Val, effect: Effect) -> Option<Val> {
    match effect {
        Effect::Read(v) => (state == v).then_some(state),
        Effect::Write(v) => Some(v),
        Effect::Cas {
            expected,
            new,
            swapped,
        } => {
            let matches = state == expected;
            if swapped.is_some_and(|s| s != matches) {
                return None;
            }
            Some(if matches { new } else { state })
        }
    }
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// A node of the event list: a call or a return of operation `op`.
struct Event {
    op: usize,
    /// For a call, its return node (NIL if the outcome is unknown); NIL for a return.
    ret_node: usize,
    is_call: bool,
}

/// Doubly linked list of events with a sentinel at `HEAD`. Removed nodes keep
/// their links so they can be put back in LIFO order (dancing links).
struct EventList {
    events: Vec<Event>,
    prev: Vec<usize>,
    next: Vec<usize>,
}

impl EventList {
    fn unlink(&mut self, n: usize) {
        let (p, x) = (self.prev[n], self.next[n]);
        self.next[p] = x;
        if x != NIL {
            self.prev[x] = p;
        }
    }

    fn relink(&mut self, n: usize) {
        let (p, x) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        if x != NIL {
            self.prev[x] = n;
        }
    }

    /// Takes a linearized call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.events[call].ret_node;
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Undoes the most recent `lift`.
    fn unlift(&mut self, call: usize) {
        let ret = self.events[call].ret_node;
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// A bitset that tracks its interesting window: all ones before `full`,
/// all zeros from `end`.
struct Bits {
    words: Vec<u64>,
    /// Index of the first word that is not all ones.
    full: usize,
    /// One past the last non-zero word, and at least `full`.
    end: usize,
}

impl Bits {
    fn new(len: usize) -> Self {
        Bits {
            words: vec![0; len.div_ceil(64)],
            full: 0,
            end: 0,
        }
    }

    fn insert(&mut self, i: usize) {
        let w = i / 64;
        self.words[w] |= 1 << (i % 64);
        self.end = self.end.max(w + 1);
        while self.full < self.words.len() && self.words[self.full] == u64::MAX {
            self.full += 1;
        }
    }

    fn remove(&mut self, i: usize) {
        let w = i / 64;
        self.words[w] &= !(1 << (i % 64));
        self.full = self.full.min(w);
        while self.end > self.full && self.words[self.end - 1] == 0 {
            self.end -= 1;
        }
    }

    /// The words between the all-ones prefix and the all-zeros suffix.
    fn window(&self) -> &[u64] {
        &self.words[self.full..self.end]
    }
}

/// The set of linearized operations. Completed ops are numbered first, by
/// call time, and the search linearizes them roughly in that order, so their
/// bitset is all ones up to a frontier and zeros a few words past it: keyed
/// by its window, a cache entry stays small however long the history.
/// Unknown-outcome ops get their own bitset, because one that is never
/// linearized would otherwise pin the window open from its position on.
struct OpSet {
    completed: usize,
    known: Bits,
    unknown: Bits,
}

impl OpSet {
    /// A set over `completed` completed ops followed by `unknown` others.
    fn new(completed: usize, unknown: usize) -> Self {
        OpSet {
            completed,
            known: Bits::new(completed),
            unknown: Bits::new(unknown),
        }
    }

    fn insert(&mut self, op: usize) {
        match op.checked_sub(self.completed) {
            None => self.known.insert(op),
            Some(i) => self.unknown.insert(i),
        }
    }

    fn remove(&mut self, op: usize) {
        match op.checked_sub(self.completed) {
            None => self.known.remove(op),
            Some(i) => self.unknown.remove(i),
        }
    }
}

/// Explored (linearized set, state) pairs. Like porcupine it buckets entries
/// by hash so a lookup needs no allocation; buckets are chains through one
/// entry vector and all windows share one word vector, so the cache is a few
/// large allocations however many entries it holds.
#[derive(Default)]
struct Cache {
    /// Hash -> newest entry with that hash.
    heads: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
    entries: Vec<CacheEntry>,
    /// The entries' windows, back to back.
    words: Vec<u64>,
}

/// A linearized set, as the `full` and windows of its two bitsets, and the
/// state after it.
struct CacheEntry {
    state: Val,
    known_full: usize,
    unknown_full: usize,
    /// The known window is `words[start..start + known_len]`, the unknown
    /// window follows it.
    start: usize,
    known_len: usize,
    unknown_len: usize,
    /// Older entry with the same hash, or NIL.
    next: usize,
}

impl CacheEntry {
    fn matches(&self, words: &[u64], set: &OpSet, state: Val) -> bool {
        let (known, unknown) = (&set.known, &set.unknown);
        let mid = self.start + self.known_len;
        self.state == state
            && self.known_full == known.full
            && self.unknown_full == unknown.full
            && words[self.start..mid] == *known.window()
            && words[mid..mid + self.unknown_len] == *unknown.window()
    }
}

impl Cache {
    /// Adds the pair and returns how many words that stored, or `None` if
    /// the pair was already there.
    fn insert(&mut self, set: &OpSet, state: Val) -> Option<usize> {
        let head = self.heads.entry(fingerprint(set, state)).or_insert(NIL);
        // Each entry is visited at most once: the chain ends in NIL.
        let mut i = *head;
        while i != NIL {
            let e = &self.entries[i];
            if e.matches(&self.words, set, state) {
                return None;
            }
            i = e.next;
        }
        let (known, unknown) = (set.known.window(), set.unknown.window());
        self.entries.push(CacheEntry {
            state,
            known_full: set.known.full,
            unknown_full: set.unknown.full,
            start: self.words.len(),
            known_len: known.len(),
            unknown_len: unknown.len(),
            next: *head,
        });
        self.words.extend_from_slice(known);
        self.words.extend_from_slice(unknown);
        *head = self.entries.len() - 1;
        Some(known.len() + unknown.len())
    }
}

/// A fast non-cryptographic hash (FxHash's multiply-rotate, then murmur3's
/// finalizer so that the low bits the table indexes by are mixed too). The
/// cache compares whole entries, so collisions cost time, never correctness.
fn fingerprint(set: &OpSet, state: Val) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mix = |h: u64, x: u64| (h.rotate_left(5) ^ x).wrapping_mul(K);
    let (known, unknown) = (&set.known, &set.unknown);
    let lengths = [known.full, known.window().len(), unknown.full].map(|n| n as u64);
    let mut h = [u64::from(state)]
        .into_iter()
        .chain(lengths)
        .chain(known.window().iter().copied())
        .chain(unknown.window().iter().copied())
        .fold(0, mix);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hasher for keys that are already hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in for completeness.
        self.0 = bytes
            .iter()
            .fold(self.0, |h, b| h.rotate_left(8) ^ u64::from(*b));
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

/// Runs the WGL search on the operations of one key. Returns the outcome and
/// the steps taken.
fn check_key<'a>(ops: &[&'a Operation], max_steps: u64) -> (Outcome, u64) {
    let mut ops: Vec<&'a Operation> = ops.to_vec();
    // Completed ops first, as `OpSet` expects.
    ops.sort_by_key(|op| (op.ret.is_none(), op.call, op.ret));

    let mut values: HashMap<&'a [u8], Val> = HashMap::new();
    let mut intern = |v: Option<&'a [u8]>| -> Val {
        let Some(v) = v else { return ABSENT };
        let next = Val::try_from(values.len() + 1).expect("fewer than 2^32 distinct values");
        *values.entry(v).or_insert(next)
    };
    let effects: Vec<Effect> = ops
        .iter()
        .map(|&op| match (&op.input, op.ret.map(|_| &op.output)) {
            (Input::Get { .. }, Some(Output::Get(v))) => Effect::Read(intern(v.as_deref())),
            (Input::Put { value, .. }, _) => Effect::Write(intern(Some(value))),
            (Input::Delete { .. }, _) => Effect::Write(ABSENT),
            (Input::Cas { expected, new, .. }, out) => Effect::Cas {
                expected: intern(expected.as_deref()),
                new: intern(new.as_deref()),
                swapped: match out {
                    Some(Output::Cas(s)) => Some(*s),
                    _ => None,
                },
            },
            // Unknown gets are dropped first (`drop_unneeded_unknowns`),
            // mismatched kinds rejected by `validate`.
            (Input::Get { .. }, _) => unreachable!("unknown or mismatched get reached the search"),
        })
        .collect();

    let mut list = build_list(&ops);
    let completed = ops.iter().filter(|op| op.ret.is_some()).count();
    let mut remaining = completed;
    let mut linearized = OpSet::new(completed, ops.len() - completed);
    let mut cache = Cache::default();
    // Linearized calls, with the state before each, to backtrack.
    let mut stack: Vec<(usize, Val)> = Vec::new();
    let mut state = ABSENT;
    let mut node = list.next[HEAD];
    let mut steps = 0u64;

    // Done once every completed op is linearized: pending unknown-outcome
    // ops are left out, as if they never took effect. Every iteration takes
    // a step, so `max_steps` bounds the loop.
    while remaining > 0 {
        if steps >= max_steps {
            return (Outcome::Exhausted, steps);
        }
        steps += 1;
        if node != NIL && list.events[node].is_call {
            let op = list.events[node].op;
            if let Some(new_state) = step(state, effects[op]) {
                linearized.insert(op);
                if let Some(words) = cache.insert(&linearized, new_state) {
                    // Stored words count as steps, so the limit bounds memory too.
                    steps += words as u64;
                    stack.push((node, state));
                    state = new_state;
                    list.lift(node);
                    if ops[op].ret.is_some() {
                        remaining -= 1;
                    }
                    node = list.next[HEAD];
                    continue;
                }
                linearized.remove(op);
            }
            node = list.next[node];
        } else {
            // A return whose op is not linearized yet (end of list cannot
            // happen while ops remain, but is handled the same): every order
            // from here fails, so undo the latest choice and try the next call.
            let Some((call, prev_state)) = stack.pop() else {
                return (Outcome::Violation, steps);
            };
            let op = list.events[call].op;
            list.unlift(call);
            state = prev_state;
            linearized.remove(op);
            if ops[op].ret.is_some() {
                remaining += 1;
            }
            node = list.next[call];
        }
    }
    (Outcome::Linearizable, steps)
}

/// Builds the event list: calls and returns sorted by time, calls first on
/// ties so that operations touching at an instant count as concurrent.
fn build_list(ops: &[&Operation]) -> EventList {
    // (time, is_return, op)
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, false, i));
        if let Some(ret) = op.ret {
            order.push((ret, true, i));
        }
    }
    order.sort_unstable();

    // Node 0 is the sentinel; event k is node k + 1.
    let n = order.len() + 1;
    let mut events = Vec::with_capacity(n);
    events.push(Event {
        op: NIL,
        ret_node: NIL,
        is_call: false,
    });
    let mut ret_node_of_op = vec![NIL; ops.len()];
    for (k, &(_, is_return, op)) in order.iter().enumerate() {
        if is_return {
            ret_node_of_op[op] = k + 1;
        }
        events.push(Event {
            op,
            ret_node: NIL,
            is_call: !is_return,
        });
    }
    for event in events.iter_mut().skip(1).filter(|e| e.is_call) {
        event.ret_node = ret_node_of_op[event.op];
    }
    let prev = (0..n).map(|i| i.wrapping_sub(1)).collect(); // HEAD's prev is NIL
    let next = (0..n)
        .map(|i| if i + 1 < n { i + 1 } else { NIL })
        .collect();
    EventList { events, prev, next }
}

// ---------------------------------------------------------------------------
// Shrinking
// ---------------------------------------------------------------------------

/// Removes chunks of operations, halving the chunk size down to single ops,
/// while the rest stays non-linearizable and the budget lasts. Only sound
/// removals are tried (see [`sound_removal`]), so the witness being
/// non-linearizable still proves the whole history is. Passes of single ops
/// repeat until one removes nothing (a removal can make an earlier op
/// removable: one that only a dropped op's expectation kept), so within the
/// budget no single op of the witness can go.
fn shrink<'a>(ops: &[&'a Operation], limits: &Limits, budget: &mut u64) -> Vec<&'a Operation> {
    let mut current: Vec<&Operation> = ops.to_vec();
    let mut chunk = (current.len() / 2).max(1);
    // Each round halves `chunk` or, at 1, removes an op; within a round each
    // try removes a chunk or advances past it, and every try costs budget, so
    // both loops end.
    loop {
        let before = current.len();
        let mut start = 0;
        while start < current.len() && *budget > 0 {
            let end = (start + chunk).min(current.len());
            let candidate: Vec<&Operation> = current[..start]
                .iter()
                .chain(&current[end..])
                .copied()
                .collect();
            // Charge the soundness check, which is linear in the history.
            *budget = budget.saturating_sub(current.len() as u64);
            if sound_removal(&current[start..end], &candidate)
                && still_violates(&candidate, limits, budget)
            {
                current = candidate;
            } else {
                start = end;
            }
        }
        if *budget == 0 || (chunk == 1 && current.len() == before) {
            return current;
        }
        chunk = (chunk / 2).max(1);
    }
}

fn still_violates(ops: &[&Operation], limits: &Limits, budget: &mut u64) -> bool {
    if ops.is_empty() {
        return false;
    }
    let (outcome, steps) = check_key(ops, limits.max_steps_per_key.min(*budget));
    *budget = budget.saturating_sub(steps);
    matches!(outcome, Outcome::Violation)
}

/// The value `op` may leave in the register (`Some(None)`: absent), or
/// `None` if it never changes it.
fn written(op: &Operation) -> Option<Option<&[u8]>> {
    match (&op.input, op.ret.map(|_| &op.output)) {
        (Input::Put { value, .. }, _) => Some(Some(value)),
        (Input::Delete { .. }, _) => Some(None),
        // A CAS to the value it expects changes nothing.
        (Input::Cas { expected, new, .. }, None | Some(Output::Cas(true))) if expected != new => {
            Some(new.as_deref())
        }
        _ => None,
    }
}

/// The register values a set of operations depends on.
struct Needs<'a> {
    /// Values that some op needs the register to hold exactly: read by a
    /// completed get, expected by a successful or unknown-outcome CAS.
    exact: HashSet<Option<&'a [u8]>>,
    /// Values expected by failed CASes, which need the register to differ.
    failed_cas_expected: HashSet<Option<&'a [u8]>>,
}

impl<'a> Needs<'a> {
    fn of(ops: &[&'a Operation]) -> Self {
        let mut needs = Needs {
            exact: HashSet::new(),
            failed_cas_expected: HashSet::new(),
        };
        for op in ops {
            match (&op.input, op.ret.map(|_| &op.output)) {
                (Input::Get { .. }, Some(Output::Get(seen))) => {
                    needs.exact.insert(seen.as_deref());
                }
                (Input::Cas { expected, .. }, None | Some(Output::Cas(true))) => {
                    needs.exact.insert(expected.as_deref());
                }
                (Input::Cas { expected, .. }, Some(Output::Cas(false))) => {
                    needs.failed_cas_expected.insert(expected.as_deref());
                }
                _ => {}
            }
        }
        needs
    }

    /// Whether removing `op` from any linearization of a history containing
    /// these ops leaves a valid linearization of the rest. Removing an op
    /// that changes nothing only lifts constraints. Removing a write changes
    /// the state seen up to the next write, so no op there may depend on the
    /// written value: no op may need it exactly, and a failed CAS there,
    /// which needs the value to differ from its expected one, may only
    /// expect the written value itself.
    fn allow_dropping(&self, op: &Operation) -> bool {
        written(op).is_none_or(|value| {
            !self.exact.contains(&value) && self.failed_cas_expected.iter().all(|e| *e == value)
        })
    }
}

/// Whether dropping `removed` and keeping `kept` is sound: if the whole
/// history is linearizable so is `kept`, so a non-linearizable `kept` is an
/// honest witness. Without this, dropping e.g. a delete would make a correct
/// read of "absent" look stale and the witness would blame the wrong op.
fn sound_removal(removed: &[&Operation], kept: &[&Operation]) -> bool {
    let needs = Needs::of(kept);
    removed.iter().all(|op| needs.allow_dropping(op))
}

/// Drops unknown-outcome ops that no op depends on. Such an op may always be
/// left out (it may never have happened), and leaving it out never breaks a
/// linearization (see [`Needs::allow_dropping`]), so the verdict is the same,
/// while the search no longer tries every point where it might have taken
/// effect. Unknown gets always go: they change nothing.
fn drop_unneeded_unknowns(mut ops: Vec<&Operation>) -> Vec<&Operation> {
    // Dropping an unknown CAS can free the value it expected, so repeat;
    // each pass drops an op or stops.
    for _ in 0..=ops.len() {
        let needs = Needs::of(&ops);
        let before = ops.len();
        ops.retain(|op| op.ret.is_some() || !needs.allow_dropping(op));
        if ops.len() == before {
            break;
        }
    }
    ops
}

// ---------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {} is not linearizable: no order of these {} (of {}) operations on it \
             respects real time and explains every result (times in ns):",
            Bytes(&self.key),
            self.ops.len(),
            self.total_ops
        )?;
        for op in &self.ops {
            write!(f, "\n  {op}")?;
        }
        Ok(())
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => f.write_str("linearizable"),
            CheckResult::Violation(v) => v.fmt(f),
            CheckResult::Unknown { keys } => {
                f.write_str("undecided: search limit exceeded for keys")?;
                for key in keys {
                    write!(f, " {}", Bytes(key))?;
                }
                Ok(())
            }
            CheckResult::Malformed { index, reason } => {
                write!(f, "malformed history: operation #{index} {reason}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::time::Instant;

    fn val(s: Option<&str>) -> Option<Vec<u8>> {
        s.map(|s| s.as_bytes().to_vec())
    }

    fn put(client: u64, key: &str, value: &str, call: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::put(key, value),
            call,
            ret: Some(ret),
            output: Output::Write,
        }
    }

    fn put_unknown(client: u64, key: &str, value: &str, call: u64) -> Operation {
        Operation {
            ret: None,
            ..put(client, key, value, call, call)
        }
    }

    fn delete(client: u64, key: &str, call: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::delete(key),
            call,
            ret: Some(ret),
            output: Output::Write,
        }
    }

    fn get(client: u64, key: &str, seen: Option<&str>, call: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::get(key),
            call,
            ret: Some(ret),
            output: Output::Get(val(seen)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn cas(
        client: u64,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
        swapped: bool,
        call: u64,
        ret: u64,
    ) -> Operation {
        Operation {
            client,
            input: Input::Cas {
                key: key.into(),
                expected: val(expected),
                new: val(new),
            },
            call,
            ret: Some(ret),
            output: Output::Cas(swapped),
        }
    }

    fn expect_violation(history: &[Operation], key: &str) -> Violation {
        match check(history) {
            CheckResult::Violation(v) => {
                assert_eq!(v.key, key.as_bytes(), "wrong key in {v}");
                v
            }
            other => panic!("expected a violation on {key:?}, got {other}"),
        }
    }

    fn assert_ok(history: &[Operation]) {
        let result = check(history);
        assert!(result.is_ok(), "expected linearizable, got {result}");
    }

    #[test]
    fn stale_read_of_absent_is_rejected() {
        let history = [put(1, "x", "1", 0, 10), get(2, "x", None, 20, 30)];
        let v = expect_violation(&history, "x");
        assert_eq!(v.ops.len(), 2, "{v}");
    }

    #[test]
    fn stale_read_of_older_value_is_rejected() {
        let history = [
            put(1, "x", "1", 0, 10),
            put(1, "x", "2", 20, 30),
            get(2, "x", Some("1"), 40, 50),
        ];
        let v = expect_violation(&history, "x");
        // Shrinking must keep the writer of "1", or the witness would lie.
        assert_eq!(v.ops, history.to_vec(), "{v}");
        assert_eq!(v.total_ops, 3);
    }

    #[test]
    fn concurrent_puts_and_gets_are_accepted() {
        // Two overlapping puts, reads that see them in the order 2 then 1.
        let history = [
            put(1, "x", "1", 0, 100),
            put(2, "x", "2", 10, 90),
            get(3, "x", None, 5, 20),
            get(3, "x", Some("2"), 30, 40),
            get(4, "x", Some("1"), 50, 120),
            get(3, "x", Some("1"), 130, 140),
            delete(2, "x", 135, 150),
            get(1, "x", Some("1"), 141, 160),
            get(1, "x", None, 161, 170),
        ];
        assert_ok(&history);
    }

    #[test]
    fn reads_going_back_in_time_are_rejected() {
        // Each read alone is fine, but once "2" is seen "1" cannot come back.
        let history = [
            put(1, "x", "1", 0, 100),
            put(2, "x", "2", 10, 90),
            get(3, "x", Some("2"), 20, 30),
            get(3, "x", Some("1"), 40, 50),
            get(4, "x", Some("2"), 60, 70),
        ];
        expect_violation(&history, "x");
    }

    #[test]
    fn two_concurrent_successful_cas_from_same_value_are_rejected() {
        let history = [
            put(1, "x", "0", 0, 10),
            cas(1, "x", Some("0"), Some("1"), true, 20, 50),
            cas(2, "x", Some("0"), Some("2"), true, 25, 45),
        ];
        expect_violation(&history, "x");
    }

    #[test]
    fn concurrent_cas_with_one_winner_is_accepted() {
        let history = [
            put(1, "x", "0", 0, 10),
            cas(1, "x", Some("0"), Some("1"), true, 20, 50),
            cas(2, "x", Some("0"), Some("2"), false, 25, 45),
            get(3, "x", Some("1"), 60, 70),
        ];
        assert_ok(&history);
    }

    #[test]
    fn cas_on_absent_key_and_cas_to_delete() {
        let ok = [
            cas(1, "x", None, Some("1"), true, 0, 10),
            cas(2, "x", None, Some("2"), false, 20, 30),
            cas(1, "x", Some("1"), None, true, 40, 50),
            get(2, "x", None, 60, 70),
        ];
        assert_ok(&ok);
        // A CAS that fails although the expected value is certainly there.
        let bad = [
            put(1, "x", "1", 0, 10),
            cas(2, "x", Some("1"), Some("2"), false, 20, 30),
        ];
        expect_violation(&bad, "x");
    }

    #[test]
    fn unknown_put_that_is_read_later_is_accepted() {
        let history = [
            put_unknown(1, "x", "1", 0),
            get(2, "x", None, 10, 20),
            get(2, "x", Some("1"), 1_000, 1_010),
        ];
        assert_ok(&history);
    }

    #[test]
    fn unknown_put_never_read_is_accepted() {
        let history = [
            put(1, "x", "0", 0, 5),
            put_unknown(1, "x", "1", 10),
            get(2, "x", Some("0"), 20, 30),
            get(2, "x", Some("0"), 40, 50),
        ];
        assert_ok(&history);
    }

    #[test]
    fn unknown_put_cannot_take_effect_twice() {
        // Once "1" is visible it stays until something overwrites it.
        let history = [
            put_unknown(1, "x", "1", 0),
            get(2, "x", Some("1"), 10, 20),
            get(2, "x", None, 30, 40),
        ];
        expect_violation(&history, "x");
    }

    #[test]
    fn unknown_put_cannot_take_effect_before_its_call() {
        let history = [get(2, "x", Some("1"), 0, 10), put_unknown(1, "x", "1", 20)];
        expect_violation(&history, "x");
    }

    #[test]
    fn unknown_cas_may_or_may_not_apply() {
        let unknown_cas = Operation {
            ret: None,
            ..cas(1, "x", Some("0"), Some("1"), false, 20, 20)
        };
        let applied = [
            put(1, "x", "0", 0, 10),
            unknown_cas.clone(),
            get(2, "x", Some("1"), 30, 40),
        ];
        assert_ok(&applied);
        let not_applied = [
            put(1, "x", "0", 0, 10),
            unknown_cas,
            get(2, "x", Some("0"), 30, 40),
        ];
        assert_ok(&not_applied);
    }

    #[test]
    fn many_unread_unknown_writes_stay_cheap() {
        // 300 timed-out puts of values nobody reads, each concurrent with
        // everything after it: dropped up front instead of multiplying the
        // search space.
        let mut history = Vec::new();
        for i in 0..300u64 {
            let t = i * 10;
            history.push(put_unknown(1, "x", &format!("lost{i}"), t));
            history.push(put(2, "x", &i.to_string(), t, t + 5));
            history.push(get(3, "x", Some(&i.to_string()), t + 6, t + 9));
        }
        let limits = Limits {
            max_steps_per_key: 20_000,
            max_shrink_steps: 20_000,
        };
        assert_eq!(check_with_limits(&history, &limits), CheckResult::Ok);
        // A stale read is still found, and the witness skips the lost puts.
        history.push(get(3, "x", Some("7"), 5_000, 5_001));
        let result = check_with_limits(&history, &limits);
        let v = result
            .violation()
            .unwrap_or_else(|| panic!("not rejected: {result}"));
        assert!(v.ops.iter().all(|op| op.ret.is_some()), "{v}");
        assert_eq!(v.total_ops, 901);
    }

    #[test]
    fn unknown_write_that_is_read_is_kept() {
        // The lost put explains the read, so it must not be dropped, and it
        // cannot have happened before its call.
        let history = [
            put(1, "x", "0", 0, 10),
            put_unknown(2, "x", "1", 100),
            get(3, "x", Some("1"), 20, 30),
        ];
        let v = expect_violation(&history, "x");
        assert_eq!(v.ops, [history[2].clone(), history[1].clone()], "{v}");
        let mut fixed = history.to_vec();
        fixed[2].call = 110;
        fixed[2].ret = Some(120);
        assert_ok(&fixed);
    }

    #[test]
    fn unknown_get_is_ignored() {
        let unknown_get = Operation {
            ret: None,
            ..get(2, "x", Some("garbage"), 20, 20)
        };
        assert_ok(&[put(1, "x", "1", 0, 10), unknown_get]);
    }

    #[test]
    fn violation_is_reported_on_its_own_key() {
        // A long valid history on "a" (sequential with some overlap) ...
        let mut history = Vec::new();
        for i in 0..500u64 {
            let t = i * 10;
            history.push(put(i % 3, "a", &i.to_string(), t, t + 15));
            history.push(get(3, "a", Some(&i.to_string()), t + 16, t + 19));
        }
        // ... and a stale read on "b" in the middle of it.
        history.push(put(7, "b", "1", 100, 110));
        history.push(get(8, "b", None, 200, 210));
        let v = expect_violation(&history, "b");
        assert!(v.ops.iter().all(|op| op.input.key() == b"b"), "{v}");
        assert_eq!(v.total_ops, 2);
    }

    #[test]
    fn shrinking_finds_a_small_witness_in_a_long_history() {
        let mut history = Vec::new();
        for i in 0..300u64 {
            let t = i * 10;
            history.push(put(i % 4, "k", &i.to_string(), t, t + 15));
        }
        // Reads "5" long after it was overwritten.
        history.push(get(9, "k", Some("5"), 2_000, 2_005));
        let v = expect_violation(&history, "k");
        assert_eq!(v.total_ops, 301);
        assert!(v.ops.len() <= 4, "witness not shrunk:\n{v}");
        assert!(
            v.ops.contains(&history[5]),
            "writer of the stale value dropped:\n{v}"
        );
    }

    #[test]
    fn shrunk_witness_keeps_the_ops_reads_depend_on() {
        // The last read is stale; the read of "absent" is fine only because
        // of the delete, so the witness must not drop the delete alone.
        let history = [
            put(1, "x", "1", 0, 10),
            delete(1, "x", 20, 30),
            get(2, "x", None, 40, 50),
            get(2, "x", Some("1"), 60, 70),
        ];
        let v = expect_violation(&history, "x");
        assert_eq!(v.ops, [&history[..2], &history[3..]].concat(), "{v}");
    }

    #[test]
    fn violation_display_is_readable() {
        let history = [
            Operation {
                input: Input::put("k\u{e9}y", vec![0xff, b'v']),
                ..put(1, "", "", 0, 10)
            },
            Operation {
                input: Input::get("k\u{e9}y"),
                ..get(2, "", None, 20, 30)
            },
        ];
        let text = check(&history).to_string();
        assert!(text.contains("key \"kéy\" is not linearizable"), "{text}");
        assert!(text.contains("client 1"), "{text}");
        assert!(text.contains("put(\"kéy\", \"\u{fffd}v\") -> ok"), "{text}");
        assert!(text.contains("get(\"kéy\") -> absent"), "{text}");
        assert!(text.contains("20 .."), "{text}");
        let unknown = put_unknown(3, "x", "1", 5).to_string();
        assert!(
            unknown.ends_with("?] put(\"x\", \"1\") -> unknown"),
            "{unknown}"
        );
    }

    #[test]
    fn pathological_history_returns_unknown_within_limits() {
        // 40 mutually concurrent puts and a read of a value nobody wrote: WGL
        // has to try every subset of puts before concluding.
        let mut history: Vec<Operation> = (0..40)
            .map(|i| put(i, "x", &i.to_string(), i, 1_000))
            .collect();
        history.push(get(99, "x", Some("never"), 0, 1_000));
        let limits = Limits {
            max_steps_per_key: 100_000,
            max_shrink_steps: 100_000,
        };
        let started = Instant::now();
        let result = check_with_limits(&history, &limits);
        assert_eq!(
            result,
            CheckResult::Unknown {
                keys: vec![b"x".to_vec()]
            }
        );
        assert!(
            started.elapsed().as_secs() < 10,
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn unknown_on_one_key_does_not_hide_violation_on_another() {
        let mut history: Vec<Operation> = (0..40)
            .map(|i| put(i, "a", &i.to_string(), i, 1_000))
            .collect();
        history.push(get(99, "a", Some("never"), 0, 1_000));
        history.push(put(1, "b", "1", 0, 10));
        history.push(get(2, "b", None, 20, 30));
        let limits = Limits {
            max_steps_per_key: 10_000,
            max_shrink_steps: 10_000,
        };
        let result = check_with_limits(&history, &limits);
        assert_eq!(
            result.violation().map(|v| v.key.as_slice()),
            Some(&b"b"[..]),
            "{result}"
        );
    }

    #[test]
    fn malformed_histories_are_flagged() {
        let backwards = [put(1, "x", "1", 10, 5)];
        assert!(matches!(
            check(&backwards),
            CheckResult::Malformed { index: 0, .. }
        ));
        let mismatched = [
            put(1, "x", "1", 0, 5),
            Operation {
                output: Output::Write,
                ..get(1, "x", None, 6, 7)
            },
        ];
        assert!(matches!(
            check(&mismatched),
            CheckResult::Malformed { index: 1, .. }
        ));
        assert!(check(&[]).is_ok());
    }

    // --- Randomized: histories of a simulated linearizable store ---------

    const KEYS: [&str; 3] = ["a", "b", "c"];
    const VALUES: [&str; 4] = ["0", "1", "2", "3"];

    /// Draws an input; without deletes no operation can make a key absent.
    fn random_input(rng: &mut StdRng, deletes: bool) -> Input {
        let key = KEYS[rng.random_range(0..KEYS.len())];
        let value = |rng: &mut StdRng| VALUES[rng.random_range(0..VALUES.len())].as_bytes();
        match rng.random_range(0..10) {
            0..=3 => Input::get(key),
            4..=6 => Input::put(key, value(rng)),
            7 if deletes => Input::delete(key),
            _ => {
                let expected = rng.random_bool(0.8).then(|| value(rng));
                let new = (!deletes || rng.random_bool(0.8)).then(|| value(rng));
                Input::cas(key, expected, new)
            }
        }
    }

    /// Clients issue operations back to back; each takes effect at a random
    /// point inside its interval (or, if its outcome is lost, at a random
    /// later point or never), and outputs come from running the operations
    /// sequentially in that order: a correct store by construction.
    fn simulate(rng: &mut StdRng, deletes: bool) -> Vec<Operation> {
        let mut ops = Vec::new();
        // Linearization point of each op, None if it never took effect.
        let mut points = Vec::new();
        for client in 0..rng.random_range(2..=5u64) {
            let mut t = rng.random_range(0..50u64);
            for _ in 0..rng.random_range(5..=15) {
                let call = t + rng.random_range(0..30);
                let ret = call + rng.random_range(1..100);
                let lost = rng.random_bool(0.08);
                points.push(match lost {
                    false => Some(rng.random_range(call..=ret)),
                    true if rng.random_bool(0.5) => Some(call + rng.random_range(0..1_000)),
                    true => None,
                });
                ops.push(Operation {
                    client,
                    input: random_input(rng, deletes),
                    call,
                    ret: (!lost).then_some(ret),
                    output: Output::Write,
                });
                t = ret;
            }
        }
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| points[i].is_some()).collect();
        order.sort_by_key(|&i| points[i]);
        let mut store: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for i in order {
            let op = &mut ops[i];
            op.output = match &op.input {
                Input::Get { key } => Output::Get(store.get(key).cloned()),
                Input::Put { key, value } => {
                    store.insert(key.clone(), value.clone());
                    Output::Write
                }
                Input::Delete { key } => {
                    store.remove(key);
                    Output::Write
                }
                Input::Cas { key, expected, new } => {
                    let swapped = store.get(key) == expected.as_ref();
                    if swapped {
                        match new {
                            Some(v) => store.insert(key.clone(), v.clone()),
                            None => store.remove(key),
                        };
                    }
                    Output::Cas(swapped)
                }
            };
        }
        ops
    }

    /// Indices of completed gets.
    fn completed_gets(history: &[Operation]) -> Vec<usize> {
        (0..history.len())
            .filter(|&i| matches!(history[i].input, Input::Get { .. }) && history[i].ret.is_some())
            .collect()
    }

    /// Whether `key` certainly holds a value at `time`: without deletes, any
    /// completed put or successful CAS before `time` leaves it present.
    fn certainly_present(history: &[Operation], key: &[u8], time: u64) -> bool {
        history.iter().any(|op| {
            op.input.key() == key
                && op.ret.is_some_and(|r| r < time)
                && matches!(
                    (&op.input, &op.output),
                    (Input::Put { .. }, _) | (Input::Cas { .. }, Output::Cas(true))
                )
        })
    }

    /// Every op the witness could soundly lose is needed: without it, the rest is
    /// linearizable.
    fn assert_one_minimal(v: &Violation, seed: u64) {
        let ops: Vec<&Operation> = v.ops.iter().collect();
        for i in 0..ops.len() {
            let mut rest = ops.clone();
            let removed = rest.remove(i);
            if sound_removal(&[removed], &rest) {
                let (outcome, _) = check_key(&rest, u64::MAX);
                assert!(
                    matches!(outcome, Outcome::Linearizable),
                    "seed {seed}: the witness still violates without {removed}:\n{v}"
                );
            }
        }
    }

    #[test]
    fn random_linearizable_histories_are_accepted_and_corruptions_rejected() {
        let mut checked_corruptions = 0;
        for seed in 0..1_000u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let deletes = seed % 2 == 0;
            let mut history = simulate(&mut rng, deletes);
            let result = check(&history);
            assert!(
                result.is_ok(),
                "seed {seed}: correct history not accepted: {result}"
            );

            let gets = completed_gets(&history);
            if gets.is_empty() {
                continue;
            }
            // A value no operation ever writes cannot be read.
            let victim = gets[rng.random_range(0..gets.len())];
            let original = history[victim].output.clone();
            history[victim].output = Output::Get(Some(b"never written".to_vec()));
            let key = String::from_utf8_lossy(history[victim].input.key()).into_owned();
            match check(&history) {
                CheckResult::Violation(v) => {
                    assert_eq!(v.key, key.as_bytes(), "seed {seed}: wrong key in {v}");
                    assert!(
                        v.ops.contains(&history[victim]),
                        "seed {seed}: read missing from {v}"
                    );
                }
                other => panic!("seed {seed}: impossible read of {key:?} not rejected: {other}"),
            }
            history[victim].output = original;
            checked_corruptions += 1;

            // A stale read: absent after a completed write, with no deletes.
            if deletes {
                continue;
            }
            let stale: Vec<usize> = gets
                .into_iter()
                .filter(|&i| {
                    let op = &history[i];
                    op.output != Output::Get(None)
                        && certainly_present(&history, op.input.key(), op.call)
                })
                .collect();
            if !stale.is_empty() {
                let victim = stale[rng.random_range(0..stale.len())];
                history[victim].output = Output::Get(None);
                let result = check(&history);
                let v = result.violation().unwrap_or_else(|| {
                    panic!("seed {seed}: stale read of absent not rejected: {result}")
                });
                assert_eq!(v.key, history[victim].input.key(), "seed {seed}: {v}");
                // Shrinking only drops what cannot matter, so the culprit stays.
                assert!(
                    v.ops.contains(&history[victim]),
                    "seed {seed}: read missing from {v}"
                );
                assert_one_minimal(v, seed);
                checked_corruptions += 1;
            }
        }
        assert!(
            checked_corruptions > 1_000,
            "only {checked_corruptions} corruptions checked"
        );
    }
}
