//! Deterministic, minimal-move rebalancing of key ranges across replica groups.
//!
//! Every shard-master replica runs [`rebalance`] on the same input and must
//! reach the same configuration, so nothing here depends on hashing or
//! randomness: all maps are ordered and every tie is broken by gid.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// Replica group id. Gid 0 means "nobody".
pub type Gid = u64;

/// Reassigns owners so that every range has a live group and the per-group
/// range counts differ by at most one, moving as few ranges as possible.
///
/// `owners[i]` is the owner of the i-th range in key order. `groups` is the set
/// of live groups after the change (never contains 0; a 0 in it is ignored).
/// If `groups` is empty, every range becomes owned by 0. Returns the number of
/// ranges whose owner changed.
///
/// Guarantees, with `n = owners.len()` and `g = groups.len() > 0`:
/// - Every range ends up owned by a member of `groups`.
/// - Every group owns `n / g` or `n / g + 1` ranges (possibly 0 when `n < g`).
/// - The number of changed owners is the minimum over all such balanced
///   assignments: every orphan (owner 0 or not in `groups`) moves, and a range
///   of a live group moves only if that group holds more than its target. The
///   larger targets go to the groups that currently own the most ranges (ties:
///   smaller gid), so no group already at the ceiling is cut needlessly.
/// - An over-full group gives up its last ranges in key order, and receivers,
///   taken in order of largest deficit (ties: smaller gid), each get a run of
///   consecutive freed ranges, which keeps ownership contiguous where it can.
/// - The result depends only on the input (deterministic), and the cost is
///   O(n log g + g log g).
pub fn rebalance(owners: &mut [Gid], groups: &BTreeSet<Gid>) -> usize {
    // Current count per live group; gid 0 is never live.
    let mut count: BTreeMap<Gid, usize> = groups
        .iter()
        .filter(|&&gid| gid != 0)
        .map(|&gid| (gid, 0))
        .collect();

    if count.is_empty() {
        let mut moved = 0;
        for owner in owners.iter_mut().filter(|o| **o != 0) {
            *owner = 0;
            moved += 1;
        }
        return moved;
    }

    for owner in owners.iter() {
        if let Some(c) = count.get_mut(owner) {
            *c += 1;
        }
    }

    let target = targets(owners.len(), &count);

    // How many ranges each live group must give up (0 if at or below target).
    let mut excess: BTreeMap<Gid, usize> = count
        .iter()
        .map(|(&gid, &c)| (gid, c.saturating_sub(target[&gid])))
        .collect();

    // Collect the ranges to reassign. Walking backwards takes each over-full
    // group's ranges from the end of its key order, so what it keeps stays put.
    let mut pool: Vec<usize> = Vec::new();
    for i in (0..owners.len()).rev() {
        let take = match excess.get_mut(&owners[i]) {
            None => true, // orphan: owned by 0 or by a group that left
            Some(0) => false,
            Some(e) => {
                *e -= 1;
                true
            }
        };
        if take {
            pool.push(i);
        }
    }
    pool.reverse();

    // Receivers: largest deficit first, then smaller gid. The deficits sum to
    // exactly pool.len() (targets sum to n), so every freed range is placed.
    let mut receivers: Vec<(usize, Gid)> = count
        .iter()
        .filter_map(|(&gid, &c)| {
            target[&gid]
                .checked_sub(c)
                .filter(|&d| d > 0)
                .map(|d| (d, gid))
        })
        .collect();
    receivers.sort_unstable_by_key(|&(deficit, gid)| (Reverse(deficit), gid));

    let mut freed = pool.into_iter();
    let mut moved = 0;
    for (deficit, gid) in receivers {
        // Consecutive freed ranges go to the same receiver to keep runs intact.
        for i in freed.by_ref().take(deficit) {
            owners[i] = gid;
            moved += 1;
        }
    }
    debug_assert!(freed.next().is_none(), "every freed range has a receiver");
    moved
}

/// Per-group target counts for `n` ranges: `n % g` groups get the ceiling,
/// chosen among those owning the most ranges now (ties: smaller gid), since
/// giving a ceiling to a smaller group could only force extra moves.
fn targets(n: usize, count: &BTreeMap<Gid, usize>) -> BTreeMap<Gid, usize> {
    let g = count.len();
    let (base, extra) = (n / g, n % g);
    let mut order: Vec<(usize, Gid)> = count.iter().map(|(&gid, &c)| (c, gid)).collect();
    order.sort_unstable_by_key(|&(c, gid)| (Reverse(c), gid));
    order
        .into_iter()
        .enumerate()
        .map(|(rank, (_, gid))| (gid, if rank < extra { base + 1 } else { base }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn set(gids: &[Gid]) -> BTreeSet<Gid> {
        gids.iter().copied().collect()
    }

    /// Range counts per live group after a call.
    fn counts(owners: &[Gid], groups: &BTreeSet<Gid>) -> Vec<usize> {
        let mut held: BTreeMap<Gid, usize> = groups.iter().map(|&g| (g, 0)).collect();
        for o in owners {
            if let Some(c) = held.get_mut(o) {
                *c += 1;
            }
        }
        held.into_values().collect()
    }

    /// The minimum number of moves, computed from counts alone and without
    /// the module's code: orphans plus what each group holds above its target,
    /// with the ceiling targets handed to the largest holders.
    fn lower_bound(before: &[Gid], groups: &BTreeSet<Gid>) -> usize {
        if groups.is_empty() {
            return before.iter().filter(|&&o| o != 0).count();
        }
        let mut held = counts(before, groups);
        let orphans = before.len() - held.iter().sum::<usize>();
        held.sort_unstable_by(|a, b| b.cmp(a));
        let (base, extra) = (before.len() / held.len(), before.len() % held.len());
        let surplus: usize = held
            .iter()
            .enumerate()
            .map(|(i, &c)| c.saturating_sub(if i < extra { base + 1 } else { base }))
            .sum();
        orphans + surplus
    }

    /// Checks every guarantee of one call and returns the new owners.
    fn check(before: &[Gid], groups: &BTreeSet<Gid>, ctx: &str) -> Vec<Gid> {
        let mut after = before.to_vec();
        let moved = rebalance(&mut after, groups);

        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(moved, changed, "{ctx}: return value vs changed owners");

        if groups.is_empty() {
            assert!(after.iter().all(|&o| o == 0), "{ctx}: not all 0: {after:?}");
        } else {
            assert!(
                after.iter().all(|o| groups.contains(o)),
                "{ctx}: dead owner in {after:?} for {groups:?}"
            );
            let c = counts(&after, groups);
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "{ctx}: unbalanced {c:?} in {after:?}");
        }
        assert_eq!(
            moved,
            lower_bound(before, groups),
            "{ctx}: not minimal, {before:?} -> {after:?} for {groups:?}"
        );

        let mut again = before.to_vec();
        assert_eq!(rebalance(&mut again, groups), moved, "{ctx}: moves differ");
        assert_eq!(again, after, "{ctx}: nondeterministic");
        after
    }

    #[test]
    fn empty_groups_orphan_every_range() {
        let mut owners = vec![1, 2, 0, 2];
        assert_eq!(rebalance(&mut owners, &set(&[])), 3);
        assert_eq!(owners, vec![0, 0, 0, 0]);
    }

    #[test]
    fn first_join_takes_all_ranges() {
        let mut owners = vec![0; 5];
        assert_eq!(rebalance(&mut owners, &set(&[7])), 5);
        assert_eq!(owners, vec![7; 5]);
    }

    #[test]
    fn second_join_of_four_ranges_moves_two_from_the_end() {
        let mut owners = vec![1; 4];
        assert_eq!(rebalance(&mut owners, &set(&[1, 2])), 2);
        assert_eq!(owners, vec![1, 1, 2, 2]);
    }

    #[test]
    fn leave_of_one_of_three_moves_exactly_its_ranges() {
        let before = vec![1, 1, 2, 2, 3, 3];
        let mut owners = before.clone();
        assert_eq!(rebalance(&mut owners, &set(&[1, 3])), 2);
        assert_eq!(&owners[..2], &[1, 1]);
        assert_eq!(&owners[4..], &[3, 3]);
        assert!(owners[2..4].iter().all(|&o| o == 1 || o == 3));
        assert_eq!(counts(&owners, &set(&[1, 3])), vec![3, 3]);
    }

    #[test]
    fn fewer_ranges_than_groups() {
        let groups = set(&[1, 2, 3, 4, 5]);
        let mut owners = vec![0, 0, 0];
        assert_eq!(rebalance(&mut owners, &groups), 3);
        // Deficits tie at 1, so the smaller gids receive.
        assert_eq!(owners, vec![1, 2, 3]);
        assert_eq!(counts(&owners, &groups), vec![1, 1, 1, 0, 0]);
        // Adding more groups moves nothing: everyone is within [0, 1].
        assert_eq!(rebalance(&mut owners, &set(&[1, 2, 3, 4, 5, 6])), 0);
    }

    #[test]
    fn balanced_input_moves_nothing() {
        let mut owners = vec![3, 1, 2, 3, 1, 2, 3];
        let before = owners.clone();
        assert_eq!(rebalance(&mut owners, &set(&[1, 2, 3])), 0);
        assert_eq!(owners, before);
    }

    #[test]
    fn larger_holder_keeps_the_ceiling_target() {
        // Gid 2 holds 4 of 7 (the ceiling): handing the ceiling to gid 1
        // instead would move a range needlessly.
        let mut owners = vec![2, 2, 2, 2, 1, 1, 1];
        assert_eq!(rebalance(&mut owners, &set(&[1, 2])), 0);
        // With orphans, the ceiling still goes to the largest holder.
        let mut owners = vec![2, 2, 2, 1, 1, 0, 9];
        assert_eq!(rebalance(&mut owners, &set(&[1, 2])), 2);
        assert_eq!(counts(&owners, &set(&[1, 2])), vec![3, 4]);
    }

    #[test]
    fn zero_in_groups_is_not_a_live_group() {
        let mut owners = vec![0, 0, 5];
        assert_eq!(rebalance(&mut owners, &set(&[0])), 1);
        assert_eq!(owners, vec![0, 0, 0]);
        assert_eq!(rebalance(&mut owners, &set(&[0, 4])), 3);
        assert_eq!(owners, vec![4, 4, 4]);
    }

    #[test]
    fn no_ranges_is_a_no_op() {
        let mut owners: Vec<Gid> = Vec::new();
        assert_eq!(rebalance(&mut owners, &set(&[1, 2])), 0);
        assert_eq!(rebalance(&mut owners, &set(&[])), 0);
    }

    /// Compares the closed-form bound used by the property test with a true
    /// brute-force minimum over every balanced final assignment, for tiny inputs.
    #[test]
    fn lower_bound_matches_brute_force_on_tiny_inputs() {
        let all_groups: [Gid; 3] = [1, 2, 3];
        for n in 1..=5usize {
            for code in 0..4usize.pow(n as u32) {
                // Owners drawn from {0, 1, 2, 3}: 0 and absent gids are orphans.
                let before: Vec<Gid> = (0..n)
                    .map(|i| ((code / 4usize.pow(i as u32)) % 4) as Gid)
                    .collect();
                for mask in 1..8usize {
                    let groups: BTreeSet<Gid> = (0..3)
                        .filter(|b| mask & (1 << b) != 0)
                        .map(|b| all_groups[b])
                        .collect();
                    let live: Vec<Gid> = groups.iter().copied().collect();
                    let g = live.len();
                    let mut best = usize::MAX;
                    for fin in 0..g.pow(n as u32) {
                        let after: Vec<Gid> =
                            (0..n).map(|i| live[(fin / g.pow(i as u32)) % g]).collect();
                        let c = counts(&after, &groups);
                        if c.iter().max().unwrap() - c.iter().min().unwrap() <= 1 {
                            let moves = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                            best = best.min(moves);
                        }
                    }
                    let ctx = format!("{before:?} {groups:?}");
                    assert_eq!(lower_bound(&before, &groups), best, "{ctx}");
                    check(&before, &groups, &ctx);
                }
            }
        }
    }

    #[test]
    fn random_join_leave_sequences() {
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = rng.random_range(1..=64usize);
            let mut owners: Vec<Gid> = vec![0; n];
            let mut groups: BTreeSet<Gid> = BTreeSet::new();
            for step in 0..20 {
                match rng.random_range(0..10) {
                    // Join: a fresh or returning gid.
                    0..=4 => {
                        groups.insert(rng.random_range(1..=16));
                    }
                    // Leave: one live group, if any.
                    5..=7 => {
                        if !groups.is_empty() {
                            let k = rng.random_range(0..groups.len());
                            let gid = *groups.iter().nth(k).unwrap();
                            groups.remove(&gid);
                        }
                    }
                    // Arbitrary, possibly unbalanced state (e.g. a restored
                    // config) so uneven counts and stray gids get exercised.
                    _ => {
                        for o in owners.iter_mut() {
                            *o = rng.random_range(0..=20);
                        }
                    }
                }
                let ctx = format!("seed {seed} step {step}");
                owners = check(&owners, &groups, &ctx);
            }
        }
    }

    #[test]
    fn large_input_stays_balanced_and_minimal() {
        let n = 100_000;
        let mut owners: Vec<Gid> = vec![0; n];
        let mut groups: BTreeSet<Gid> = (1..=1000).collect();
        owners = check(&owners, &groups, "initial join");
        groups.insert(5000);
        owners = check(&owners, &groups, "join");
        groups.retain(|&g| g % 3 != 0);
        check(&owners, &groups, "mass leave");
    }
}
