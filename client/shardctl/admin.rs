//! Admin commands: change the shard master's configuration (groups, members,
//! ranges), and wait for a leaving group to hand over its data or for a moved
//! range to arrive.

use crate::output::{self, print_json, ConfigJson, Output};
use crate::Ctx;
use anyhow::Context;
use clap::{Args, Subcommand};
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shardkv::client::master::MasterClient;
use shardkv::proto::kv_client::KvClient;
use shardkv::proto::{
    CancelMoveRequest, Config, Group, JoinRequest, KeyRange, LeaveRequest, MovePlan, MoveRequest,
    Node, NodeStatusReply, NodeStatusRequest, RangeState, RequestId, SplitRequest, StatusRequest,
};
use shardkv::security::{Dialer, SecureChannel};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::Status;

/// How long `leave` and `move --wait` wait for data when --timeout is not given.
const DEFAULT_DATA_WAIT: Duration = Duration::from_secs(600);
/// Between two looks at a group's nodes.
const POLL_EVERY: Duration = Duration::from_millis(250);

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add a replica group: it gets a share of the key ranges.
    Join(JoinArgs),
    /// Remove a replica group: its ranges move live to the others, one at a time,
    /// and the group is removed once it owns nothing. Waits until then and until the
    /// group holds no data any more (unless --no-wait).
    Leave(LeaveArgs),
    /// Give the range that contains KEY to group GID.
    Move(MoveArgs),
    /// Cut the range that contains KEY into [start, KEY) and [KEY, end).
    Split(SplitArgs),
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The new group's id (non-zero).
    #[arg(long)]
    gid: u64,
    /// A member of the group as ID=HOST:PORT; repeat for each member (or separate
    /// with commas).
    #[arg(
        long = "node",
        value_name = "ID=HOST:PORT",
        required = true,
        value_delimiter = ','
    )]
    nodes: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LeaveArgs {
    /// The group to remove.
    #[arg(long)]
    gid: u64,
    /// Return once the shard master has accepted the leave, without waiting for the
    /// data to move.
    #[arg(long)]
    no_wait: bool,
    /// Remove the group and give its ranges away in one configuration instead of
    /// live moves: they answer nothing until their new owners have pulled them.
    #[arg(long)]
    immediate: bool,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    /// A key in the range to move.
    key: String,
    /// The group to give the range to.
    #[arg(required_unless_present = "cancel")]
    gid: Option<u64>,
    /// Cancel the live move of the range instead (its source keeps serving it).
    #[arg(long, conflicts_with_all = ["gid", "immediate"])]
    cancel: bool,
    /// Give the range away in one configuration instead of a live move: it answers
    /// nothing until the new owner has pulled all of it.
    #[arg(long)]
    immediate: bool,
    /// Return once the new owner has all of the range's data and serves it (shows
    /// progress; up to --timeout, default 600 s).
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// Where to cut: the first key of the new range.
    key: String,
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    let master = ctx.master()?;
    let id = Some(request_id());
    match command {
        Command::Join(a) => {
            let nodes = parse_nodes(&a.nodes)?;
            let request = JoinRequest {
                groups: vec![Group {
                    gid: a.gid,
                    nodes,
                    leaving: false,
                }],
                id,
                immediate: false,
            };
            let config = master.join(request).await?;
            report(ctx, &config, &format!("group {} joined", a.gid))?;
        }
        Command::Leave(a) => return leave(ctx, &master, a).await,
        Command::Move(a) if a.cancel => {
            let request = CancelMoveRequest {
                key: a.key.clone().into_bytes(),
                id,
                reason: "shardctl move --cancel".into(),
                ..Default::default()
            };
            let config = master.cancel_move(request).await?;
            let (range, owner) = config.owner(a.key.as_bytes());
            let what = format!("move of {range} cancelled; group {owner} keeps serving it");
            report(ctx, &config, &what)?;
        }
        Command::Move(a) => {
            let gid = a.gid.context("a group to move the range to")?;
            let request = MoveRequest {
                key: a.key.clone().into_bytes(),
                gid,
                id,
                immediate: a.immediate,
            };
            let config = master.move_range(request).await?;
            let (range, owner) = config.owner(a.key.as_bytes());
            let (range, owner) = (range.clone(), owner);
            let plan = config
                .moves
                .iter()
                .find(|p| p.range.as_ref() == Some(&range))
                .cloned();
            let what = match &plan {
                Some(p) => format!(
                    "range {range} is moving from group {owner} to group {gid} (plan {}); \
                     group {owner} serves it until the cutover",
                    p.id
                ),
                None => format!("range {range} now belongs to group {gid}"),
            };
            if !a.wait {
                report(ctx, &config, &what)?;
                return Ok(ExitCode::SUCCESS);
            }
            if ctx.output() == Output::Table {
                outln!("{what} in configuration {}", config.num);
            }
            let wait = ctx.timeout_or(DEFAULT_DATA_WAIT);
            let started = Instant::now();
            let config = match plan {
                Some(p) => wait_for_plan(&master, &p, wait).await?,
                None => config,
            };
            anyhow::ensure!(
                config.owner(a.key.as_bytes()).1 == gid,
                "the move of {range} was cancelled (see the shard master's log); group {owner} \
                 keeps serving it"
            );
            let nodes = config
                .group(gid)
                .map(|g| g.nodes.clone())
                .unwrap_or_default();
            let wait = wait.saturating_sub(started.elapsed());
            let took = started.elapsed()
                + wait_until_served(ctx.dialer(), a.key.as_bytes(), &nodes, config.num, wait)
                    .await?;
            match ctx.output() {
                Output::Json => print_json(&serde_json::json!({
                    "message": what,
                    "config": ConfigJson::from(&config),
                    "arrived_after_secs": took.as_secs_f64(),
                }))?,
                Output::Table => outln!(
                    "group {} serves the range with all of its data ({:.1} s)",
                    gid,
                    took.as_secs_f64()
                ),
            }
        }
        Command::Split(a) => {
            let request = SplitRequest {
                key: a.key.clone().into_bytes(),
                id,
            };
            let config = master.split(request).await?;
            report(ctx, &config, &format!("split at {:?}", a.key))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A shard-master command id: one command per shardctl run, so seq 1 of a random client.
pub(crate) fn request_id() -> RequestId {
    let mut client_id = 0;
    while client_id == 0 {
        client_id = rand::random();
    }
    RequestId {
        client_id,
        seq: 1,
        first_incomplete: 1,
    }
}

/// Parses `ID=HOST:PORT` members.
fn parse_nodes(specs: &[String]) -> anyhow::Result<Vec<Node>> {
    specs
        .iter()
        .map(|spec| {
            let (id, addr) = spec
                .trim()
                .split_once('=')
                .with_context(|| format!("--node {spec:?}: expected ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .with_context(|| format!("--node {spec:?}: the id {id:?} is not a number"))?;
            anyhow::ensure!(!addr.trim().is_empty(), "--node {spec:?}: no address");
            Ok(Node {
                id,
                addr: addr.trim().to_owned(),
            })
        })
        .collect()
}

#[derive(Serialize)]
struct ChangeJson<'a> {
    message: &'a str,
    config: ConfigJson,
}

pub(crate) fn report(ctx: &Ctx, config: &Config, message: &str) -> anyhow::Result<()> {
    match ctx.output() {
        Output::Json => print_json(&ChangeJson {
            message,
            config: ConfigJson::from(config),
        }),
        Output::Table => {
            outln!("{message}");
            outln!();
            output::print_config_table(config)
        }
    }
}

async fn leave(ctx: &Ctx, master: &MasterClient, a: LeaveArgs) -> anyhow::Result<ExitCode> {
    // The members must be read before the leave: the configuration that removes the
    // group no longer has them.
    let before = master.query(None).await?;
    let nodes = before
        .group(a.gid)
        .map(|g| g.nodes.clone())
        .unwrap_or_default();
    let request = LeaveRequest {
        gids: vec![a.gid],
        id: Some(request_id()),
        immediate: a.immediate,
    };
    let config = master.leave(request).await?;
    let message = if config.group(a.gid).is_some() {
        format!(
            "group {} is leaving (configuration {}): its ranges move live to the other \
             groups, one at a time",
            a.gid, config.num
        )
    } else {
        format!(
            "group {} left in configuration {}; its ranges move to the other groups",
            a.gid, config.num
        )
    };
    if a.no_wait || nodes.is_empty() {
        report(ctx, &config, &message)?;
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.output() == Output::Table {
        outln!("{message}");
    }
    let started = Instant::now();
    let wait = ctx.timeout_or(DEFAULT_DATA_WAIT);
    // Progress counts the ranges the group owned, as `query` showed them.
    let owned: Vec<KeyRange> = before
        .ranges
        .iter()
        .filter(|r| r.gid == a.gid)
        .filter_map(|r| r.range.clone())
        .collect();
    let removed = wait_until_removed(master, a.gid, owned.len(), wait).await?;
    let wait = wait.saturating_sub(started.elapsed());
    let outcome = wait_until_empty(ctx.dialer(), a.gid, &nodes, &owned, removed.num, wait).await?;
    match ctx.output() {
        Output::Json => print_json(&serde_json::json!({
            "message": message,
            "config": ConfigJson::from(&removed),
            "drained": true,
            "unreachable_nodes": outcome.unreachable,
        }))?,
        Output::Table => {
            outln!(
                "group {} left in configuration {} and holds no data any more",
                a.gid,
                removed.num
            );
            for node in &outcome.unreachable {
                outln!("note: node {node} was unreachable; it drops its copy when it catches up");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows the live moves of a leaving group (ranges moved, the current move's phase,
/// bytes copied and lag) until the shard master removes the group; returns the
/// configuration that removed it.
async fn wait_until_removed(
    master: &MasterClient,
    gid: u64,
    owned: usize,
    wait: Duration,
) -> anyhow::Result<Config> {
    let started = Instant::now();
    let bar = ProgressBar::new(owned as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} ranges moved  {msg}",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let latest = master.query(None).await;
        if let Ok(config) = &latest {
            let Some(group) = config.group(gid) else {
                bar.finish_and_clear();
                return Ok(config.clone());
            };
            debug_assert!(group.leaving, "no command ends a leave but its last move");
            let left = config.ranges.iter().filter(|r| r.gid == gid).count();
            bar.set_position(owned.saturating_sub(left) as u64);
        }
        let status = master
            .call(|mut c| async move { Ok(c.status(StatusRequest {}).await?.into_inner()) })
            .await;
        if let Ok(status) = status {
            let active = status
                .moves
                .iter()
                .find(|p| p.source == gid && !p.queued)
                .map(output::move_progress_text);
            bar.set_message(active.unwrap_or_default());
        }
        if started.elapsed() >= wait {
            bar.abandon();
            anyhow::bail!(
                "group {gid} is still leaving after {wait:?}: its ranges are still moving \
                 (the moves go on; watch them with `shardctl status`)"
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// What one node of a leaving group reported.
enum NodeView {
    Down(String),
    /// Ranges still held (none once it has applied the leave and dropped them all),
    /// the configuration the node has applied, and the states of the held ranges.
    Holding(Vec<KeyRange>, u64, String),
}

struct Drained {
    unreachable: Vec<String>,
}

/// Polls every node of group `gid` until none holds data in configuration
/// `leave_num` or later (unreachable nodes do not hold the wait up once a reachable
/// node is empty: the deletion is committed in the group's log).
async fn wait_until_empty(
    dialer: &Dialer,
    gid: u64,
    nodes: &[Node],
    owned: &[KeyRange],
    leave_num: u64,
    wait: Duration,
) -> anyhow::Result<Drained> {
    let started = Instant::now();
    let channels = node_channels(dialer, nodes)?;
    let bar = ProgressBar::new(owned.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} ranges released  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut first = true;
    loop {
        let views = join_all(channels.iter().map(|c| async move {
            match node_status(c).await {
                Ok(r) => {
                    let mut states: Vec<&str> = r
                        .ranges
                        .iter()
                        .map(|h| output::state_text(h.state()))
                        .collect();
                    states.sort_unstable();
                    states.dedup();
                    let held = r.ranges.iter().filter_map(|h| h.range.clone()).collect();
                    NodeView::Holding(held, r.config_num, states.join("/"))
                }
                Err(e) => NodeView::Down(output::call_error_text(&e)),
            }
        }))
        .await;
        let mut left = 0;
        let mut empty = 0;
        let mut unreachable = Vec::new();
        let mut parts = Vec::new();
        for (node, view) in nodes.iter().zip(&views) {
            match view {
                NodeView::Down(e) => {
                    unreachable.push(format!("{} ({})", node.id, node.addr));
                    parts.push(format!(
                        "node {}: {}",
                        node.id,
                        output::unreachable_label(e)
                    ));
                }
                NodeView::Holding(held, num, _) if held.is_empty() && *num >= leave_num => {
                    empty += 1;
                    parts.push(format!("node {}: empty", node.id));
                }
                NodeView::Holding(held, _, states) => {
                    let n = output::ranges_still_held(owned, held);
                    left = left.max(n);
                    parts.push(format!("node {}: {n} {states}", node.id));
                }
            }
        }
        bar.set_position((owned.len() - left) as u64);
        bar.set_message(parts.join(", "));
        if first {
            first = false;
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        if left == 0 && empty > 0 {
            bar.finish_and_clear();
            return Ok(Drained { unreachable });
        }
        if started.elapsed() >= wait {
            bar.abandon();
            let detail = nodes
                .iter()
                .zip(&views)
                .map(|(n, v)| match v {
                    NodeView::Down(e) => format!("node {} ({}) unreachable: {e}", n.id, n.addr),
                    NodeView::Holding(held, num, states) => format!(
                        "node {} holds {} range(s) ({states}) at configuration {num}",
                        n.id,
                        held.len()
                    ),
                })
                .collect::<Vec<_>>()
                .join("; ");
            anyhow::bail!(
                "group {gid} left the configuration, but still holds data after {:?}: {detail} \
                 (the transfer goes on; watch it with `shardctl status`)",
                wait
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn node_channels(dialer: &Dialer, nodes: &[Node]) -> anyhow::Result<Vec<SecureChannel>> {
    nodes
        .iter()
        .map(|n| {
            Ok(dialer.connect_lazy(
                dialer
                    .endpoint(&n.addr)?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(2)),
            ))
        })
        .collect()
}

async fn node_status(channel: &SecureChannel) -> Result<NodeStatusReply, Status> {
    let reply = KvClient::new(channel.clone())
        .node_status(NodeStatusRequest {})
        .await?;
    Ok(reply.into_inner())
}

/// Shows a live move's phase, bytes copied and catch-up lag until its plan ends;
/// returns the configuration that ended it (the owner says whether it was done or
/// cancelled).
async fn wait_for_plan(
    master: &MasterClient,
    plan: &MovePlan,
    wait: Duration,
) -> anyhow::Result<Config> {
    let started = Instant::now();
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let status = master
            .call(|mut c| async move { Ok(c.status(StatusRequest {}).await?.into_inner()) })
            .await;
        if let Ok(status) = status {
            match status.moves.iter().find(|p| p.id == plan.id) {
                Some(p) => bar.set_message(output::move_progress_text(p)),
                None => {
                    bar.finish_and_clear();
                    return Ok(master.query(None).await?);
                }
            }
        }
        if started.elapsed() >= wait {
            bar.abandon();
            anyhow::bail!(
                "the move is still under way after {wait:?}; watch it with `shardctl status` \
                 or cancel it with `shardctl move --cancel`"
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the nodes of a range's new owner until one of them (a committed state) has
/// configuration `num` or later and serves the range holding `key`; returns how long
/// that took.
async fn wait_until_served(
    dialer: &Dialer,
    key: &[u8],
    nodes: &[Node],
    num: u64,
    wait: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let channels = node_channels(dialer, nodes)?;
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] waiting for the range's data  {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let views = join_all(channels.iter().map(node_status)).await;
        let mut parts = Vec::new();
        let mut served = false;
        for (node, view) in nodes.iter().zip(&views) {
            let text = match view {
                Err(e) => output::unreachable_label(&output::call_error_text(e)).to_owned(),
                Ok(r) if r.config_num < num => format!("at configuration {}", r.config_num),
                Ok(r) => {
                    let held = r
                        .ranges
                        .iter()
                        .find(|h| h.range.as_ref().is_some_and(|range| range.contains(key)));
                    match held.map(|h| h.state()) {
                        Some(RangeState::Serving) => {
                            served = true;
                            "serving".to_owned()
                        }
                        Some(state) => output::state_text(state).to_owned(),
                        None => "not holding it".to_owned(),
                    }
                }
            };
            parts.push(format!("node {}: {text}", node.id));
        }
        if served {
            bar.finish_and_clear();
            return Ok(started.elapsed());
        }
        bar.set_message(parts.join(", "));
        if started.elapsed() >= wait {
            bar.abandon();
            anyhow::bail!(
                "the range has not arrived after {wait:?} ({}); the transfer goes on: \
                 watch it with `shardctl status`",
                parts.join(", ")
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_parse() {
        let nodes = parse_nodes(&["1=127.0.0.1:1".into(), " 2 = h:2 ".into()]).unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.id, n.addr.as_str()))
                .collect::<Vec<_>>(),
            [(1, "127.0.0.1:1"), (2, "h:2")]
        );
        assert!(parse_nodes(&["x=h:1".into()]).is_err());
        assert!(parse_nodes(&["1".into()]).is_err());
        assert!(parse_nodes(&["1=".into()]).is_err());
    }
}
