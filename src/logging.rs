//! Process logs: terminal or JSON records (`--log-format`), filtered by level
//! (`--log-level` or `SHARDKV_LOG`), every record of a replica process carrying its
//! kind (`process`: kvnode, shardmaster), node id, group and current Raft term, so records from many processes can be
//! merged and filtered without parsing messages.

use slog::Drain;
use std::sync::atomic::{AtomicU64, Ordering};

/// How records are written to stderr.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per record, coloured on a terminal.
    #[default]
    Terminal,
    /// One JSON object per line (`ts`, `level`, `msg` and every key-value pair),
    /// for log shippers.
    Json,
}

/// The least severe records written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for slog::Level {
    fn from(level: LogLevel) -> slog::Level {
        match level {
            LogLevel::Error => slog::Level::Error,
            LogLevel::Warn => slog::Level::Warning,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Trace => slog::Level::Trace,
        }
    }
}

/// Which process writes the log, for the keys every record carries.
#[derive(Debug, Clone, Copy)]
pub enum Process {
    /// A Raft replica: a shard master (group 0) or a kvnode.
    Replica {
        role: &'static str,
        group: u64,
        node: u64,
    },
    /// A process that is no replica (the HTTP router).
    Other { role: &'static str },
}

impl Process {
    pub fn role(&self) -> &'static str {
        match self {
            Process::Replica { role, .. } | Process::Other { role } => role,
        }
    }
}

/// The Raft term of this process's replica, for the `term` key of its records.
/// Process-wide because a process runs one replica; the driver keeps it current.
static TERM: AtomicU64 = AtomicU64::new(0);

/// Records `term` as the one later records carry (called by the replica driver).
pub fn set_term(term: u64) {
    TERM.store(term, Ordering::Relaxed);
}

/// A logger writing `format` records at `level` and above to stderr. Records are
/// formatted on a background thread (slog-async), so a slow stderr does not stall
/// the Raft loop.
pub fn logger(format: LogFormat, level: LogLevel, process: Process) -> slog::Logger {
    let drain = match format {
        LogFormat::Terminal => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            async_drain(slog_term::FullFormat::new(decorator).build().fuse(), level)
        }
        LogFormat::Json => async_drain(
            slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse(),
            level,
        ),
    };
    let root = slog::Logger::root(drain, slog::o!());
    match process {
        Process::Replica { role, group, node } => root.new(slog::o!(
            "process" => role,
            "group" => group,
            "node" => node,
            "term" => slog::FnValue(|_: &slog::Record| TERM.load(Ordering::Relaxed)),
        )),
        Process::Other { role } => root.new(slog::o!("process" => role)),
    }
}

fn async_drain<D>(drain: D, level: LogLevel) -> slog::Fuse<slog::LevelFilter<slog_async::Async>>
where
    D: Drain<Ok = (), Err = slog::Never> + Send + 'static,
{
    slog_async::Async::new(drain)
        .build()
        .filter_level(level.into())
        .fuse()
}
