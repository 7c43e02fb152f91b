//! The shard master's client: the configuration (`query`) and the admin calls that
//! change it (join, leave, move, split, members of a group), each sent to the
//! leader through [`Replicas`], retried under a deadline, and answered with the
//! configuration it produced or a [`client::Error`](Error) in words.

use super::error::{transport_message, Error};
use super::leader::Replicas;
use crate::proto::shard_master_client::ShardMasterClient;
use crate::proto::{
    AddNodeRequest, CancelMoveRequest, Config, ConfigReply, JoinRequest, LeaveRequest, MoveRequest,
    QueryRequest, RemoveNodeRequest, SplitRequest,
};
use crate::security::{Dialer, SecureChannel};
use std::future::Future;
use std::time::Duration;
use tonic::{Code, Response, Status};

pub use super::leader::check_addr;

/// How long one attempt at one replica may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections to every shard-master replica (opened lazily, reused).
pub struct MasterClient {
    replicas: Replicas,
    deadline: Duration,
}

impl MasterClient {
    /// A client of the replicas at `addrs` (host:port), connecting through `dialer`.
    /// Calls give up after `deadline`.
    pub fn new(
        addrs: &[String],
        deadline: Duration,
        dialer: &Dialer,
    ) -> Result<MasterClient, Error> {
        if addrs.is_empty() {
            return Err(Error::invalid(
                "masters",
                "no shard master address given",
                1,
            ));
        }
        Ok(MasterClient {
            replicas: Replicas::new("the shard master", addrs, dialer, Some(ATTEMPT_TIMEOUT))?
                .fail_fast_when_refused(),
            deadline,
        })
    }

    /// Runs `call` against the leader, retrying transient failures at other replicas
    /// until it succeeds, fails for good, or the deadline passes. For the calls
    /// without a method of their own; [`MasterClient::error`] says what a failure
    /// means.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(ShardMasterClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.replicas
            .call(self.deadline, |target| {
                call(ShardMasterClient::new(target.channel))
            })
            .await
    }

    /// A failed call's status, in words.
    pub fn error(&self, status: &Status) -> Error {
        let at = self.replicas.addrs().join(",");
        match status.code() {
            Code::DeadlineExceeded => Error::Unavailable(format!(
                "cannot reach the shard master at {at}: {}",
                status.message()
            )),
            Code::Cancelled => Error::Unavailable(format!(
                "cannot reach the shard master at {at}: no replica answered within {:?}",
                self.deadline
            )),
            Code::Unavailable | Code::Unknown => Error::Unavailable(format!(
                "cannot reach the shard master at {at}: {}",
                transport_message(status)
            )),
            _ => Error::Refused(status.message().to_owned()),
        }
    }

    /// Configuration `num`, or the latest when `None`.
    pub async fn query(&self, num: Option<u64>) -> Result<Config, Error> {
        self.call(|mut c| async move { Ok(c.query(QueryRequest { num }).await?.into_inner()) })
            .await
            .map_err(|s| self.error(&s))
    }

    /// Adds replica groups (`JoinRequest`).
    pub async fn join(&self, request: JoinRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.join(r).await }
        })
        .await
    }

    /// Removes replica groups (`LeaveRequest`).
    pub async fn leave(&self, request: LeaveRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.leave(r).await }
        })
        .await
    }

    /// Gives a range to a group, live or at once (`MoveRequest`).
    pub async fn move_range(&self, request: MoveRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.r#move(r).await }
        })
        .await
    }

    /// Cancels a live move (`CancelMoveRequest`).
    pub async fn cancel_move(&self, request: CancelMoveRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.cancel_move(r).await }
        })
        .await
    }

    /// Cuts a range at a key (`SplitRequest`).
    pub async fn split(&self, request: SplitRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.split(r).await }
        })
        .await
    }

    /// Adds a node to a group's member list, where clients route (`AddNodeRequest`).
    pub async fn add_node(&self, request: AddNodeRequest) -> Result<Config, Error> {
        self.change(|mut c| {
            let r = request.clone();
            async move { c.add_node(r).await }
        })
        .await
    }

    /// Removes a node from a group's member list (`RemoveNodeRequest`).
    pub async fn remove_node(&self, request: RemoveNodeRequest) -> Result<Config, Error> {
        self.change(|mut c| async move { c.remove_node(request).await })
            .await
    }

    /// Runs a configuration-changing call at the leader: the configuration it made.
    async fn change<F, Fut>(&self, call: F) -> Result<Config, Error>
    where
        F: Fn(ShardMasterClient<SecureChannel>) -> Fut,
        Fut: Future<Output = Result<Response<ConfigReply>, Status>>,
    {
        let reply = self
            .call(|c| {
                let fut = call(c);
                async move { Ok(fut.await?.into_inner()) }
            })
            .await
            .map_err(|s| self.error(&s))?;
        reply.config.ok_or_else(|| {
            Error::Internal("the shard master's reply holds no configuration".to_owned())
        })
    }
}
