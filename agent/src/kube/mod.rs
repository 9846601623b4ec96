//! Kubernetes mode (`wisp run --config FILE --kubernetes`): the agent
//! watches this node's pods, namespaces, services, endpoint slices and
//! `WasmPlugin`s and turns them into the same [`Config`](crate::config::Config)
//! the file mode reads, applied through the same path as a file reload
//! ([`crate::reload::Applier`]), so there is one dataplane code path.
//!
//! - [`crd`]: the `WasmPlugin` custom resource and its per-node status.
//! - [`translate`]: cluster objects → `Config` (pure, unit-tested).
//! - [`controller`]: the kube-rs reflectors, the reconcile loop, status.
//! - [`status`]: the server-side-apply patch of one node's status entry.
//!
//! Two small seams keep this independent of how modules are fetched and how
//! a pod's network namespace is found: [`ModuleSourceResolver`] and
//! [`PodNetnsResolver`].

pub mod controller;
pub mod crd;
pub mod resolvers;
pub mod status;
pub mod translate;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use sha2::{Digest, Sha256};

/// Label on a namespace that enrolls its pods.
pub const NAMESPACE_LABEL: &str = "wisp.dev/dataplane";
/// Value of [`NAMESPACE_LABEL`] that enrolls.
pub const ENABLED: &str = "enabled";
/// Pod annotation ([`NAMESPACE_LABEL`]`: disabled`) that opts a pod out.
pub const DISABLED: &str = "disabled";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no node name: pass --node-name, set WISP_NODE_NAME (the DaemonSet sets it from spec.nodeName) or kubernetes.node_name"
    )]
    NoNodeName,
    #[error("Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    ClientConfig(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("module directory {path}: {source}")]
    ModuleDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Fetches a plugin module by URL, checking its SHA-256 when given.
pub trait ModuleSourceResolver: Send + Sync {
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        sha256: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;
}

/// What the agent knows of a local pod when it looks for its netns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `status.qosClass`: Guaranteed, Burstable or BestEffort (kubelet's
    /// cgroup layout depends on it).
    pub qos_class: String,
    /// `status.containerStatuses[].containerID`, e.g. `containerd://abc…`.
    pub container_ids: Vec<String>,
}

/// Finds the network namespace of a local pod.
pub trait PodNetnsResolver: Send + Sync {
    fn netns_of(&self, pod: &PodInfo) -> Result<PathBuf, String>;
}

/// `file://` modules only; other schemes are refused with a message.
#[derive(Debug, Default)]
pub struct FileModuleResolver;

impl ModuleSourceResolver for FileModuleResolver {
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        sha256: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>> {
        Box::pin(async move {
            let Some(path) = url.strip_prefix("file://") else {
                return Err(format!(
                    "{url}: only file:// modules are fetched by this build"
                ));
            };
            let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
            check_sha256(&bytes, sha256)?;
            Ok(bytes)
        })
    }
}

/// Refuses `bytes` unless their SHA-256 is `expected` (when given).
pub fn check_sha256(bytes: &[u8], expected: Option<&str>) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = sha256_hex(bytes);
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        Err(format!(
            "sha256 mismatch: expected {expected}, got {actual}"
        ))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Network namespaces named by pod uid in one directory (`DIR/<uid>`, a
/// bind mount or a symlink to `/proc/PID/ns/net`): for tests and runtimes
/// that publish them (`kubernetes.netns_dir`).
#[derive(Debug)]
pub struct NetnsDirResolver {
    pub dir: PathBuf,
}

impl PodNetnsResolver for NetnsDirResolver {
    fn netns_of(&self, pod: &PodInfo) -> Result<PathBuf, String> {
        let path = self.dir.join(&pod.uid);
        if path.exists() {
            Ok(path)
        } else {
            Err(format!(
                "no network namespace for pod {}/{} (uid {}) at {}",
                pod.namespace,
                pod.name,
                pod.uid,
                path.display()
            ))
        }
    }
}

/// Where fetched modules are kept: `DIR/<sha256>.wasm`, written once.
pub fn store_module(dir: &Path, bytes: &[u8]) -> Result<PathBuf, String> {
    let path = dir.join(format!("{}.wasm", sha256_hex(bytes)));
    if !path.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // Write beside it and rename, so a reader never sees half a module.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_resolver_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.wasm");
        std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
        let url = format!("file://{}", path.display());
        let good = sha256_hex(b"\0asm\x01\0\0\0");
        let r = FileModuleResolver;
        assert_eq!(r.fetch(&url, Some(&good)).await.unwrap().len(), 8);
        let err = r.fetch(&url, Some(&"0".repeat(64))).await.unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
        let err = r
            .fetch("https://example.invalid/x.wasm", None)
            .await
            .unwrap_err();
        assert!(err.contains("only file://"), "{err}");
    }

    #[test]
    fn modules_are_stored_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let a = store_module(dir.path(), b"abc").unwrap();
        assert_eq!(
            a.file_name().unwrap().to_str().unwrap(),
            format!("{}.wasm", sha256_hex(b"abc"))
        );
        assert_eq!(std::fs::read(&a).unwrap(), b"abc");
        assert_eq!(store_module(dir.path(), b"abc").unwrap(), a);
    }
}
