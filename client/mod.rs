//! The Rust client library of shardkv's servers: the key-value [`Client`], the
//! shard master's client with the admin calls ([`master::MasterClient`]), group
//! membership ([`membership::Members`]), and the one leader-following helper they
//! are built on ([`leader::Replicas`]). Every public call fails with [`Error`].
//! Applications built on the library (`shardctl`, its playground and HTTP router)
//! live in `client/shardctl/`.

mod coalesce;
mod error;
pub mod kv;
pub mod leader;
pub mod master;
pub mod membership;
pub mod retry;

pub use error::Error;
pub use kv::{CasOutcome, Client, ClientOptions, Pair, Scanner};
