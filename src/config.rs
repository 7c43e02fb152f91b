//! Key ranges and configurations: the routing table every component shares.

use crate::proto::{Config, Group, KeyRange, RangeAssignment};

/// Largest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Most requests in one Batch call.
pub const MAX_BATCH_OPS: usize = 1024;

impl KeyRange {
    /// The whole key space.
    pub fn full() -> KeyRange {
        KeyRange {
            start: Vec::new(),
            end: Vec::new(),
        }
    }

    /// True if the two ranges share a key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        (self.end.is_empty() || other.start < self.end)
            && (other.end.is_empty() || self.start < other.end)
    }

    /// True if `key` is in `[start, end)`; an empty end is +infinity.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = if self.end.is_empty() {
            "+inf".to_owned()
        } else {
            format!("{:?}", String::from_utf8_lossy(&self.end))
        };
        write!(f, "[{:?}, {end})", String::from_utf8_lossy(&self.start))
    }
}

impl Config {
    /// Configuration 0: no groups, one range owned by nobody.
    pub fn initial() -> Config {
        Config {
            num: 0,
            ranges: vec![RangeAssignment {
                range: Some(KeyRange::full()),
                gid: 0,
            }],
            groups: Vec::new(),
            moves: Vec::new(),
        }
    }

    /// Position in `ranges` of the range that contains `key`.
    pub fn range_index(&self, key: &[u8]) -> usize {
        // Ranges are ordered and cover everything: the owner is the last range whose
        // start is <= key.
        self.ranges
            .partition_point(|r| r.range.as_ref().is_none_or(|r| r.start.as_slice() <= key))
            .saturating_sub(1)
    }

    /// The range containing `key` and its owner.
    pub fn owner(&self, key: &[u8]) -> (&KeyRange, u64) {
        let r = &self.ranges[self.range_index(key)];
        (r.range.as_ref().expect("range set"), r.gid)
    }

    pub fn group(&self, gid: u64) -> Option<&Group> {
        self.groups.iter().find(|g| g.gid == gid)
    }

    /// Test fixture: configuration `num` with the key space cut at `bounds`, range
    /// `i` owned by `owners[i]`, no groups and no moves.
    #[cfg(test)]
    pub fn cut_at(num: u64, bounds: &[&str], owners: &[u64]) -> Config {
        let mut starts: Vec<Vec<u8>> = vec![Vec::new()];
        starts.extend(bounds.iter().map(|b| b.as_bytes().to_vec()));
        let ranges = starts
            .iter()
            .enumerate()
            .map(|(i, s)| RangeAssignment {
                range: Some(KeyRange {
                    start: s.clone(),
                    end: starts.get(i + 1).cloned().unwrap_or_default(),
                }),
                gid: owners[i],
            })
            .collect();
        Config {
            num,
            ranges,
            groups: Vec::new(),
            moves: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_config(bounds: &[&str], owners: &[u64]) -> Config {
        Config::cut_at(1, bounds, owners)
    }

    #[test]
    fn owner_follows_range_bounds() {
        let c = split_config(&["g", "n"], &[1, 2, 3]);
        assert_eq!(c.owner(b"apple").1, 1);
        assert_eq!(c.owner(b"g").1, 2, "a bound belongs to the range it starts");
        assert_eq!(c.owner(b"fzzz").1, 1);
        assert_eq!(c.owner(b"m\xff").1, 2);
        assert_eq!(c.owner(b"zebra").1, 3);
        assert_eq!(c.owner(b"\x00").1, 1);
    }

    #[test]
    fn ranges_contain_their_keys_only() {
        let r = KeyRange {
            start: b"g".to_vec(),
            end: b"n".to_vec(),
        };
        assert!(r.contains(b"g") && r.contains(b"mzz"));
        assert!(!r.contains(b"n") && !r.contains(b"f"));
        assert!(KeyRange::full().contains(b"\xff\xff"));
    }
}
