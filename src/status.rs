//! Typed, actionable errors on the wire: a gRPC status whose message says what
//! happened and whose details carry an [`ErrorDetail`] a client can act on.
//!
//! The details follow the gRPC richer error model: a `google.rpc.Status` whose
//! `details` hold the `ErrorDetail` as an `Any`, so grpcurl prints it too.

use crate::proto::{
    error_detail::Kind, ErrorDetail, InvalidArgument, NotLeader, OpStatus, WrongGroup,
};
use crate::replica::ReplicaError;
use prost::Message;
use tonic::{Code, Status};

const DETAIL_TYPE_URL: &str = "type.googleapis.com/shardkv.v1.ErrorDetail";

/// `google.rpc.Status`, the standard envelope of status details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn with_detail(code: Code, message: String, kind: Kind) -> Status {
    let detail = ErrorDetail { kind: Some(kind) };
    let envelope = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: DETAIL_TYPE_URL.to_owned(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, envelope.encode_to_vec().into())
}

impl From<ReplicaError> for Status {
    fn from(err: ReplicaError) -> Status {
        from_replica(err)
    }
}

/// The status for a request this replica could not complete.
pub fn from_replica(err: ReplicaError) -> Status {
    match &err {
        ReplicaError::NotLeader {
            leader_id,
            leader_addr,
        } => with_detail(
            Code::Unavailable,
            err.to_string(),
            Kind::NotLeader(NotLeader {
                leader_id: *leader_id,
                leader_addr: leader_addr.clone().unwrap_or_default(),
            }),
        ),
        ReplicaError::Timeout => Status::deadline_exceeded(err.to_string()),
        ReplicaError::ConfChange(_) => Status::failed_precondition(err.to_string()),
        ReplicaError::Stopped => Status::unavailable(err.to_string()),
    }
}

/// A request field broke a rule; nothing was changed.
pub fn invalid_argument(field: &str, reason: impl Into<String>, limit: u64) -> Status {
    let reason = reason.into();
    with_detail(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        Kind::InvalidArgument(InvalidArgument {
            field: field.to_owned(),
            reason,
            limit,
        }),
    )
}

/// The key is not served by this group in the configuration it has applied;
/// `moving_to` names the group a live move is handing it to (0: none).
pub fn wrong_group(config_num: u64, moving_to: u64, what: String) -> Status {
    with_detail(
        Code::FailedPrecondition,
        what,
        Kind::WrongGroup(WrongGroup {
            config_num,
            moving_to,
        }),
    )
}

/// Decodes the typed detail of a status, if it has one.
pub fn detail(status: &Status) -> Option<Kind> {
    let envelope = RpcStatus::decode(status.details()).ok()?;
    let any = envelope
        .details
        .into_iter()
        .find(|a| a.type_url == DETAIL_TYPE_URL)?;
    ErrorDetail::decode(any.value.as_slice()).ok()?.kind
}

/// A status as one op's result in a Batch reply.
pub fn to_op(status: &Status) -> OpStatus {
    OpStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: status.details().to_vec(),
    }
}

/// The status one op of a Batch failed with, as if it had been called alone.
pub fn from_op(op: OpStatus) -> Status {
    Status::with_details(Code::from(op.code), op.message, op.details.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip() {
        let s = from_replica(ReplicaError::NotLeader {
            leader_id: 2,
            leader_addr: Some("127.0.0.1:7002".into()),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("node 2 at 127.0.0.1:7002"));
        match detail(&s) {
            Some(Kind::NotLeader(n)) => {
                assert_eq!((n.leader_id, n.leader_addr.as_str()), (2, "127.0.0.1:7002"))
            }
            other => panic!("unexpected detail {other:?}"),
        }
        let s = invalid_argument("key", "longer than 4096 bytes", 4096);
        match detail(&s) {
            Some(Kind::InvalidArgument(a)) => {
                assert_eq!((a.field.as_str(), a.limit), ("key", 4096))
            }
            other => panic!("unexpected detail {other:?}"),
        }
        assert!(detail(&Status::internal("x")).is_none());
        let back = from_op(to_op(&s));
        assert_eq!((back.code(), back.message()), (s.code(), s.message()));
        assert!(matches!(detail(&back), Some(Kind::InvalidArgument(_))));
    }
}
