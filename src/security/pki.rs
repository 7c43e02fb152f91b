//! A throwaway certificate authority (rcgen) for the playground and tests: a CA and
//! certificates for 127.0.0.1, ::1 and localhost whose OU names their [`Role`].
//! and a random admin token. Not for production: keys are written unencrypted and
//! never rotated.

use super::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A CA that issues certificates.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and the certificate as DER.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// Where [`Pki::write`] puts the CA certificate and each role's certificate and key.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub ca: PathBuf,
    /// (certificate, key) per role.
    pub server: (PathBuf, PathBuf),
    pub admin: (PathBuf, PathBuf),
    pub data: (PathBuf, PathBuf),
    /// A random admin token: the other admin credential.
    pub admin_token: PathBuf,
}

impl PkiFiles {
    /// The files' paths in `dir`: `ca.pem`, and `ROLE.pem` and `ROLE-key.pem` per role.
    pub fn at(dir: &Path) -> PkiFiles {
        let pair = |role: Role| {
            (
                dir.join(format!("{}.pem", role.ou())),
                dir.join(format!("{}-key.pem", role.ou())),
            )
        };
        PkiFiles {
            ca: dir.join("ca.pem"),
            server: pair(Role::Server),
            admin: pair(Role::Admin),
            data: pair(Role::Data),
            admin_token: dir.join("admin-token"),
        }
    }
}

impl Pki {
    /// A new CA with a fresh key, named `name`.
    pub fn generate(name: &str) -> anyhow::Result<Pki> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Pki { ca })
    }

    /// The CA's certificate (PEM): what clients and servers trust.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for this machine's loopback addresses with OU=`role`, good for
    /// both ends of a connection (servers also present it when they dial peers).
    pub fn issue(&self, role: Role) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("shardkv {}", role.ou()));
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.ou());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// Writes the CA certificate, a certificate and key per role and an admin token
    /// into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PkiFiles> {
        std::fs::create_dir_all(dir)?;
        let files = PkiFiles::at(dir);
        std::fs::write(&files.ca, self.ca_pem())?;
        for (role, (cert, key)) in [
            (Role::Server, &files.server),
            (Role::Admin, &files.admin),
            (Role::Data, &files.data),
        ] {
            let issued = self.issue(role)?;
            std::fs::write(cert, issued.cert_pem)?;
            write_private(key, issued.key_pem.as_bytes())?;
        }
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write_private(&files.admin_token, token.as_bytes())?;
        Ok(files)
    }
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(contents)
}
