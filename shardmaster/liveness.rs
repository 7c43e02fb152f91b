//! Which kvnodes are alive, from their heartbeats. Kept in the leader's memory only:
//! replicating a heartbeat every second per node through the Raft log would flood
//! it, and liveness is only meaningful "as seen by the current leader" anyway.
//!
//! A replica that has just become leader has heard from nobody: for one
//! `down_after` period it reports unheard nodes as UNKNOWN rather than DOWN, after
//! which silence means DOWN.

use crate::proto::{Config, HeartbeatRequest, Liveness as State, NodeHealth, RangeStats};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Liveness {
    down_after: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The term in which this replica leads, and since when; None when not leading.
    leading: Option<(u64, Instant)>,
    beats: HashMap<(u64, u64), (Instant, HeartbeatRequest)>,
}

impl Liveness {
    pub fn new(down_after: Duration) -> Liveness {
        Liveness {
            down_after,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Tells the table whether this replica leads, in which term. A new term of
    /// leadership starts from an empty table: what an old leader heard is not ours.
    pub fn observe(&self, leader_term: Option<u64>) {
        let mut inner = self.inner.lock().expect("poisoned");
        match (leader_term, inner.leading) {
            (Some(term), Some((t, _))) if t == term => {}
            (Some(term), _) => {
                inner.leading = Some((term, Instant::now()));
                inner.beats.clear();
            }
            (None, _) => {
                inner.leading = None;
                inner.beats.clear();
            }
        }
    }

    pub fn record(&self, beat: HeartbeatRequest) {
        let mut inner = self.inner.lock().expect("poisoned");
        inner
            .beats
            .insert((beat.gid, beat.node_id), (Instant::now(), beat));
    }

    /// How many nodes of `config`'s groups are unknown, up and down (for metrics).
    pub fn counts(&self, config: &Config) -> [usize; 3] {
        let inner = self.inner.lock().expect("poisoned");
        let now = Instant::now();
        let mut counts = [0; 3];
        for group in &config.groups {
            for node in &group.nodes {
                let heard = inner.beats.get(&(group.gid, node.id));
                counts[self.state(&inner, heard, now) as usize] += 1;
            }
        }
        counts
    }

    fn state(
        &self,
        inner: &Inner,
        heard: Option<&(Instant, HeartbeatRequest)>,
        now: Instant,
    ) -> State {
        match (heard, inner.leading) {
            (_, None) => State::Unknown,
            (Some((at, _)), _) if now - *at <= self.down_after => State::Up,
            (Some(_), _) => State::Down,
            (None, Some((_, since))) if now - since <= self.down_after => State::Unknown,
            (None, Some(_)) => State::Down,
        }
    }

    /// The statistics of `config`'s ranges, each as its owner's leader (the beat of
    /// the highest term within `down_after`) last reported it; a range that owner
    /// did not report (not sized yet, or just split) is missing.
    pub fn range_stats(&self, config: &Config) -> Vec<RangeStats> {
        let inner = self.inner.lock().expect("poisoned");
        let now = Instant::now();
        let mut leaders: HashMap<u64, &HeartbeatRequest> = HashMap::new();
        for (at, beat) in inner.beats.values() {
            if beat.role != "leader" || now - *at > self.down_after {
                continue;
            }
            let newer = leaders.get(&beat.gid).is_none_or(|b| b.term < beat.term);
            if newer {
                leaders.insert(beat.gid, beat);
            }
        }
        config
            .ranges
            .iter()
            .filter_map(|r| {
                let beat = leaders.get(&r.gid)?;
                beat.ranges
                    .iter()
                    .find(|s| s.sized && s.range == r.range)
                    .cloned()
            })
            .collect()
    }

    /// The health of every node of `config`'s groups.
    pub fn report(&self, config: &Config) -> Vec<NodeHealth> {
        let inner = self.inner.lock().expect("poisoned");
        let now = Instant::now();
        let mut out = Vec::new();
        for group in &config.groups {
            for node in &group.nodes {
                let heard = inner.beats.get(&(group.gid, node.id));
                let liveness = self.state(&inner, heard, now);
                out.push(NodeHealth {
                    gid: group.gid,
                    node_id: node.id,
                    addr: node.addr.clone(),
                    liveness: liveness as i32,
                    last_seen_ms: heard.map_or(0, |(at, _)| (now - *at).as_millis() as u64),
                    last: heard.map(|(_, beat)| beat.clone()),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Group, Node};

    fn config() -> Config {
        Config {
            num: 1,
            ranges: Vec::new(),
            groups: vec![Group {
                gid: 1,
                leaving: false,
                nodes: vec![
                    Node {
                        id: 1,
                        addr: "a".into(),
                    },
                    Node {
                        id: 2,
                        addr: "b".into(),
                    },
                ],
            }],
            moves: Vec::new(),
        }
    }

    fn states(l: &Liveness) -> Vec<State> {
        l.report(&config()).iter().map(|h| h.liveness()).collect()
    }

    #[test]
    fn silence_means_unknown_to_a_new_leader_then_down() {
        let l = Liveness::new(Duration::from_millis(50));
        assert_eq!(states(&l), [State::Unknown, State::Unknown], "not leading");
        l.observe(Some(3));
        l.record(HeartbeatRequest {
            gid: 1,
            node_id: 1,
            ..Default::default()
        });
        assert_eq!(states(&l), [State::Up, State::Unknown]);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(states(&l), [State::Down, State::Down]);
        // A new term of leadership forgets what was heard before.
        l.observe(Some(4));
        assert_eq!(states(&l), [State::Unknown, State::Unknown]);
    }
}
