//! kvnode: a member of one replica group. The group's Raft log orders client writes,
//! configuration changes and range transfers; its state machine ([`KvState`]) holds
//! the ordered data of the ranges the group owns.

pub mod cli;
mod heartbeat;
mod migration;
mod service;
mod state;
mod stats;

pub use heartbeat::{report_range_metrics, run_heartbeats};
pub use migration::{run_migrations, MovePacing};
pub use service::{KvService, Limits, TransferService};
pub use state::{KvError, KvState};

/// gRPC names of the services, for health reporting.
pub const SERVICE_NAMES: &[&str] = &["shardkv.v1.Kv", "shardkv.internal.v1.RangeTransfer"];
