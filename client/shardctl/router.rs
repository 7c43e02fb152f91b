//! `shardctl router`: the HTTP entry point of the original system. `PUT`, `GET` and
//! `DELETE /keys/{key}` with plain-text bodies, routed through the client library (so
//! it follows leader changes and range moves), logging which group each key went to.
//! The key is the rest of the path, slashes included (`/keys/a/b` is the key `a/b`).
//!
//! The router listens at once, also while the cluster cannot be reached: until it
//! can, requests are answered 503 with the reason, and it keeps trying.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use backon::Retryable;
use shardkv::client::retry::backoff;
use shardkv::client::{Client, ClientOptions, Error};
use slog::{info, warn, Logger};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options of the HTTP router.
#[derive(clap::Args, Debug, Clone)]
pub struct RouterOptions {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Largest request body (value) accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub observability: shardkv::observability::ObservabilityArgs,
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
    /// Set once the cluster has been reached.
    client: tokio::sync::OnceCell<Client>,
    /// Why the cluster cannot be reached yet, for the 503 answers until then.
    not_ready: Mutex<String>,
    max_body_bytes: usize,
    logger: Logger,
}

impl Gateway {
    /// The answer while the cluster has not been reached: 503 and why.
    fn not_ready(&self) -> Response {
        let why = self.not_ready.lock().expect("not_ready lock").clone();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the router cannot reach the cluster yet: {why}\n"),
        )
            .into_response()
    }

    /// Connects to the cluster, retrying until it answers.
    async fn connect(&self, masters: Vec<String>, options: ClientOptions) {
        let attempt = || Client::connect_with(&masters, options.clone());
        let client = attempt
            .retry(backoff().with_max_delay(Duration::from_secs(2)))
            .notify(|e, _| {
                *self.not_ready.lock().expect("not_ready lock") = format!("{e:#}");
                warn!(self.logger, "waiting for the cluster"; "error" => %e);
            })
            .await
            .expect("retried without end");
        info!(self.logger, "cluster reached"; "config" => client.config().num);
        let _ = self.client.set(client);
    }

    /// The group that owns `key` in the client's current configuration, for the log.
    fn group_of(&self, client: &Client, key: &str) -> u64 {
        client.config().owner(key.as_bytes()).1
    }

    fn error(&self, method: &str, key: &str, e: Error) -> Response {
        let status = match &e {
            Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            // A data call is refused only by the shard master (its configuration).
            Error::Refused(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        warn!(self.logger, "request failed"; "method" => method, "key" => shown(key), "error" => %e);
        (status, format!("{e}\n")).into_response()
    }

    /// The answer to a body that could not be read: for one over the limit, the
    /// limit in the words the CLI uses.
    fn body_error(&self, headers: &HeaderMap, rejection: BytesRejection) -> Response {
        if rejection.status() != StatusCode::PAYLOAD_TOO_LARGE {
            return rejection.into_response();
        }
        let size = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .map(|n| format!("is {n} bytes, "))
            .unwrap_or_default();
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "value: {size}larger than {} bytes (the router's --max-body-bytes)\n",
                self.max_body_bytes
            ),
        )
            .into_response()
    }
}

async fn get_key(State(gw): State<Arc<Gateway>>, Path(key): Path<String>) -> Response {
    let Some(client) = gw.client.get() else {
        return gw.not_ready();
    };
    match client.get(key.as_bytes()).await {
        Ok(Some(value)) => {
            info!(gw.logger, "GET"; "key" => shown(&key), "group" => gw.group_of(client, &key));
            (StatusCode::OK, value).into_response()
        }
        Ok(None) => {
            info!(gw.logger, "GET (not found)"; "key" => shown(&key), "group" => gw.group_of(client, &key));
            (StatusCode::NOT_FOUND, "key not found\n").into_response()
        }
        Err(e) => gw.error("GET", &key, e),
    }
}

async fn put_key(
    State(gw): State<Arc<Gateway>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return gw.body_error(&headers, rejection),
    };
    let Some(client) = gw.client.get() else {
        return gw.not_ready();
    };
    match client.put(key.as_bytes(), &body).await {
        Ok(()) => {
            info!(gw.logger, "PUT"; "key" => shown(&key), "bytes" => body.len(), "group" => gw.group_of(client, &key));
            (StatusCode::OK, "OK\n").into_response()
        }
        Err(e) => gw.error("PUT", &key, e),
    }
}

async fn delete_key(State(gw): State<Arc<Gateway>>, Path(key): Path<String>) -> Response {
    let Some(client) = gw.client.get() else {
        return gw.not_ready();
    };
    match client.delete(key.as_bytes()).await {
        Ok(true) => {
            info!(gw.logger, "DELETE"; "key" => shown(&key), "group" => gw.group_of(client, &key));
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

/// Serves the HTTP router until Ctrl-C or SIGTERM: listens at once, and connects to
/// the shard masters at `masters` in the background.
pub async fn run(
    masters: Vec<String>,
    client_options: ClientOptions,
    options: RouterOptions,
    logger: Logger,
) -> anyhow::Result<()> {
    let gateway = Arc::new(Gateway {
        client: tokio::sync::OnceCell::new(),
        not_ready: Mutex::new("connecting to the shard master".into()),
        max_body_bytes: options.max_body_bytes,
        logger,
    });
    let app = Router::new()
        // `{*key}`: the rest of the path, so keys may contain `/`.
        .route("/keys/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/keys/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/keys", get(empty_key).put(empty_key).delete(empty_key))
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(axum::middleware::from_fn(shardkv::metrics::http_middleware))
        .with_state(gateway.clone());
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    info!(gateway.logger, "HTTP router serving"; "listen" => &options.listen);
    let connecting = {
        let gateway = gateway.clone();
        tokio::spawn(async move { gateway.connect(masters, client_options).await })
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shardkv::server::shutdown_signal())
        .await;
    connecting.abort();
    Ok(served?)
}
