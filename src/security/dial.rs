//! Outgoing connections: one [`Dialer`] per process builds every channel it opens.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// A channel from [`Dialer::connect_lazy`]: TLS when the dialer has a CA, and the
/// dialer's bearer token on every call.
pub type SecureChannel = InterceptedService<Channel, Credential>;

/// The bearer token a channel sends with each call (none by default).
#[derive(Clone, Default)]
pub struct Credential(Option<MetadataValue<Ascii>>);

impl Interceptor for Credential {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// How this process reaches servers: plaintext (the default), or TLS trusting the
/// cluster CA and presenting this process's certificate, with an optional token.
#[derive(Clone, Default)]
pub struct Dialer {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    credential: Credential,
}

impl std::fmt::Debug for Dialer {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("token", &self.credential.0.is_some())
            .finish()
    }
}

impl Dialer {
    /// Connect with TLS, trusting servers whose certificates the CA in `pem` signed.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Dialer {
        self.ca = Some(Certificate::from_pem(pem));
        self
    }

    /// Present this certificate and key (PEM) to servers (mutual TLS).
    pub fn with_identity_pem(mut self, cert: &[u8], key: &[u8]) -> Dialer {
        self.identity = Some(Identity::from_pem(cert, key));
        self
    }

    /// Send `token` as `authorization: Bearer TOKEN` with every call.
    pub fn with_token(mut self, token: &str) -> anyhow::Result<Dialer> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the token must be printable ASCII"))?;
        self.credential = Credential(Some(value));
        Ok(self)
    }

    /// What to check when no server would talk to this dialer: the settings it
    /// lacks that a secured cluster asks for ("" when it has them all).
    pub fn unanswered_hint(&self) -> &'static str {
        match (&self.ca, &self.identity) {
            (None, _) => " (if the servers use TLS, give their CA with --tls-ca)",
            (Some(_), None) => {
                " (if the servers require client certificates, give --tls-cert and --tls-key)"
            }
            (Some(_), Some(_)) => "",
        }
    }

    /// The endpoint of the server at `addr` (HOST:PORT), `https` with this dialer's
    /// TLS settings when it has a CA. The caller adds timeouts and keepalive.
    pub fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let Some(ca) = &self.ca else {
            return Ok(Endpoint::from_shared(format!("http://{addr}"))?);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(ca.clone());
        if let Some(identity) = &self.identity {
            tls = tls.identity(identity.clone());
        }
        Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?)
    }

    /// A channel to `endpoint` (from [`Dialer::endpoint`]), connected on first use.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> SecureChannel {
        InterceptedService::new(endpoint.connect_lazy(), self.credential.clone())
    }
}
