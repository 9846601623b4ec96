//! TLS with rustls (ring provider): terminating TLS on listeners that have a
//! certificate — ALPN `h2` and `http/1.1`, client certificates verified
//! against a CA for mTLS — and originating TLS or mTLS to upstreams that ask
//! for it. What the handshake established is handed to plugins as the
//! `connection.*` properties.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use sha2::Digest;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// The file the error is about, if it is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Pem { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::ClientCa { path, .. } => Some(path),
            TlsError::KeyMismatch { key, .. } => Some(key),
            TlsError::Rustls(_) | TlsError::ServerName(_) => None,
        }
    }
}

/// ALPN protocols a TLS listener may offer.
pub const ALPN_PROTOCOLS: [&str; 2] = ["h2", "http/1.1"];

/// Certificates of a TLS server listener.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, in order of preference; empty: `h2` and
    /// `http/1.1`.
    pub alpn: Vec<String>,
}

/// TLS towards an upstream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UpstreamTls {
    /// CA bundle that signs the upstream's certificate.
    pub ca: PathBuf,
    /// Name to send as SNI and to verify the certificate against.
    pub server_name: String,
    /// Client certificate and key, for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem {
            what: "certificate file",
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "private key file",
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(TlsError::Rustls)?;
    }
    Ok(roots)
}

impl ServerTls {
    /// The acceptor for this listener; errors name the file at fault.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| TlsError::ClientCa {
                            path: ca.clone(),
                            message: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|error| match error {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                },
                error => TlsError::Rustls(error),
            })?;
        config.alpn_protocols = if self.alpn.is_empty() {
            ALPN_PROTOCOLS
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect()
        } else {
            self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
        };
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl UpstreamTls {
    /// A connector offering `alpn` (`http/1.1` or `h2`), and the name to
    /// verify the upstream's certificate against.
    pub fn connector_with_alpn(
        &self,
        alpn: &[u8],
    ) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca)?);
        let mut config = match &self.client_cert {
            Some((cert, key_path)) => builder
                .with_client_auth_cert(certs(cert)?, key(key_path)?)
                .map_err(|error| match error {
                    rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                        cert: cert.clone(),
                        key: key_path.clone(),
                    },
                    error => TlsError::Rustls(error),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|_| TlsError::ServerName(self.server_name.clone()))?;
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    }
}

/// What a downstream TLS handshake established.
#[derive(Clone, Debug, Default)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`, as Envoy's `connection.tls_version`.
    pub version: String,
    pub server_name: Option<String>,
    pub alpn: Option<Vec<u8>>,
    /// Hex SHA-256 of the client's certificate, when it sent one.
    pub peer_certificate_sha256: Option<String>,
}

impl TlsInfo {
    pub fn from_connection(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        TlsInfo {
            version: version.to_owned(),
            server_name: conn.server_name().map(str::to_owned),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            peer_certificate_sha256: conn
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| hex(&sha2::Sha256::digest(cert.as_ref()))),
        }
    }

    /// The `connection.*` properties plugins read.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = vec![
            ("connection.tls_version", self.version.clone()),
            (
                "connection.mtls",
                self.peer_certificate_sha256.is_some().to_string(),
            ),
        ];
        if let Some(name) = &self.server_name {
            properties.push(("connection.requested_server_name", name.clone()));
        }
        if let Some(digest) = &self.peer_certificate_sha256 {
            properties.push(("connection.sha256_peer_certificate_digest", digest.clone()));
        }
        properties
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A config file error about TLS: `(line, field, message)`, the field
/// relative to the `tls` / `upstream_tls` mapping (`cert`, `alpn[1]`, …).
pub type FieldError = (u64, String, String);

/// `tls:` of a listener in the config file: terminate TLS with these files.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub cert: Spanned<PathBuf>,
    /// Private key (PEM) of the leaf certificate.
    pub key: Spanned<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<Spanned<PathBuf>>,
    /// ALPN protocols offered: `h2`, `http/1.1`; default both, `h2` first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Spanned<Vec<String>>>,
}

/// `upstream_tls:` of a listener, or `tls:` of a cluster: originate TLS
/// (or mTLS) to the upstream.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA bundle (PEM) that signs the upstream's certificate.
    pub ca: Spanned<PathBuf>,
    /// Name sent as SNI and verified against the upstream's certificate.
    pub server_name: Spanned<String>,
    /// Client certificate (PEM), for mTLS; needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<Spanned<PathBuf>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<Spanned<PathBuf>>,
}

fn resolve(path: &mut Spanned<PathBuf>, base: &Path) {
    if path.value.is_relative() {
        path.value = base.join(&path.value);
    }
}

/// `Err` naming the field when `path` is not a file.
fn exists(field: &str, path: &Spanned<PathBuf>) -> Result<(), FieldError> {
    if path.value.is_file() {
        Ok(())
    } else {
        Err((
            path.referenced.line(),
            field.to_owned(),
            format!("no such file: {}", path.value.display()),
        ))
    }
}

/// Attributes a [`TlsError`] to the field whose file it names.
fn attribute(
    error: TlsError,
    fields: &[(&str, &Spanned<PathBuf>)],
    fallback: (u64, &str),
) -> FieldError {
    let (line, field) = error
        .path()
        .and_then(|path| fields.iter().find(|(_, f)| f.value == path))
        .map_or(fallback, |(field, f)| (f.referenced.line(), *field));
    (line, field.to_owned(), error.to_string())
}

impl ListenerTlsConfig {
    /// Resolves relative paths against the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.cert, base);
        resolve(&mut self.key, base);
        if let Some(ca) = &mut self.client_ca {
            resolve(ca, base);
        }
    }

    pub fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert: self.cert.value.clone(),
            key: self.key.value.clone(),
            client_ca: self.client_ca.as_ref().map(|ca| ca.value.clone()),
            alpn: self
                .alpn
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default(),
        }
    }

    /// Reads every file as the listener will: missing files, bad PEM, a key
    /// that does not match the certificate, an unusable CA, unknown ALPN.
    pub fn check(&self) -> Result<(), FieldError> {
        exists("cert", &self.cert)?;
        exists("key", &self.key)?;
        if let Some(ca) = &self.client_ca {
            exists("client_ca", ca)?;
        }
        if let Some(alpn) = &self.alpn {
            let line = alpn.referenced.line();
            if alpn.value.is_empty() {
                return Err((
                    line,
                    "alpn".into(),
                    format!("offer at least one of {ALPN_PROTOCOLS:?}"),
                ));
            }
            if let Some((i, p)) = alpn
                .value
                .iter()
                .enumerate()
                .find(|(_, p)| !ALPN_PROTOCOLS.contains(&p.as_str()))
            {
                return Err((
                    line,
                    format!("alpn[{i}]"),
                    format!("{p:?}: expected one of {ALPN_PROTOCOLS:?}"),
                ));
            }
        }
        let mut fields = vec![("cert", &self.cert), ("key", &self.key)];
        if let Some(ca) = &self.client_ca {
            fields.push(("client_ca", ca));
        }
        self.server_tls()
            .acceptor()
            .map(drop)
            .map_err(|e| attribute(e, &fields, (self.cert.referenced.line(), "cert")))
    }
}

impl UpstreamTlsConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.ca, base);
        for path in [&mut self.client_cert, &mut self.client_key]
            .into_iter()
            .flatten()
        {
            resolve(path, base);
        }
    }

    pub fn upstream_tls(&self) -> UpstreamTls {
        UpstreamTls {
            ca: self.ca.value.clone(),
            server_name: self.server_name.value.clone(),
            client_cert: self
                .client_cert
                .as_ref()
                .zip(self.client_key.as_ref())
                .map(|(c, k)| (c.value.clone(), k.value.clone())),
        }
    }

    pub fn check(&self) -> Result<(), FieldError> {
        exists("ca", &self.ca)?;
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                exists("client_cert", cert)?;
                exists("client_key", key)?;
            }
            (Some(cert), None) => {
                return Err((
                    cert.referenced.line(),
                    "client_key".into(),
                    "required with client_cert (mTLS)".into(),
                ));
            }
            (None, Some(key)) => {
                return Err((
                    key.referenced.line(),
                    "client_cert".into(),
                    "required with client_key (mTLS)".into(),
                ));
            }
            (None, None) => {}
        }
        if ServerName::try_from(self.server_name.value.clone()).is_err() {
            return Err((
                self.server_name.referenced.line(),
                "server_name".into(),
                format!(
                    "{:?} is not a DNS name or IP address",
                    self.server_name.value
                ),
            ));
        }
        let mut fields = vec![("ca", &self.ca)];
        fields.extend(self.client_cert.iter().map(|c| ("client_cert", c)));
        fields.extend(self.client_key.iter().map(|k| ("client_key", k)));
        self.upstream_tls()
            .connector_with_alpn(b"http/1.1")
            .map(drop)
            .map_err(|e| attribute(e, &fields, (self.ca.referenced.line(), "ca")))
    }
}
