//! The placement scheduler. Its round ([`schedule`]) is a pure, deterministic function from the latest
//! configuration, the ranges' statistics (the owners' heartbeats), the settings and
//! the recent moves and splits to a bounded list of decisions. No I/O and no
//! clock: the time comes in, so every replica that applies a round's decisions
//! (checked again against the configuration then, in `state.rs`) agrees, and tests
//! can replay any situation.
//!
//! One round, in order, each range in at most one decision:
//! 1. **Split by size**: a range over `split_bytes` is cut at the key its owner
//!    found near the middle by bytes.
//! 2. **Split by load**: a range over `split_load` (reads plus writes per second)
//!    is cut at the key its owner found to divide the load. A range whose load is
//!    mostly one key (`hot_key`) is not split: it shows in status instead.
//! 3. **Merge**: two adjacent ranges of one group, together under `split_bytes /
//!    MERGE_SHARE` and each under `split_load / MERGE_SHARE`, become one.
//! 4. **Balance by bytes**: while the heaviest or the lightest group is outside
//!    ±[`BALANCE_BAND`] of the mean bytes (and they differ by over a quarter of
//!    `split_bytes`), the range of the heaviest that brings the two closest moves
//!    to the lightest; else, by load, when the busiest group serves over 1.5 times
//!    the mean and over a quarter of `split_load` more than the idlest, if the byte
//!    gap does not widen past a quarter of `split_bytes`.
//!
//! Hysteresis, so nothing flaps:
//! * split at `split_bytes`, merge only under a quarter of it together (and a
//!   quarter of the load threshold each): a merged range is far from splitting
//!   again, and the halves of a split far from merging;
//! * a move is planned only when a group is outside ±20% of the mean, and only a
//!   range smaller than the gap between the two groups, so the gap shrinks and the
//!   order of the two never flips back and forth;
//! * a range the scheduler moved is not moved back to the group it left for
//!   `hold_ms` (it may move on: a join changes the mean), nor are the pieces of a
//!   range it split merged for as long; a range an operator moved is neither moved
//!   nor merged for `manual_hold_ms`, and the pieces of a range an operator split
//!   are not merged for as long (overlap counts) but may move: a split says where
//!   ranges end, not where they live (CockroachDB's manual splits, too, only stop
//!   merges), and the playground's pre-splits must not pin their data for 30 min;
//! * at most one move per group at a time: a group with any plan (queued or live)
//!   neither gives nor takes, and a round plans at most one move per group.
//!
//! Balancing needs the size of every range of the groups that take part: while one
//! is unknown (a fresh split not yet counted, a group without a leader), a round
//! only splits and merges.

use super::liveness::Liveness;
use super::service::{now_ms, propose};
use super::state::MasterState;
use crate::config::MAX_KEY_BYTES;
use crate::proto::placement_decision::Kind;
use crate::proto::storage::master_command::Command;
use crate::proto::storage::ScheduleCommand;
use crate::proto::{
    Config, KeyRange, MovePlan, PlacementDecision, RangeAssignment, RangeStats, SchedulerSettings,
};
use crate::replica::{Replica, Role};
use slog::{info, Logger};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub type Gid = u64;

/// Splits per round at most (each is cheap: no data moves).
pub const MAX_SPLITS: usize = 8;
/// Merges per round at most.
pub const MAX_MERGES: usize = 8;
/// Two ranges merge when together under `split_bytes / MERGE_SHARE` bytes and each
/// under `split_load / MERGE_SHARE` load.
pub const MERGE_SHARE: u64 = 4;
/// Groups are balanced when each is within this share of the mean.
pub const BALANCE_BAND: f64 = 0.2;

/// Defaults: 96 MiB as TiKV's regions; 2500 ops/s as CockroachDB's load-based
/// split; the scheduler's own moves and splits held 5 minutes, an operator's 30.
pub fn default_settings() -> SchedulerSettings {
    SchedulerSettings {
        split_bytes: 96 << 20,
        split_load: 2500.0,
        merge: true,
        balance: true,
        paused: false,
        hold_ms: 5 * 60 * 1000,
        manual_hold_ms: 30 * 60 * 1000,
    }
}

/// What happened to a range recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The scheduler moved it away from `Recent::from_gid`: not moved back there
    /// for `hold_ms`.
    Moved,
    /// The scheduler split it: its pieces are not merged for `hold_ms` (their load
    /// is counted from zero after a split, so they look cold at first).
    Split,
    /// An operator moved it: neither moved nor merged for `manual_hold_ms`.
    ManualMove,
    /// An operator split it: its pieces are not merged for `manual_hold_ms`.
    ManualSplit,
}

/// Something that happened to a range recently, which the scheduler respects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recent {
    pub range: KeyRange,
    pub at_ms: u64,
    pub event: Event,
    /// Moved: the group it left.
    pub from_gid: Gid,
}

/// True if `key` can cut `range` in two non-empty ranges.
fn cuts(range: &KeyRange, key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key > range.start.as_slice()
        && (range.end.is_empty() || key < range.end.as_slice())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

struct Slot<'a> {
    range: &'a KeyRange,
    gid: Gid,
    stats: Option<&'a RangeStats>,
    /// Has a move plan, or was decided on this round.
    taken: bool,
    /// Moved or split by an operator recently: not to be moved.
    hold_move: bool,
    /// The groups the scheduler moved it away from recently: not to go back there.
    left: Vec<Gid>,
    /// Split recently: not to be merged.
    hold_merge: bool,
}

impl Slot<'_> {
    fn load(&self) -> f64 {
        self.stats
            .map_or(0.0, |s| s.reads_per_sec + s.writes_per_sec)
    }

    fn bytes(&self) -> u64 {
        self.stats.map_or(0, |s| s.bytes)
    }
}

/// One round: the decisions for `config` given the ranges' `stats` (those with
/// `sized` set count), at `now_ms`. See the module comment for the rules.
pub fn schedule(
    config: &Config,
    stats: &[RangeStats],
    settings: &SchedulerSettings,
    recent: &[Recent],
    now_ms: u64,
) -> Vec<PlacementDecision> {
    if settings.paused {
        return Vec::new();
    }
    let leaving: BTreeSet<Gid> = config
        .groups
        .iter()
        .filter(|g| g.leaving)
        .map(|g| g.gid)
        .collect();
    let mut busy: BTreeSet<Gid> = config
        .moves
        .iter()
        .flat_map(|p| [p.source, p.dest])
        .collect();
    let mut slots: Vec<Slot> = config
        .ranges
        .iter()
        .filter_map(|r| Some((r.range.as_ref()?, r.gid)))
        .map(|(range, gid)| {
            let live = |m: &&Recent| {
                let hold = match m.event {
                    Event::ManualMove | Event::ManualSplit => settings.manual_hold_ms,
                    Event::Moved | Event::Split => settings.hold_ms,
                };
                now_ms < m.at_ms.saturating_add(hold) && m.range.overlaps(range)
            };
            let held = |events: &[Event]| {
                recent
                    .iter()
                    .filter(live)
                    .any(|m| events.contains(&m.event))
            };
            Slot {
                range,
                gid,
                stats: stats
                    .iter()
                    .find(|s| s.sized && s.range.as_ref() == Some(range)),
                taken: gid == 0
                    || leaving.contains(&gid)
                    || config.moves.iter().any(|p| p.range.as_ref() == Some(range)),
                hold_move: held(&[Event::ManualMove]),
                left: recent
                    .iter()
                    .filter(live)
                    .filter(|m| m.event == Event::Moved)
                    .map(|m| m.from_gid)
                    .collect(),
                hold_merge: held(&[Event::Split, Event::ManualMove, Event::ManualSplit]),
            }
        })
        .collect();
    let mut out = Vec::new();
    splits(&mut slots, settings, &mut out);
    if settings.merge {
        merges(&mut slots, settings, &mut out);
    }
    if settings.balance {
        let groups: Vec<Gid> = config
            .groups
            .iter()
            .map(|g| g.gid)
            .filter(|g| !leaving.contains(g))
            .collect();
        balance(&mut slots, &groups, settings, &mut busy, &mut out);
    }
    out
}

fn splits(slots: &mut [Slot], settings: &SchedulerSettings, out: &mut Vec<PlacementDecision>) {
    let mut made = 0;
    for slot in slots.iter_mut().filter(|s| !s.taken) {
        let Some(s) = slot.stats else { continue };
        let load = slot.load();
        let (at, why) = if s.bytes > settings.split_bytes && cuts(slot.range, &s.size_split_key) {
            let why = format!(
                "size {} over the split size {}",
                mib(s.bytes),
                mib(settings.split_bytes)
            );
            (&s.size_split_key, why)
        } else if load > settings.split_load && cuts(slot.range, &s.load_split_key) {
            let why = format!(
                "load {load:.0} ops/s over the split load {:.0} ops/s",
                settings.split_load
            );
            (&s.load_split_key, why)
        } else {
            continue;
        };
        if made == MAX_SPLITS {
            break;
        }
        made += 1;
        slot.taken = true;
        out.push(PlacementDecision {
            kind: Kind::Split as i32,
            range: Some(slot.range.clone()),
            at: at.clone(),
            why,
            ..Default::default()
        });
    }
}

fn merges(slots: &mut [Slot], settings: &SchedulerSettings, out: &mut Vec<PlacementDecision>) {
    let small = settings.split_bytes / MERGE_SHARE;
    let cold = settings.split_load / MERGE_SHARE as f64;
    let free = |s: &Slot| !s.taken && !s.hold_merge && s.stats.is_some() && s.load() < cold;
    let mut made = 0;
    let mut i = 0;
    while i + 1 < slots.len() && made < MAX_MERGES {
        let (a, b) = (&slots[i], &slots[i + 1]);
        let bytes = a.bytes() + b.bytes();
        if a.gid == b.gid && free(a) && free(b) && bytes < small {
            out.push(PlacementDecision {
                kind: Kind::Merge as i32,
                range: Some(KeyRange {
                    start: a.range.start.clone(),
                    end: b.range.end.clone(),
                }),
                at: b.range.start.clone(),
                why: format!(
                    "together {} under {} and each under {cold:.0} ops/s",
                    mib(bytes),
                    mib(small)
                ),
                ..Default::default()
            });
            slots[i].taken = true;
            slots[i + 1].taken = true;
            made += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
}

/// Per group (of `groups`): total bytes and load of its ranges, and whether all
/// their sizes are known.
fn totals(slots: &[Slot], groups: &[Gid]) -> BTreeMap<Gid, (u64, f64, bool)> {
    let mut t: BTreeMap<Gid, (u64, f64, bool)> =
        groups.iter().map(|&g| (g, (0, 0.0, true))).collect();
    for s in slots {
        if let Some(e) = t.get_mut(&s.gid) {
            e.0 += s.bytes();
            e.1 += s.load();
            e.2 &= s.stats.is_some();
        }
    }
    t
}

type Totals = (u64, f64, bool);

fn balance(
    slots: &mut [Slot],
    groups: &[Gid],
    settings: &SchedulerSettings,
    busy: &mut BTreeSet<Gid>,
    out: &mut Vec<PlacementDecision>,
) {
    if groups.len() < 2 {
        return;
    }
    let mut totals = totals(slots, groups);
    if totals.values().any(|t| !t.2) {
        return;
    }
    let n = groups.len() as f64;
    let mean_bytes = totals.values().map(|t| t.0).sum::<u64>() as f64 / n;
    let mean_load = totals.values().map(|t| t.1).sum::<f64>() / n;
    // A gap under this is not worth a move, whatever the ratio (tiny clusters).
    let min_gap = settings.split_bytes / MERGE_SHARE;
    loop {
        let free: Vec<(Gid, Totals)> = totals
            .iter()
            .filter(|(g, _)| !busy.contains(*g))
            .map(|(g, t)| (*g, *t))
            .collect();
        if free.len() < 2 {
            return;
        }
        let min_load_gap = settings.split_load / MERGE_SHARE as f64;
        let chosen = byte_move(slots, &free, mean_bytes, min_gap)
            .or_else(|| load_move(slots, &free, (mean_load, min_load_gap), min_gap));
        let Some((i, to, why)) = chosen else { return };
        let from = slots[i].gid;
        let (b, l) = (slots[i].bytes(), slots[i].load());
        slots[i].taken = true;
        let f = totals.get_mut(&from).expect("a group");
        f.0 -= b;
        f.1 -= l;
        let t = totals.get_mut(&to).expect("a group");
        t.0 += b;
        t.1 += l;
        busy.insert(from);
        busy.insert(to);
        out.push(PlacementDecision {
            kind: Kind::Move as i32,
            range: Some(slots[i].range.clone()),
            from_gid: from,
            to_gid: to,
            why,
            ..Default::default()
        });
    }
}

/// The range of `gid` movable to `to` with the smallest score (ties: key order).
fn pick(
    slots: &[Slot],
    (gid, to): (Gid, Gid),
    score: impl Fn(&Slot) -> Option<f64>,
) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, s) in slots.iter().enumerate() {
        if s.gid != gid || s.taken || s.hold_move || s.left.contains(&to) {
            continue;
        }
        if let Some(v) = score(s) {
            if best.is_none_or(|(b, _)| v < b) {
                best = Some((v, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// When the heaviest or the lightest of the `free` groups is outside the band: the
/// range of the heaviest that brings the two closest, of those smaller than their
/// gap (so the gap shrinks). Returns the range's slot, where it goes and why.
fn byte_move(
    slots: &[Slot],
    free: &[(Gid, Totals)],
    mean: f64,
    min_gap: u64,
) -> Option<(usize, Gid, String)> {
    let &(from, ft) = free
        .iter()
        .max_by_key(|(g, t)| (t.0, std::cmp::Reverse(*g)))?;
    let &(to, tt) = free.iter().min_by_key(|(g, t)| (t.0, *g))?;
    let outside = |b: u64| (b as f64 - mean).abs() > BALANCE_BAND * mean;
    let gap = ft.0 - tt.0;
    if from == to || !(outside(ft.0) || outside(tt.0)) || gap <= min_gap {
        return None;
    }
    let i = pick(slots, (from, to), |s| {
        let b = s.bytes();
        (b > 0 && b < gap).then(|| gap.abs_diff(2 * b) as f64)
    })?;
    let why = format!(
        "group {from} holds {}, group {to} {}, mean {}",
        mib(ft.0),
        mib(tt.0),
        mib(mean as u64)
    );
    Some((i, to, why))
}

/// With bytes balanced: a move from the busiest to the idlest of the `free` groups
/// when the busiest carries over 1.5 times the mean load and their gap is over
/// `min_load_gap`, of a range with less load than the gap, that does not widen
/// their byte gap past `min_gap`.
fn load_move(
    slots: &[Slot],
    free: &[(Gid, Totals)],
    (mean, min_load_gap): (f64, f64),
    min_gap: u64,
) -> Option<(usize, Gid, String)> {
    let by_load = |a: &&(Gid, Totals), b: &&(Gid, Totals)| a.1 .1.total_cmp(&b.1 .1);
    let &(hot, ht) = free
        .iter()
        .max_by(|a, b| by_load(a, b).then(b.0.cmp(&a.0)))?;
    let &(cold, ct) = free
        .iter()
        .min_by(|a, b| by_load(a, b).then(a.0.cmp(&b.0)))?;
    let gap = ht.1 - ct.1;
    if hot == cold || ht.1 <= 1.5 * mean || gap <= min_load_gap {
        return None;
    }
    let byte_gap = ht.0.abs_diff(ct.0);
    let i = pick(slots, (hot, cold), |s| {
        let (l, b) = (s.load(), s.bytes());
        let after = (ht.0 - b).abs_diff(ct.0 + b);
        (l > 0.0 && l < gap && after <= byte_gap.max(min_gap)).then(|| (gap - 2.0 * l).abs())
    })?;
    let why = format!(
        "group {hot} serves {:.0} ops/s, group {cold} {:.0}, mean {mean:.0}",
        ht.1, ct.1
    );
    Some((i, cold, why))
}

/// Applies a round's `decisions` to `next` (the configuration after the latest),
/// each only if it still fits: the range exists as decided, has no plan, a move's
/// groups still exist, are not leaving and take part in no move. Moves first, so
/// the range indices in their plan ids are those of the latest configuration and
/// unique. Returns the decisions applied.
pub fn apply(next: &mut Config, decisions: &[PlacementDecision]) -> Vec<PlacementDecision> {
    let mut done = Vec::new();
    let index =
        |c: &Config, r: &KeyRange| c.ranges.iter().position(|a| a.range.as_ref() == Some(r));
    let planned = |c: &Config, r: &KeyRange| c.moves.iter().any(|p| p.range.as_ref() == Some(r));
    let moves = decisions.iter().filter(|d| d.kind() == Kind::Move);
    for d in moves {
        let Some(range) = d.range.as_ref() else {
            continue;
        };
        let Some(i) = index(next, range) else {
            continue;
        };
        let busy = next.moves.iter().any(|p| {
            [p.source, p.dest]
                .iter()
                .any(|g| *g == d.from_gid || *g == d.to_gid)
        });
        let dest_ok = next.group(d.to_gid).is_some_and(|g| !g.leaving);
        if next.ranges[i].gid != d.from_gid || d.from_gid == d.to_gid || !dest_ok || busy {
            continue;
        }
        next.moves.push(MovePlan {
            id: (next.num << 16) | i as u64,
            range: Some(range.clone()),
            source: d.from_gid,
            dest: d.to_gid,
            ..Default::default()
        });
        done.push(d.clone());
    }
    for d in decisions.iter().filter(|d| d.kind() != Kind::Move) {
        let Some(range) = d.range.as_ref() else {
            continue;
        };
        if d.kind() == Kind::Split {
            let Some(i) = index(next, range) else {
                continue;
            };
            if planned(next, range) || !cuts(range, &d.at) {
                continue;
            }
            let gid = next.ranges[i].gid;
            next.ranges[i].range = Some(KeyRange {
                start: range.start.clone(),
                end: d.at.clone(),
            });
            next.ranges.insert(
                i + 1,
                RangeAssignment {
                    range: Some(KeyRange {
                        start: d.at.clone(),
                        end: range.end.clone(),
                    }),
                    gid,
                },
            );
        } else {
            let left = KeyRange {
                start: range.start.clone(),
                end: d.at.clone(),
            };
            let right = KeyRange {
                start: d.at.clone(),
                end: range.end.clone(),
            };
            let Some(i) = index(next, &left) else {
                continue;
            };
            let fits = next
                .ranges
                .get(i + 1)
                .is_some_and(|r| r.range.as_ref() == Some(&right) && r.gid == next.ranges[i].gid);
            if !fits || planned(next, &left) || planned(next, &right) {
                continue;
            }
            next.ranges.remove(i + 1);
            next.ranges[i].range = Some(range.clone());
        }
        done.push(d.clone());
    }
    done
}

/// How often the leader runs a round.
const ROUND_EVERY: Duration = Duration::from_secs(1);

/// The scheduler's loop: on the leader, one round per [`ROUND_EVERY`] over the
/// latest configuration and the statistics of the heartbeats, proposed as one
/// `Schedule` command (applied as one configuration, after each decision is
/// checked again).
pub async fn run_scheduler(replica: Replica<MasterState>, liveness: Arc<Liveness>, logger: Logger) {
    let mut ticker = tokio::time::interval(ROUND_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let status = replica.status();
        if status.role != Role::Leader {
            continue;
        }
        liveness.observe(Some(status.term));
        let now = now_ms();
        let decisions = {
            let state = replica.state();
            let config = state.latest();
            let stats = liveness.range_stats(config);
            schedule(config, &stats, state.settings(), &state.recent(), now)
        };
        if decisions.is_empty() {
            continue;
        }
        for d in &decisions {
            info!(logger, "placement decision"; "kind" => d.kind().as_str_name(),
                "range" => d.range.clone().unwrap_or_default().to_string(), "why" => &d.why);
        }
        let round = Command::Schedule(ScheduleCommand {
            decisions,
            at_ms: now,
        });
        if let Err(e) = propose(&replica, round).await {
            info!(logger, "placement round not applied"; "error" => e.message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Group;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    /// Ranges cut at `bounds`, owned by `owners`, groups 1..=`groups`.
    fn config(bounds: &[&str], owners: &[Gid], groups: u64) -> Config {
        Config {
            groups: (1..=groups)
                .map(|gid| Group {
                    gid,
                    ..Default::default()
                })
                .collect(),
            ..Config::cut_at(7, bounds, owners)
        }
    }

    fn stats(c: &Config, sizes: &[(u64, f64)]) -> Vec<RangeStats> {
        c.ranges
            .iter()
            .zip(sizes)
            .map(|(r, &(bytes, load))| RangeStats {
                range: r.range.clone(),
                bytes,
                reads_per_sec: load,
                sized: true,
                ..Default::default()
            })
            .collect()
    }

    fn settings() -> SchedulerSettings {
        SchedulerSettings {
            split_bytes: 4 * MIB,
            split_load: 100.0,
            hold_ms: 1000,
            manual_hold_ms: 5000,
            ..default_settings()
        }
    }

    fn kinds(d: &[PlacementDecision]) -> Vec<(Kind, String)> {
        d.iter()
            .map(|d| (d.kind(), d.range.clone().unwrap_or_default().to_string()))
            .collect()
    }

    #[test]
    fn a_big_range_splits_at_its_middle_and_a_hot_one_where_its_load_divides() {
        let c = config(&["m", "t"], &[1, 1, 1], 1);
        let mut s = stats(&c, &[(5 * MIB, 0.0), (MIB, 500.0), (MIB, 500.0)]);
        s[0].size_split_key = b"g".to_vec();
        s[1].load_split_key = b"p".to_vec();
        s[2].hot_key = b"u".to_vec(); // one hot key: no split key, no split
        let d = schedule(&c, &s, &settings(), &[], 0);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!((d[0].kind(), d[0].at.as_slice()), (Kind::Split, &b"g"[..]));
        assert!(d[0].why.contains("size 5.0 MiB"), "{}", d[0].why);
        assert_eq!((d[1].kind(), d[1].at.as_slice()), (Kind::Split, &b"p"[..]));
        assert!(d[1].why.contains("load 500"), "{}", d[1].why);
        // A split key outside the range is never used.
        s[0].size_split_key = b"z".to_vec();
        let d = schedule(&c, &s, &settings(), &[], 0);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn small_cold_neighbours_of_one_group_merge_unless_just_split() {
        let c = config(&["c", "f", "m"], &[1, 1, 2, 2], 2);
        let s = stats(&c, &[(MIB / 4, 1.0), (MIB / 4, 1.0), (0, 0.0), (0, 0.0)]);
        let no_balance = SchedulerSettings {
            balance: false,
            ..settings()
        };
        let d = schedule(&c, &s, &no_balance, &[], 0);
        assert_eq!(
            kinds(&d),
            [
                (Kind::Merge, "[\"\", \"f\")".to_owned()),
                (Kind::Merge, "[\"f\", +inf)".to_owned())
            ]
        );
        assert_eq!(d[0].at, b"c");
        // Hot, or too big together: no merge.
        let hot = stats(
            &c,
            &[(MIB / 4, 30.0), (MIB / 4, 1.0), (MIB, 0.0), (MIB, 0.0)],
        );
        assert!(schedule(&c, &hot, &no_balance, &[], 0).is_empty());
        // Just split by the scheduler: left alone for hold_ms.
        let recent = [Recent {
            range: KeyRange {
                start: Vec::new(),
                end: b"f".to_vec(),
            },
            at_ms: 100,
            event: Event::Split,
            from_gid: 0,
        }];
        assert_eq!(schedule(&c, &s, &no_balance, &recent, 1000).len(), 1);
        assert_eq!(schedule(&c, &s, &no_balance, &recent, 1100).len(), 2);
        let merge_off = SchedulerSettings {
            merge: false,
            ..no_balance
        };
        assert!(schedule(&c, &s, &merge_off, &[], 0).is_empty());
    }

    #[test]
    fn bytes_balance_within_the_band_one_move_per_group() {
        let c = config(&["c", "f", "m"], &[1, 1, 1, 2], 3);
        let s = stats(
            &c,
            &[(3 * MIB, 0.0), (3 * MIB, 0.0), (3 * MIB, 0.0), (0, 0.0)],
        );
        let d = schedule(&c, &s, &settings(), &[], 0);
        // Group 1 holds 9 MiB, groups 2 and 3 nothing: one range goes to 2 (the
        // lightest, smallest gid); 3 gets none this round (group 1 is busy).
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].kind(), d[0].from_gid, d[0].to_gid),
            (Kind::Move, 1, 2)
        );
        // A group already moving takes no part.
        let mut busy = c.clone();
        busy.moves.push(MovePlan {
            source: 1,
            dest: 2,
            range: c.ranges[0].range.clone(),
            ..Default::default()
        });
        assert!(schedule(&busy, &s, &settings(), &[], 0).is_empty());
        // Within the band: nothing.
        let even = config(&["m"], &[1, 2], 2);
        let s = stats(&even, &[(11 * MIB, 0.0), (9 * MIB, 0.0)]);
        assert!(schedule(&even, &s, &settings(), &[], 0)
            .iter()
            .all(|d| d.kind() != Kind::Move));
        // A size unknown: no balancing.
        let mut partial = stats(&c, &[(3 * MIB, 0.0); 4]);
        partial[3].sized = false;
        assert!(schedule(&c, &partial, &settings(), &[], 0).is_empty());
    }

    #[test]
    fn a_manual_move_is_respected_for_manual_hold_ms() {
        let c = config(&["m"], &[1, 2], 2);
        let s = stats(&c, &[(8 * MIB, 0.0), (0, 0.0)]);
        let mut s = s;
        s[0].size_split_key = Vec::new(); // no split key: only a move could help
        let recent = [Recent {
            range: c.ranges[0].range.clone().unwrap(),
            at_ms: 0,
            event: Event::ManualMove,
            from_gid: 0,
        }];
        assert!(schedule(&c, &s, &settings(), &recent, 4999).is_empty());
        // 8 MiB is not smaller than the gap: a lone range is never moved back and
        // forth. With a second range of group 1 it is.
        let c2 = config(&["g", "m"], &[1, 1, 2], 2);
        let s2 = stats(&c2, &[(4 * MIB, 0.0), (4 * MIB, 0.0), (0, 0.0)]);
        let d = schedule(&c2, &s2, &settings(), &recent, 4999);
        assert_eq!(d.len(), 0, "both pieces overlap the manual move");
        let d = schedule(&c2, &s2, &settings(), &recent, 5000);
        assert_eq!(kinds(&d), [(Kind::Move, "[\"\", \"g\")".to_owned())]);
    }

    #[test]
    fn a_manual_split_keeps_its_pieces_from_merging_but_not_from_moving() {
        // An operator split [g, n) at m (as the playground pre-splits its key
        // space): group 1 holds all the bytes, group 2 none.
        let c = config(&["g", "m", "n"], &[2, 1, 1, 2], 2);
        let s = stats(&c, &[(0, 0.0), (4 * MIB, 0.0), (4 * MIB, 0.0), (0, 0.0)]);
        // The history records the range that was split: both pieces overlap it.
        let recent = [Recent {
            range: KeyRange {
                start: b"g".to_vec(),
                end: b"n".to_vec(),
            },
            at_ms: 0,
            event: Event::ManualSplit,
            from_gid: 0,
        }];
        let d = schedule(&c, &s, &settings(), &recent, 10);
        assert_eq!(kinds(&d).len(), 1, "{d:?}");
        assert_eq!(kinds(&d)[0].0, Kind::Move, "{d:?}");
        // Small and cold, the two pieces would merge, but not within the hold.
        let cold = stats(&c, &[(0, 0.0), (MIB / 4, 0.0), (MIB / 4, 0.0), (0, 0.0)]);
        let balanced = config(&["g", "m", "n"], &[2, 1, 1, 2], 2);
        let merges = |now| {
            schedule(&balanced, &cold, &settings(), &recent, now)
                .iter()
                .filter(|d| d.kind() == Kind::Merge)
                .count()
        };
        assert_eq!(merges(10), 0);
        assert!(merges(5000) > 0);
    }

    #[test]
    fn a_moved_range_does_not_go_back_within_hold_ms_but_may_move_on() {
        // [g, m) came from group 1 to group 2; group 2 is now the heaviest.
        let c = config(&["g", "m"], &[1, 2, 2], 3);
        let s = stats(&c, &[(2 * MIB, 0.0), (3 * MIB, 0.0), (3 * MIB, 0.0)]);
        let moved = |range: KeyRange| Recent {
            range,
            at_ms: 0,
            event: Event::Moved,
            from_gid: 1,
        };
        let recent = [moved(c.ranges[1].range.clone().unwrap())];
        let d = schedule(&c, &s, &settings(), &recent, 10);
        assert_eq!(kinds(&d), [(Kind::Move, "[\"g\", \"m\")".to_owned())]);
        assert_eq!(d[0].to_gid, 3, "on to the lightest, group 3");
        // Back toward the group it left: not within hold_ms.
        let two = config(&["g", "m"], &[1, 2, 2], 2);
        let s = stats(&two, &[(0, 0.0), (3 * MIB, 0.0), (3 * MIB, 0.0)]);
        let both = [
            moved(two.ranges[1].range.clone().unwrap()),
            moved(two.ranges[2].range.clone().unwrap()),
        ];
        assert!(schedule(&two, &s, &settings(), &both, 10).is_empty());
        assert_eq!(schedule(&two, &s, &settings(), &both, 1000).len(), 1);
    }

    #[test]
    fn load_follows_when_bytes_are_even_and_pause_stops_everything() {
        let c = config(&["g", "m"], &[1, 1, 2], 2);
        // Bytes within reach of even (their gap is not over split_bytes / 4).
        let s = stats(&c, &[(MIB, 90.0), (MIB, 90.0), (MIB, 0.0)]);
        let d = schedule(&c, &s, &settings(), &[], 0);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].kind(), d[0].from_gid, d[0].to_gid),
            (Kind::Move, 1, 2)
        );
        assert!(d[0].why.contains("ops/s"), "{}", d[0].why);
        let paused = SchedulerSettings {
            paused: true,
            ..settings()
        };
        assert!(schedule(&c, &s, &paused, &[], 0).is_empty());
    }

    fn arb_case() -> impl Strategy<Value = (Config, Vec<RangeStats>, Vec<Recent>)> {
        (1usize..12, 1u64..5).prop_flat_map(|(n, groups)| {
            (
                proptest::collection::btree_set(1u8..250, n - 1),
                proptest::collection::vec(0..=groups, n),
                proptest::collection::vec(
                    (
                        0u64..12 * MIB,
                        0.0f64..300.0,
                        any::<bool>(),
                        any::<u8>(),
                        any::<bool>(),
                    ),
                    n,
                ),
                proptest::collection::vec((0usize..n, any::<bool>()), 0..3),
                0usize..3,
            )
                .prop_map(move |(bounds, owners, sizes, recent, plans)| {
                    let bounds: Vec<String> = bounds.iter().map(|b| format!("{b:03}")).collect();
                    let refs: Vec<&str> = bounds.iter().map(String::as_str).collect();
                    let mut c = config(&refs, &owners, groups);
                    let stats = c
                        .ranges
                        .iter()
                        .zip(&sizes)
                        .map(|(r, &(bytes, load, sized, key, hot))| {
                            let k = format!("{key:03}").into_bytes();
                            RangeStats {
                                range: r.range.clone(),
                                bytes,
                                writes_per_sec: load,
                                sized,
                                size_split_key: k.clone(),
                                load_split_key: if hot { Vec::new() } else { k.clone() },
                                hot_key: if hot { k } else { Vec::new() },
                                ..Default::default()
                            }
                        })
                        .collect();
                    let recent = recent
                        .into_iter()
                        .map(|(i, manual)| Recent {
                            range: c.ranges[i].range.clone().unwrap(),
                            at_ms: 50,
                            event: if manual {
                                Event::ManualMove
                            } else {
                                Event::Moved
                            },
                            from_gid: 1,
                        })
                        .collect();
                    for p in 0..plans.min(n) {
                        let r = &c.ranges[p];
                        if r.gid != 0 && r.gid < groups {
                            let plan = MovePlan {
                                id: 1000 + p as u64,
                                range: r.range.clone(),
                                source: r.gid,
                                dest: r.gid + 1,
                                ..Default::default()
                            };
                            c.moves.push(plan);
                        }
                    }
                    (c, stats, recent)
                })
        })
    }

    proptest! {
        #[test]
        fn rounds_lose_no_range_own_none_twice_and_stay_bounded((c, s, recent) in arb_case(), now in 0u64..10_000) {
            let d = schedule(&c, &s, &settings(), &recent, now);
            prop_assert_eq!(&d, &schedule(&c, &s, &settings(), &recent, now), "deterministic");
            let mut next = c.clone();
            next.num += 1;
            let done = apply(&mut next, &d);
            prop_assert!(done.len() == d.len() && d.iter().all(|x| done.contains(x)), "every decision fits the configuration");
            // Still one ordered cover of the key space.
            let after: Vec<KeyRange> = next.ranges.iter().map(|r| r.range.clone().unwrap()).collect();
            prop_assert!(after[0].start.is_empty() && after.last().unwrap().end.is_empty());
            for w in after.windows(2) {
                prop_assert!(w[0].end == w[1].start && w[0].start < w[1].start, "gap or overlap in {:?}", after);
            }
            let ids: BTreeSet<u64> = next.moves.iter().map(|p| p.id).collect();
            prop_assert_eq!(ids.len(), next.moves.len(), "plan ids are unique");
            // Each range in at most one decision; bounded counts; one move per group,
            // none for a group already moving.
            let mut named = BTreeSet::new();
            let mut movers = BTreeSet::new();
            let busy: BTreeSet<Gid> = c.moves.iter().flat_map(|p| [p.source, p.dest]).collect();
            for x in &d {
                let r = x.range.clone().unwrap();
                prop_assert!(c.moves.iter().all(|p| p.range.as_ref() != Some(&r)));
                if x.kind() == Kind::Move {
                    prop_assert!(named.insert(r.start.clone()));
                    prop_assert!(x.from_gid != x.to_gid && x.to_gid != 0);
                    prop_assert!(movers.insert(x.from_gid) && movers.insert(x.to_gid));
                    prop_assert!(!busy.contains(&x.from_gid) && !busy.contains(&x.to_gid));
                } else if x.kind() == Kind::Merge {
                    prop_assert!(named.insert(r.start.clone()) && named.insert(x.at.clone()));
                } else {
                    prop_assert!(named.insert(r.start.clone()));
                }
            }
            let count = |k: Kind| d.iter().filter(|x| x.kind() == k).count();
            prop_assert!(count(Kind::Split) <= MAX_SPLITS && count(Kind::Merge) <= MAX_MERGES);
            prop_assert!(count(Kind::Move) <= c.groups.len() / 2);
        }
    }
}
