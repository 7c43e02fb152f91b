//! The Rust client library (`shardkv::client::Client`) against real clusters: writes
//! stay exactly-once across a leader kill and a range migration, and scans stitch
//! ranges of several groups together in key order.

mod common;

use common::{wait_until, KvCluster, KvOptions};
use shardkv::client::{Client, ClientOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// Time for the writers to make progress between two disruptions.
const PROGRESS_WAIT: Duration = Duration::from_secs(60);

/// Counters to which writers append tokens with compare-and-swap: one per range of
/// the split at g, n and t.
const COUNTERS: [&str; 4] = ["a-count", "h-count", "p-count", "w-count"];

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn connect(cluster: &KvCluster, options: ClientOptions) -> Client {
    Client::connect_with(cluster.masters().addrs(), options)
        .await
        .expect("client connects")
}

/// What the writers saw.
#[derive(Default)]
struct Outcomes {
    /// Unique puts acknowledged: key -> value.
    puts_acked: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Puts that failed (outcome unknown).
    puts_unknown: BTreeSet<Vec<u8>>,
    /// Tokens whose compare-and-swap append was acknowledged, per counter.
    tokens_acked: HashMap<String, BTreeSet<String>>,
    /// Appends that failed (outcome unknown).
    tokens_unknown: HashMap<String, BTreeSet<String>>,
    /// Appends answered "not swapped" although the value already held the token: a
    /// retried write applied twice, or a lost reply turned into a failure.
    phantoms: Vec<String>,
    errors: Vec<String>,
}

/// Appends `token;` to `key` with a compare-and-swap loop. Ok(true): acknowledged.
async fn append(client: &Client, key: &str, token: &str, out: &Mutex<Outcomes>) -> bool {
    let mut current = match client.get(key.as_bytes()).await {
        Ok(v) => v,
        Err(e) => {
            out.lock().unwrap().errors.push(format!("get {key}: {e}"));
            return false;
        }
    };
    for _ in 0..1000 {
        let mut next = current.clone().unwrap_or_default();
        next.extend_from_slice(format!("{token};").as_bytes());
        match client
            .compare_and_swap(key.as_bytes(), current.as_deref(), Some(&next))
            .await
        {
            Ok(o) if o.swapped => return true,
            Ok(o) => {
                let holds = o
                    .current
                    .as_deref()
                    .is_some_and(|v| s(v).split(';').any(|t| t == token));
                if holds {
                    out.lock()
                        .unwrap()
                        .phantoms
                        .push(format!("{key}: {token} applied but answered not swapped"));
                    return false;
                }
                current = o.current;
            }
            Err(e) => {
                out.lock()
                    .unwrap()
                    .errors
                    .push(format!("cas {key} {token}: {e}"));
                return false;
            }
        }
    }
    out.lock()
        .unwrap()
        .errors
        .push(format!("cas {key} {token}: no swap in 1000 tries"));
    false
}

/// Writer `w`: alternates unique puts and appends until `stop`, counting acks.
async fn writer(
    w: usize,
    client: Client,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    out: Arc<Mutex<Outcomes>>,
) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        // Unique keys spread over every range (first letter a..z).
        let letter = (b'a' + ((w * 7 + i) % 26) as u8) as char;
        let key = format!("{letter}/u/{w}/{i:05}").into_bytes();
        let value = format!("value-{w}-{i}").into_bytes();
        match client.put(&key, &value).await {
            Ok(()) => {
                out.lock().unwrap().puts_acked.insert(key, value);
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let mut o = out.lock().unwrap();
                o.errors.push(format!("put {}: {e}", s(&key)));
                o.puts_unknown.insert(key);
            }
        }
        let counter = COUNTERS[(w + i) % COUNTERS.len()];
        let token = format!("{w}.{i}");
        if append(&client, counter, &token, &out).await {
            let mut o = out.lock().unwrap();
            o.tokens_acked
                .entry(counter.into())
                .or_default()
                .insert(token);
            acks.fetch_add(1, Ordering::Relaxed);
        } else {
            out.lock()
                .unwrap()
                .tokens_unknown
                .entry(counter.into())
                .or_default()
                .insert(token);
        }
        i += 1;
    }
}

/// Waits until `acks` has grown by `more` (the writers make progress).
async fn progress(acks: &AtomicU64, more: u64, what: &str) {
    let target = acks.load(Ordering::Relaxed) + more;
    assert!(
        wait_until(PROGRESS_WAIT, || async {
            acks.load(Ordering::Relaxed) >= target
        })
        .await,
        "writers made no progress {what}: {} acks, wanted {target}",
        acks.load(Ordering::Relaxed)
    );
}

/// Joins group 1, splits the key space at g, n and t, joins group 2 (which takes
/// half of the four ranges) and waits until both serve.
async fn split_in_four_over_two_groups(cluster: &KvCluster) -> shardkv::proto::Config {
    cluster.join(&[1]).await;
    let mut mc = cluster.master_client();
    for key in [&b"g"[..], b"n", b"t"] {
        mc.split(key).await.expect("split");
    }
    cluster.join(&[2]).await;
    cluster.wait_settled(SETTLE_WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_applied_exactly_once_across_a_leader_kill_and_a_migration() {
    let mut cluster = KvCluster::start(KvOptions::default());
    let config = split_in_four_over_two_groups(&cluster).await;
    let owners: BTreeSet<u64> = COUNTERS
        .iter()
        .map(|c| config.owner(c.as_bytes()).1)
        .collect();
    assert_eq!(
        owners.len(),
        2,
        "counters should span both groups: {config:?}"
    );

    // Generous deadlines: a call waits out an election or a transfer on a loaded machine.
    let options = ClientOptions {
        call_deadline: Duration::from_secs(45),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let out = Arc::new(Mutex::new(Outcomes::default()));
    let mut tasks = Vec::new();
    // Two clients (two write sessions), each shared by two tasks.
    for c in 0..2 {
        let client = connect(&cluster, options.clone()).await;
        for t in 0..2 {
            tasks.push(tokio::spawn(writer(
                c * 2 + t,
                client.clone(),
                stop.clone(),
                acks.clone(),
                out.clone(),
            )));
        }
    }
    progress(&acks, 20, "at the start").await;

    // 1. kill -9 a group's leader while writes are in flight, let the writers go on
    //    without it, bring it back; three times, alternating groups. A write the old
    //    leader committed but could not answer is retried at the new one.
    let first = config.owner(COUNTERS[0].as_bytes()).1;
    for round in 0..3u64 {
        let gid = if round % 2 == 0 { first } else { 3 - first };
        let leader = cluster.wait_leader(gid, Duration::from_secs(30)).await;
        cluster.kill9(gid, leader);
        progress(&acks, 15, &format!("after kill {round} (group {gid})")).await;
        cluster.restart(gid, leader);
        progress(&acks, 5, &format!("after restart {round}")).await;
    }

    // 2. Move the range of the second counter (with unique keys) to the other group,
    //    and kill -9 the destination's leader while the range is on its way.
    let moved = COUNTERS[1].as_bytes();
    let from = config.owner(moved).1;
    let to = 3 - from;
    let to_leader = cluster.wait_leader(to, Duration::from_secs(30)).await;
    cluster
        .master_client()
        .move_range(moved, to)
        .await
        .expect("move");
    cluster.kill9(to, to_leader);
    cluster.wait_settled(SETTLE_WAIT).await;
    progress(&acks, 20, "after the migration").await;

    // 3. Bring the node back; keep writing a little longer.
    cluster.restart(to, to_leader);
    progress(&acks, 10, "after the restart").await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer task");
    }
    let final_config = cluster.wait_settled(SETTLE_WAIT).await;
    assert_eq!(final_config.owner(moved).1, to);

    let out = std::mem::take(&mut *out.lock().unwrap());
    assert!(out.phantoms.is_empty(), "{:?}", out.phantoms);
    // Retries should hide every disruption within the call deadline.
    assert!(out.errors.is_empty(), "failed calls: {:?}", out.errors);
    let reader = connect(&cluster, ClientOptions::default()).await;

    // Every acknowledged unique put is there, once (a scan lists each key once, in order).
    let all = reader.scan(b"", b"", 0).await.expect("scan");
    let keys: Vec<&Vec<u8>> = all.iter().map(|(k, _)| k).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "scan not in strict key order"
    );
    let found: BTreeMap<Vec<u8>, Vec<u8>> = all
        .iter()
        .filter(|(k, _)| k.get(1..3) == Some(b"/u"))
        .cloned()
        .collect();
    for (k, v) in &out.puts_acked {
        assert_eq!(found.get(k), Some(v), "acknowledged put {} lost", s(k));
    }
    for k in found.keys() {
        assert!(
            out.puts_acked.contains_key(k) || out.puts_unknown.contains(k),
            "{} was never written",
            s(k)
        );
    }

    // Every acknowledged append is in its counter exactly once; nothing else is.
    let mut total = 0;
    for counter in COUNTERS {
        let value = reader
            .get(counter.as_bytes())
            .await
            .expect("get counter")
            .unwrap_or_default();
        let value = s(&value);
        let tokens: Vec<&str> = value.split(';').filter(|t| !t.is_empty()).collect();
        let mut seen = BTreeSet::new();
        for t in &tokens {
            assert!(
                seen.insert(*t),
                "{counter}: token {t} applied twice: {value}"
            );
        }
        let acked = out.tokens_acked.get(counter).cloned().unwrap_or_default();
        let unknown = out.tokens_unknown.get(counter).cloned().unwrap_or_default();
        for t in &acked {
            assert!(
                seen.contains(t.as_str()),
                "{counter}: acknowledged {t} lost"
            );
        }
        for t in &seen {
            assert!(
                acked.contains(*t) || unknown.contains(*t),
                "{counter}: {t} was never written"
            );
        }
        total += acked.len();
    }
    eprintln!(
        "{} puts and {total} appends acknowledged across three leader kills and a migration",
        out.puts_acked.len()
    );
}

#[tokio::test]
async fn scan_across_four_ranges_of_two_groups_is_complete_and_in_order() {
    let cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 2,
        replicas: 1,
        ..Default::default()
    });
    let config = split_in_four_over_two_groups(&cluster).await;
    assert!(config.ranges.len() >= 4, "{config:?}");
    let gids: BTreeSet<u64> = config.ranges.iter().map(|r| r.gid).collect();
    assert_eq!(gids, BTreeSet::from([1, 2]), "{config:?}");

    let client = connect(&cluster, ClientOptions::default()).await;
    // 260 keys over the whole alphabet, written concurrently, plus edge keys at the
    // range bounds.
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = (0..260)
        .map(|i| {
            let key = format!("{}{:03}", (b'a' + (i % 26) as u8) as char, i);
            (key.into_bytes(), format!("v{i}").into_bytes())
        })
        .collect();
    for edge in ["g", "n", "t", "f\u{7f}", "\u{1}", "zzzz"] {
        expected.insert(edge.as_bytes().to_vec(), b"edge".to_vec());
    }
    let puts = expected.iter().map(|(k, v)| client.put(k, v));
    for r in futures::future::join_all(puts).await {
        r.expect("put");
    }
    let want: Vec<(Vec<u8>, Vec<u8>)> = expected.clone().into_iter().collect();

    // Everything, in one call.
    assert_eq!(client.scan(b"", b"", 0).await.expect("scan"), want);
    // Small pages: many requests, each page stopping at range bounds.
    let small = connect(
        &cluster,
        ClientOptions {
            scan_page_size: 7,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(small.scan(b"", b"", 0).await.expect("scan"), want);
    let mut pages = 0;
    let mut paged = Vec::new();
    let mut scanner = client.scan_pages(b"", b"", 0).with_page_size(10);
    while let Some(page) = scanner.next_page().await.expect("page") {
        assert!(!page.is_empty() && page.len() <= 10);
        pages += 1;
        paged.extend(page);
    }
    assert_eq!(paged, want);
    assert!(pages >= want.len() / 10, "{pages} pages");
    // A bounded scan crossing three range bounds; the end is exclusive.
    let bounded: Vec<_> = want
        .iter()
        .filter(|(k, _)| k.as_slice() >= b"c".as_slice() && k.as_slice() < b"w".as_slice())
        .cloned()
        .collect();
    assert_eq!(small.scan(b"c", b"w", 0).await.expect("scan"), bounded);
    // A limit stops early, wherever it falls.
    assert_eq!(
        small.scan(b"c", b"w", 50).await.expect("scan"),
        bounded[..50].to_vec()
    );
    // An interval with no key in it; an empty one is refused.
    assert!(client.scan(b"m", b"m\0", 0).await.expect("scan").is_empty());
    assert!(matches!(
        client.scan(b"m", b"m", 0).await,
        Err(shardkv::client::Error::InvalidArgument { .. })
    ));
}

/// A client whose cached configuration still gives a range to a group that has
/// since left and been shut down (the scale-in of README's "Deploy") asks the shard
/// master again, rather than retrying the gone group's nodes until its deadline:
/// nothing else would ever tell it, since no node of that group answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_follows_a_range_whose_old_group_left_and_stopped() {
    let mut cluster = KvCluster::start(KvOptions {
        masters: 1,
        groups: 2,
        replicas: 1,
        ..Default::default()
    });
    cluster.join(&[1]).await;
    let client = connect(
        &cluster,
        ClientOptions {
            call_deadline: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
    .await;
    client.put(b"apple", b"red").await.expect("put in group 1");
    assert_eq!(client.config().owner(b"apple").1, 1);

    // Group 2 takes everything over; the client hears nothing of it.
    cluster.join(&[2]).await;
    let mut masters = cluster.master_client();
    masters.leave(vec![1]).await.expect("group 1 leaves");
    cluster.wait_settled(SETTLE_WAIT).await;
    cluster.kill9_group(1);
    assert_eq!(client.config().owner(b"apple").1, 1, "the cache is stale");

    let value = client.get(b"apple").await.expect("get after group 1 left");
    assert_eq!(value.as_deref(), Some(&b"red"[..]));
    assert_eq!(client.config().owner(b"apple").1, 2);
}
