//! The `Membership` gRPC service: adding and removing replicas of a Raft group, and
//! handing leadership over. Served by every shard master replica and kvnode, for its
//! own group.

use crate::proto::membership_server::Membership;
use crate::proto::{
    AddMemberRequest, MembershipReply, RemoveMemberRequest, TransferLeaderReply,
    TransferLeaderRequest,
};
use crate::replica::{MembershipChange, Replica, ReplicaStatus, Role, StateMachine};
use crate::status;
use raft::prelude::ConfState;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Longest wait for a learner to catch up, or for a leadership transfer.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the members of a group to be heard from before a removal that
/// would leave no live majority is refused (several heartbeat intervals).
const LIVENESS_SETTLE: Duration = Duration::from_secs(2);

pub struct MembershipService<S: StateMachine> {
    replica: Replica<S>,
}

impl<S: StateMachine> MembershipService<S> {
    pub fn new(replica: Replica<S>) -> MembershipService<S> {
        MembershipService { replica }
    }

    fn leader_status(&self) -> Result<ReplicaStatus, Status> {
        let status = self.replica.status();
        if status.role != Role::Leader {
            return Err(status::from_replica(status.not_leader()));
        }
        Ok(status)
    }

    async fn change(&self, change: MembershipChange) -> Result<ConfState, Status> {
        self.replica
            .change_membership(change)
            .await
            .map_err(status::from_replica)
    }

    /// Waits until `done` holds for the status, or `timeout` passes.
    async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&ReplicaStatus) -> bool,
    ) -> Result<ReplicaStatus, Status> {
        let mut watch = self.replica.watch_status();
        let wait = async {
            loop {
                let status = watch.borrow_and_update().clone();
                if done(&status) {
                    return Ok(status);
                }
                if watch.changed().await.is_err() {
                    return Err(Status::unavailable("replica stopped"));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("timed out")))
    }

    /// Hands leadership to `to` (0: the most up-to-date other voter) and waits until
    /// this replica is no longer the leader.
    async fn transfer(&self, status: &ReplicaStatus, to: u64) -> Result<u64, Status> {
        let to = if to != 0 {
            if !status.conf_state.voters.contains(&to) || to == status.id {
                return Err(status::invalid_argument(
                    "to",
                    format!("node {to} is not another voter of this group"),
                    0,
                ));
            }
            to
        } else {
            status
                .progress
                .iter()
                .filter(|(id, p)| {
                    **id != status.id && p.recent_active && status.conf_state.voters.contains(id)
                })
                .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    Status::failed_precondition("no other live voter to take leadership")
                })?
        };
        self.replica
            .transfer_leader(to)
            .await
            .map_err(status::from_replica)?;
        let after = self
            .wait_for(TRANSFER_TIMEOUT, |s| {
                s.role != Role::Leader && s.leader_id != 0
            })
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("node {to} did not take leadership in time"))
            })?;
        Ok(after.leader_id)
    }
}

fn reply(cs: &ConfState) -> Response<MembershipReply> {
    Response::new(MembershipReply {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
    })
}

#[tonic::async_trait]
impl<S: StateMachine> Membership for MembershipService<S> {
    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let node = request
            .into_inner()
            .node
            .ok_or_else(|| status::invalid_argument("node", "missing", 0))?;
        if node.id == 0 || node.addr.is_empty() {
            return Err(status::invalid_argument(
                "node",
                "needs a non-zero id and an address",
                0,
            ));
        }
        let status = self.leader_status()?;
        if let Some((other, _)) = status
            .peers
            .iter()
            .find(|(id, addr)| **id != node.id && **addr == node.addr)
        {
            return Err(Status::already_exists(format!(
                "address {} belongs to node {other}",
                node.addr
            )));
        }
        if status.conf_state.voters.contains(&node.id) {
            return Ok(reply(&status.conf_state));
        }
        if !status.conf_state.learners.contains(&node.id) {
            self.change(MembershipChange::AddLearner {
                id: node.id,
                addr: node.addr.clone(),
            })
            .await?;
        }
        // Promote only once the learner holds everything committed when it was added,
        // so the group never waits on a voter that is still catching up.
        let target = self.replica.status().commit_index;
        self.wait_for(CATCH_UP_TIMEOUT, |s| {
            s.role == Role::Leader
                && s.progress
                    .get(&node.id)
                    .is_some_and(|p| p.matched >= target)
        })
        .await
        .map_err(|e| {
            Status::new(
                e.code(),
                format!(
                    "node {} at {} has not caught up (is it running with --join?): {}",
                    node.id,
                    node.addr,
                    e.message()
                ),
            )
        })?;
        let cs = self
            .change(MembershipChange::AddVoter {
                id: node.id,
                addr: node.addr,
            })
            .await?;
        Ok(reply(&cs))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = request.into_inner().id;
        let status = self.leader_status()?;
        let cs = &status.conf_state;
        let is_voter = cs.voters.contains(&id);
        if !is_voter && !cs.learners.contains(&id) {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        if is_voter {
            let remaining: Vec<u64> = cs.voters.iter().copied().filter(|v| *v != id).collect();
            if remaining.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the last voter of the group"
                )));
            }
            let live = |s: &ReplicaStatus| {
                remaining
                    .iter()
                    .filter(|v| s.progress.get(v).is_some_and(|p| p.recent_active))
                    .count()
            };
            // A leader elected a moment ago has not heard from every member yet: give
            // the members a few heartbeats to answer before calling them down.
            let settled = self
                .wait_for(LIVENESS_SETTLE, |s| {
                    s.role != Role::Leader || live(s) > remaining.len() / 2
                })
                .await;
            let now = settled.unwrap_or_else(|_| self.replica.status());
            if now.role != Role::Leader {
                return Err(status::from_replica(now.not_leader()));
            }
            if live(&now) <= remaining.len() / 2 {
                return Err(Status::failed_precondition(format!(
                    "removing node {id} would leave {} live voters of {}: no majority",
                    live(&now),
                    remaining.len()
                )));
            }
        }
        if id == status.id {
            // A leader cannot remove itself safely: hand over, and let the caller retry
            // at the new leader.
            let leader = self.transfer(&status, 0).await?;
            let after = self.replica.status();
            return Err(status::from_replica(
                crate::replica::ReplicaError::NotLeader {
                    leader_id: leader,
                    leader_addr: after.peers.get(&leader).cloned(),
                },
            ));
        }
        let cs = self.change(MembershipChange::Remove { id }).await?;
        Ok(reply(&cs))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderReply>, Status> {
        let to = request.into_inner().to;
        let status = self.leader_status()?;
        let leader_id = self.transfer(&status, to).await?;
        Ok(Response::new(TransferLeaderReply { leader_id }))
    }
}
