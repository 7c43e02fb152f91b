//! Which errors are worth retrying, and how long to wait between tries.

use backon::ExponentialBuilder;
use std::time::Duration;
use tonic::{Code, Status};

/// Backoff between attempts: quick first retries (an election takes a few hundred
/// milliseconds), capped so a recovering cluster is noticed soon.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
}

/// True for errors that another attempt (possibly at another replica) may not hit:
/// no leader, unreachable server, timeout, a connection that broke mid-call.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => true,
        // tonic reports an HTTP/2 connection that failed under a call (a server
        // shutting down, a reset) as INTERNAL with this prefix; the server never
        // answered, so another attempt may succeed (writes carry their request id).
        Code::Internal => status.message().starts_with(H2_FAILURE),
        _ => false,
    }
}

/// How tonic's message for a failed HTTP/2 connection begins.
const H2_FAILURE: &str = "h2 protocol error";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_are_retried_and_server_errors_are_not() {
        assert!(is_transient(&Status::internal(format!(
            "{H2_FAILURE}: http2 error"
        ))));
        assert!(!is_transient(&Status::internal("storage failed")));
        assert!(!is_transient(&Status::invalid_argument("key")));
        assert!(is_transient(&Status::unavailable("no leader")));
    }
}
