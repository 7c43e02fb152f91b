//! A tour of the shardkv client library: put, get, compare-and-swap, delete and scan.
//!
//! Start a cluster (three shard masters and at least one joined group; see
//! `shardctl --help`), then run, with the shard masters as arguments or in
//! SHARDKV_MASTERS (default 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003):
//!
//! ```text
//! cargo run --example client -- 127.0.0.1:7001 127.0.0.1:7002 127.0.0.1:7003
//! SHARDKV_MASTERS=127.0.0.1:7001,127.0.0.1:7002 cargo run --example client
//! ```
//!
//! It writes keys under the prefix `example/` and deletes them again.

use futures::StreamExt;
use shardkv::client::{Client, ClientOptions, Error};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut masters: Vec<String> = std::env::args().skip(1).collect();
    if masters.is_empty() {
        masters = std::env::var("SHARDKV_MASTERS")
            .unwrap_or_else(|_| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into())
            .split(',')
            .map(str::to_owned)
            .collect();
    }

    // Each call (retries included) gives up after 5 s.
    let options = ClientOptions {
        call_deadline: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&masters, options).await?;
    println!(
        "connected; configuration {} has {} group(s)",
        client.config().num,
        client.config().groups.len()
    );

    // Writes from many tasks at once: the client is cheap to clone.
    let fruits = ["apple", "banana", "cherry", "mango", "peach", "zucchini"];
    let mut tasks = Vec::new();
    for (i, fruit) in fruits.iter().enumerate() {
        let client = client.clone();
        let key = format!("example/{fruit}");
        tasks.push(tokio::spawn(async move {
            client.put(key.as_bytes(), format!("{i}").as_bytes()).await
        }));
    }
    for task in tasks {
        task.await??;
    }

    let value = client.get(b"example/apple").await?;
    println!(
        "example/apple = {:?}",
        value.as_deref().map(String::from_utf8_lossy)
    );

    // Compare-and-swap: only changes the key if it still holds "0".
    let outcome = client
        .compare_and_swap(b"example/apple", Some(b"0"), Some(b"green"))
        .await?;
    println!(
        "cas swapped: {}, now {:?}",
        outcome.swapped,
        outcome.current.as_deref().map(String::from_utf8_lossy)
    );

    // A scan across ranges and groups, in key order.
    for (key, value) in client.scan(b"example/", b"example0", 0).await? {
        println!(
            "  {} = {}",
            String::from_utf8_lossy(&key),
            String::from_utf8_lossy(&value)
        );
    }

    // The same, as a stream of bounded pages.
    let mut pages = client
        .scan_pages(b"example/", b"example0", 0)
        .with_page_size(2)
        .into_stream()
        .boxed();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        n += page?.len();
    }
    println!("streamed {n} pairs in pages of at most 2");

    // Typed errors say what went wrong.
    match client.get(b"").await {
        Err(Error::InvalidArgument { field, reason, .. }) => {
            println!("an empty key is refused: {field}: {reason}")
        }
        other => println!("unexpected: {other:?}"),
    }

    for fruit in fruits {
        client.delete(format!("example/{fruit}").as_bytes()).await?;
    }
    println!("cleaned up");
    Ok(())
}
