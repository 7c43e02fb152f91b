//! Generated gRPC types and services of `proto/shardkv/v1/shardkv.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("shardkv.v1");

/// Encoded `FileDescriptorSet` of our protos, registered with server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardkv_descriptor");

/// The services users call (data and admin). Server reflection lists only these:
/// Raft, RangeTransfer and the test-only Faults are between servers and tests, and a
/// user browsing with `grpcurl list` should not be invited to call them.
pub const PUBLIC_SERVICES: &[&str] = &[
    "shardkv.v1.Kv",
    "shardkv.v1.ShardMaster",
    "shardkv.v1.Membership",
];
