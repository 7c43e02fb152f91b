//! Read-only views of the cluster: configurations and the health of every replica.

use crate::output::{
    self, print_json, range_text, state_text, AssignmentJson, ConfigJson, Output, RangeJson, Table,
};
use crate::Ctx;
use clap::{Args, Subcommand};
use futures::future::join_all;
use serde::Serialize;
use shardkv::proto::kv_client::KvClient;
use shardkv::proto::shard_master_client::ShardMasterClient;
use shardkv::proto::{
    Config, KeyRange, Liveness, NodeHealth, NodeStatusReply, NodeStatusRequest, RangeStats,
    StatusReply, StatusRequest,
};
use shardkv::security::SecureChannel;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

/// Longest wait for one replica's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show configuration NUM (default: the latest): which group owns which range,
    /// and each group's nodes.
    Query(QueryArgs),
    /// Show every shard master replica and every node of every group: role, term,
    /// applied index and configuration, held ranges; unreachable ones as DOWN (or NO ANSWER when too slow).
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The configuration number (default: the latest).
    num: Option<u64>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Query(a) => query(ctx, a).await?,
        Command::Status(_) => status(ctx).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn query(ctx: &Ctx, a: QueryArgs) -> anyhow::Result<()> {
    let config = ctx.master()?.query(a.num).await?;
    // Statistics are of the latest configuration's ranges; an older configuration
    // shows those of its ranges that still exist.
    let statuses = master_statuses(ctx).await?;
    let stats = leader_of(&statuses)
        .map(|r| r.ranges.clone())
        .unwrap_or_default();
    match ctx.output() {
        Output::Json => print_json(&ConfigJson::with_stats(&config, &stats)),
        Output::Table => output::print_config_table_with_stats(&config, &stats),
    }
}

/// Every shard master replica's status, asked directly (not through the leader),
/// all at once.
async fn master_statuses(ctx: &Ctx) -> anyhow::Result<Vec<Result<StatusReply, String>>> {
    let channels = ctx
        .masters
        .iter()
        .map(|a| channel(a, ctx))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(join_all(channels.into_iter().map(|c| async move {
        ShardMasterClient::new(c)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| output::call_error_text(&e))
    }))
    .await)
}

/// The leader's answer: liveness, move progress and range statistics are known to
/// the leader only.
fn leader_of(statuses: &[Result<StatusReply, String>]) -> Option<&StatusReply> {
    statuses
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .find(|r| r.replica.as_ref().is_some_and(|x| x.role == "leader"))
}

fn channel(addr: &str, ctx: &Ctx) -> anyhow::Result<SecureChannel> {
    let dialer = ctx.dialer();
    Ok(dialer.connect_lazy(
        dialer
            .endpoint(addr)?
            .connect_timeout(Duration::from_secs(1))
            .timeout(STATUS_TIMEOUT.min(ctx.deadline())),
    ))
}

#[derive(Serialize)]
struct MasterJson {
    addr: String,
    up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    term: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latest_config: Option<u64>,
}

#[derive(Serialize)]
struct HeldJson {
    #[serde(flatten)]
    range: RangeJson,
    state: &'static str,
    config: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_gid: Option<u64>,
}

#[derive(Serialize)]
struct NodeJson {
    id: u64,
    addr: String,
    up: bool,
    /// What the shard master leader's heartbeat table says: "UP 0.4s ago", "DOWN 12.0s
    /// ago", "UNKNOWN" (no leader, or a new one that has not heard from it yet).
    master_sees: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    term: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ranges: Vec<HeldJson>,
}

#[derive(Serialize)]
struct GroupStatusJson {
    gid: u64,
    nodes: Vec<NodeJson>,
}

#[derive(Serialize)]
struct StatusJson {
    masters: Vec<MasterJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<u64>,
    /// The latest configuration's ranges, owners and statistics.
    ranges: Vec<AssignmentJson>,
    groups: Vec<GroupStatusJson>,
    moves: Vec<MoveJson>,
}

/// A live move as the shard master's leader last heard of it.
#[derive(Serialize)]
struct MoveJson {
    plan: u64,
    range: String,
    source: u64,
    dest: u64,
    phase: &'static str,
    bytes_copied: u64,
    lag_bytes: u64,
    /// The line shown in the table.
    #[serde(skip)]
    text: String,
}

fn master_json(addr: &str, reply: &Result<StatusReply, String>) -> MasterJson {
    match reply {
        Ok(s) => {
            let r = s.replica.clone().unwrap_or_default();
            MasterJson {
                addr: addr.to_owned(),
                up: true,
                error: None,
                id: Some(r.id),
                role: Some(r.role),
                term: Some(r.term),
                applied: Some(r.applied_index),
                latest_config: Some(s.latest_config_num),
            }
        }
        Err(e) => MasterJson {
            addr: addr.to_owned(),
            up: false,
            error: Some(e.clone()),
            id: None,
            role: None,
            term: None,
            applied: None,
            latest_config: None,
        },
    }
}

/// The id of the one shard master replica that did not answer, when that is
/// certain: the replicas that answered know every member's id, not its address, so
/// with one replica down its id is the one member missing among them.
fn down_master_id(replies: &[Result<StatusReply, String>]) -> Option<u64> {
    let up: Vec<&StatusReply> = replies.iter().filter_map(|r| r.as_ref().ok()).collect();
    if replies.len() - up.len() != 1 {
        return None;
    }
    let answered: Vec<u64> = up
        .iter()
        .filter_map(|r| r.replica.as_ref())
        .map(|r| r.id)
        .collect();
    let members = up
        .iter()
        .filter_map(|r| r.replica.as_ref())
        .find(|r| r.role == "leader")?;
    let mut missing = members
        .voters
        .iter()
        .chain(&members.learners)
        .filter(|id| !answered.contains(id));
    match (missing.next(), missing.next()) {
        (Some(id), None) => Some(*id),
        _ => None,
    }
}

/// The leader's heartbeat view of a node, in words.
fn liveness_text(health: Option<&NodeHealth>) -> String {
    match health {
        None => "UNKNOWN".into(),
        Some(h) => match (h.liveness(), h.last_seen_ms) {
            (Liveness::Unknown, _) => "UNKNOWN".into(),
            (state, 0) => state.as_str_name().into(),
            (state, ms) => format!("{} {:.1}s ago", state.as_str_name(), ms as f64 / 1000.0),
        },
    }
}

fn node_json(
    id: u64,
    addr: &str,
    reply: &Result<NodeStatusReply, String>,
    master_sees: String,
    config: &Config,
) -> NodeJson {
    match reply {
        Ok(s) => {
            let r = s.replica.clone().unwrap_or_default();
            NodeJson {
                id,
                addr: addr.to_owned(),
                up: true,
                master_sees,
                error: None,
                role: Some(r.role),
                term: Some(r.term),
                applied: Some(r.applied_index),
                config: Some(s.config_num),
                ranges: s
                    .ranges
                    .iter()
                    .flat_map(|h| {
                        let held = h.range.clone().unwrap_or_else(KeyRange::full);
                        output::split_at_config(&held, config)
                            .into_iter()
                            .map(move |piece| HeldJson {
                                range: RangeJson::from(Some(&piece)),
                                state: state_text(h.state()),
                                config: h.config_num,
                                peer_gid: (h.peer_gid != 0).then_some(h.peer_gid),
                            })
                    })
                    .collect(),
            }
        }
        Err(e) => NodeJson {
            id,
            addr: addr.to_owned(),
            up: false,
            master_sees,
            error: Some(e.clone()),
            role: None,
            term: None,
            applied: None,
            config: None,
            ranges: Vec::new(),
        },
    }
}

async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let masters = master_statuses(ctx).await?;
    let leader = leader_of(&masters);
    let stats = leader.map(|r| r.ranges.clone()).unwrap_or_default();
    let moves: Vec<MoveJson> = leader
        .map(|r| {
            r.moves
                .iter()
                .map(|p| MoveJson {
                    plan: p.id,
                    range: range_text(p.range.as_ref()),
                    source: p.source,
                    dest: p.dest,
                    phase: if p.queued {
                        "queued"
                    } else {
                        output::phase_text(p.phase())
                    },
                    bytes_copied: p.bytes_copied,
                    lag_bytes: p.lag_bytes,
                    text: output::move_progress_text(p),
                })
                .collect()
        })
        .unwrap_or_default();
    let health: HashMap<(u64, u64), NodeHealth> = leader
        .map(|r| {
            r.nodes
                .iter()
                .map(|n| ((n.gid, n.node_id), n.clone()))
                .collect()
        })
        .unwrap_or_default();
    let down_id = down_master_id(&masters);
    let masters: Vec<MasterJson> = ctx
        .masters
        .iter()
        .zip(&masters)
        .map(|(a, r)| {
            let mut m = master_json(a, r);
            if !m.up {
                m.id = down_id;
            }
            m
        })
        .collect();
    let config: Result<Config, _> = if masters.iter().any(|m| m.up) {
        ctx.master()?.query(None).await.map_err(anyhow::Error::from)
    } else {
        Err(anyhow::anyhow!(
            "cannot reach the shard master at {}: every replica is down",
            ctx.masters_text()
        ))
    };
    let mut groups = Vec::new();
    if let Ok(config) = &config {
        for g in &config.groups {
            let channels = g
                .nodes
                .iter()
                .map(|n| channel(&n.addr, ctx))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let replies: Vec<Result<NodeStatusReply, String>> =
                join_all(channels.into_iter().map(|c| async move {
                    KvClient::new(c)
                        .node_status(NodeStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| output::call_error_text(&e))
                }))
                .await;
            groups.push(GroupStatusJson {
                gid: g.gid,
                nodes: g
                    .nodes
                    .iter()
                    .zip(&replies)
                    .map(|(n, r)| {
                        let seen = liveness_text(health.get(&(g.gid, n.id)));
                        node_json(n.id, &n.addr, r, seen, config)
                    })
                    .collect(),
            });
        }
    }
    let report = StatusJson {
        masters,
        config: config.as_ref().ok().map(|c| c.num),
        ranges: config
            .as_ref()
            .map(|c| output::assignments(c, &stats))
            .unwrap_or_default(),
        groups,
        moves,
    };
    match ctx.output() {
        Output::Json => print_json(&report)?,
        Output::Table => print_status(&report, config.as_ref().ok(), &stats)?,
    }
    // The replicas that could be reached are shown; a master that cannot answer is an error.
    config.map(|_| ())
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

fn print_status(
    report: &StatusJson,
    config: Option<&Config>,
    stats: &[RangeStats],
) -> anyhow::Result<()> {
    outln!("SHARD MASTER");
    let mut t = Table::new(&["ID", "ADDR", "ROLE", "TERM", "APPLIED", "LATEST CONFIG"]);
    for m in &report.masters {
        if m.up {
            t.row(vec![
                opt(&m.id),
                m.addr.clone(),
                opt(&m.role),
                opt(&m.term),
                opt(&m.applied),
                opt(&m.latest_config),
            ]);
        } else {
            let label = output::unreachable_label(m.error.as_deref().unwrap_or_default());
            let id = m.id.map_or_else(|| "?".into(), |id| id.to_string());
            t.row(vec![id, m.addr.clone(), label.into()]);
        }
    }
    t.print()?;
    if !report.moves.is_empty() {
        outln!();
        outln!("MOVES");
        for m in &report.moves {
            outln!("plan {}: {}", m.plan, m.text);
        }
    }
    let (Some(num), Some(config)) = (report.config, config) else {
        return Ok(());
    };
    outln!();
    outln!("RANGES (configuration {num})");
    output::print_ranges(config, stats)?;
    if report.groups.is_empty() {
        outln!();
        outln!("configuration {num} has no groups");
    }
    for g in &report.groups {
        outln!();
        outln!("GROUP {} (latest configuration {num})", g.gid);
        let mut t = Table::new(&[
            "NODE",
            "ADDR",
            "MASTER SEES",
            "ROLE",
            "TERM",
            "APPLIED",
            "CONFIG",
            "RANGES",
        ]);
        let mut views_differ = false;
        for n in &g.nodes {
            if !n.up {
                views_differ |= n.master_sees.starts_with("UP");
                let label = output::unreachable_label(n.error.as_deref().unwrap_or_default());
                t.row(vec![
                    n.id.to_string(),
                    n.addr.clone(),
                    n.master_sees.clone(),
                    label.into(),
                ]);
                continue;
            }
            let ranges: Vec<String> = n
                .ranges
                .iter()
                .map(|h| {
                    let peer = match (h.state, h.peer_gid) {
                        ("PULLING", Some(p)) => format!(" <- {p}"),
                        ("FROZEN", Some(p)) => format!(" -> {p}"),
                        _ => String::new(),
                    };
                    let range = shardkv::proto::KeyRange {
                        start: h.range.start.clone().into_bytes(),
                        end: h.range.end.clone().unwrap_or_default().into_bytes(),
                    };
                    format!("{} {}{peer}", range_text(Some(&range)), h.state)
                })
                .collect();
            let mut cells = vec![
                n.id.to_string(),
                n.addr.clone(),
                n.master_sees.clone(),
                opt(&n.role),
                opt(&n.term),
                opt(&n.applied),
                opt(&n.config),
                ranges.first().cloned().unwrap_or_else(|| "(none)".into()),
            ];
            t.row(std::mem::take(&mut cells));
            for more in ranges.iter().skip(1) {
                let mut row = vec![String::new(); 7];
                row.push(more.clone());
                t.row(row);
            }
        }
        t.print()?;
        if views_differ {
            outln!(
                "note: ROLE DOWN: shardctl cannot reach the node now. MASTER SEES: the shard \
                 master's last heartbeat from it; the master reports a node DOWN only after \
                 --down-after-ms (5 s by default) without one."
            );
        }
    }
    Ok(())
}
