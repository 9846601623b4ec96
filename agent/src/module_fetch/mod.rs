//! Fetching plugin modules: from a file, an HTTPS URL, or an OCI registry the
//! way Istio's `WasmPlugin` stores them, pinned by sha256 and kept in a
//! content-addressed local cache.
//!
//! Where a module may come from:
//!
//! * a path (`/opt/filters/x.wasm`, `filters/x.wasm`) or `file:///…` URL,
//!   read as is; a `sha256`, when given, is checked;
//! * `https://host/x.wasm` (rustls, the system's roots plus `modules.ca_file`);
//!   plain `http://` only with `modules.allow_http`, and a redirect from
//!   HTTPS to HTTP is refused unless that is set;
//! * `oci://registry/repo:tag` or `oci://registry/repo@sha256:…`, in either
//!   form of the Wasm OCI image spec: the artifact whose layer has media type
//!   `application/vnd.module.wasm.content.layer.v1+wasm`, or the "compat"
//!   image with one tar.gz layer holding `plugin.wasm`.
//!
//! A fetched (HTTPS or OCI) module must be pinned: by `sha256`, or for OCI by
//! a `@sha256:` digest in the reference. For OCI the pin may be either the
//! image manifest's digest (as Istio's `WasmPlugin.sha256`) or the module's
//! own sha256 (what `sha256sum plugin.wasm` prints); both bind the content.
//!
//! A pinned module found in the cache is used without any network request,
//! so a node keeps loading its plugins while the registry is down. Transient
//! failures (connect errors, timeouts, 5xx, 429) are retried with
//! exponential backoff; everything else fails at once with its reason.

mod cache;
mod https;
mod oci;

use std::path::PathBuf;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sha2::{Digest, Sha256};

use crate::config::ModulesConfig;
use cache::ModuleCache;

/// A module ready to compile.
#[derive(Clone, Debug)]
pub struct FetchedModule {
    pub bytes: Vec<u8>,
    /// Hex sha256 of `bytes` (no `sha256:` prefix).
    pub sha256: String,
    /// Where it came from: the URL or path as configured.
    pub origin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url:?}: {reason}")]
    InvalidLocation { url: String, reason: String },
    #[error(
        "{url}: plain http:// is refused; use https://, or set `modules.allow_http: true` for a trusted network"
    )]
    HttpNotAllowed { url: String },
    #[error(
        "{url}: a sha256 is required for a module fetched over the network (or, for oci://, a reference by @sha256: digest)"
    )]
    Sha256Required { url: String },
    #[error("{value:?} is not a sha256 digest (64 hex digits, optionally prefixed with `sha256:`)")]
    InvalidSha256 { value: String },
    #[error("{url}: sha256 mismatch: expected sha256:{expected}, got {actual}")]
    Sha256Mismatch {
        url: String,
        expected: String,
        /// What was fetched, e.g. `sha256:…` (and for OCI, the manifest digest).
        actual: String,
    },
    #[error("{url}: cannot read {path}: {source}")]
    Read {
        url: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: the server answered {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("{url}: giving up after {attempts} attempt(s): {reason}")]
    Unavailable {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("{url}: the module is larger than {limit} bytes (`modules.cache_max_bytes`)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {reason}")]
    Registry { url: String, reason: String },
    #[error("{url}: {reason}")]
    Refused { url: String, reason: String },
    #[error("{url}: not a Wasm image: {reason}")]
    NotWasmImage { url: String, reason: String },
    #[error("{url}: not a WebAssembly binary module (no \\0asm header)")]
    NotWasm { url: String },
    #[error("{url}: TLS: {reason}")]
    Tls { url: String, reason: String },
    #[error("module cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`modules.ca_file` {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("building the {what} client: {reason}")]
    Client { what: &'static str, reason: String },
}

/// Where a module is, parsed from the configured string.
#[derive(Clone, Debug)]
pub enum ModuleLocation {
    File(PathBuf),
    /// `https://` or `http://`.
    Http(reqwest::Url),
    Oci(oci_client::Reference),
}

impl ModuleLocation {
    /// Parses a path or URL. Relative paths are returned as they are; the
    /// config resolves them against its own directory.
    pub fn parse(text: &str) -> Result<ModuleLocation, FetchError> {
        let invalid = |reason: String| FetchError::InvalidLocation {
            url: text.to_owned(),
            reason,
        };
        if let Some(path) = text.strip_prefix("file://") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(invalid(
                    "a file:// URL needs an absolute path (file:///dir/x.wasm); write a relative path without file://".into(),
                ));
            }
            return Ok(ModuleLocation::File(path));
        }
        if let Some(reference) = text.strip_prefix("oci://") {
            let reference: oci_client::Reference = reference
                .parse()
                .map_err(|e| invalid(format!("not an OCI reference: {e}")))?;
            return Ok(ModuleLocation::Oci(reference));
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            let url = reqwest::Url::parse(text).map_err(|e| invalid(format!("not a URL: {e}")))?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err(invalid("the URL has no host".into()));
            }
            return Ok(ModuleLocation::Http(url));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(invalid(format!(
                "unsupported scheme {scheme}://; use a path, file://, https:// or oci://"
            )));
        }
        if text.is_empty() {
            return Err(invalid("empty".into()));
        }
        Ok(ModuleLocation::File(PathBuf::from(text)))
    }

    /// Fetched over the network (and so must be pinned).
    pub fn is_remote(&self) -> bool {
        !matches!(self, ModuleLocation::File(_))
    }

    /// The pin the location carries itself: an OCI `@sha256:` digest.
    pub fn own_pin(&self) -> Option<&str> {
        match self {
            ModuleLocation::Oci(reference) => reference.digest(),
            _ => None,
        }
    }
}

/// `sha256:HEX` or `HEX` → lowercase `HEX`.
pub fn parse_sha256(text: &str) -> Result<String, FetchError> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(FetchError::InvalidSha256 {
            value: text.to_owned(),
        })
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why one attempt failed, and whether another could succeed.
pub(crate) struct AttemptError {
    transient: bool,
    error: FetchError,
}

impl AttemptError {
    fn permanent(error: FetchError) -> AttemptError {
        AttemptError {
            transient: false,
            error,
        }
    }
    fn transient(url: &str, reason: String) -> AttemptError {
        AttemptError {
            transient: true,
            error: FetchError::Unavailable {
                url: url.to_owned(),
                attempts: 1,
                reason,
            },
        }
    }
}

/// First delay between attempts; doubled (with jitter) up to [`MAX_DELAY`].
const MIN_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

pub struct ModuleFetcher {
    http: reqwest::Client,
    oci: oci_client::Client,
    cache: ModuleCache,
    timeout: Duration,
    retries: u32,
    allow_http: bool,
    max_bytes: u64,
}

impl ModuleFetcher {
    pub fn new(config: &ModulesConfig) -> Result<ModuleFetcher, FetchError> {
        // reqwest and oci-client take the process's rustls provider; the
        // agent's TLS uses ring, so they do too (no second crypto library).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_pem = match &config.ca_file {
            Some(path) => {
                let path = &path.value;
                let pem = std::fs::read(path).map_err(|e| FetchError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    FetchError::CaFile {
                        path: path.clone(),
                        reason: format!("not a PEM certificate bundle: {e}"),
                    }
                })?;
                if certs.is_empty() {
                    return Err(FetchError::CaFile {
                        path: path.clone(),
                        reason: "holds no PEM certificate".into(),
                    });
                }
                Some((pem, certs))
            }
            None => None,
        };
        let timeout = Duration::from_secs(config.fetch_timeout_seconds.value.max(1));
        let http = https::client(
            ca_pem.as_ref().map(|(_, certs)| certs.clone()),
            timeout,
            config.allow_http,
        )?;
        let oci = oci::client(ca_pem.as_ref().map(|(pem, _)| pem.clone()), timeout)?;
        Ok(ModuleFetcher {
            http,
            oci,
            cache: ModuleCache::new(config.cache_dir.clone(), config.cache_max_bytes.value),
            timeout,
            retries: config.fetch_retries,
            allow_http: config.allow_http,
            max_bytes: config.cache_max_bytes.value,
        })
    }

    /// Fetches the module at `url` (a path or a URL, see the module docs),
    /// checking it against `sha256` (`HEX` or `sha256:HEX`).
    pub async fn fetch(
        &self,
        url: &str,
        sha256: Option<&str>,
    ) -> Result<FetchedModule, FetchError> {
        let location = ModuleLocation::parse(url)?;
        let pin = sha256.map(parse_sha256).transpose()?;
        let module = match &location {
            ModuleLocation::File(path) => self.read_file(url, path, pin).await?,
            ModuleLocation::Http(http_url) => {
                if http_url.scheme() == "http" && !self.allow_http {
                    return Err(FetchError::HttpNotAllowed {
                        url: url.to_owned(),
                    });
                }
                let pin = pin.ok_or_else(|| FetchError::Sha256Required {
                    url: url.to_owned(),
                })?;
                if let Some(module) = self.cached(url, std::slice::from_ref(&pin))? {
                    return Ok(module);
                }
                let bytes = self
                    .retrying(url, || {
                        https::download(&self.http, http_url, self.max_bytes, url)
                    })
                    .await?;
                let sha = sha256_hex(&bytes);
                if sha != pin {
                    return Err(FetchError::Sha256Mismatch {
                        url: url.to_owned(),
                        expected: pin,
                        actual: format!("sha256:{sha}"),
                    });
                }
                check_magic(url, &bytes)?;
                self.cache.insert(&sha, &bytes, &[])?;
                FetchedModule {
                    bytes,
                    sha256: sha,
                    origin: url.to_owned(),
                }
            }
            ModuleLocation::Oci(reference) => {
                let own = location.own_pin().map(parse_sha256).transpose()?;
                let pins: Vec<String> = pin.into_iter().chain(own).collect();
                if pins.is_empty() {
                    return Err(FetchError::Sha256Required {
                        url: url.to_owned(),
                    });
                }
                if let Some(module) = self.cached(url, &pins)? {
                    return Ok(module);
                }
                let pulled = self
                    .retrying(url, || oci::pull(&self.oci, reference, self.max_bytes, url))
                    .await?;
                let sha = sha256_hex(&pulled.bytes);
                for pin in &pins {
                    if *pin != sha && !pulled.manifest_digests.contains(pin) {
                        return Err(FetchError::Sha256Mismatch {
                            url: url.to_owned(),
                            expected: pin.clone(),
                            actual: format!(
                                "module sha256:{sha} in image manifest sha256:{}",
                                pulled.manifest_digests.join(", sha256:")
                            ),
                        });
                    }
                }
                check_magic(url, &pulled.bytes)?;
                self.cache
                    .insert(&sha, &pulled.bytes, &pulled.manifest_digests)?;
                FetchedModule {
                    bytes: pulled.bytes,
                    sha256: sha,
                    origin: url.to_owned(),
                }
            }
        };
        tracing::info!(origin = url, sha256 = %module.sha256, bytes = module.bytes.len(), "module fetched");
        Ok(module)
    }

    async fn read_file(
        &self,
        url: &str,
        path: &std::path::Path,
        pin: Option<String>,
    ) -> Result<FetchedModule, FetchError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| FetchError::Read {
                url: url.to_owned(),
                path: path.to_owned(),
                source,
            })?;
        let sha = sha256_hex(&bytes);
        if let Some(pin) = pin
            && pin != sha
        {
            return Err(FetchError::Sha256Mismatch {
                url: url.to_owned(),
                expected: pin,
                actual: format!("sha256:{sha}"),
            });
        }
        Ok(FetchedModule {
            bytes,
            sha256: sha,
            origin: url.to_owned(),
        })
    }

    fn cached(&self, url: &str, pins: &[String]) -> Result<Option<FetchedModule>, FetchError> {
        Ok(self.cache.lookup(pins)?.map(|(bytes, sha256)| {
            tracing::info!(origin = url, %sha256, "module found in the cache");
            FetchedModule {
                bytes,
                sha256,
                origin: url.to_owned(),
            }
        }))
    }

    /// Runs `attempt` with a deadline each time, retrying transient
    /// failures with exponential backoff.
    async fn retrying<T, F, Fut>(&self, url: &str, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let timeout = self.timeout;
        let once = || {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let future = attempt();
            async move {
                match tokio::time::timeout(timeout, future).await {
                    Ok(result) => result,
                    Err(_) => Err(AttemptError::transient(
                        url,
                        format!(
                            "no complete answer within {}s (`modules.fetch_timeout_seconds`)",
                            timeout.as_secs()
                        ),
                    )),
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(MIN_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_max_times(self.retries as usize)
            .with_jitter();
        once.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| e.transient)
            .notify(|e: &AttemptError, delay: Duration| {
                let reason = match &e.error {
                    FetchError::Unavailable { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                tracing::warn!(origin = url, reason, retry_in = ?delay, "module fetch failed; retrying");
            })
            .await
            .map_err(|e| match e.error {
                FetchError::Unavailable { url, reason, .. } if e.transient => {
                    FetchError::Unavailable {
                        url,
                        attempts: attempts.load(std::sync::atomic::Ordering::Relaxed),
                        reason,
                    }
                }
                error => error,
            })
    }
}

fn check_magic(url: &str, bytes: &[u8]) -> Result<(), FetchError> {
    if bytes.starts_with(b"\0asm") {
        Ok(())
    } else {
        Err(FetchError::NotWasm {
            url: url.to_owned(),
        })
    }
}

/// An error and its sources, as one line: reqwest's own message names only
/// the outermost layer ("error sending request").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

/// The rustls error somewhere in `error`'s sources, if the failure was the
/// TLS handshake (a certificate that does not verify will not verify on the
/// next attempt either).
fn tls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        current = e.source();
    }
    // hyper-util's connect errors do not always expose their cause to
    // downcasting; rustls's own wording identifies it then.
    let text = error_chain(error);
    [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
    ]
    .iter()
    .find_map(|mark| text.find(mark).map(|at| text[at..].to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_by_scheme() {
        assert!(matches!(
            ModuleLocation::parse("filters/x.wasm").unwrap(),
            ModuleLocation::File(p) if p == std::path::Path::new("filters/x.wasm")
        ));
        assert!(matches!(
            ModuleLocation::parse("file:///opt/x.wasm").unwrap(),
            ModuleLocation::File(p) if p == std::path::Path::new("/opt/x.wasm")
        ));
        let https = ModuleLocation::parse("https://example.test/x.wasm").unwrap();
        assert!(https.is_remote() && https.own_pin().is_none());
        let digest = "a".repeat(64);
        let oci =
            ModuleLocation::parse(&format!("oci://127.0.0.1:5000/wisp/f@sha256:{digest}")).unwrap();
        let ModuleLocation::Oci(reference) = &oci else {
            panic!("{oci:?}")
        };
        assert_eq!(reference.registry(), "127.0.0.1:5000");
        assert_eq!(reference.repository(), "wisp/f");
        assert_eq!(oci.own_pin(), Some(format!("sha256:{digest}").as_str()));
        for bad in [
            "ftp://x/y.wasm",
            "file://rel/x.wasm",
            "https://",
            "oci://",
            "",
        ] {
            let err = ModuleLocation::parse(bad).unwrap_err();
            assert!(
                matches!(err, FetchError::InvalidLocation { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_fetcher_can_be_shared_between_tasks() {
        // The Kubernetes control loop fetches from spawned tasks.
        fn shared<T: Send + Sync>(_: &T) {}
        fn sendable<F: Future + Send>(_: F) {}
        let dir = tempfile::tempdir().unwrap();
        let fetcher = ModuleFetcher::new(&ModulesConfig {
            cache_dir: dir.path().to_owned(),
            ..Default::default()
        })
        .unwrap();
        shared(&fetcher);
        sendable(fetcher.fetch("/nonexistent.wasm", None));
    }

    #[test]
    fn sha256_accepts_hex_with_or_without_prefix() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_sha256(&hex).unwrap(), "ab".repeat(32));
        assert_eq!(
            parse_sha256(&format!("sha256:{hex}")).unwrap(),
            "ab".repeat(32)
        );
        for bad in ["abc", "sha512:00", &"g".repeat(64)] {
            assert!(parse_sha256(bad).is_err(), "{bad}");
        }
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
