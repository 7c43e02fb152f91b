//! `shardctl router`: the HTTP entry point of the original system. `PUT`, `GET` and
//! `DELETE /keys/{key}` with plain-text bodies, routed through the client library (so
//! it follows leader changes and range moves), logging which group each key went to.

use crate::client::{Client, Error};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use slog::{info, warn, Logger};
use std::sync::Arc;

/// Options of the HTTP router.
#[derive(clap::Args, Debug, Clone)]
pub struct RouterOptions {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Largest request body (value) accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

/// Keys longer than this are shortened in the log.
const LOGGED_KEY_CHARS: usize = 64;

/// `key` as it appears in the log: whole if short, else its start and its length.
fn shown(key: &str) -> String {
    if key.chars().count() <= LOGGED_KEY_CHARS {
        return key.to_owned();
    }
    let start: String = key.chars().take(LOGGED_KEY_CHARS).collect();
    format!("{start}... ({} bytes)", key.len())
}

struct Gateway {
    client: Client,
    logger: Logger,
}

impl Gateway {
    /// The group that owns `key` in the client's current configuration, for the log.
    fn group_of(&self, key: &str) -> u64 {
        self.client.config().owner(key.as_bytes()).1
    }

    fn error(&self, method: &str, key: &str, e: Error) -> Response {
        let status = match &e {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        warn!(self.logger, "request failed"; "method" => method, "key" => shown(key), "error" => %e);
        (status, format!("{e}\n")).into_response()
    }
}

async fn get_key(State(gw): State<Arc<Gateway>>, Path(key): Path<String>) -> Response {
    match gw.client.get(key.as_bytes()).await {
        Ok(Some(value)) => {
            info!(gw.logger, "GET"; "key" => shown(&key), "group" => gw.group_of(&key));
            (StatusCode::OK, value).into_response()
        }
        Ok(None) => {
            info!(gw.logger, "GET (not found)"; "key" => shown(&key), "group" => gw.group_of(&key));
            (StatusCode::NOT_FOUND, "key not found\n").into_response()
        }
        Err(e) => gw.error("GET", &key, e),
    }
}

async fn put_key(State(gw): State<Arc<Gateway>>, Path(key): Path<String>, body: Bytes) -> Response {
    match gw.client.put(key.as_bytes(), &body).await {
        Ok(()) => {
            info!(gw.logger, "PUT"; "key" => shown(&key), "bytes" => body.len(), "group" => gw.group_of(&key));
            (StatusCode::OK, "OK\n").into_response()
        }
        Err(e) => gw.error("PUT", &key, e),
    }
}

async fn delete_key(State(gw): State<Arc<Gateway>>, Path(key): Path<String>) -> Response {
    match gw.client.delete(key.as_bytes()).await {
        Ok(true) => {
            info!(gw.logger, "DELETE"; "key" => shown(&key), "group" => gw.group_of(&key));
            (StatusCode::OK, "OK\n").into_response()
        }
        Ok(false) => (StatusCode::NOT_FOUND, "key not found\n").into_response(),
        Err(e) => gw.error("DELETE", &key, e),
    }
}

/// `/keys/` (and `/keys`): a request for the empty key, which cannot exist. Without
/// this route axum would answer 404, which reads as "no such key" to a curl user.
async fn empty_key() -> Response {
    (StatusCode::BAD_REQUEST, "key must not be empty\n").into_response()
}

/// Serves the HTTP router until Ctrl-C or SIGTERM.
pub async fn run(client: Client, options: RouterOptions, logger: Logger) -> anyhow::Result<()> {
    let gateway = Arc::new(Gateway { client, logger });
    let app = Router::new()
        .route("/keys/{key}", get(get_key).put(put_key).delete(delete_key))
        .route("/keys/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/keys", get(empty_key).put(empty_key).delete(empty_key))
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(gateway.clone());
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    info!(gateway.logger, "HTTP router serving"; "listen" => &options.listen);
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::server::shutdown_signal())
        .await?;
    Ok(())
}
