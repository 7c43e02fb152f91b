//! The flags every server takes for being watched: its metrics endpoint, log format
//! and log level. One struct, flattened into each binary's command line.

use crate::logging::{self, LogFormat, LogLevel, Process};
use std::net::SocketAddr;

/// Metrics and logging options of a server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ObservabilityArgs {
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (off unless given;
    /// port 0 picks a free port, which the log reports).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// How log records are written to stderr.
    #[arg(long, env = "SHARDKV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Terminal)]
    pub log_format: LogFormat,
    /// The least severe log records written.
    #[arg(long, env = "SHARDKV_LOG", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

impl ObservabilityArgs {
    /// The process's root logger; also starts the metrics endpoint if asked for.
    /// Call inside the Tokio runtime.
    pub async fn start(&self, process: Process) -> anyhow::Result<slog::Logger> {
        let logger = logging::logger(self.log_format, self.log_level, process);
        crate::metrics::metrics().set_process(process);
        if let Some(addr) = self.metrics_listen {
            let bound = crate::metrics::serve(addr, process.role()).await?;
            slog::info!(logger, "serving metrics"; "metrics_listen" => %bound);
        }
        Ok(logger)
    }
}
