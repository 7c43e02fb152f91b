//! Clients of shardkv's servers.

pub mod master;
pub mod playground;
pub mod retry;
