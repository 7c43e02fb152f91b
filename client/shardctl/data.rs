//! Data commands: read and write keys through the client library.

use crate::output::{print_json, text, Output};
use crate::Ctx;
use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the value of KEY (exit status 1 if it does not exist).
    Get(GetArgs),
    /// Set KEY to VALUE (or to the contents of --value-file).
    Put(PutArgs),
    /// Delete KEY (says whether it existed).
    Delete(DeleteArgs),
    /// Print the pairs with keys in [START, END) in key order.
    Scan(ScanArgs),
    /// Compare and swap: change KEY only if it has the expected value (exit status 1
    /// if it did not).
    Cas(CasArgs),
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// The key (UTF-8).
    key: String,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key (UTF-8).
    key: String,
    /// The value (UTF-8).
    #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
    value: Option<String>,
    /// Read the value from this file ("-" for stdin), byte for byte.
    #[arg(long, value_name = "PATH")]
    value_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The key (UTF-8).
    key: String,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// First key (inclusive); default: the beginning of the key space.
    #[arg(default_value = "")]
    start: String,
    /// End key (exclusive); default: the end of the key space.
    #[arg(default_value = "")]
    end: String,
    /// At most this many pairs (default: all of them).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("expect").required(true).args(["expected", "expect_absent"])))]
#[command(group(ArgGroup::new("new").required(true).args(["value", "delete"])))]
pub struct CasArgs {
    /// The key (UTF-8).
    key: String,
    /// The value the key must have.
    #[arg(long, value_name = "V")]
    expected: Option<String>,
    /// The key must not exist.
    #[arg(long)]
    expect_absent: bool,
    /// The value to set.
    #[arg(long, value_name = "V")]
    value: Option<String>,
    /// Delete the key instead.
    #[arg(long)]
    delete: bool,
}

#[derive(Serialize)]
struct ValueJson {
    key: String,
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

#[derive(Serialize)]
struct PairJson {
    key: String,
    value: String,
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    let client = ctx.client().await?;
    let json = ctx.output() == Output::Json;
    match command {
        Command::Get(a) => {
            let value = client.get(a.key.as_bytes()).await?;
            if json {
                print_json(&ValueJson {
                    key: a.key.clone(),
                    found: value.is_some(),
                    value: value.as_deref().map(text),
                })?;
            }
            match value {
                Some(v) => {
                    if !json {
                        outln!("{}", text(&v));
                    }
                }
                None => {
                    eprintln!("not found: {:?}", a.key);
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Put(a) => {
            let value = match (&a.value, &a.value_file) {
                (Some(v), _) => v.clone().into_bytes(),
                (None, Some(path)) => read_value(path)?,
                (None, None) => unreachable!("clap requires one"),
            };
            client.put(a.key.as_bytes(), &value).await?;
            if json {
                print_json(&serde_json::json!({ "key": a.key, "ok": true }))?;
            } else {
                outln!("OK");
            }
        }
        Command::Delete(a) => {
            let existed = client.delete(a.key.as_bytes()).await?;
            if json {
                print_json(&serde_json::json!({ "key": a.key, "existed": existed }))?;
            } else if existed {
                outln!("deleted");
            } else {
                outln!("not found (nothing to delete)");
            }
        }
        Command::Scan(a) => scan(&client, a, json).await?,
        Command::Cas(a) => {
            let expected = a.expected.as_ref().map(|s| s.as_bytes());
            let new = a.value.as_ref().map(|s| s.as_bytes());
            let outcome = client
                .compare_and_swap(a.key.as_bytes(), expected, new)
                .await?;
            if json {
                print_json(&serde_json::json!({
                    "key": a.key,
                    "swapped": outcome.swapped,
                    "current": outcome.current.as_deref().map(text),
                }))?;
            } else {
                let now = match &outcome.current {
                    Some(v) => format!("{:?} is {:?}", a.key, text(v)),
                    None => format!("{:?} does not exist", a.key),
                };
                if outcome.swapped {
                    outln!("swapped: {now}");
                } else {
                    outln!("not swapped: {now}");
                }
            }
            if !outcome.swapped {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_value(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::stdin()
            .read_to_end(&mut v)
            .context("--value-file -: cannot read stdin")?;
        return Ok(v);
    }
    std::fs::read(path).with_context(|| format!("--value-file {}: cannot read", path.display()))
}

/// Prints the pairs page by page as they arrive (memory stays bounded).
async fn scan(client: &shardkv::client::Client, a: ScanArgs, json: bool) -> anyhow::Result<()> {
    let mut scanner = client.scan_pages(a.start.as_bytes(), a.end.as_bytes(), a.limit.unwrap_or(0));
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut count = 0usize;
    if json {
        write!(out, "[")?;
    }
    let result = async {
        while let Some(page) = scanner.next_page().await? {
            for (k, v) in page {
                if json {
                    let sep = if count == 0 { "\n  " } else { ",\n  " };
                    let pair = PairJson {
                        key: text(&k),
                        value: text(&v),
                    };
                    write!(out, "{sep}{}", serde_json::to_string(&pair)?)?;
                } else {
                    writeln!(out, "{}\t{}", text(&k), text(&v))?;
                }
                count += 1;
            }
            out.flush()?;
        }
        anyhow::Ok(())
    }
    .await;
    if json {
        writeln!(out, "{}]", if count == 0 { "" } else { "\n" })?;
    }
    out.flush()?;
    result?;
    if !json && std::io::stdout().is_terminal() {
        eprintln!("({count} pairs)");
    }
    Ok(())
}
