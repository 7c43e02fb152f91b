//! shardkv: a sharded, Raft-replicated key-value database.
//!
//! The library holds the shared core (storage, the Raft replica driver, the Raft
//! transport, server plumbing, the routing table) and the shard master, kvnode and
//! client modules, which live in their own top-level folders.

pub mod config;
pub mod faults;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod observability;
pub mod proto;
pub mod replica;
pub mod security;
pub mod server;
pub mod status;
pub mod storage;
pub mod transport;
pub mod verify;

#[path = "../client/mod.rs"]
pub mod client;
#[path = "../kvnode/mod.rs"]
pub mod kvnode;
#[path = "../shardmaster/mod.rs"]
pub mod shardmaster;
