//! The shard master: a Raft group whose state machine is the numbered history of
//! configurations (which group owns which key range, and who is in each group).

mod balance;
pub mod cli;
mod liveness;
mod moves;
mod placement;
mod service;
mod state;

pub use moves::{run_move_watchdog, MoveLimits};
pub use service::MasterService;
pub use state::{next_config, MasterState};

use crate::proto::shard_master_server::ShardMasterServer;

/// The gRPC name of the service, for health reporting.
pub const SERVICE_NAME: &str = "shardkv.v1.ShardMaster";

/// Wraps the service for mounting on a tonic server.
pub fn server(service: MasterService) -> ShardMasterServer<MasterService> {
    ShardMasterServer::new(service)
}
