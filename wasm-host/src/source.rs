//! [`ModuleSource`]: where a plugin's code comes from, and its checksum.

use std::path::PathBuf;

use crate::error::Error;
use crate::plugin::sha256_hex;

/// A plugin module: a local file, bytes in the configuration, or bytes the
/// embedder fetched from elsewhere (OCI, HTTP). Fetched code must carry its
/// SHA-256 (Envoy's `RemoteDataSource.sha256` is required too); for the others
/// it is optional and checked when present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    File {
        path: PathBuf,
        sha256: Option<String>,
    },
    Bytes {
        bytes: Vec<u8>,
        sha256: Option<String>,
    },
    Fetched {
        /// Where it came from, for error messages.
        origin: String,
        bytes: Vec<u8>,
        sha256: String,
    },
}

impl ModuleSource {
    /// The module bytes, after the checksum check.
    pub fn load(&self, plugin: &str) -> Result<Vec<u8>, Error> {
        let (bytes, expected, origin) = match self {
            ModuleSource::File { path, sha256 } => {
                let bytes = std::fs::read(path).map_err(|e| Error::Source {
                    plugin: plugin.to_owned(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                (bytes, sha256.as_deref(), path.display().to_string())
            }
            ModuleSource::Bytes { bytes, sha256 } => {
                (bytes.clone(), sha256.as_deref(), "inline bytes".to_owned())
            }
            ModuleSource::Fetched {
                origin,
                bytes,
                sha256,
            } => (bytes.clone(), Some(sha256.as_str()), origin.clone()),
        };
        if let Some(expected) = expected {
            let valid = expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(Error::Source {
                    plugin: plugin.to_owned(),
                    reason: format!("{origin}: {expected:?} is not a SHA-256 (64 hex digits)"),
                });
            }
            let actual = sha256_hex(&bytes);
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(Error::Source {
                    plugin: plugin.to_owned(),
                    reason: format!(
                        "{origin}: SHA-256 mismatch: expected {expected}, got {actual}"
                    ),
                });
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn checksums_are_checked() {
        let ok = ModuleSource::Fetched {
            origin: "oci://x".into(),
            bytes: b"abc".to_vec(),
            sha256: ABC.to_uppercase(),
        };
        assert_eq!(ok.load("p").unwrap(), b"abc");
        let bad = ModuleSource::Bytes {
            bytes: b"abd".to_vec(),
            sha256: Some(ABC.into()),
        };
        let error = bad.load("p").unwrap_err().to_string();
        assert!(error.contains("SHA-256 mismatch"), "{error}");
        let malformed = ModuleSource::Bytes {
            bytes: b"abc".to_vec(),
            sha256: Some("abc".into()),
        };
        assert!(malformed.load("p").is_err());
        let unchecked = ModuleSource::Bytes {
            bytes: b"abc".to_vec(),
            sha256: None,
        };
        assert_eq!(unchecked.load("p").unwrap(), b"abc");
        let missing = ModuleSource::File {
            path: "/nonexistent/wisp.wasm".into(),
            sha256: None,
        };
        assert!(
            missing
                .load("p")
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
    }
}
