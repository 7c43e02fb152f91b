//! `shardctl node ...`: change who is in a replica group, on both sides. Raft
//! membership is who votes; the shard master's member list is where clients route.
//! Adding: Raft first (the node joins as a learner, catches up, becomes a voter),
//! then the list. Removing: the list first (clients stop routing there), then Raft.
//! `shardctl master ...` does the same for the shard master's own replicas, which
//! clients find through `--masters` rather than a member list.

use crate::admin::{execute, report, request_id};
use crate::Ctx;
use clap::{Args, Subcommand};
use shardkv::client::retry::{backoff, is_transient};
use shardkv::proto::error_detail::Kind;
use shardkv::proto::membership_client::MembershipClient;
use shardkv::proto::{
    AddMemberRequest, AddNodeRequest, Group, Node, RemoveMemberRequest, RemoveNodeRequest,
    TransferLeaderRequest,
};
use shardkv::security::SecureChannel;
use shardkv::status;
use std::collections::VecDeque;
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::{Response, Status};

/// How long adding a node may take when --timeout is not given: it must catch up.
const DEFAULT_ADD_WAIT: Duration = Duration::from_secs(120);
/// Attempts at finding a group's leader.
const MAX_ATTEMPTS: usize = 32;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add or remove one node of a group, or move its leadership.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Add or remove a shard master replica, or move the shard master's leadership.
    #[command(subcommand)]
    Master(MasterCommand),
}

#[derive(Subcommand, Debug)]
pub enum MasterCommand {
    /// Add a replica (already started with `shardmaster --join --listen ADDR`): it
    /// joins as a learner, catches up, and becomes a voter. Then add its address to
    /// --masters (SHARDKV_MASTERS) of clients, kvnodes and routers.
    Add(MasterAddArgs),
    /// Remove a replica (hands leadership over first if it leads). The replica stops.
    Remove(MasterRemoveArgs),
    /// Hand the shard master's leadership to another replica.
    TransferLeader(MasterTransferArgs),
}

#[derive(Args, Debug)]
pub struct MasterAddArgs {
    /// The replica's id (non-zero, unused by the other replicas).
    #[arg(long)]
    id: u64,
    /// The replica's HOST:PORT.
    #[arg(long)]
    addr: String,
}

#[derive(Args, Debug)]
pub struct MasterRemoveArgs {
    /// The replica's id.
    #[arg(long)]
    id: u64,
}

#[derive(Args, Debug)]
pub struct MasterTransferArgs {
    /// The replica to lead; by default the most up-to-date other voter.
    #[arg(long)]
    to: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Add a node (already started with `kvnode --join`) to a group: Raft first, then
    /// the shard master's member list.
    Add(NodeAddArgs),
    /// Remove a node from a group: the member list first, then Raft. The node stops.
    Remove(NodeRemoveArgs),
    /// Hand the group's leadership to another node (for maintenance).
    TransferLeader(TransferArgs),
}

#[derive(Args, Debug)]
pub struct NodeAddArgs {
    /// The group.
    #[arg(long)]
    gid: u64,
    /// The node's id within the group (non-zero).
    #[arg(long)]
    id: u64,
    /// The node's HOST:PORT.
    #[arg(long)]
    addr: String,
}

#[derive(Args, Debug)]
pub struct NodeRemoveArgs {
    /// The group.
    #[arg(long)]
    gid: u64,
    /// The node's id within the group.
    #[arg(long)]
    id: u64,
}

#[derive(Args, Debug)]
pub struct TransferArgs {
    /// The group.
    #[arg(long)]
    gid: u64,
    /// The node to lead; by default the most up-to-date other voter.
    #[arg(long)]
    to: Option<u64>,
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Node(c) => run_node(ctx, c).await,
        Command::Master(c) => run_master(ctx, c).await,
    }
}

async fn run_master(ctx: &Ctx, command: MasterCommand) -> anyhow::Result<ExitCode> {
    let masters: Vec<String> = ctx.masters().to_vec();
    let what = "the shard master";
    match command {
        MasterCommand::Add(a) => {
            let request = AddMemberRequest {
                node: Some(Node {
                    id: a.id,
                    addr: a.addr.clone(),
                }),
            };
            let reply = at_leader(
                ctx,
                what,
                &masters,
                ctx.timeout_or(DEFAULT_ADD_WAIT),
                |mut c| {
                    let r = request.clone();
                    async move { c.add_member(r).await }
                },
            )
            .await?;
            outln!(
                "replica {} ({}) is a voting member of the shard master (voters {:?}); add it to --masters",
                a.id,
                a.addr,
                reply.voters
            );
        }
        MasterCommand::Remove(a) => {
            let reply = at_leader(ctx, what, &masters, ctx.deadline(), |mut c| async move {
                c.remove_member(RemoveMemberRequest { id: a.id }).await
            })
            .await?;
            outln!(
                "replica {} left the shard master (voters {:?}) and has stopped",
                a.id,
                reply.voters
            );
        }
        MasterCommand::TransferLeader(a) => {
            let to = a.to.unwrap_or(0);
            let reply = at_leader(ctx, what, &masters, ctx.deadline(), |mut c| async move {
                c.transfer_leader(TransferLeaderRequest { to }).await
            })
            .await?;
            outln!("replica {} now leads the shard master", reply.leader_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn node_addrs(group: &Group) -> Vec<String> {
    group.nodes.iter().map(|n| n.addr.clone()).collect()
}

async fn run_node(ctx: &Ctx, command: NodeCommand) -> anyhow::Result<ExitCode> {
    let master = ctx.master()?;
    let config = master.query(None).await.map_err(|s| ctx.master_error(s))?;
    let group_of = |gid: u64| -> anyhow::Result<Group> {
        config.group(gid).cloned().ok_or_else(|| {
            anyhow::anyhow!("group {gid} does not exist in configuration {}", config.num)
        })
    };
    match command {
        NodeCommand::Add(a) => {
            let group = group_of(a.gid)?;
            let node = Node {
                id: a.id,
                addr: a.addr.clone(),
            };
            let request = AddMemberRequest {
                node: Some(node.clone()),
            };
            let wait = ctx.timeout_or(DEFAULT_ADD_WAIT);
            at_leader(
                ctx,
                &format!("group {}", group.gid),
                &node_addrs(&group),
                wait,
                |mut c| {
                    let r = request.clone();
                    async move { c.add_member(r).await }
                },
            )
            .await?;
            let request = AddNodeRequest {
                gid: a.gid,
                node: Some(node),
                id: Some(request_id()),
            };
            let config = execute(ctx, &master, |mut c| {
                let r = request.clone();
                async move { c.add_node(r).await }
            })
            .await?;
            let message = format!(
                "node {} ({}) is a voting member of group {} and clients route to it",
                a.id, a.addr, a.gid
            );
            report(ctx, &config, &message)?;
        }
        NodeCommand::Remove(a) => {
            let group = group_of(a.gid)?;
            let request = RemoveNodeRequest {
                gid: a.gid,
                node_id: a.id,
                id: Some(request_id()),
            };
            let config = execute(ctx, &master, |mut c| {
                let r = request;
                async move { c.remove_node(r).await }
            })
            .await?;
            at_leader(
                ctx,
                &format!("group {}", group.gid),
                &node_addrs(&group),
                ctx.deadline(),
                |mut c| async move { c.remove_member(RemoveMemberRequest { id: a.id }).await },
            )
            .await?;
            let message = format!("node {} left group {} and has stopped", a.id, a.gid);
            report(ctx, &config, &message)?;
        }
        NodeCommand::TransferLeader(a) => {
            let group = group_of(a.gid)?;
            let to = a.to.unwrap_or(0);
            let reply = at_leader(
                ctx,
                &format!("group {}", group.gid),
                &node_addrs(&group),
                ctx.deadline(),
                |mut c| async move { c.transfer_leader(TransferLeaderRequest { to }).await },
            )
            .await?;
            outln!("node {} now leads group {}", reply.leader_id, a.gid);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Calls `call` on the leader of a Raft group (`what`, at `addrs`), trying its nodes
/// in turn and following not-leader hints, until it answers or `deadline` passes.
async fn at_leader<T, F, Fut>(
    ctx: &Ctx,
    what: &str,
    addrs: &[String],
    deadline: Duration,
    call: F,
) -> anyhow::Result<T>
where
    F: Fn(MembershipClient<SecureChannel>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let start = Instant::now();
    let mut delays = backon::BackoffBuilder::build(backoff());
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut last_error = String::from("no node answered");
    for _ in 0..MAX_ATTEMPTS {
        if queue.is_empty() {
            queue.extend(addrs.iter().cloned());
        }
        let Some(addr) = queue.pop_front() else { break };
        let dialer = ctx.dialer();
        let channel = dialer.connect_lazy(
            dialer
                .endpoint(&addr)?
                .connect_timeout(Duration::from_secs(1)),
        );
        let remaining = deadline.saturating_sub(start.elapsed());
        if remaining.is_zero() {
            break;
        }
        let result = tokio::time::timeout(remaining, call(MembershipClient::new(channel))).await;
        let status = match result {
            Ok(Ok(reply)) => return Ok(reply.into_inner()),
            Ok(Err(status)) => status,
            Err(_) => break,
        };
        match status::detail(&status) {
            Some(Kind::NotLeader(hint)) if !hint.leader_addr.is_empty() => {
                queue.push_front(hint.leader_addr);
            }
            _ if is_transient(&status) => {
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(500))).await;
            }
            _ => anyhow::bail!("{}", status.message()),
        }
        last_error = format!("{addr}: {}", status.message());
    }
    anyhow::bail!(
        "no leader of {what} completed the change within {deadline:?} (last: {last_error})"
    )
}
