//! Per-range statistics for the placement scheduler: approximate size (keys, bytes)
//! and load (reads and writes per second), kept in each replica's memory and
//! reported by the group's leader in its heartbeat.
//!
//! Size is kept incrementally: a range is *seeded* once by one scan of an engine
//! view (on a blocking thread, outside the state lock) and from then on every
//! client write applied adds what it changed (the key's old and new sizes). Writes
//! that bypass that accounting (a transfer's install, garbage deletion) mark the
//! range for a new seed, and so does a drift of a quarter since the last one,
//! which also refreshes the split key the seed scan finds (the key at the middle of
//! the range by bytes). The seed view is taken under the state lock but the last
//! applied entry may not be committed in it yet, so a seed can miss one entry's
//! writes: the sizes are approximate, as the scheduler needs them.
//!
//! Load is counted per one-second bucket over [`WINDOW_SECS`]; accessed keys are
//! kept in a bounded sample with counts (halved when full and once per window, so
//! old accesses fade),
//! from which the key that divides the load in two, or a single hot key that holds
//! most of it, is read.

use crate::proto::{KeyRange, RangeStats};
use std::collections::BTreeMap;
use std::time::Instant;

/// Seconds of the load window.
pub const WINDOW_SECS: usize = 10;
/// Distinct keys sampled per range for the load split key.
const SAMPLE_KEYS: usize = 256;
/// A key holding more than this share of a range's sampled load is hot: splitting
/// next to it cannot divide the load.
const HOT_KEY_SHARE: f64 = 0.5;
/// A size drift from the last seed of more than 1/this triggers a new seed.
const RESEED_DRIFT: i64 = 4;

/// Per-second counts over the last [`WINDOW_SECS`] seconds.
#[derive(Default, Clone)]
struct Window {
    buckets: [u64; WINDOW_SECS],
    /// The second of `buckets[second % WINDOW_SECS]` when it was last written.
    seconds: [u64; WINDOW_SECS],
}

impl Window {
    fn add(&mut self, second: u64) {
        let i = second as usize % WINDOW_SECS;
        if self.seconds[i] != second {
            self.seconds[i] = second;
            self.buckets[i] = 0;
        }
        self.buckets[i] += 1;
    }

    /// Average per second over the window of complete seconds before `second`.
    fn rate(&self, second: u64) -> f64 {
        let total: u64 = (0..WINDOW_SECS)
            .filter(|&i| self.seconds[i] < second && self.seconds[i] + WINDOW_SECS as u64 >= second)
            .map(|i| self.buckets[i])
            .sum();
        total as f64 / WINDOW_SECS as f64
    }
}

#[derive(Default, Clone)]
struct Entry {
    range: KeyRange,
    /// Keys and bytes from the last seed plus every accounted write since.
    keys: i64,
    bytes: i64,
    /// The size at the last seed; None: not seeded (or to be seeded again).
    seeded_bytes: Option<i64>,
    /// Bumped by anything that invalidates a seed in flight.
    epoch: u64,
    size_split_key: Vec<u8>,
    reads: Window,
    writes: Window,
    sample: BTreeMap<Vec<u8>, u64>,
    /// The second the sample was last halved.
    sample_halved: u64,
}

impl Entry {
    fn halve_sample(&mut self) {
        self.sample.retain(|_, c| {
            *c /= 2;
            *c > 0
        });
    }

    fn touch(&mut self, key: &[u8], second: u64) {
        // Once per window, so the sample follows the load of the last seconds.
        if second >= self.sample_halved + WINDOW_SECS as u64 {
            self.sample_halved = second;
            self.halve_sample();
        }
        if let Some(c) = self.sample.get_mut(key) {
            *c += 1;
            return;
        }
        if self.sample.len() >= SAMPLE_KEYS {
            self.halve_sample();
        }
        if self.sample.len() < SAMPLE_KEYS {
            self.sample.insert(key.to_vec(), 1);
        }
    }

    /// The key that divides the sampled load most evenly (never the range's start),
    /// or the hot key when one key holds most of it.
    fn load_keys(&self) -> (Vec<u8>, Vec<u8>) {
        let total: u64 = self.sample.values().sum();
        if total == 0 {
            return Default::default();
        }
        let (hot, hottest) = self
            .sample
            .iter()
            .max_by_key(|(k, c)| (**c, std::cmp::Reverse(*k)))
            .expect("not empty");
        if *hottest as f64 > HOT_KEY_SHARE * total as f64 {
            return (Vec::new(), hot.clone());
        }
        let mut left = 0;
        let mut best: Option<(u64, &Vec<u8>)> = None;
        for (k, c) in &self.sample {
            if k.as_slice() > self.range.start.as_slice() {
                let skew = left.max(total - left) - left.min(total - left);
                if best.is_none_or(|(s, _)| skew < s) {
                    best = Some((skew, k));
                }
            }
            left += c;
        }
        (best.map(|(_, k)| k.clone()).unwrap_or_default(), Vec::new())
    }
}

/// What a seed scan must count: a range, and the epoch that makes its result stick.
pub struct SeedJob {
    pub range: KeyRange,
    epoch: u64,
}

/// The statistics of the ranges one replica holds, in key order of their starts.
pub struct RangeStatsTable {
    started: Instant,
    ranges: BTreeMap<Vec<u8>, Entry>,
}

impl Default for RangeStatsTable {
    fn default() -> Self {
        RangeStatsTable {
            started: Instant::now(),
            ranges: BTreeMap::new(),
        }
    }
}

impl RangeStatsTable {
    fn second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Follows the held ranges: a range held before keeps its statistics, a new one
    /// starts unseeded with no load.
    pub fn follow<'a>(&mut self, held: impl Iterator<Item = &'a KeyRange>) {
        let mut old = std::mem::take(&mut self.ranges);
        for range in held {
            let entry = match old.remove(&range.start) {
                Some(e) if e.range == *range => e,
                _ => Entry {
                    range: range.clone(),
                    ..Default::default()
                },
            };
            self.ranges.insert(range.start.clone(), entry);
        }
    }

    fn entry(&mut self, key: &[u8]) -> Option<&mut Entry> {
        self.ranges
            .range_mut(..=key.to_vec())
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| e.range.contains(key))
    }

    /// A read of `key`.
    pub fn read(&mut self, key: &[u8]) {
        let second = self.second();
        if let Some(e) = self.entry(key) {
            e.reads.add(second);
            e.touch(key, second);
        }
    }

    /// An applied client write of `key` whose stored value went from `before` to
    /// `after` bytes (None: absent).
    pub fn wrote(&mut self, key: &[u8], before: Option<usize>, after: Option<usize>) {
        let second = self.second();
        if let Some(e) = self.entry(key) {
            e.writes.add(second);
            e.touch(key, second);
            let size = |v: Option<usize>| v.map_or(0, |n| (key.len() + n) as i64);
            e.keys += after.is_some() as i64 - before.is_some() as i64;
            e.bytes += size(after) - size(before);
        }
    }

    /// Data in `range` changed without accounting: seed every range it touches
    /// again (a transfer's range is that of an older configuration, which may have
    /// been split since).
    pub fn invalidate(&mut self, range: &KeyRange) {
        for e in self.ranges.values_mut() {
            if e.range.overlaps(range) {
                e.seeded_bytes = None;
                e.epoch += 1;
            }
        }
    }

    /// The ranges to seed now (unseeded, or drifted). Their counts restart from zero:
    /// the seed's result is added to whatever is written from here on.
    pub fn seed_jobs(&mut self) -> Vec<SeedJob> {
        let mut jobs = Vec::new();
        for e in self.ranges.values_mut() {
            let drifted = e
                .seeded_bytes
                .is_some_and(|s| (e.bytes - s).abs() * RESEED_DRIFT > s.max(1 << 20));
            if e.seeded_bytes.is_none() || drifted {
                e.epoch += 1;
                e.keys = 0;
                e.bytes = 0;
                e.seeded_bytes = Some(0);
                jobs.push(SeedJob {
                    range: e.range.clone(),
                    epoch: e.epoch,
                });
            }
        }
        jobs
    }

    /// The result of a seed scan: `keys`, `bytes` and the key at the middle by bytes.
    pub fn seeded(&mut self, job: &SeedJob, keys: u64, bytes: u64, middle: Vec<u8>) {
        match self.ranges.get_mut(&job.range.start) {
            Some(e) if e.range == job.range && e.epoch == job.epoch => {
                e.keys += keys as i64;
                e.bytes += bytes as i64;
                e.seeded_bytes = Some(bytes as i64);
                e.size_split_key = middle;
            }
            Some(e) if e.range == job.range => e.seeded_bytes = None,
            _ => {}
        }
    }

    /// The statistics of every held range, for the heartbeat (states filled in by
    /// the caller).
    pub fn report(&self) -> Vec<RangeStats> {
        let second = self.second();
        self.ranges
            .values()
            .map(|e| {
                let (load_split_key, hot_key) = e.load_keys();
                RangeStats {
                    range: Some(e.range.clone()),
                    state: 0,
                    keys: e.keys.max(0) as u64,
                    bytes: e.bytes.max(0) as u64,
                    reads_per_sec: e.reads.rate(second),
                    writes_per_sec: e.writes.rate(second),
                    size_split_key: e.size_split_key.clone(),
                    load_split_key,
                    hot_key,
                    sized: e.seeded_bytes.is_some(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: &str) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: end.into(),
        }
    }

    #[test]
    fn writes_after_the_seed_add_to_it_and_a_new_range_starts_over() {
        let mut t = RangeStatsTable::default();
        let (a, b) = (range("", "m"), range("m", ""));
        t.follow([&a, &b].into_iter());
        let jobs = t.seed_jobs();
        assert_eq!(jobs.len(), 2);
        // Written while the seed scan runs: counted on top of the scan's result.
        t.wrote(b"c", None, Some(10));
        t.wrote(b"c", Some(10), Some(4));
        t.seeded(&jobs[0], 5, 100, b"f".to_vec());
        t.wrote(b"x", Some(3), None);
        t.seeded(&jobs[1], 2, 20, b"z".to_vec());
        let r = t.report();
        assert_eq!((r[0].keys, r[0].bytes), (6, 105));
        assert_eq!(r[0].size_split_key, b"f");
        assert_eq!((r[1].keys, r[1].bytes), (1, 16));
        assert!(t.seed_jobs().is_empty(), "seeded and not drifted");
        // An unaccounted change makes a seed in flight void.
        let again = {
            t.invalidate(&range("a", "b"));
            t.seed_jobs()
        };
        t.invalidate(&range("a", "b"));
        t.seeded(&again[0], 1, 1, Vec::new());
        assert!(!t.report()[0].sized);
        // Split at "g": both halves are new, unseeded.
        let (a1, a2) = (range("", "g"), range("g", "m"));
        t.follow([&a1, &a2, &b].into_iter());
        let halves = t.seed_jobs();
        assert_eq!(halves.len(), 3 - 1, "b keeps its seed");
        for job in &halves {
            t.seeded(job, 0, 0, Vec::new());
        }
        assert!(t.seed_jobs().is_empty());
        // An install of a range from before the split reaches both halves.
        t.invalidate(&range("", "m"));
        assert_eq!(t.seed_jobs().len(), 2, "both halves of the installed range");
    }

    #[test]
    fn load_is_split_where_it_divides_and_a_hot_key_is_named() {
        let mut t = RangeStatsTable::default();
        let a = range("k", "");
        t.follow([&a].into_iter());
        for i in 0..100u32 {
            t.read(format!("k{:03}", i % 10).as_bytes());
        }
        let (split, hot) = t.ranges.values().next().unwrap().load_keys();
        assert_eq!(split, b"k005", "five keys of ten on each side");
        assert!(hot.is_empty());
        for _ in 0..1000 {
            t.wrote(b"k007", Some(1), Some(1));
        }
        let (split, hot) = t.ranges.values().next().unwrap().load_keys();
        assert!(split.is_empty(), "one hot key cannot be divided");
        assert_eq!(hot, b"k007");
    }

    #[test]
    fn the_sample_stays_bounded() {
        let mut t = RangeStatsTable::default();
        let a = KeyRange::full();
        t.follow([&a].into_iter());
        for i in 0..10_000u32 {
            t.read(&i.to_be_bytes());
        }
        assert!(t.ranges.values().next().unwrap().sample.len() <= SAMPLE_KEYS);
    }

    #[test]
    fn rates_count_complete_seconds_of_the_window() {
        let mut w = Window::default();
        for s in [1, 1, 2, 5] {
            w.add(s);
        }
        assert_eq!(w.rate(3), 0.3);
        assert_eq!(w.rate(20), 0.0, "all older than the window");
    }
}
