//! Clients of shardkv's servers: the Rust client library ([`Client`]), the shard
//! master client, and the pieces of `shardctl` that are libraries (the playground).

mod coalesce;
pub mod kv;
pub mod master;
pub mod playground;
pub mod retry;
pub mod router;

pub use kv::{CasOutcome, Client, ClientOptions, Error, Pair, Scanner};
