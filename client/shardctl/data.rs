//! Data commands: read and write keys through the client library.

//!
//! Keys and values are bytes. Arguments are taken byte for byte as the shell passes
//! them (`shardctl get $'\xff'` works); output is exact where a program reads it
//! (`get --raw`, `get --value-file`, JSON with base64 for bytes that are not UTF-8)
//! and escaped where a person reads it (tables: `\n`, `\xff`).

use crate::output::{escaped, insert_bytes, print_json, Output};
use crate::Ctx;
use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
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
    /// Print the pairs with keys in [START, END) in key order, one per line: key, a
    /// tab, the value, with newlines, tabs, backslashes and bytes that are not UTF-8
    /// escaped (\n, \t, \\, \xff); `--output json` gives the exact bytes.
    Scan(ScanArgs),
    /// Compare and swap: change KEY only if it has the expected value (exit status 1
    /// if it did not).
    Cas(CasArgs),
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// The key (any bytes the shell passes, e.g. $'\xff\x00k').
    key: OsString,
    /// Write the value's bytes to stdout exactly as stored, with no newline added
    /// (like `etcdctl get --print-value-only` and `redis-cli --raw`).
    #[arg(long, conflicts_with = "value_file")]
    raw: bool,
    /// Write the value to this file, byte for byte, instead of printing it.
    #[arg(long, value_name = "PATH")]
    value_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key (any bytes the shell passes).
    key: OsString,
    /// The value (any bytes the shell passes).
    #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
    value: Option<OsString>,
    /// Read the value from this file ("-" for stdin), byte for byte.
    #[arg(long, value_name = "PATH")]
    value_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The key (any bytes the shell passes).
    key: OsString,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// First key (inclusive); default: the beginning of the key space.
    #[arg(default_value = "")]
    start: OsString,
    /// End key (exclusive); default: the end of the key space.
    #[arg(default_value = "")]
    end: OsString,
    /// At most this many pairs, at least 1 (leave it out for all of them).
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    limit: Option<usize>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("expect").required(true).args(["expected", "expect_absent"])))]
#[command(group(ArgGroup::new("new").required(true).args(["value", "delete"])))]
pub struct CasArgs {
    /// The key (any bytes the shell passes).
    key: OsString,
    /// The value the key must have.
    #[arg(long, value_name = "V")]
    expected: Option<OsString>,
    /// The key must not exist.
    #[arg(long)]
    expect_absent: bool,
    /// The value to set.
    #[arg(long, value_name = "V")]
    value: Option<OsString>,
    /// Delete the key instead.
    #[arg(long)]
    delete: bool,
}

/// `--limit`: a positive count (0 is refused rather than read as "no limit").
fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (leave --limit out for every pair)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

/// The bytes of a command-line argument, as the shell passed them.
fn bytes(arg: &OsStr) -> &[u8] {
    arg.as_bytes()
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    let json = ctx.output() == Output::Json;
    if let Command::Get(a) = &command {
        anyhow::ensure!(
            !(json && a.raw),
            "--raw and --output json cannot be used together: JSON carries the value \
             (base64 when it is not UTF-8)"
        );
    }
    let client = ctx.client().await?;
    match command {
        Command::Get(a) => {
            let key = bytes(&a.key);
            let value = client.get(key).await?;
            if json {
                let mut doc = serde_json::Map::new();
                insert_bytes(&mut doc, "key", key);
                doc.insert("found".into(), value.is_some().into());
                if let Some(v) = &value {
                    insert_bytes(&mut doc, "value", v);
                }
                print_json(&doc)?;
            }
            let Some(v) = value else {
                eprintln!("not found: {}", escaped(key));
                return Ok(ExitCode::from(1));
            };
            if let Some(path) = &a.value_file {
                std::fs::write(path, &v)
                    .with_context(|| format!("--value-file {}: cannot write", path.display()))?;
            } else if a.raw {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                out.flush()?;
            } else if !json {
                outln!("{}", escaped(&v));
                if std::str::from_utf8(&v).is_err() {
                    eprintln!("(the value is not UTF-8: shown escaped; --raw prints its bytes)");
                }
            }
        }
        Command::Put(a) => {
            let key = bytes(&a.key);
            let value = match (&a.value, &a.value_file) {
                (Some(v), _) => bytes(v).to_vec(),
                (None, Some(path)) => read_value(path)?,
                (None, None) => unreachable!("clap requires one"),
            };
            client.put(key, &value).await?;
            if json {
                let mut doc = serde_json::Map::new();
                insert_bytes(&mut doc, "key", key);
                doc.insert("ok".into(), true.into());
                print_json(&doc)?;
            } else {
                outln!("OK");
            }
        }
        Command::Delete(a) => {
            let key = bytes(&a.key);
            let existed = client.delete(key).await?;
            if json {
                let mut doc = serde_json::Map::new();
                insert_bytes(&mut doc, "key", key);
                doc.insert("existed".into(), existed.into());
                print_json(&doc)?;
            } else if existed {
                outln!("deleted");
            } else {
                outln!("not found (nothing to delete)");
            }
        }
        Command::Scan(a) => scan(&client, a, json).await?,
        Command::Cas(a) => {
            let key = bytes(&a.key);
            let expected = a.expected.as_deref().map(bytes);
            let new = a.value.as_deref().map(bytes);
            let outcome = client.compare_and_swap(key, expected, new).await?;
            if json {
                let mut doc = serde_json::Map::new();
                insert_bytes(&mut doc, "key", key);
                doc.insert("swapped".into(), outcome.swapped.into());
                match &outcome.current {
                    Some(v) => insert_bytes(&mut doc, "current", v),
                    None => {
                        doc.insert("current".into(), serde_json::Value::Null);
                    }
                }
                print_json(&doc)?;
            } else {
                let now = match &outcome.current {
                    Some(v) => format!("\"{}\" is \"{}\"", escaped(key), escaped(v)),
                    None => format!("\"{}\" does not exist", escaped(key)),
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
    // 0 means "no limit" to the library.
    let mut scanner = client.scan_pages(bytes(&a.start), bytes(&a.end), a.limit.unwrap_or(0));
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
                    let mut pair = serde_json::Map::new();
                    insert_bytes(&mut pair, "key", &k);
                    insert_bytes(&mut pair, "value", &v);
                    write!(out, "{sep}{}", serde_json::to_string(&pair)?)?;
                } else {
                    writeln!(out, "{}\t{}", escaped(&k), escaped(&v))?;
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
