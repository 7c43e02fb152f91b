//! `shardctl scheduler`: the placement scheduler's settings and decision history.

use crate::admin::request_id;
use crate::output::{self, print_json, range_text, size_text, Output, Table};
use crate::Ctx;
use clap::{Args, Subcommand};
use serde::Serialize;
use shardkv::proto::{
    PlacementDecision, SchedulerReply, SchedulerRequest, SchedulerSettings, SetSchedulerRequest,
};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The settings.
    Show,
    /// Change settings (only those given); bad values are refused and nothing changes.
    Set(SetArgs),
    /// The recent decisions, oldest first: what split, merged or moved, why, when.
    History,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// Split a range over this many MiB near its middle (0.0625 to 4096).
    #[arg(long)]
    split_mib: Option<f64>,
    /// Split a range over this many reads plus writes per second where it divides
    /// its load (at least 1).
    #[arg(long)]
    split_load: Option<f64>,
    /// Merge adjacent small and cold ranges of one group.
    #[arg(long)]
    merge: Option<bool>,
    /// Move ranges between groups to even out bytes, then load.
    #[arg(long)]
    balance: Option<bool>,
    /// Decide nothing (maintenance).
    #[arg(long)]
    paused: Option<bool>,
    /// Milliseconds a range the scheduler moved is not moved back, and the pieces of
    /// a range it split are not merged.
    #[arg(long)]
    hold_ms: Option<u64>,
    /// Milliseconds a range an operator moved is left in place, and the pieces of one an operator split are not merged.
    #[arg(long)]
    manual_hold_ms: Option<u64>,
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    let master = ctx.master()?;
    let reply = match &command {
        Command::Show | Command::History => master
            .call(|mut c| async move { Ok(c.scheduler(SchedulerRequest {}).await?.into_inner()) })
            .await
            .map_err(|s| master.error(&s))?,
        Command::Set(a) => {
            let request = set_request(a)?;
            master
                .call(|mut c| {
                    let r = request.clone();
                    async move { Ok(c.set_scheduler(r).await?.into_inner()) }
                })
                .await
                .map_err(|s| master.error(&s))?
        }
    };
    match command {
        Command::Show | Command::Set(_) => show(ctx, &reply)?,
        Command::History => history(ctx, &reply)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn set_request(a: &SetArgs) -> anyhow::Result<SetSchedulerRequest> {
    let split_bytes = match a.split_mib {
        None => 0,
        // Refused by the master when out of bounds; a NaN or negative becomes 0 here,
        // which would mean "unchanged", so refuse those now.
        Some(m) if m.is_finite() && m > 0.0 => (m * (1u64 << 20) as f64) as u64,
        Some(m) => anyhow::bail!("--split-mib: {m} must be a positive number"),
    };
    let split_load = match a.split_load {
        None => 0.0,
        Some(l) if l.is_finite() && l > 0.0 => l,
        Some(l) => anyhow::bail!("--split-load: {l} must be a positive number"),
    };
    if a.hold_ms == Some(0) || a.manual_hold_ms == Some(0) {
        anyhow::bail!("--hold-ms, --manual-hold-ms: must be at least 1");
    }
    let mut set_flags = Vec::new();
    for (value, name) in [
        (a.merge, "merge"),
        (a.balance, "balance"),
        (a.paused, "paused"),
    ] {
        if value.is_some() {
            set_flags.push(name.to_owned());
        }
    }
    Ok(SetSchedulerRequest {
        settings: Some(SchedulerSettings {
            split_bytes,
            split_load,
            merge: a.merge.unwrap_or_default(),
            balance: a.balance.unwrap_or_default(),
            paused: a.paused.unwrap_or_default(),
            hold_ms: a.hold_ms.unwrap_or_default(),
            manual_hold_ms: a.manual_hold_ms.unwrap_or_default(),
        }),
        set_flags,
        id: Some(request_id()),
    })
}

#[derive(Serialize)]
struct SettingsJson {
    split_bytes: u64,
    split_load: f64,
    merge: bool,
    balance: bool,
    paused: bool,
    hold_ms: u64,
    manual_hold_ms: u64,
}

fn show(ctx: &Ctx, reply: &SchedulerReply) -> anyhow::Result<()> {
    let s = reply.settings.unwrap_or_default();
    let json = SettingsJson {
        split_bytes: s.split_bytes,
        split_load: s.split_load,
        merge: s.merge,
        balance: s.balance,
        paused: s.paused,
        hold_ms: s.hold_ms,
        manual_hold_ms: s.manual_hold_ms,
    };
    if ctx.output() == Output::Json {
        return print_json(&json);
    }
    let mut t = Table::new(&["SETTING", "VALUE"]);
    t.row(vec!["split size".into(), size_text(s.split_bytes)]);
    t.row(vec!["split load".into(), format!("{} ops/s", s.split_load)]);
    t.row(vec!["merge".into(), s.merge.to_string()]);
    t.row(vec!["balance".into(), s.balance.to_string()]);
    t.row(vec!["paused".into(), s.paused.to_string()]);
    t.row(vec!["hold".into(), format!("{} ms", s.hold_ms)]);
    t.row(vec![
        "manual hold".into(),
        format!("{} ms", s.manual_hold_ms),
    ]);
    t.print()
}

#[derive(Serialize)]
struct DecisionJson {
    kind: &'static str,
    range: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_gid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_gid: Option<u64>,
    why: String,
    manual: bool,
    at_ms: u64,
    config: u64,
}

fn decision_json(d: &PlacementDecision) -> DecisionJson {
    DecisionJson {
        kind: match d.kind() {
            shardkv::proto::placement_decision::Kind::Split => "split",
            shardkv::proto::placement_decision::Kind::Merge => "merge",
            shardkv::proto::placement_decision::Kind::Move => "move",
        },
        range: range_text(d.range.as_ref()),
        at: (!d.at.is_empty()).then(|| output::escaped(&d.at)),
        from_gid: (d.from_gid != 0).then_some(d.from_gid),
        to_gid: (d.to_gid != 0).then_some(d.to_gid),
        why: d.why.clone(),
        manual: d.manual,
        at_ms: d.at_ms,
        config: d.config_num,
    }
}

/// How long before now `at_ms` was, in words.
fn ago(at_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let then = Duration::from_millis(at_ms);
    format!("{:.0} s ago", now.saturating_sub(then).as_secs_f64())
}

fn history(ctx: &Ctx, reply: &SchedulerReply) -> anyhow::Result<()> {
    let decisions: Vec<DecisionJson> = reply.history.iter().map(decision_json).collect();
    if ctx.output() == Output::Json {
        return print_json(&decisions);
    }
    if decisions.is_empty() {
        outln!("no decisions yet");
        return Ok(());
    }
    let mut t = Table::new(&["WHEN", "CONFIG", "WHAT", "WHY"]);
    for d in decisions {
        let what = match d.kind {
            "move" => format!(
                "move {} {} -> {}",
                d.range,
                d.from_gid.unwrap_or_default(),
                d.to_gid.unwrap_or_default()
            ),
            "split" => format!("split {} at {:?}", d.range, d.at.unwrap_or_default()),
            _ => format!("merge into {}", d.range),
        };
        t.row(vec![ago(d.at_ms), d.config.to_string(), what, d.why]);
    }
    t.print()
}
