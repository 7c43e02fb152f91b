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

/// Golden bytes of the stored formats: commands as this format writes them into the
/// Raft logs, decoded field by field. An edit of `storage.proto` that would misread
/// what is on disk (a renumbered, retyped or reused field) fails here; see
/// "Stored formats" in ARCHITECTURE.md before changing these bytes.
#[cfg(test)]
mod stored_formats {
    use super::storage::kv_command::Command as KvOp;
    use super::storage::master_command::Command as MasterOp;
    use super::storage::write::Op;
    use super::storage::write_result::Result as Effect;
    use super::storage::*;
    use prost::Message;

    /// A kv group's client writes: a put with a request id, a delete, a CAS that
    /// creates its key.
    const WRITE_BATCH: &[u8] = &[
        0x7a, 0x26, // KvCommand.writes (15), 38 bytes
        0x0a, 0x11, // WriteBatch.writes (1): the put, 17 bytes
        0x0a, 0x02, b'k', b'1', // Write.key (1)
        // Write.id (2): client_id 7, seq 3, first_incomplete 2
        0x12, 0x06, 0x08, 0x07, 0x10, 0x03, 0x18, 0x02, //
        0x1a, 0x03, 0x0a, 0x01, b'v', // Write.put (3): value "v"
        0x0a, 0x06, // WriteBatch.writes (1): the delete, 6 bytes
        0x0a, 0x02, b'k', b'2', // Write.key (1)
        0x22, 0x00, // Write.delete (4)
        0x0a, 0x09, // WriteBatch.writes (1): the CAS, 9 bytes
        0x0a, 0x02, b'k', b'3', // Write.key (1)
        0x2a, 0x03, 0x12, 0x01, b'x', // Write.cas (5): no expected (1), value (2) "x"
    ];

    /// A client session's remembered result of a CAS.
    const SESSION_ENTRY: &[u8] = &[
        0x08, 0x03, // SessionEntry.seq (1)
        0x12, 0x09, // SessionEntry.result (2)
        // WriteResult.cas (3): swapped, found, current "x"
        0x1a, 0x07, 0x08, 0x01, 0x10, 0x01, 0x1a, 0x01, b'x',
    ];

    /// A shard-master move.
    const MASTER_MOVE: &[u8] = &[
        0x1a, 0x0f, // MasterCommand.move (3)
        0x0a, 0x01, b'm', // Move.key (1)
        0x10, 0x02, // Move.gid (2)
        0x1a, 0x06, 0x08, 0x07, 0x10, 0x04, 0x18, 0x04, // Move.id (3)
        0x20, 0x01, // Move.immediate (4)
        0xa0, 0x01, 0xe8, 0x07, // MasterCommand.at_ms (20): 1000
    ];

    fn id(client_id: u64, seq: u64, first_incomplete: u64) -> Option<RequestId> {
        Some(RequestId {
            client_id,
            seq,
            first_incomplete,
        })
    }

    #[test]
    fn a_write_batch_decodes_field_by_field() {
        let command = KvCommand::decode(WRITE_BATCH).unwrap();
        let Some(KvOp::Writes(batch)) = &command.command else {
            panic!("not a write batch: {command:?}");
        };
        let [put, delete, cas] = batch.writes.as_slice() else {
            panic!("not three writes: {batch:?}");
        };
        assert_eq!(put.key, b"k1");
        assert_eq!(put.id, id(7, 3, 2));
        assert_eq!(
            put.op,
            Some(Op::Put(Put {
                value: b"v".to_vec()
            }))
        );
        assert_eq!(delete.key, b"k2");
        assert_eq!(delete.id, None);
        assert_eq!(delete.op, Some(Op::Delete(Delete {})));
        assert_eq!(cas.key, b"k3");
        assert_eq!(
            cas.op,
            Some(Op::Cas(CompareAndSwap {
                expected: None,
                value: Some(b"x".to_vec()),
            }))
        );
        assert_eq!(
            command.encode_to_vec(),
            WRITE_BATCH,
            "encodes as it decodes"
        );
    }

    #[test]
    fn a_session_entry_decodes_field_by_field() {
        let entry = SessionEntry::decode(SESSION_ENTRY).unwrap();
        assert_eq!(entry.seq, 3);
        assert_eq!(
            entry.result.and_then(|r| r.result),
            Some(Effect::Cas(CompareAndSwapResult {
                swapped: true,
                found: true,
                current: b"x".to_vec(),
            }))
        );
    }

    #[test]
    fn a_master_command_decodes_field_by_field() {
        let command = MasterCommand::decode(MASTER_MOVE).unwrap();
        assert_eq!(command.at_ms, 1000);
        assert_eq!(
            command.command,
            Some(MasterOp::Move(Move {
                key: b"m".to_vec(),
                gid: 2,
                id: id(7, 4, 4),
                immediate: true,
            }))
        );
        assert_eq!(
            command.encode_to_vec(),
            MASTER_MOVE,
            "encodes as it decodes"
        );
    }
}
