//! Metrics and structured logs end to end: every server (shard master, kvnodes, the
//! HTTP router) started with `--metrics-listen 127.0.0.1:0 --log-format json`. The
//! test finds each metrics address in the server's JSON log, scrapes the endpoint
//! before and after a workload, parses it with a Prometheus text-format parser and
//! checks that the counters moved with the traffic, the histograms have buckets and
//! the Raft gauges are sane; and that every log line is JSON carrying the node,
//! group and term.

mod common;

use common::user::{bin, http, poll_until};
use common::{free_ports, KvCluster, KvOptions, Proc};
use prometheus_parse::{Sample, Scrape, Value};
use std::time::Duration;

const OBSERVED: [&str; 4] = ["--metrics-listen", "127.0.0.1:0", "--log-format", "json"];
const WAIT: Duration = Duration::from_secs(30);
/// Writes and reads of the workload (each through the kv client, so one gRPC call
/// at the group's leader apiece, plus retries).
const OPS: usize = 20;

/// The JSON records of a log, panicking on a line that is not a JSON object (but
/// the fixture's own `===== start` lines).
fn json_records(name: &str, log: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    log.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("===== "))
        .map(|l| match serde_json::from_str(l) {
            Ok(serde_json::Value::Object(record)) => record,
            other => panic!("{name}: log line is not a JSON object ({other:?}): {l}"),
        })
        .collect()
}

/// The metrics address a server logged (`serving metrics`, `metrics_listen`).
fn metrics_addr(proc: &Proc) -> String {
    let mut addr = None;
    let found = poll_until(WAIT, || {
        addr = json_records(proc.name(), &proc.log())
            .iter()
            .find_map(|r| r.get("metrics_listen")?.as_str().map(str::to_owned));
        addr.is_some()
    });
    assert!(
        found,
        "{} logged no metrics address:\n{}",
        proc.name(),
        proc.log_tail(20)
    );
    addr.expect("found")
}

fn scrape(addr: &str) -> Scrape {
    let r =
        http("GET", addr, "/metrics", b"", WAIT).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    assert_eq!(r.status, 200, "scrape {addr}: {}", r.text());
    let content_type = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let lines = r
        .text()
        .lines()
        .map(|l| Ok(l.to_owned()))
        .collect::<Vec<_>>();
    Scrape::parse(lines.into_iter()).expect("Prometheus text format")
}

/// The position of the one node whose scrape says it leads (polled: an election may
/// be under way).
fn leader_index(addrs: &[String]) -> usize {
    let mut leader = None;
    let found = poll_until(WAIT, || {
        leader = addrs
            .iter()
            .position(|a| value(&scrape(a), "shardkv_raft_role", &[("role", "leader")]) == 1.0);
        leader.is_some()
    });
    assert!(found, "no node leads");
    leader.expect("found")
}

fn matches(s: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
}

/// The sum of the counter or gauge samples of `name` with `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) => *v,
            other => panic!("{name} is no counter or gauge: {other:?}"),
        })
        .sum()
}

/// The bucket counts of the histogram `name` with `labels`, summed over its series.
fn histogram_buckets(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for s in scrape.samples.iter().filter(|s| matches(s, name, labels)) {
        let Value::Histogram(buckets) = &s.value else {
            panic!("{name} is no histogram: {:?}", s.value);
        };
        for (i, b) in buckets.iter().enumerate() {
            match sum.get_mut(i) {
                Some(entry) => entry.1 += b.count,
                None => sum.push((b.less_than, b.count)),
            }
        }
    }
    sum
}

#[tokio::test]
async fn servers_export_metrics_that_follow_the_traffic_and_log_json() {
    let mut options = KvOptions {
        masters: 1,
        groups: 1,
        replicas: 3,
        ..Default::default()
    };
    options.extra_args = OBSERVED.map(String::from).to_vec();
    options.master_args = options.extra_args.clone();
    let cluster = KvCluster::start(options);
    cluster.join(&[1]).await;
    cluster.wait_settled(Duration::from_secs(60)).await;
    let router_addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut router_args = vec![
        "--masters".to_owned(),
        cluster.masters().addrs().join(","),
        "router".into(),
        "--listen".into(),
        router_addr.clone(),
    ];
    router_args.extend(OBSERVED.map(String::from));
    let router = Proc::spawn(
        "router",
        bin("shardctl"),
        router_args,
        cluster.masters().dir().join("router.log"),
    );

    let group = cluster.group(1);
    let kv_procs: Vec<&Proc> = (0..group.len()).map(|i| group.proc(i)).collect();
    let kv_addrs: Vec<String> = kv_procs.iter().map(|p| metrics_addr(p)).collect();
    let master_addr = metrics_addr(cluster.masters().proc(0));
    let router_metrics = metrics_addr(&router);

    let before: Vec<Scrape> = kv_addrs.iter().map(|a| scrape(a)).collect();
    let router_before = scrape(&router_metrics);

    let mut client = cluster.client();
    for i in 0..OPS {
        let key = format!("key-{i}");
        client.put(key.as_bytes(), b"value").await.expect("put");
        assert_eq!(
            client.get(key.as_bytes()).await.expect("get"),
            Some(b"value".to_vec())
        );
    }
    let up = poll_until(WAIT, || {
        http("PUT", &router_addr, "/keys/routed", b"v", WAIT).is_ok_and(|r| r.status == 200)
    });
    assert!(up, "router PUT failed; log:\n{}", router.log_tail(20));
    let r = http("GET", &router_addr, "/keys/routed", b"", WAIT).expect("router GET");
    assert_eq!(r.status, 200);

    let after: Vec<Scrape> = kv_addrs.iter().map(|a| scrape(a)).collect();
    let router_after = scrape(&router_metrics);

    // Requests: the group's Kv calls that succeeded grew by at least the workload.
    let kv_ok = |scrapes: &[Scrape], method: &str| -> f64 {
        scrapes
            .iter()
            .map(|s| {
                value(
                    s,
                    "shardkv_grpc_requests_total",
                    &[
                        ("service", "shardkv.v1.Kv"),
                        ("method", method),
                        ("code", "OK"),
                    ],
                )
            })
            .sum()
    };
    for method in ["Put", "Get"] {
        let grown = kv_ok(&after, method) - kv_ok(&before, method);
        assert!(
            grown >= OPS as f64,
            "Kv/{method} OK calls grew by {grown}, want >= {OPS}"
        );
    }
    // Latency histograms have buckets that count the calls.
    for s in &after {
        let buckets = histogram_buckets(
            s,
            "shardkv_grpc_request_duration_seconds",
            &[("service", "shardkv.v1.Kv")],
        );
        if buckets.is_empty() {
            continue; // a follower serves no Kv calls
        }
        assert!(buckets.len() > 10, "{buckets:?}");
        assert!(buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(buckets.last().expect("buckets").0, f64::INFINITY);
    }
    let kv_buckets: f64 = after
        .iter()
        .map(|s| {
            let b = histogram_buckets(
                s,
                "shardkv_grpc_request_duration_seconds",
                &[("service", "shardkv.v1.Kv"), ("method", "Put")],
            );
            b.last().map_or(0.0, |last| last.1)
        })
        .sum();
    assert!(kv_buckets >= OPS as f64, "{kv_buckets}");

    // Raft: exactly one leader, terms agree, every node applied the workload.
    // (Polled: an election under load may leave a moment with none or two.)
    let one_leader = poll_until(WAIT, || {
        let leaders: f64 = kv_addrs
            .iter()
            .map(|a| value(&scrape(a), "shardkv_raft_role", &[("role", "leader")]))
            .sum();
        leaders == 1.0
    });
    assert!(one_leader, "group 1 does not have exactly one leader");
    let terms: Vec<f64> = after
        .iter()
        .map(|s| value(s, "shardkv_raft_term", &[]))
        .collect();
    assert!(terms.iter().all(|t| *t >= 1.0), "{terms:?}");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let applied = |s: &Scrape| value(s, "shardkv_raft_applied_index", &[]);
        let commit = value(a, "shardkv_raft_commit_index", &[]);
        // Followers apply what they learn from the next heartbeat: poll briefly.
        let grew = poll_until(WAIT, || {
            applied(&scrape(&kv_addrs[i])) >= applied(b) + OPS as f64
        });
        assert!(grew, "node {i}: applied index did not grow by the workload");
        assert!(applied(a) <= commit, "node {i}: applied past commit");
        assert!(value(a, "shardkv_storage_disk_bytes", &[]) > 0.0);
        let node = i.to_string();
        assert_eq!(
            value(
                a,
                "shardkv_node_info",
                &[("role", "kvnode"), ("group", "1")]
            ),
            1.0,
            "node {node}"
        );
    }
    let proposals: f64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| {
            value(a, "shardkv_raft_proposals_total", &[("kind", "command")])
                - value(b, "shardkv_raft_proposals_total", &[("kind", "command")])
        })
        .sum();
    assert!(proposals >= OPS as f64, "proposals grew by {proposals}");
    let reads = |scrapes: &[Scrape]| -> f64 {
        scrapes
            .iter()
            .map(|s| value(s, "shardkv_raft_reads_total", &[]))
            .sum()
    };
    assert!(reads(&after) - reads(&before) >= OPS as f64);

    // Ranges: the group's leader exports the load of its one range, the whole key
    // space, and its size once its heartbeat has counted it.
    let loaded = poll_until(WAIT, || {
        let s = scrape(&kv_addrs[leader_index(&kv_addrs)]);
        let full = [("start", ""), ("end", "")];
        value(&s, "shardkv_range_writes_per_second", &full) > 0.0
            && value(&s, "shardkv_range_reads_per_second", &full) > 0.0
    });
    assert!(loaded, "the leader exported no load for its range");
    let counted = poll_until(WAIT, || {
        let s = scrape(&kv_addrs[leader_index(&kv_addrs)]);
        value(&s, "shardkv_range_keys", &[]) == (OPS + 1) as f64
            && value(&s, "shardkv_range_size_bytes", &[]) > 0.0
    });
    assert!(
        counted,
        "the leader did not export its range's {} keys",
        OPS + 1
    );
    for (i, a) in kv_addrs.iter().enumerate() {
        if i != leader_index(&kv_addrs) {
            assert_eq!(
                value(&scrape(a), "shardkv_range_keys", &[]),
                0.0,
                "follower {i}"
            );
        }
    }

    // The shard master: one leader, its configuration, all three kvnodes up.
    let nodes_up = poll_until(WAIT, || {
        value(
            &scrape(&master_addr),
            "shardkv_shardmaster_nodes",
            &[("state", "up")],
        ) == 3.0
    });
    assert!(nodes_up, "the shard master did not report 3 kvnodes up");
    let sized = poll_until(WAIT, || {
        let s = scrape(&master_addr);
        let g1 = [("group", "1")];
        value(&s, "shardkv_shardmaster_group_ranges", &g1) == 1.0
            && value(&s, "shardkv_shardmaster_group_size_bytes", &g1) > 0.0
    });
    assert!(
        sized,
        "the shard master did not report group 1's range and bytes"
    );
    let master = scrape(&master_addr);
    assert!(value(&master, "shardkv_shardmaster_config_num", &[]) >= 1.0);
    assert_eq!(
        value(&master, "shardkv_raft_role", &[("role", "leader")]),
        1.0
    );
    assert!(
        value(
            &master,
            "shardkv_grpc_requests_total",
            &[
                ("service", "shardkv.v1.ShardMaster"),
                ("method", "Heartbeat")
            ]
        ) > 0.0
    );

    // The router counts its HTTP requests.
    let routed = |s: &Scrape, method| {
        value(
            s,
            "shardkv_http_requests_total",
            &[("method", method), ("code", "200")],
        )
    };
    assert!(routed(&router_after, "PUT") > routed(&router_before, "PUT"));
    assert!(routed(&router_after, "GET") > routed(&router_before, "GET"));
    assert!(
        !histogram_buckets(&router_after, "shardkv_http_request_duration_seconds", &[]).is_empty()
    );

    // Logs: every line is JSON; a replica's records carry node, group and term.
    for (i, proc) in kv_procs.iter().enumerate() {
        let records = json_records(proc.name(), &proc.log());
        assert!(!records.is_empty());
        for r in &records {
            assert_eq!(r.get("node"), Some(&serde_json::json!(i + 1)), "{r:?}");
            assert_eq!(r.get("group"), Some(&serde_json::json!(1)), "{r:?}");
            assert!(r.get("term").is_some_and(|t| t.is_u64()), "{r:?}");
            assert!(r.contains_key("msg") && r.contains_key("level") && r.contains_key("ts"));
        }
        // Once elected, records carry the term the replica is in.
        assert!(
            records
                .iter()
                .any(|r| r.get("term").and_then(|t| t.as_u64()) >= Some(1)),
            "{}: no record carries a term",
            proc.name()
        );
    }
    let master_log = json_records("master", &cluster.masters().proc(0).log());
    assert!(master_log
        .iter()
        .all(|r| r.get("group") == Some(&serde_json::json!(0))));
    let router_log = json_records("router", &router.log());
    assert!(router_log
        .iter()
        .all(|r| r.get("process") == Some(&serde_json::json!("router"))));
}

#[test]
fn a_bad_log_level_is_refused_by_name() {
    let out = std::process::Command::new(bin("kvnode"))
        .args(["--gid", "1", "--id", "1", "--data-dir", "/nonexistent"])
        .args(["--log-level", "loud"])
        .output()
        .expect("run kvnode");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'loud' for '--log-level"),
        "{err}"
    );
    assert!(err.contains("error, warn, info, debug, trace"), "{err}");
    let out = std::process::Command::new(bin("kvnode"))
        .args(["--gid", "1", "--id", "1", "--data-dir", "/nonexistent"])
        .env("SHARDKV_LOG", "loud")
        .output()
        .expect("run kvnode");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'loud' for '--log-level"),
        "{err}"
    );
}
