//! Generated gRPC types and services of `proto/shardkv/`, one module per package:
//! the public API at the root (`crate::proto::Config`), the servers' own RPCs in
//! [`internal`], the stored formats in [`storage`] and the test-only services in
//! [`testing`].
#![allow(clippy::all, missing_docs)]

/// The packages nested as they are named, so the generated cross-package paths
/// (`super::super::v1::KeyRange`) resolve.
pub mod shardkv {
    pub mod v1 {
        tonic::include_proto!("shardkv.v1");
    }
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("shardkv.internal.v1");
        }
    }
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("shardkv.storage.v1");
        }
    }
    pub mod testing {
        pub mod v1 {
            tonic::include_proto!("shardkv.testing.v1");
        }
    }
}

pub use shardkv::internal::v1 as internal;
pub use shardkv::storage::v1 as storage;
pub use shardkv::testing::v1 as testing;
pub use shardkv::v1::*;

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

/// A client's request id as the logs store it.
impl From<RequestId> for storage::RequestId {
    fn from(id: RequestId) -> storage::RequestId {
        storage::RequestId {
            client_id: id.client_id,
            seq: id.seq,
            first_incomplete: id.first_incomplete,
        }
    }
}
