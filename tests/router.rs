//! The HTTP router (`shardctl router`) over real HTTP/1.1: PUT/GET/DELETE round
//! trips in two groups, and the status codes the README promises: 404 for a missing
//! key, 400 for an empty or over-long key, 413 for a value over the body limit.

mod common;

use common::user::{bin, http, poll_until, HttpResponse};
use common::{free_ports, KvCluster, KvOptions, Proc};
use std::time::Duration;

const HTTP_LIMIT: Duration = Duration::from_secs(30);

/// A cluster of one shard master and two one-node groups, split at "m" so that
/// "apple" and "zebra" live in different groups, and a router in front of it.
struct Setup {
    cluster: KvCluster,
    router: Proc,
    addr: String,
}

async fn setup(router_args: &[&str]) -> Setup {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 2,
        replicas: 1,
        ..Default::default()
    });
    let mut mc = cluster.master_client();
    mc.split(b"m").await.expect("split at m");
    cluster.join(&[1, 2]).await;
    let config = cluster.wait_settled(Duration::from_secs(60)).await;
    assert_ne!(
        config.owner(b"apple").1,
        config.owner(b"zebra").1,
        "apple and zebra should be in different groups: {config:?}"
    );
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut args = vec![
        "--masters".to_owned(),
        cluster.masters().addrs().join(","),
        "router".into(),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(router_args.iter().map(|s| s.to_string()));
    let router = Proc::spawn(
        "router",
        bin("shardctl"),
        args,
        cluster.masters().dir().join("router.log"),
    );
    // Up when it answers HTTP at all.
    let up = poll_until(Duration::from_secs(30), || {
        http("GET", &addr, "/keys/probe", b"", Duration::from_secs(5)).is_ok()
    });
    assert!(up, "router not answering; log:\n{}", router.log_tail(40));
    Setup {
        cluster,
        router,
        addr,
    }
}

impl Setup {
    fn req(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        http(method, &self.addr, path, body, HTTP_LIMIT).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {e}; router log:\n{}",
                self.router.log_tail(40)
            )
        })
    }

    fn expect(&self, method: &str, path: &str, body: &[u8], status: u16, text: &str) {
        let r = self.req(method, path, body);
        let shown: String = path.chars().take(60).collect();
        assert_eq!(r.status, status, "{method} {shown}: {}", r.text());
        assert!(
            r.text().contains(text),
            "{method} {shown}: body {:?} does not contain {text:?}",
            r.text()
        );
    }
}

#[tokio::test]
async fn put_get_delete_round_trip_through_both_groups() {
    let s = setup(&[]).await;
    for (key, value) in [("apple", "value-for-apple"), ("zebra", "value-for-zebra")] {
        let path = format!("/keys/{key}");
        s.expect("GET", &path, b"", 404, "key not found");
        s.expect("PUT", &path, value.as_bytes(), 200, "OK");
        s.expect("GET", &path, b"", 200, value);
        assert_eq!(s.req("GET", &path, b"").body, value.as_bytes());
        s.expect("PUT", &path, b"second", 200, "OK");
        assert_eq!(s.req("GET", &path, b"").body, b"second");
    }
    // The router wrote through the cluster: the client library sees the same data,
    // and a percent-encoded key is decoded.
    s.expect("PUT", "/keys/hello%20world", b"spaced", 200, "OK");
    let client = shardkv::client::Client::connect(s.cluster.masters().addrs())
        .await
        .expect("connect");
    assert_eq!(
        client.get(b"hello world").await.expect("get"),
        Some(b"spaced".to_vec())
    );
    assert_eq!(
        client.get(b"apple").await.expect("get"),
        Some(b"second".to_vec())
    );
    // An empty value is a value.
    s.expect("PUT", "/keys/empty-value", b"", 200, "OK");
    let r = s.req("GET", "/keys/empty-value", b"");
    assert_eq!((r.status, r.body.len()), (200, 0));
    // Values up to 1 MiB (the router's and the kvnodes' default limit) are stored;
    // a larger one is 413.
    let mib = vec![b'v'; 1 << 20];
    s.expect("PUT", "/keys/big", &mib, 200, "OK");
    assert!(s.req("GET", "/keys/big", b"").body == mib);
    let r = s.req("PUT", "/keys/big", &vec![b'w'; (1 << 20) + 1]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(s.req("GET", "/keys/big", b"").body == mib);
    // DELETE: 200 when it existed, then 404.
    s.expect("DELETE", "/keys/apple", b"", 200, "OK");
    s.expect("GET", "/keys/apple", b"", 404, "key not found");
    s.expect("DELETE", "/keys/apple", b"", 404, "key not found");
    s.expect("GET", "/keys/zebra", b"", 200, "second");
    // The log says which group each key went to.
    let log = s.router.log();
    assert!(log.contains("group"), "router log:\n{log}");
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_reason() {
    let s = setup(&["--max-body-bytes", "1000"]).await;
    // Missing key.
    s.expect("GET", "/keys/nothing-here", b"", 404, "key not found");
    // Empty key, with and without the slash, for every method.
    for path in ["/keys/", "/keys"] {
        for method in ["GET", "PUT", "DELETE"] {
            s.expect(method, path, b"v", 400, "key must not be empty");
        }
    }
    // Over-long key (the limit is 4096 bytes).
    let long = format!("/keys/{}", "k".repeat(4097));
    s.expect("PUT", &long, b"v", 400, "longer than 4096");
    s.expect("GET", &long, b"", 400, "longer than 4096");
    s.expect("DELETE", &long, b"", 400, "longer than 4096");
    let max = format!("/keys/{}", "k".repeat(4096));
    s.expect("PUT", &max, b"v", 200, "OK");
    // Value over --max-body-bytes.
    let r = s.req("PUT", "/keys/big", &[b'x'; 1001]);
    assert_eq!(r.status, 413, "{}", r.text());
    s.expect("GET", "/keys/big", b"", 404, "key not found");
    s.expect("PUT", "/keys/big", &[b'x'; 1000], 200, "OK");
    // Other paths and methods.
    s.expect("GET", "/nothing", b"", 404, "");
    let r = s.req("POST", "/keys/apple", b"v");
    assert_eq!(r.status, 405, "{}", r.text());
}
