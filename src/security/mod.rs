//! Transport security and access control: TLS (rustls through tonic) on every
//! connection, mutual TLS between servers, and credentials for admin and data RPCs.
//!
//! * [`Dialer`] builds every outgoing channel (Raft, snapshots, range transfers,
//!   heartbeats, the client library, shardctl, the router's upstream): `https` with
//!   the cluster CA when TLS is on, this process's certificate when it has one, and a
//!   bearer token on every call when it has one.
//! * [`ServerSecurity`] is applied to every gRPC server: its TLS acceptor (refusing
//!   at the handshake a client without a CA-signed certificate under
//!   `--client-cert-auth`) and the [`guard`] layer, which checks each call against
//!   the one policy table ([`guard::POLICY`]).
//! * [`pki`] makes a throwaway CA and certificates (the playground, tests).
//!
//! Everything is off by default: without these flags servers and clients speak
//! plaintext and every RPC is open, as before.

mod dial;
pub mod guard;
pub mod pki;

pub use dial::{Credential, Dialer, SecureChannel};
pub use guard::{Class, Role};

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Security flags of a server (kvnode, shard master).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Security")]
pub struct ServerArgs {
    /// PEM certificate this server presents to clients, and to the peers it dials.
    /// Turns on TLS; needs --tls-key and --tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate of the cluster's CA: the servers this one dials must present a
    /// certificate it signed, and so must clients that present one.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: refuse at the handshake any client or peer without a certificate
    /// signed by --tls-ca; internal RPCs (Raft, transfers, heartbeats) then need a
    /// certificate with OU=server.
    #[arg(long, requires = "tls_ca")]
    pub client_cert_auth: bool,
    /// File holding the admin token: admin RPCs (join, leave, move, split, members,
    /// leader transfer) need it (`authorization: Bearer TOKEN`) or a client
    /// certificate with OU=admin.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the data token: data RPCs (get, put, scan, query, ...) then need
    /// it, the admin token or a CA-signed client certificate with a role. This server
    /// sends it on its own calls to the shard master.
    #[arg(long, value_name = "FILE")]
    pub data_token_file: Option<PathBuf>,
}

/// Security flags of a client (`shardctl`, its router, bench and playground).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// PEM certificate of the cluster's CA: connect with TLS, trusting servers it signed.
    #[arg(
        long,
        global = true,
        env = "SHARDKV_TLS_CA",
        value_name = "PEM",
        help_heading = "Security"
    )]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present (mutual TLS; its OU is its role: admin or data).
    #[arg(
        long,
        global = true,
        env = "SHARDKV_TLS_CERT",
        value_name = "PEM",
        help_heading = "Security"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "SHARDKV_TLS_KEY",
        value_name = "PEM",
        help_heading = "Security"
    )]
    pub tls_key: Option<PathBuf>,
    /// File holding a token sent with every call (the admin or the data token).
    #[arg(
        long,
        global = true,
        env = "SHARDKV_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Security"
    )]
    pub token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// Trust the CA in `ca`; present the certificate and key `identity`.
    pub fn for_files(ca: &Path, identity: &(PathBuf, PathBuf)) -> ClientArgs {
        ClientArgs {
            tls_ca: Some(ca.to_owned()),
            tls_cert: Some(identity.0.clone()),
            tls_key: Some(identity.1.clone()),
            token_file: None,
        }
    }

    /// These settings as command-line flags (for a child `shardctl`).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--token-file", &self.token_file),
        ] {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value.clone().into());
            }
        }
        args
    }

    /// The dialer these flags describe (plaintext when none is given).
    pub fn dialer(&self) -> anyhow::Result<Dialer> {
        let mut dialer = Dialer::default();
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                anyhow::bail!("--tls-cert and --tls-key go together")
            }
            (Some(_), Some(_)) if self.tls_ca.is_none() => {
                anyhow::bail!(
                    "--tls-cert needs --tls-ca (the CA that signed the servers' certificates)"
                )
            }
            _ => {}
        }
        if let Some(ca) = &self.tls_ca {
            dialer = dialer.with_ca_pem(&read(ca, "--tls-ca")?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            dialer = dialer.with_identity_pem(&read(cert, "--tls-cert")?, &read(key, "--tls-key")?);
        }
        if let Some(file) = &self.token_file {
            dialer = dialer.with_token(&read_token(file, "--token-file")?)?;
        }
        Ok(dialer)
    }
}

/// What a server applies to its gRPC server, and how it dials the others.
#[derive(Clone, Default)]
pub struct ServerSecurity {
    tls: Option<ServerTlsConfig>,
    /// `None` when no credential is configured: every call passes.
    policy: Option<Arc<guard::Policy>>,
    dialer: Dialer,
}

impl ServerArgs {
    /// Reads the certificates and tokens the flags name.
    pub fn load(&self) -> anyhow::Result<ServerSecurity> {
        let mut security = ServerSecurity::default();
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            let (cert, key, ca) = (
                read(cert, "--tls-cert")?,
                read(key, "--tls-key")?,
                read(ca, "--tls-ca")?,
            );
            security.tls = Some(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&cert, &key))
                    .client_ca_root(Certificate::from_pem(&ca))
                    .client_auth_optional(!self.client_cert_auth),
            );
            security.dialer = Dialer::default()
                .with_ca_pem(&ca)
                .with_identity_pem(&cert, &key);
        }
        let admin = self
            .admin_token_file
            .as_deref()
            .map(|f| read_token(f, "--admin-token-file"))
            .transpose()?;
        let data = self
            .data_token_file
            .as_deref()
            .map(|f| read_token(f, "--data-token-file"))
            .transpose()?;
        anyhow::ensure!(
            data.is_none() || admin.is_some() || self.client_cert_auth,
            "--data-token-file needs --admin-token-file or --client-cert-auth: \
             otherwise admin RPCs would be open while data RPCs are protected"
        );
        if let Some(data) = &data {
            security.dialer = security.dialer.with_token(data)?;
        }
        if self.client_cert_auth || admin.is_some() || data.is_some() {
            security.policy = Some(Arc::new(guard::Policy::new(
                self.client_cert_auth,
                admin.as_deref(),
                data.as_deref(),
            )));
        }
        Ok(security)
    }
}

impl ServerSecurity {
    /// The TLS acceptor's configuration, if TLS is on.
    pub fn tls(&self) -> Option<ServerTlsConfig> {
        self.tls.clone()
    }

    /// The layer that checks every call against [`guard::POLICY`].
    pub fn guard(&self) -> guard::GuardLayer {
        guard::GuardLayer::new(self.policy.clone())
    }

    /// How this server dials the others (peers, the shard master, range sources).
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// A token file's content without surrounding whitespace; an empty one is refused.
fn read_token(path: &Path, flag: &str) -> anyhow::Result<String> {
    let raw = read(path, flag)?;
    let token = String::from_utf8(raw)
        .ok()
        .map(|t| t.trim().to_owned())
        .with_context(|| format!("{flag} {}: the token is not text", path.display()))?;
    anyhow::ensure!(
        !token.is_empty(),
        "{flag} {}: the file is empty",
        path.display()
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_or_empty_settings_are_refused_with_the_flag_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "x").unwrap();
        let half = ClientArgs {
            tls_cert: Some(pem.clone()),
            ..ClientArgs::default()
        };
        let e = half.dialer().unwrap_err().to_string();
        assert!(e.contains("--tls-key"), "{e}");
        let no_ca = ClientArgs {
            tls_key: Some(pem.clone()),
            ..half
        };
        let e = no_ca.dialer().unwrap_err().to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        let e = ClientArgs {
            token_file: Some(empty.clone()),
            ..ClientArgs::default()
        }
        .dialer()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--token-file") && e.contains("empty"), "{e}");
        let e = ServerArgs {
            admin_token_file: Some(dir.path().join("missing")),
            ..ServerArgs::default()
        }
        .load()
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("--admin-token-file"), "{e:#}");
        assert!(ClientArgs::default().dialer().is_ok());
    }
}
