//! Printing: aligned text tables for people, JSON for programs.

use clap::ValueEnum;
use serde::Serialize;
use shardkv::proto::{Config, KeyRange, MovePhase, MovePlan, RangeState, RangeStats};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Table,
    /// One JSON document on stdout (keys and values as strings when they are UTF-8,
    /// else base64 in `key_base64`, `value_base64`).
    Json,
}

/// Bytes as text (invalid UTF-8 is shown as U+FFFD).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes as one line of text a person can read back unambiguously: UTF-8 as is,
/// except backslash, tab, newline, carriage return and other control characters,
/// which are escaped (`\\`, `\t`, `\n`, `\r`, `\x1b`), as is every byte that is
/// not UTF-8 (`\xff`).
pub fn escaped(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() && (c as u32) < 0x100 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Adds `bytes` to a JSON object as `name` (a string) when it is UTF-8, otherwise
/// as `name_base64`, so every byte survives the trip through JSON.
pub fn insert_bytes(
    doc: &mut serde_json::Map<String, serde_json::Value>,
    name: &str,
    bytes: &[u8],
) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(s) => doc.insert(name.to_owned(), s.into()),
        Err(_) => doc.insert(
            format!("{name}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into(),
        ),
    };
}

/// A status's message with its causes, e.g. "tcp connect error: Connection refused".
pub fn status_text(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) && text != "transport error" {
            message = format!("{message}: {text}");
        }
        source = e.source();
    }
    message
}

/// How to show a replica whose status call failed: DOWN when it could not be
/// reached, NO ANSWER when it was reached but did not answer in time.
pub fn unreachable_label(error: &str) -> &'static str {
    if error.starts_with(NO_ANSWER) {
        "NO ANSWER"
    } else {
        "DOWN"
    }
}

const NO_ANSWER: &str = "no answer in time";

/// [`status_text`] for a status call, saying "no answer in time" for a timeout.
pub fn call_error_text(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
            format!("{NO_ANSWER}: {}", status_text(status))
        }
        _ => status_text(status),
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A text table whose columns are as wide as their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) -> anyhow::Result<()> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 < row.len() {
                    let pad = widths[c] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                } else {
                    line.push_str(cell);
                }
            }
            outln!("{}", line.trim_end());
        }
        Ok(())
    }
}

/// `a ∩ b`, or `None` when they do not overlap (an empty end is +infinity).
fn intersection(a: &KeyRange, b: &KeyRange) -> Option<KeyRange> {
    let start = a.start.clone().max(b.start.clone());
    let end = match (a.end.is_empty(), b.end.is_empty()) {
        (true, _) => b.end.clone(),
        (_, true) => a.end.clone(),
        _ => a.end.clone().min(b.end.clone()),
    };
    (end.is_empty() || start < end).then_some(KeyRange { start, end })
}

/// `held` cut at the boundaries of `config`'s ranges. A node merges adjacent ranges
/// it holds in the same state; cut this way, what it holds reads as the ranges
/// `query` shows.
pub fn split_at_config(held: &KeyRange, config: &Config) -> Vec<KeyRange> {
    config
        .ranges
        .iter()
        .filter_map(|r| r.range.as_ref())
        .filter_map(|r| intersection(held, r))
        .collect()
}

/// How many of `ranges` overlap any of `held`.
pub fn ranges_still_held(ranges: &[KeyRange], held: &[KeyRange]) -> usize {
    ranges
        .iter()
        .filter(|r| held.iter().any(|h| intersection(r, h).is_some()))
        .count()
}

/// A key range as `["start", "end")`, `+inf` for an open end.
pub fn range_text(range: Option<&KeyRange>) -> String {
    range.map(|r| r.to_string()).unwrap_or_else(|| "?".into())
}

pub fn state_text(state: RangeState) -> &'static str {
    match state {
        RangeState::Serving => "SERVING",
        RangeState::Pulling => "PULLING",
        RangeState::Frozen => "FROZEN",
        RangeState::Garbage => "GARBAGE",
    }
}

pub fn phase_text(phase: MovePhase) -> &'static str {
    match phase {
        MovePhase::MoveCopying => "copying",
        MovePhase::MoveCatchingUp => "catching up",
        MovePhase::MoveCuttingOver => "cutting over",
    }
}

/// One line on a live move: where it goes, its phase, bytes copied and lag.
pub fn move_progress_text(p: &MovePlan) -> String {
    format!(
        "{} group {} -> {}: {}, {:.1} MiB copied, {} KiB behind",
        p.range.clone().unwrap_or_default(),
        p.source,
        p.dest,
        if p.queued {
            "queued"
        } else {
            phase_text(p.phase())
        },
        p.bytes_copied as f64 / (1 << 20) as f64,
        p.lag_bytes / 1024
    )
}

#[derive(Serialize)]
pub struct RangeJson {
    pub start: String,
    /// `null` for +infinity.
    pub end: Option<String>,
}

impl RangeJson {
    pub fn from(range: Option<&KeyRange>) -> RangeJson {
        let range = range.cloned().unwrap_or_else(KeyRange::full);
        RangeJson {
            start: text(&range.start),
            end: (!range.end.is_empty()).then(|| text(&range.end)),
        }
    }
}

#[derive(Serialize)]
pub struct NodeJson {
    pub id: u64,
    pub addr: String,
}

#[derive(Serialize)]
pub struct AssignmentJson {
    #[serde(flatten)]
    pub range: RangeJson,
    pub gid: u64,
    /// As the owner's leader last reported it (absent when not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsJson>,
}

/// Size and load of one range.
#[derive(Serialize)]
pub struct StatsJson {
    pub keys: u64,
    pub bytes: u64,
    pub reads_per_sec: f64,
    pub writes_per_sec: f64,
    /// A single key with most of the range's load: it cannot be split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_key: Option<String>,
}

impl StatsJson {
    /// The statistics of `range` among `stats`.
    pub fn find(stats: &[RangeStats], range: Option<&KeyRange>) -> Option<StatsJson> {
        let s = stats.iter().find(|s| s.range.as_ref() == range)?;
        Some(StatsJson {
            keys: s.keys,
            bytes: s.bytes,
            reads_per_sec: s.reads_per_sec,
            writes_per_sec: s.writes_per_sec,
            hot_key: (!s.hot_key.is_empty()).then(|| text(&s.hot_key)),
        })
    }

    /// The table cells: keys, size, reads/s, writes/s, note.
    fn cells(&self) -> Vec<String> {
        vec![
            self.keys.to_string(),
            size_text(self.bytes),
            format!("{:.1}", self.reads_per_sec),
            format!("{:.1}", self.writes_per_sec),
            self.hot_key
                .as_ref()
                .map(|k| format!("hot key {k:?} (not split)"))
                .unwrap_or_default(),
        ]
    }
}

/// Bytes in binary units: `512 B`, `3.5 MiB`.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(Serialize)]
pub struct GroupJson {
    pub gid: u64,
    pub nodes: Vec<NodeJson>,
    /// Draining: its ranges move away, then it is removed.
    pub leaving: bool,
}

#[derive(Serialize)]
pub struct ConfigJson {
    pub num: u64,
    pub ranges: Vec<AssignmentJson>,
    pub groups: Vec<GroupJson>,
}

/// `config`'s ranges with their owners and, where known, their statistics.
pub fn assignments(config: &Config, stats: &[RangeStats]) -> Vec<AssignmentJson> {
    config
        .ranges
        .iter()
        .map(|r| AssignmentJson {
            range: RangeJson::from(r.range.as_ref()),
            gid: r.gid,
            stats: StatsJson::find(stats, r.range.as_ref()),
        })
        .collect()
}

impl ConfigJson {
    pub fn from(config: &Config) -> ConfigJson {
        ConfigJson::with_stats(config, &[])
    }

    /// With the statistics of the ranges `stats` holds.
    pub fn with_stats(config: &Config, stats: &[RangeStats]) -> ConfigJson {
        ConfigJson {
            num: config.num,
            ranges: assignments(config, stats),
            groups: config
                .groups
                .iter()
                .map(|g| GroupJson {
                    gid: g.gid,
                    nodes: g
                        .nodes
                        .iter()
                        .map(|n| NodeJson {
                            id: n.id,
                            addr: n.addr.clone(),
                        })
                        .collect(),
                    leaving: g.leaving,
                })
                .collect(),
        }
    }
}

/// Prints a configuration: its ranges and owners, then its groups and their nodes.
pub fn print_config_table(config: &Config) -> anyhow::Result<()> {
    print_config_table_with_stats(config, &[])
}

/// [`print_config_table`] with the ranges' statistics, where `stats` has them.
pub fn print_config_table_with_stats(config: &Config, stats: &[RangeStats]) -> anyhow::Result<()> {
    outln!("configuration {}", config.num);
    print_ranges(config, stats)?;
    outln!();
    if config.groups.is_empty() {
        outln!("no groups");
        return Ok(());
    }
    let mut groups = Table::new(&["GID", "NODES"]);
    for g in &config.groups {
        let nodes: Vec<String> = g
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect();
        let gid = if g.leaving {
            format!("{} (leaving)", g.gid)
        } else {
            g.gid.to_string()
        };
        groups.row(vec![gid, nodes.join(", ")]);
    }
    groups.print()
}

/// The ranges of `config`, their owners and, when any is known, their statistics.
pub fn print_ranges(config: &Config, stats: &[RangeStats]) -> anyhow::Result<()> {
    let mut header = vec!["RANGE", "GID"];
    if !stats.is_empty() {
        header.extend(["KEYS", "SIZE", "READS/S", "WRITES/S", "NOTE"]);
    }
    let mut ranges = Table::new(&header);
    for r in &config.ranges {
        let owner = if r.gid == 0 {
            "- (no group)".to_owned()
        } else {
            r.gid.to_string()
        };
        let mut row = vec![range_text(r.range.as_ref()), owner];
        let stats = StatsJson::find(stats, r.range.as_ref());
        row.extend(stats.map(|s| s.cells()).unwrap_or_default());
        ranges.row(row);
    }
    ranges.print()
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
    fn held_ranges_are_cut_at_the_configurations_boundaries() {
        let mut config = Config::initial();
        config.ranges = ["", "g", "n", "t"]
            .windows(2)
            .map(|w| (w[0], w[1]))
            .chain([("t", "")])
            .map(|(s, e)| shardkv::proto::RangeAssignment {
                range: Some(range(s, e)),
                gid: 1,
            })
            .collect();
        assert_eq!(
            split_at_config(&range("", "n"), &config),
            [range("", "g"), range("g", "n")]
        );
        assert_eq!(
            split_at_config(&range("h", ""), &config),
            [range("h", "n"), range("n", "t"), range("t", "")]
        );
        let owned = [range("", "g"), range("g", "n")];
        assert_eq!(ranges_still_held(&owned, &[range("", "n")]), 2);
        assert_eq!(ranges_still_held(&owned, &[range("g", "n")]), 1);
        assert_eq!(ranges_still_held(&owned, &[range("n", "t")]), 0);
    }

    #[test]
    fn escaped_text_shows_every_byte_and_is_one_line() {
        assert_eq!(escaped("plain ü".as_bytes()), "plain ü");
        assert_eq!(escaped(b"a\nb\tc\\d\r\x1b"), "a\\nb\\tc\\\\d\\r\\x1b");
        assert_eq!(escaped(b"\xff\xfeok"), "\\xff\\xfeok");
    }

    #[test]
    fn json_bytes_are_strings_when_utf8_and_base64_otherwise() {
        let mut doc = serde_json::Map::new();
        insert_bytes(&mut doc, "key", b"k");
        insert_bytes(&mut doc, "value", b"\xff\xfe");
        assert_eq!(
            serde_json::Value::Object(doc).to_string(),
            r#"{"key":"k","value_base64":"//4="}"#
        );
    }

    #[test]
    fn json_ranges_use_null_for_an_open_end() {
        let r = RangeJson::from(Some(&KeyRange {
            start: b"g".to_vec(),
            end: Vec::new(),
        }));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"start":"g","end":null}"#
        );
    }
}
