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
/// no leader, unreachable server, timeout.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}
