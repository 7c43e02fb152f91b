//! Generated gRPC types and services of `proto/shardkv/v1/shardkv.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("shardkv.v1");

/// Encoded `FileDescriptorSet` of our protos, registered with server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardkv_descriptor");
