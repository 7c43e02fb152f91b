//! `shardctl node ...`: change who is in a replica group, on both sides. Raft
//! membership is who votes; the shard master's member list is where clients route.
//! Adding: Raft first (the node joins as a learner, catches up, becomes a voter),
//! then the list. Removing: the list first (clients stop routing there), then Raft.
//! `shardctl master ...` does the same for the shard master's own replicas, which
//! clients find through `--masters` rather than a member list.

use crate::admin::{report, request_id};
use crate::Ctx;
use clap::{Args, Subcommand};
use shardkv::client::membership::Members;
use shardkv::proto::{AddNodeRequest, Group, Node, RemoveNodeRequest};
use std::process::ExitCode;
use std::time::Duration;

/// How long adding a node may take when --timeout is not given: it must catch up.
const DEFAULT_ADD_WAIT: Duration = Duration::from_secs(120);

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
    let members = Members::new("the shard master", ctx.masters(), ctx.dialer())?;
    match command {
        MasterCommand::Add(a) => {
            let node = Node {
                id: a.id,
                addr: a.addr.clone(),
            };
            let reply = members.add(node, ctx.timeout_or(DEFAULT_ADD_WAIT)).await?;
            outln!(
                "replica {} ({}) is a voting member of the shard master (voters {:?}); add it to --masters",
                a.id,
                a.addr,
                reply.voters
            );
        }
        MasterCommand::Remove(a) => {
            let reply = members.remove(a.id, ctx.deadline()).await?;
            outln!(
                "replica {} left the shard master (voters {:?}) and has stopped",
                a.id,
                reply.voters
            );
        }
        MasterCommand::TransferLeader(a) => {
            let reply = members.transfer_leader(a.to, ctx.deadline()).await?;
            outln!("replica {} now leads the shard master", reply.leader_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The members of `group`, for membership changes at its leader.
fn members_of(ctx: &Ctx, group: &Group) -> anyhow::Result<Members> {
    let addrs: Vec<String> = group.nodes.iter().map(|n| n.addr.clone()).collect();
    Ok(Members::new(
        &format!("group {}", group.gid),
        &addrs,
        ctx.dialer(),
    )?)
}

async fn run_node(ctx: &Ctx, command: NodeCommand) -> anyhow::Result<ExitCode> {
    let master = ctx.master()?;
    let config = master.query(None).await?;
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
            members_of(ctx, &group)?
                .add(node.clone(), ctx.timeout_or(DEFAULT_ADD_WAIT))
                .await?;
            let config = master
                .add_node(AddNodeRequest {
                    gid: a.gid,
                    node: Some(node),
                    id: Some(request_id()),
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
            let config = master
                .remove_node(RemoveNodeRequest {
                    gid: a.gid,
                    node_id: a.id,
                    id: Some(request_id()),
                })
                .await?;
            members_of(ctx, &group)?
                .remove(a.id, ctx.deadline())
                .await?;
            let message = format!("node {} left group {} and has stopped", a.id, a.gid);
            report(ctx, &config, &message)?;
        }
        NodeCommand::TransferLeader(a) => {
            let group = group_of(a.gid)?;
            let reply = members_of(ctx, &group)?
                .transfer_leader(a.to, ctx.deadline())
                .await?;
            outln!("node {} now leads group {}", reply.leader_id, a.gid);
        }
    }
    Ok(ExitCode::SUCCESS)
}
