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
    // Value over --max-body-bytes: the limit, in the words the CLI uses.
    s.expect(
        "PUT",
        "/keys/big",
        &[b'x'; 1001],
        413,
        "value: is 1001 bytes, larger than 1000 bytes",
    );
    s.expect("GET", "/keys/big", b"", 404, "key not found");
    s.expect("PUT", "/keys/big", &[b'x'; 1000], 200, "OK");
    // Other paths and methods.
    s.expect("GET", "/nothing", b"", 404, "");
    let r = s.req("POST", "/keys/apple", b"v");
    assert_eq!(r.status, 405, "{}", r.text());
}

#[tokio::test]
async fn keys_with_slashes_are_the_rest_of_the_path() {
    let s = setup(&[]).await;
    s.expect("PUT", "/keys/a/b/c", b"nested", 200, "OK");
    s.expect("GET", "/keys/a/b/c", b"", 200, "nested");
    // %2F is the same key.
    s.expect("GET", "/keys/a%2Fb%2Fc", b"", 200, "nested");
    s.expect("GET", "/keys/a/b", b"", 404, "key not found");
    let client = shardkv::client::Client::connect(s.cluster.masters().addrs())
        .await
        .expect("connect");
    assert_eq!(
        client.get(b"a/b/c").await.expect("get"),
        Some(b"nested".to_vec())
    );
    // A key `shardctl bench` writes.
    s.expect("PUT", "/keys/z/bench/000000000042", b"v", 200, "OK");
    s.expect("DELETE", "/keys/a/b/c", b"", 200, "OK");
    s.expect("GET", "/keys/a/b/c", b"", 404, "key not found");
}

#[test]
fn without_a_reachable_cluster_it_listens_at_once_and_answers_503_with_the_reason() {
    let closed = format!("127.0.0.1:{}", free_ports(1)[0]);
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let router = Proc::spawn(
        "router",
        bin("shardctl"),
        vec![
            "--masters".to_owned(),
            closed.clone(),
            "router".into(),
            "--listen".into(),
            addr.clone(),
        ],
        tmp.path().join("router.log"),
    );
    let started = std::time::Instant::now();
    // The first answers may come before the first connection attempt has failed.
    let mut answer = None;
    poll_until(Duration::from_secs(30), || {
        answer = http("GET", &addr, "/keys/apple", b"", Duration::from_secs(5)).ok();
        answer
            .as_ref()
            .is_some_and(|a| a.text().contains("refused"))
    });
    let answer =
        answer.unwrap_or_else(|| panic!("router not answering; log:\n{}", router.log_tail(40)));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the router took {:?} to answer",
        started.elapsed()
    );
    assert_eq!(answer.status, 503, "{}", answer.text());
    for needle in [
        "cannot reach the cluster",
        "connection refused",
        closed.as_str(),
    ] {
        assert!(
            answer.text().contains(needle),
            "{needle:?} not in {:?}",
            answer.text()
        );
    }
    let r = http("PUT", &addr, "/keys/apple", b"v", HTTP_LIMIT).expect("PUT");
    assert_eq!(r.status, 503, "{}", r.text());
}
