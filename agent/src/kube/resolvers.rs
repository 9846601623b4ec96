//! The production implementations of the controller's two lookups: module
//! URLs through [`ModuleFetcher`] (file, HTTPS, OCI, with the cache) and pod
//! network namespaces through kubelet's cgroup layout ([`PodResolver`]).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use super::{ModuleSourceResolver, PodInfo, PodNetnsResolver};
use crate::module_fetch::ModuleFetcher;
use crate::pod_resolver::PodResolver;

impl ModuleSourceResolver for ModuleFetcher {
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        sha256: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>> {
        Box::pin(async move {
            ModuleFetcher::fetch(self, url, sha256)
                .await
                .map(|module| module.bytes)
                .map_err(|error| error.to_string())
        })
    }
}

/// A pod's netns from its cgroup's processes, as kubelet lays them out.
pub struct KubeletPodResolver(pub PodResolver);

impl PodNetnsResolver for KubeletPodResolver {
    fn netns_of(&self, pod: &PodInfo) -> Result<PathBuf, String> {
        self.0
            .resolve(&pod.uid)
            .map(|resolved| resolved.netns)
            .map_err(|error| error.to_string())
    }
}
