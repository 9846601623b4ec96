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
}

/// Certificates of a TLS server listener.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// TLS towards an upstream.
#[derive(Clone, Debug, serde::Serialize)]
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
        let mut config = builder.with_single_cert(certs(&self.cert)?, key(&self.key)?)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
            Some((cert, key_path)) => {
                builder.with_client_auth_cert(certs(cert)?, key(key_path)?)?
            }
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
