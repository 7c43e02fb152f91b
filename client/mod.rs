//! The Rust client library of shardkv's servers: the key-value [`Client`], the
//! shard master's client with the admin calls ([`master::MasterClient`]), and the
//! one leader-following helper both are built on ([`leader::Replicas`]).
//! Applications built on it (`shardctl`, its playground and HTTP router) live in
//! `client/shardctl/`.

mod coalesce;
pub mod kv;
pub mod master;
pub mod retry;

pub use kv::{CasOutcome, Client, ClientOptions, Error, Pair, Scanner};
