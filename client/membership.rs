//! Who is in a Raft group (a kv group or the shard master's own replicas): add or
//! remove a member and move the leadership, at the group's leader through
//! [`Replicas`]. Each call has its own deadline: adding a member waits for it to
//! catch up.

use super::error::Error;
use super::leader::Replicas;
use crate::proto::membership_client::MembershipClient;
use crate::proto::{
    AddMemberRequest, MembershipReply, Node, RemoveMemberRequest, TransferLeaderReply,
    TransferLeaderRequest,
};
use crate::security::{Dialer, SecureChannel};
use std::future::Future;
use std::time::Duration;
use tonic::{Code, Response, Status};

/// The `Membership` service of one Raft group's replicas.
pub struct Members {
    name: String,
    replicas: Replicas,
}

impl Members {
    /// The replicas of `name` ("group 3", "the shard master") at `addrs`.
    pub fn new(name: &str, addrs: &[String], dialer: &Dialer) -> Result<Members, Error> {
        Ok(Members {
            name: name.to_owned(),
            // An attempt may wait as long as its call: adding a member waits until
            // the member has caught up.
            replicas: Replicas::new(name, addrs, dialer, None)?,
        })
    }

    /// Adds `node`: it joins as a learner, catches up, and becomes a voter.
    pub async fn add(&self, node: Node, deadline: Duration) -> Result<MembershipReply, Error> {
        let request = AddMemberRequest { node: Some(node) };
        self.at_leader(deadline, |mut c| {
            let r = request.clone();
            async move { c.add_member(r).await }
        })
        .await
    }

    /// Removes member `id` (which stops).
    pub async fn remove(&self, id: u64, deadline: Duration) -> Result<MembershipReply, Error> {
        self.at_leader(deadline, |mut c| async move {
            c.remove_member(RemoveMemberRequest { id }).await
        })
        .await
    }

    /// Hands the leadership to `to`, or by default to the most up-to-date other voter.
    pub async fn transfer_leader(
        &self,
        to: Option<u64>,
        deadline: Duration,
    ) -> Result<TransferLeaderReply, Error> {
        let to = to.unwrap_or(0);
        self.at_leader(deadline, |mut c| async move {
            c.transfer_leader(TransferLeaderRequest { to }).await
        })
        .await
    }

    async fn at_leader<T, F, Fut>(&self, deadline: Duration, call: F) -> Result<T, Error>
    where
        F: Fn(MembershipClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let reply = self
            .replicas
            .call(deadline, |target| {
                let fut = call(MembershipClient::new(target.channel));
                async move { Ok(fut.await?.into_inner()) }
            })
            .await;
        reply.map_err(|s| match s.code() {
            Code::DeadlineExceeded => Error::DeadlineExceeded(format!(
                "no leader of {} completed the change within {deadline:?} ({})",
                self.name,
                s.message()
            )),
            Code::Unavailable => Error::Unavailable(s.message().to_owned()),
            _ => Error::Refused(s.message().to_owned()),
        })
    }
}
