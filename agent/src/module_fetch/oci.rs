//! Pulling a module from an OCI registry (oci-client), in either form of the
//! Wasm OCI image spec that Istio's `WasmPlugin` reads:
//!
//! * the OCI artifact: a layer of media type
//!   `application/vnd.module.wasm.content.layer.v1+wasm` that is the module;
//! * the "compat" image: exactly one `tar+gzip` layer (OCI or Docker media
//!   type) with a `plugin.wasm` file in it.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{AttemptError, FetchError, error_chain, parse_sha256, sha256_hex, tls_error};

pub(super) const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub(super) const OCI_TAR_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(super) const DOCKER_TAR_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The file of the compat image's layer that is the module.
const PLUGIN_FILE: &str = "plugin.wasm";

pub(super) struct Pulled {
    pub bytes: Vec<u8>,
    /// Hex digests of the image manifest (and of the index that chose it,
    /// for a multi-platform image).
    pub manifest_digests: Vec<String>,
}

pub(super) fn client(ca_pem: Option<Vec<u8>>, timeout: Duration) -> Result<Client, FetchError> {
    let config = oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Https,
        extra_root_certificates: ca_pem
            .map(|data| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data,
            })
            .into_iter()
            .collect(),
        connect_timeout: Some(timeout.min(Duration::from_secs(10))),
        read_timeout: Some(timeout),
        user_agent: concat!("wisp/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    Client::try_from(config).map_err(|e| FetchError::Client {
        what: "OCI",
        reason: error_chain(&e),
    })
}

enum Layer<'a> {
    Wasm(&'a OciDescriptor),
    TarGzip(&'a OciDescriptor),
}

pub(super) async fn pull(
    client: &Client,
    reference: &Reference,
    max_bytes: u64,
    origin: &str,
) -> Result<Pulled, AttemptError> {
    let (manifest, digest, list_digest) = client
        .pull_image_manifest_and_list_digest(reference, &RegistryAuth::Anonymous)
        .await
        .map_err(|e| classify(origin, e))?;
    let manifest_digests = [Some(digest), list_digest]
        .into_iter()
        .flatten()
        .filter_map(|d| parse_sha256(&d).ok())
        .collect::<Vec<_>>();
    if let Some(own) = reference.digest().and_then(|d| parse_sha256(d).ok())
        && !manifest_digests.contains(&own)
    {
        return Err(AttemptError::permanent(FetchError::Sha256Mismatch {
            url: origin.to_owned(),
            expected: own,
            actual: format!(
                "image manifest sha256:{}",
                manifest_digests.join(", sha256:")
            ),
        }));
    }
    let layer = choose_layer(&manifest).map_err(|reason| {
        AttemptError::permanent(FetchError::NotWasmImage {
            url: origin.to_owned(),
            reason,
        })
    })?;
    let descriptor = match layer {
        Layer::Wasm(d) | Layer::TarGzip(d) => d,
    };
    let too_large = || {
        AttemptError::permanent(FetchError::TooLarge {
            url: origin.to_owned(),
            limit: max_bytes,
        })
    };
    if u64::try_from(descriptor.size).unwrap_or(u64::MAX) > max_bytes {
        return Err(too_large());
    }
    let mut blob = CappedBuffer {
        bytes: Vec::new(),
        max: max_bytes,
        exceeded: false,
    };
    if let Err(e) = client.pull_blob(reference, descriptor, &mut blob).await {
        if blob.exceeded {
            return Err(too_large());
        }
        return Err(classify(origin, e));
    }
    // oci-client checks the digest too; checking here keeps the guarantee
    // independent of its version.
    let expected = parse_sha256(&descriptor.digest).unwrap_or_default();
    let actual = sha256_hex(&blob.bytes);
    if actual != expected {
        return Err(AttemptError::permanent(FetchError::Sha256Mismatch {
            url: origin.to_owned(),
            expected,
            actual: format!("layer sha256:{actual}"),
        }));
    }
    let bytes = match layer {
        Layer::Wasm(_) => blob.bytes,
        Layer::TarGzip(_) => extract_plugin(&blob.bytes, max_bytes).map_err(|e| match e {
            Extract::TooLarge => too_large(),
            Extract::Invalid(reason) => AttemptError::permanent(FetchError::NotWasmImage {
                url: origin.to_owned(),
                reason,
            }),
        })?,
    };
    Ok(Pulled {
        bytes,
        manifest_digests,
    })
}

fn choose_layer(manifest: &OciImageManifest) -> Result<Layer<'_>, String> {
    let wasm: Vec<_> = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER)
        .collect();
    match (wasm.as_slice(), manifest.layers.as_slice()) {
        ([one], _) => Ok(Layer::Wasm(one)),
        ([], [only])
            if only.media_type == OCI_TAR_GZIP_LAYER
                || only.media_type == DOCKER_TAR_GZIP_LAYER =>
        {
            Ok(Layer::TarGzip(only))
        }
        ([_, _, ..], _) => Err(format!(
            "{} layers of type {WASM_LAYER}; the spec allows one module per image",
            wasm.len()
        )),
        _ => Err(format!(
            "expected one {WASM_LAYER} layer, or exactly one tar+gzip layer holding {PLUGIN_FILE}; the image has [{}]",
            manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

enum Extract {
    TooLarge,
    Invalid(String),
}

/// `plugin.wasm` from a compat image's tar.gz layer.
fn extract_plugin(layer: &[u8], max_bytes: u64) -> Result<Vec<u8>, Extract> {
    let invalid = |e: std::io::Error| Extract::Invalid(format!("reading the tar.gz layer: {e}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    let mut seen = Vec::new();
    for entry in archive.entries().map_err(invalid)? {
        let entry = entry.map_err(invalid)?;
        let path = entry.path().map_err(invalid)?.into_owned();
        let name = path.to_string_lossy();
        let name = name.trim_start_matches("./").trim_start_matches('/');
        if name == PLUGIN_FILE && entry.header().entry_type().is_file() {
            if entry.size() > max_bytes {
                return Err(Extract::TooLarge);
            }
            let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
            entry
                .take(max_bytes + 1)
                .read_to_end(&mut bytes)
                .map_err(invalid)?;
            return Ok(bytes);
        }
        if seen.len() < 10 {
            seen.push(name.to_owned());
        }
    }
    Err(Extract::Invalid(format!(
        "its layer has no {PLUGIN_FILE} (it holds [{}])",
        seen.join(", ")
    )))
}

/// Registry answers that may change on a retry: connect errors, timeouts,
/// 5xx and 429. "Not found", "unauthorized" and malformed manifests will not.
fn classify(origin: &str, error: OciDistributionError) -> AttemptError {
    let permanent = |reason: String| {
        AttemptError::permanent(FetchError::Registry {
            url: origin.to_owned(),
            reason,
        })
    };
    match &error {
        OciDistributionError::RequestError(e) => super::https::classify(origin, e),
        OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429 => {
            AttemptError::transient(origin, error_chain(&error))
        }
        OciDistributionError::IoError(_) => match tls_error(&error) {
            Some(reason) => AttemptError::permanent(FetchError::Tls {
                url: origin.to_owned(),
                reason,
            }),
            None => AttemptError::transient(origin, error_chain(&error)),
        },
        _ => permanent(error_chain(&error)),
    }
}

/// An `AsyncWrite` into memory that refuses to grow past `max`, so a
/// registry that sends more than the descriptor said cannot exhaust memory.
struct CappedBuffer {
    bytes: Vec<u8>,
    max: u64,
    exceeded: bool,
}

impl tokio::io::AsyncWrite for CappedBuffer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if (self.bytes.len() + data.len()) as u64 > self.max {
            self.exceeded = true;
            return Poll::Ready(Err(std::io::Error::other("module larger than the limit")));
        }
        self.bytes.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn plugin_wasm_is_found_in_a_compat_layer() {
        let layer = tar_gz(&[
            ("./runtime-config.json", b"{}"),
            ("./plugin.wasm", b"\0asm\x01\0\0\0"),
        ]);
        assert_eq!(
            extract_plugin(&layer, 1024).ok().unwrap(),
            b"\0asm\x01\0\0\0"
        );
        let Err(Extract::Invalid(reason)) = extract_plugin(&tar_gz(&[("filter.wasm", b"x")]), 1024)
        else {
            panic!("a layer without plugin.wasm was accepted");
        };
        assert!(
            reason.contains("no plugin.wasm") && reason.contains("filter.wasm"),
            "{reason}"
        );
        assert!(matches!(
            extract_plugin(&tar_gz(&[("plugin.wasm", &[0u8; 100])]), 50),
            Err(Extract::TooLarge)
        ));
    }

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 10,
            ..Default::default()
        }
    }

    #[test]
    fn the_layer_is_chosen_as_the_spec_says() {
        let manifest = |layers: Vec<OciDescriptor>| OciImageManifest {
            layers,
            ..Default::default()
        };
        assert!(matches!(
            choose_layer(&manifest(vec![descriptor(WASM_LAYER)])),
            Ok(Layer::Wasm(_))
        ));
        assert!(matches!(
            choose_layer(&manifest(vec![descriptor(DOCKER_TAR_GZIP_LAYER)])),
            Ok(Layer::TarGzip(_))
        ));
        let two = manifest(vec![
            descriptor(OCI_TAR_GZIP_LAYER),
            descriptor(OCI_TAR_GZIP_LAYER),
        ]);
        let err = choose_layer(&two).err().unwrap();
        assert!(err.contains("exactly one tar+gzip layer"), "{err}");
        assert!(choose_layer(&manifest(vec![descriptor("text/plain")])).is_err());
    }
}
