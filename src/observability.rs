//! The flags every server takes for being watched: its log format and level. One
//! struct, flattened into each binary's command line.

use crate::logging::{self, LogFormat, LogLevel, Process};

/// Logging options of a server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ObservabilityArgs {
    /// How log records are written to stderr.
    #[arg(long, env = "SHARDKV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Terminal)]
    pub log_format: LogFormat,
    /// The least severe log records written.
    #[arg(long, env = "SHARDKV_LOG", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

impl ObservabilityArgs {
    /// The process's root logger.
    pub fn logger(&self, process: Process) -> slog::Logger {
        logging::logger(self.log_format, self.log_level, process)
    }
}
