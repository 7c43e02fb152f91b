//! Access control: every RPC path has one [`Class`] in [`POLICY`], and the
//! [`GuardLayer`] in front of each gRPC server checks the caller's credential (its
//! verified client certificate's role, or a bearer token) against that class before
//! the call reaches a handler, so a refused call changes nothing.

use futures::future::{ready, Either, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// What an RPC may do, and so who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reads and writes of keys and configurations: with `--data-token-file`, the data
    /// or admin token, or a CA-signed client certificate.
    Data,
    /// Changes to the cluster's shape (groups, ranges, members, leaders): an admin
    /// certificate or the admin token, once either is configured.
    Admin,
    /// Between servers (Raft, range transfers, heartbeats, move reports): under
    /// `--client-cert-auth`, a certificate with OU=server.
    Internal,
}

/// Every RPC of `proto/shardkv` and its class. An RPC missing here is refused
/// (a unit test checks that every RPC of the proto is listed).
pub const POLICY: &[(&str, Class)] = &[
    ("/shardkv.v1.ShardMaster/Join", Class::Admin),
    ("/shardkv.v1.ShardMaster/Leave", Class::Admin),
    ("/shardkv.v1.ShardMaster/Move", Class::Admin),
    ("/shardkv.v1.ShardMaster/Split", Class::Admin),
    ("/shardkv.v1.ShardMaster/AddNode", Class::Admin),
    ("/shardkv.v1.ShardMaster/RemoveNode", Class::Admin),
    ("/shardkv.v1.ShardMaster/CancelMove", Class::Admin),
    // The placement scheduler's settings are admin; reading them and the history is not.
    ("/shardkv.v1.ShardMaster/SetScheduler", Class::Admin),
    ("/shardkv.v1.ShardMaster/Scheduler", Class::Data),
    ("/shardkv.v1.ShardMaster/Query", Class::Data),
    ("/shardkv.v1.ShardMaster/Status", Class::Data),
    ("/shardkv.v1.ShardMaster/FinishMove", Class::Internal),
    ("/shardkv.v1.ShardMaster/ReportMove", Class::Internal),
    ("/shardkv.v1.ShardMaster/Heartbeat", Class::Internal),
    ("/shardkv.v1.Kv/Get", Class::Data),
    ("/shardkv.v1.Kv/Put", Class::Data),
    ("/shardkv.v1.Kv/Delete", Class::Data),
    ("/shardkv.v1.Kv/Scan", Class::Data),
    ("/shardkv.v1.Kv/CompareAndSwap", Class::Data),
    ("/shardkv.v1.Kv/Batch", Class::Data),
    ("/shardkv.v1.Kv/NodeStatus", Class::Data),
    ("/shardkv.internal.v1.RangeTransfer/Pull", Class::Internal),
    (
        "/shardkv.internal.v1.RangeTransfer/Release",
        Class::Internal,
    ),
    (
        "/shardkv.internal.v1.RangeTransfer/CopyRange",
        Class::Internal,
    ),
    (
        "/shardkv.internal.v1.RangeTransfer/PullDeltas",
        Class::Internal,
    ),
    (
        "/shardkv.internal.v1.RangeTransfer/FreezeMove",
        Class::Internal,
    ),
    ("/shardkv.v1.Membership/AddMember", Class::Admin),
    ("/shardkv.v1.Membership/RemoveMember", Class::Admin),
    ("/shardkv.v1.Membership/TransferLeader", Class::Admin),
    ("/shardkv.internal.v1.Raft/Send", Class::Internal),
    ("/shardkv.internal.v1.Raft/InstallSnapshot", Class::Internal),
    // Test only (served under --enable-fault-injection): it cuts a node's links.
    ("/shardkv.testing.v1.Faults/SetFaults", Class::Admin),
    ("/shardkv.testing.v1.Faults/ClearFaults", Class::Admin),
    ("/shardkv.testing.v1.Faults/GetFaults", Class::Admin),
];

/// Services open to anyone who completes the handshake: health checks and
/// reflection (which describes the API, not the data).
const PUBLIC_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The class of the RPC at `path`; `None` for a public service.
fn class_of(path: &str) -> Result<Option<Class>, Status> {
    if PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Ok(None);
    }
    POLICY
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, class)| Some(*class))
        .ok_or_else(|| Status::permission_denied(format!("{path} is not in the access policy")))
}

/// A certificate's role: its subject's organizational unit (OU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May call admin and data RPCs.
    Admin,
    /// A kvnode or shard master: internal and data RPCs.
    Server,
    /// A client: data RPCs.
    Data,
}

impl Role {
    /// The OU that names this role in a certificate.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Server => "server",
            Role::Data => "data",
        }
    }

    /// The role of the DER certificate `der`: its first OU that names one.
    pub fn of_certificate(der: &[u8]) -> Option<Role> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        // Bound first: the iterator borrows `cert`.
        let role = cert
            .subject()
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok())
            .find_map(|ou| {
                [Role::Admin, Role::Server, Role::Data]
                    .into_iter()
                    .find(|r| ou.eq_ignore_ascii_case(r.ou()))
            });
        role
    }
}

/// A secret compared in constant time, so timing does not reveal how much of a
/// guess was right (only whether its length was).
struct Token(Vec<u8>);

impl Token {
    fn matches(&self, given: &[u8]) -> bool {
        self.0.as_slice().ct_eq(given).into()
    }
}

/// What the caller of one RPC showed.
struct Caller<'a> {
    /// Some if it presented a certificate (the handshake verified it against the CA);
    /// the inner `None` is a certificate naming no role.
    cert: Option<Option<Role>>,
    /// The bearer token it sent.
    token: Option<&'a [u8]>,
}

/// The credentials a server accepts.
pub struct Policy {
    client_cert_auth: bool,
    admin_token: Option<Token>,
    data_token: Option<Token>,
}

impl Policy {
    pub fn new(
        client_cert_auth: bool,
        admin_token: Option<&str>,
        data_token: Option<&str>,
    ) -> Policy {
        let token = |t: &str| Token(t.as_bytes().to_vec());
        Policy {
            client_cert_auth,
            admin_token: admin_token.map(token),
            data_token: data_token.map(token),
        }
    }

    /// Whether the call to `path` by `caller` may go ahead; if not, the status it gets.
    fn check(&self, path: &str, caller: &Caller) -> Result<(), Status> {
        let Some(class) = class_of(path)? else {
            return Ok(());
        };
        let token_is = |t: &Option<Token>| matches!((t, caller.token), (Some(t), Some(given)) if t.matches(given));
        let shown = || {
            let cert = match caller.cert {
                Some(Some(role)) => Some(format!("a certificate with OU={}", role.ou())),
                Some(None) => Some("a certificate naming no role".to_owned()),
                None => None,
            };
            let token = caller
                .token
                .map(|_| "a bearer token that does not grant it".to_owned());
            match (cert, token) {
                (Some(c), Some(t)) => format!("{c} and {t}"),
                (Some(one), None) | (None, Some(one)) => one,
                (None, None) => "no credential".to_owned(),
            }
        };
        // A wrong token is a bad credential (Unauthenticated); a valid certificate of
        // the wrong role is a known caller without the right (PermissionDenied).
        let refuse = |needs: &str| {
            let message = format!("{path} needs {needs}; the caller showed {}", shown());
            if caller.token.is_some() || caller.cert.is_none() {
                Status::unauthenticated(message)
            } else {
                Status::permission_denied(message)
            }
        };
        match class {
            Class::Internal if !self.client_cert_auth => Ok(()),
            Class::Internal if caller.cert == Some(Some(Role::Server)) => Ok(()),
            Class::Internal => Err(Status::permission_denied(format!(
                "{path} is internal to the cluster: it needs a certificate with OU=server; the caller showed {}",
                shown()
            ))),
            Class::Admin if caller.cert == Some(Some(Role::Admin)) => Ok(()),
            Class::Admin if token_is(&self.admin_token) => Ok(()),
            Class::Admin => Err(refuse(
                "an admin credential (a certificate with OU=admin or the admin token)",
            )),
            Class::Data if self.data_token.is_none() => Ok(()),
            Class::Data if matches!(caller.cert, Some(Some(_))) => Ok(()),
            Class::Data if token_is(&self.data_token) || token_is(&self.admin_token) => Ok(()),
            Class::Data => Err(refuse(
                "a data credential (the data or admin token, or a client certificate with a role)",
            )),
        }
    }

    fn check_request<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let cert = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| Role::of_certificate(c)));
        let token = match request.headers().get("authorization") {
            None => None,
            Some(value) => {
                Some(value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
                    Status::unauthenticated("authorization must be `Bearer TOKEN`")
                })?)
            }
        };
        self.check(request.uri().path(), &Caller { cert, token })
    }
}

/// Puts [`Guard`] in front of a server's services.
#[derive(Clone)]
pub struct GuardLayer {
    policy: Option<Arc<Policy>>,
}

impl GuardLayer {
    /// `None`: no credential is configured, every call passes.
    pub fn new(policy: Option<Arc<Policy>>) -> GuardLayer {
        GuardLayer { policy }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Answers a call that the [`Policy`] refuses with its status; passes the rest on.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(policy) = &self.policy {
            if let Err(status) = policy.check_request(&request) {
                return Either::Right(ready(Ok(status.into_http())));
            }
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_rpc_of_the_proto_has_a_class() {
        let fds =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut rpcs = Vec::new();
        for file in &fds.file {
            for service in &file.service {
                for method in &service.method {
                    rpcs.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(rpcs.len() > 20, "{rpcs:?}");
        for rpc in &rpcs {
            assert!(
                POLICY.iter().any(|(p, _)| p == rpc),
                "{rpc} is not in POLICY"
            );
        }
        for (path, _) in POLICY {
            assert!(
                rpcs.contains(&path.to_string()),
                "POLICY lists {path}, which the proto does not have"
            );
        }
    }

    fn call(
        policy: &Policy,
        path: &str,
        cert: Option<Option<Role>>,
        token: Option<&str>,
    ) -> Result<(), tonic::Code> {
        policy
            .check(
                path,
                &Caller {
                    cert,
                    token: token.map(str::as_bytes),
                },
            )
            .map_err(|s| s.code())
    }

    const JOIN: &str = "/shardkv.v1.ShardMaster/Join";
    const GET: &str = "/shardkv.v1.Kv/Get";
    const RAFT: &str = "/shardkv.internal.v1.Raft/Send";

    #[test]
    fn admin_calls_need_the_admin_token_or_an_admin_certificate() {
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let p = Policy::new(false, Some("secret"), None);
        assert_eq!(call(&p, JOIN, None, None), Err(Unauthenticated));
        assert_eq!(call(&p, JOIN, None, Some("secreT")), Err(Unauthenticated));
        assert_eq!(
            call(&p, JOIN, None, Some("secret-and-more")),
            Err(Unauthenticated)
        );
        assert_eq!(call(&p, JOIN, None, Some("secret")), Ok(()));
        assert_eq!(call(&p, JOIN, Some(Some(Role::Admin)), None), Ok(()));
        assert_eq!(
            call(&p, JOIN, Some(Some(Role::Data)), None),
            Err(PermissionDenied)
        );
        assert_eq!(call(&p, JOIN, Some(None), None), Err(PermissionDenied));
        // Data and internal calls stay open without a data token or mTLS.
        assert_eq!(call(&p, GET, None, None), Ok(()));
        assert_eq!(call(&p, RAFT, None, None), Ok(()));
        assert_eq!(call(&p, "/grpc.health.v1.Health/Check", None, None), Ok(()));
        assert_eq!(
            call(&p, "/shardkv.v1.Kv/NoSuchCall", None, Some("secret")),
            Err(PermissionDenied)
        );
    }

    #[test]
    fn under_mtls_roles_decide() {
        use tonic::Code::PermissionDenied;
        let p = Policy::new(true, None, None);
        assert_eq!(call(&p, RAFT, Some(Some(Role::Server)), None), Ok(()));
        assert_eq!(
            call(&p, RAFT, Some(Some(Role::Admin)), None),
            Err(PermissionDenied)
        );
        assert_eq!(
            call(&p, JOIN, Some(Some(Role::Server)), None),
            Err(PermissionDenied)
        );
        assert_eq!(call(&p, JOIN, Some(Some(Role::Admin)), None), Ok(()));
        assert_eq!(call(&p, GET, Some(Some(Role::Data)), None), Ok(()));
    }

    #[test]
    fn the_data_token_guards_data_calls() {
        use tonic::Code::Unauthenticated;
        let p = Policy::new(false, Some("adm"), Some("dat"));
        assert_eq!(call(&p, GET, None, None), Err(Unauthenticated));
        assert_eq!(call(&p, GET, None, Some("nope")), Err(Unauthenticated));
        assert_eq!(call(&p, GET, None, Some("dat")), Ok(()));
        assert_eq!(call(&p, GET, None, Some("adm")), Ok(()));
        assert_eq!(call(&p, GET, Some(Some(Role::Data)), None), Ok(()));
        assert_eq!(call(&p, JOIN, None, Some("dat")), Err(Unauthenticated));
    }

    #[test]
    fn a_certificate_role_is_its_ou() {
        let pki = crate::security::pki::Pki::generate("test CA").unwrap();
        let roles: Vec<_> = [Role::Admin, Role::Server, Role::Data]
            .into_iter()
            .map(|r| Role::of_certificate(&pki.issue(r).unwrap().der))
            .collect();
        assert_eq!(
            roles,
            [Some(Role::Admin), Some(Role::Server), Some(Role::Data)]
        );
        assert_eq!(Role::of_certificate(b"not a certificate"), None);
    }
}
