//! gRPC server plumbing shared by every server: reflection (v1 and v1alpha, which
//! grpcurl 1.8 speaks), grpc.health.v1, TLS and access control
//! ([`crate::security`]), the metrics layer, message limits and graceful shutdown.
//! (Logging: `src/logging.rs`.)

use crate::security::ServerSecurity;
use std::future::Future;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// Serves `routes` plus reflection and health on `listener` until `shutdown` resolves.
/// `services` are the fully-qualified names reported as SERVING by the health service;
/// reflection lists those of them that are public, membership and health.
/// `security` gives the TLS acceptor and the access policy every call is checked against.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    security: &ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in services {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection = || {
        let listed = services
            .iter()
            .copied()
            .filter(|s| crate::proto::PUBLIC_SERVICES.contains(s))
            .chain([
                "shardkv.v1.Membership",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]);
        listed.fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(name),
        )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // With a listener of our own, tonic ignores Server::tcp_nodelay: set it on the
    // incoming stream, or Nagle's algorithm adds ~40 ms to replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls() {
        builder = builder.tls_config(tls)?;
    }
    // Metrics outside the guard, so refused calls are counted too.
    builder
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(security.guard())
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
