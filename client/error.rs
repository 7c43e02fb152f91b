//! The client library's one error type, returned by every public call of
//! [`Client`](super::Client) and [`MasterClient`](super::master::MasterClient).

use tonic::Status;

/// Errors of the client library's calls. Each message says what happened in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request broke a rule (nothing was changed): `field` is the request field
    /// at fault, `reason` what was wrong with it and `limit` the limit broken, if any
    /// (bytes or a count; 0 when there is none).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, e.g. `key`.
        field: String,
        /// What was wrong, e.g. `must not be empty`.
        reason: String,
        /// The limit broken, in bytes or items; 0 when there is none.
        limit: u64,
    },
    /// The servers that could answer were unreachable (or no group owns the key)
    /// until the deadline passed. A write's outcome is unknown.
    #[error("{0}")]
    Unavailable(String),
    /// Servers answered, but the call did not complete before its deadline (an
    /// election, a range transfer or a lost quorum took too long). A write's outcome is
    /// unknown.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A server refused the request for a reason another attempt does not change (a
    /// shard-master command on a group that already exists, say): its words.
    #[error("{0}")]
    Refused(String),
    /// An unexpected answer; retrying does not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn invalid(field: &str, reason: impl Into<String>, limit: u64) -> Error {
        Error::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
            limit,
        }
    }
}

/// A transport status's message with its causes ("tcp connect error: Connection refused").
/// `status`'s message with the causes under it (a refused TLS handshake says why there).
pub(crate) fn transport_message(status: &Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) && text != "transport error" {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}
