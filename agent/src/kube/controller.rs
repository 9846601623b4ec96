//! The control loop: reflectors (list + watch, relisting with backoff
//! after errors) on this node's Pods (field selector `spec.nodeName`),
//! Namespaces, Services, EndpointSlices and WasmPlugins; on any change,
//! after a short debounce, the whole state is translated into a
//! [`Config`] and handed to a [`ConfigSink`] — in the agent, the same
//! [`Applier`](crate::reload::Applier) a file reload uses — and each
//! `WasmPlugin` this node runs gets its status entry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::crd::WasmPlugin;
use super::status::{self, NodeOutcome};
use super::translate::{self, ClusterState, Selected};
use super::{ModuleSourceResolver, PodNetnsResolver};
use crate::config::{Config, KubernetesConfig, PluginSpec};

/// Where the controller puts what it computed.
pub trait ConfigSink: Send {
    /// Checks that one plugin compiles and instantiates (a canary), so a
    /// bad module fails alone and is reported on its own status.
    fn check_plugin(&mut self, plugin: &PluginSpec) -> Result<(), String>;
    /// Applies a whole config; an error leaves the previous one in effect.
    fn apply(&mut self, config: Config) -> Result<(), String>;
}

/// Debounce: changes arriving together are applied together.
const SETTLE: Duration = Duration::from_millis(200);
/// Re-translate this often even without events: pods whose network
/// namespace was not there yet, modules whose fetch failed.
pub const RESYNC: Duration = Duration::from_secs(10);

pub struct Controller {
    pub client: kube::Client,
    pub node: String,
    /// The file's config, which the cluster's objects are added to.
    pub base: Config,
    pub settings: KubernetesConfig,
    pub modules: Arc<dyn ModuleSourceResolver>,
    pub netns: Arc<dyn PodNetnsResolver>,
}

struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    plugins: Store<WasmPlugin>,
}

impl Stores {
    fn snapshot(&self) -> ClusterState {
        ClusterState {
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            plugins: self.plugins.state(),
        }
    }
}

/// Which reflector an event came from, and whether it completed a (re)list.
type Tick = (usize, bool);

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
) -> (Store<K>, BoxStream<'static, Tick>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .filter_map(move |event| {
            let tick = match event {
                Ok(watcher::Event::InitDone) => Some((index, true)),
                Ok(_) => Some((index, false)),
                Err(error) => {
                    // The backoff wraps the watcher: it relists after this.
                    tracing::warn!(kind = %kind, %error, "watch failed; relisting with backoff");
                    None
                }
            };
            std::future::ready(tick)
        })
        .boxed();
    (store, stream)
}

/// Module bytes fetched for one (url, sha256).
type ModuleKey = (String, Option<String>);

#[derive(Default)]
struct Memory {
    /// Fetched modules by (url, sha256): their local path.
    modules: BTreeMap<ModuleKey, PathBuf>,
    /// Canary results by (plugin key, generation, module path).
    checks: BTreeMap<(String, i64, PathBuf), Result<(), String>>,
    /// The last version of each plugin that passed, kept when a newer one
    /// fails: a failed fetch or compile leaves the previous plugin in place.
    last_good: BTreeMap<String, PathBuf>,
    /// What we last wrote to each plugin's status (namespace/name).
    written: BTreeMap<String, NodeOutcome>,
    applied: Option<serde_json::Value>,
}

impl Controller {
    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut sink: impl ConfigSink, mut shutdown: watch::Receiver<bool>) {
        let client = &self.client;
        let pods_config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let (pods, s0) = reflect(Api::<Pod>::all(client.clone()), pods_config, 0);
        let (namespaces, s1) =
            reflect(Api::<Namespace>::all(client.clone()), Default::default(), 1);
        let (services, s2) = reflect(Api::<Service>::all(client.clone()), Default::default(), 2);
        let (endpoint_slices, s3) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            Default::default(),
            3,
        );
        let (plugins, s4) = reflect(
            Api::<WasmPlugin>::all(client.clone()),
            Default::default(),
            4,
        );
        let stores = Stores {
            pods,
            namespaces,
            services,
            endpoint_slices,
            plugins,
        };
        let mut events = futures::stream::select_all([s0, s1, s2, s3, s4]);
        let mut listed = [false; 5];
        let mut dirty = false;
        let mut memory = Memory::default();
        let mut settle = tokio::time::interval(SETTLE);
        let mut resync = tokio::time::interval(RESYNC);
        tracing::info!(node = %self.node, "watching the Kubernetes API");
        loop {
            tokio::select! {
                tick = events.next() => {
                    let Some((index, init_done)) = tick else { break };
                    if init_done && !listed[index] {
                        listed[index] = true;
                        if listed.iter().all(|l| *l) {
                            tracing::info!("initial lists complete");
                        }
                    }
                    dirty = true;
                }
                _ = settle.tick(), if dirty && listed.iter().all(|l| *l) => {
                    dirty = false;
                    self.reconcile(&stores.snapshot(), &mut sink, &mut memory).await;
                }
                _ = resync.tick() => dirty = true,
                _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
            }
        }
        tracing::info!("Kubernetes control loop stopped");
    }

    /// Fetches (or reuses) the module of `selected` and checks it.
    async fn module_for(
        &self,
        selected: &Selected,
        sink: &mut impl ConfigSink,
        memory: &mut Memory,
    ) -> Result<PathBuf, String> {
        let spec = &selected.plugin.spec;
        let key = (spec.url.clone(), spec.sha256.clone());
        let path = match memory.modules.get(&key) {
            Some(path) => path.clone(),
            None => {
                let bytes = self
                    .modules
                    .fetch(&spec.url, spec.sha256.as_deref())
                    .await
                    .map_err(|e| format!("fetching {}: {e}", spec.url))?;
                let path = super::store_module(&self.settings.module_dir, &bytes)?;
                memory.modules.insert(key, path.clone());
                path
            }
        };
        let generation = selected.plugin.metadata.generation.unwrap_or(0);
        let check_key = (selected.key.clone(), generation, path.clone());
        if !memory.checks.contains_key(&check_key) {
            let result = sink.check_plugin(&translate::plugin_spec(selected, path.clone()));
            memory.checks.insert(check_key.clone(), result);
        }
        memory.checks[&check_key].clone().map(|()| path)
    }

    async fn reconcile(
        &self,
        state: &ClusterState,
        sink: &mut impl ConfigSink,
        memory: &mut Memory,
    ) {
        let node = &self.node;
        let (workloads, skipped) = translate::local_workloads(state, node, self.netns.as_ref());
        for s in &skipped {
            tracing::warn!(pod = %s.pod, reason = %s.reason, "pod not enrolled (retried on the next change or resync)");
        }
        let selected = translate::select_plugins(state, &workloads, &self.settings.root_namespace);
        let mut chain = Vec::new();
        let mut outcomes = Vec::new();
        for s in selected {
            let generation = s.plugin.metadata.generation.unwrap_or(0);
            let count = s.workloads.len();
            let result = match &s.invalid {
                Some(reason) => Err(reason.clone()),
                None => self.module_for(&s, sink, memory).await,
            };
            let entry = match result {
                Ok(path) => {
                    memory.last_good.insert(s.key.clone(), path.clone());
                    chain.push((s.clone(), path));
                    NodeOutcome::loaded(node, generation, count)
                }
                Err(reason) => {
                    // A module that cannot be fetched keeps the last good
                    // one; an invalid spec cannot run at all (its fields
                    // would go into the node's configuration).
                    let last_good = match &s.invalid {
                        None => memory.last_good.get(&s.key),
                        Some(_) => None,
                    };
                    let reason = match last_good {
                        Some(path) => {
                            chain.push((s.clone(), path.clone()));
                            format!("{reason}; the previously loaded version stays in effect")
                        }
                        None => reason,
                    };
                    tracing::warn!(plugin = %s.key, %reason, "plugin not loaded");
                    NodeOutcome::failed(node, generation, count, reason)
                }
            };
            outcomes.push(NodeOutcome {
                namespace: s.plugin.metadata.namespace.clone().unwrap_or_default(),
                name: s.plugin.metadata.name.clone().unwrap_or_default(),
                entry: Some(entry),
            });
        }
        let config =
            translate::build_config(&self.base, &workloads, &chain, translate::services(state));
        let dump = serde_json::to_value(&config).ok();
        if dump != memory.applied {
            match sink.apply(config) {
                Ok(()) => {
                    tracing::info!(
                        workloads = workloads.len(),
                        plugins = chain.len(),
                        "applied the cluster's configuration"
                    );
                    memory.applied = dump;
                }
                Err(reason) => {
                    tracing::error!(%reason, "cluster configuration NOT applied; the previous one stays in effect");
                    for outcome in &mut outcomes {
                        if let Some(entry) = &mut outcome.entry {
                            *entry = NodeOutcome::failed(
                                node,
                                entry.observed_generation,
                                entry.workloads as usize,
                                format!("the node's configuration was not applied: {reason}"),
                            );
                        }
                    }
                }
            }
        }
        // Plugins this node reported on before and no longer runs: remove
        // our entry (if the object still exists).
        let live: std::collections::BTreeSet<String> = state
            .plugins
            .iter()
            .map(|p| translate::key_of(p.as_ref()))
            .collect();
        for (key, old) in &memory.written {
            let still = outcomes
                .iter()
                .any(|o| format!("{}/{}", o.namespace, o.name) == *key);
            if !still && old.entry.is_some() && live.contains(key) {
                outcomes.push(NodeOutcome {
                    entry: None,
                    ..old.clone()
                });
            }
        }
        memory.written.retain(|key, _| live.contains(key));
        // Forget modules and checks of plugin versions that are gone.
        let wanted: std::collections::BTreeSet<ModuleKey> = state
            .plugins
            .iter()
            .map(|p| (p.spec.url.clone(), p.spec.sha256.clone()))
            .collect();
        memory.modules.retain(|key, _| wanted.contains(key));
        memory.checks.retain(|(key, _, path), _| {
            live.contains(key) && memory.modules.values().any(|p| p == path)
        });
        memory.last_good.retain(|key, _| live.contains(key));
        for outcome in outcomes {
            let key = format!("{}/{}", outcome.namespace, outcome.name);
            if memory.written.get(&key) == Some(&outcome) {
                continue;
            }
            match status::apply(&self.client, node, &outcome).await {
                Ok(()) => {
                    memory.written.insert(key, outcome);
                }
                Err(error) => {
                    // Not remembered: retried on the next reconcile.
                    tracing::warn!(plugin = %key, %error, "could not write the plugin's status");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
