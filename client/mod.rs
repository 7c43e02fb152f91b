//! Clients of shardkv's servers.

pub mod master;
pub mod retry;
