//! Snapshots streamed to a lagging follower: a stream whose sender fails part way
//! is never installed (the correctness issue's finding 4). Before the fix, the
//! stream simply ended, and the follower installed the chunks it had under the
//! snapshot's full applied index, silently missing the rest of the data.

mod common;

use common::faults::{start_faulty, At};
use common::{expect_within, KvOptions};
use shardkv::proto::membership_client::MembershipClient;
use shardkv::proto::testing::NodeFaults;
use shardkv::proto::TransferLeaderRequest;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const KEYS: usize = 48;
const VALUE_BYTES: usize = 64 << 10;

fn key(i: usize) -> Vec<u8> {
    format!("snap/{i:03}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    vec![b'a' + (i % 26) as u8; VALUE_BYTES]
}

#[tokio::test]
async fn truncated_snapshot_stream_is_not_installed() {
    // A short log, so a follower that misses the writes needs a snapshot: 3 MiB of
    // data, several 1 MiB chunks.
    let mut cluster = start_faulty(KvOptions {
        masters: 1,
        groups: 1,
        compact_threshold: Some(20),
        ..Default::default()
    });
    cluster.join(&[1]).await;
    cluster.wait_settled(WAIT).await;
    let leader = cluster.wait_leader(1, WAIT).await;
    let lagging = (leader + 1) % 3;
    cluster.kill9(1, lagging);
    let mut client = cluster.client();
    for i in 0..KEYS {
        client.put(&key(i), &value(i)).await.expect("put");
    }
    let leader = cluster.wait_leader(1, WAIT).await;
    let first_index = cluster
        .must_node_status(1, leader)
        .await
        .replica
        .expect("replica")
        .first_log_index;

    // The leader's snapshot reads fail after the first data chunk.
    let failing = NodeFaults {
        snapshot_fail_after_chunks: 2,
        ..Default::default()
    };
    cluster.set_node_faults(At::Kv(1, leader), failing).await;
    cluster.restart(1, lagging);
    // Wait for a retry after a failed stream, or for the lagging node to claim the
    // snapshot's index anyway.
    let applied = || async {
        let status = cluster.node_status(1, lagging).await;
        status.map_or(0, |s| s.replica.map_or(0, |r| r.applied_index))
    };
    expect_within(WAIT, "a second snapshot stream, or an install", || async {
        let failed = cluster
            .get_faults(At::Kv(1, leader))
            .await
            .map_or(0, |f| f.dropped);
        failed >= 2 || (failed >= 1 && applied().await >= first_index)
    })
    .await;
    let applied = applied().await;
    assert!(
        applied < first_index,
        "the lagging node claims index {applied}, past the leader's compacted log \
         (first index {first_index}), from truncated snapshots"
    );

    // Healed, it receives the whole snapshot and catches up; as leader it serves
    // every key from its own copy.
    cluster
        .set_node_faults(At::Kv(1, leader), NodeFaults::default())
        .await;
    cluster.wait_caught_up(1, lagging, WAIT).await;
    let to = lagging as u64 + 1;
    expect_within(WAIT, "the caught-up node leads", || async {
        let mut membership = MembershipClient::new(common::grpc_channel(cluster.addr(1, leader)));
        let _ = membership
            .transfer_leader(TransferLeaderRequest { to })
            .await;
        cluster.leader(1).await == Some(lagging)
    })
    .await;
    for i in 0..KEYS {
        assert_eq!(
            client.get(&key(i)).await.expect("get"),
            Some(value(i)),
            "key {i} at the node that received the snapshot"
        );
    }
}
