//! The etcd side of `shardctl bench --etcd`: the same closed-loop workload sent to an
//! etcd cluster over its v3 gRPC API, so both systems are measured by one client
//! runtime. Reads are etcd's default linearizable Range; writes are Puts.

use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

use proto::kv_client::KvClient;
use proto::{PutRequest, RangeRequest};

/// One connection to one etcd member; clones share it.
#[derive(Clone)]
pub struct EtcdKv {
    kv: KvClient<Channel>,
    timeout: Duration,
}

impl EtcdKv {
    pub async fn connect(endpoint: &str, timeout: Duration) -> anyhow::Result<EtcdKv> {
        let channel = Endpoint::from_shared(format!("http://{endpoint}"))?
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach etcd at {endpoint}: {e}"))?;
        Ok(EtcdKv {
            kv: KvClient::new(channel),
            timeout,
        })
    }

    pub async fn get(&self, key: &[u8]) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        });
        request.set_timeout(self.timeout);
        self.kv.clone().range(request).await.map(|_| ())
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        });
        request.set_timeout(self.timeout);
        self.kv.clone().put(request).await.map(|_| ())
    }
}
