//! One worker's Proxy-Wasm filter chain: its own instance of each plugin, run
//! in order on request headers and in reverse order on response headers, as
//! Envoy's HTTP filter manager does.
//!
//! Each plugin runs under a [`Supervisor`] with its failure policy, as in
//! Envoy: a plugin that fails (a trap, a deadline, a host error) gives the
//! request its policy — FAIL_CLOSED and FAIL_RELOAD answer 503, FAIL_OPEN
//! skips the plugin — and its instance is thrown away, since a trapped
//! instance's memory can no longer be trusted. FAIL_RELOAD re-creates it
//! with jittered backoff until a crash-loop limit; the other policies keep
//! applying to later requests until the configuration is reloaded.

use std::time::Instant;

use wisp_wasm_host::{
    Action, Embedder, FailureAction, HttpStream, LocalResponse, Plugin, Supervisor,
};

use crate::metrics::{Metrics, PluginLabels};
use crate::plugins::{Facts, PluginMatch};

/// The response details Envoy gives a stream failed by a Wasm plugin.
pub const WASM_FAIL_DETAILS: &str = "wasm_fail_stream";

struct Slot {
    supervisor: Supervisor,
    /// Requests that do not match skip the plugin (`plugins[].match`).
    matcher: Option<PluginMatch>,
}

pub struct FilterChain {
    slots: Vec<Slot>,
}

/// The HTTP contexts one request holds in each plugin of the chain.
#[derive(Default)]
pub struct StreamContexts {
    /// Per slot: the context id, if the plugin has a context for this stream.
    ids: Vec<Option<u32>>,
}

/// What the request path does after the request headers went through the chain.
pub enum RequestVerdict {
    /// Forward upstream with the (possibly rewritten) request headers.
    Forward,
    /// Answer downstream with this response instead.
    Respond(LocalResponse),
}

impl FilterChain {
    /// Instantiates every plugin for this worker; fails if one cannot start,
    /// so a bad plugin is found at start-up rather than on the first request.
    pub fn new(plugins: &[Plugin]) -> Result<FilterChain, wisp_wasm_host::Error> {
        let slots = plugins
            .iter()
            .map(|plugin| {
                Ok(Slot {
                    supervisor: Supervisor::new(plugin.clone(), Embedder::default())?,
                    matcher: None,
                })
            })
            .collect::<Result<_, wisp_wasm_host::Error>>()?;
        Ok(FilterChain { slots })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sets each plugin's match, in plugin order.
    pub fn with_matches(mut self, matches: Vec<Option<PluginMatch>>) -> FilterChain {
        for (slot, matcher) in self.slots.iter_mut().zip(matches) {
            slot.matcher = matcher;
        }
        self
    }

    /// Runs `on_request_headers` through the chain, stopping at the first
    /// plugin that answers the request itself.
    pub fn on_request_headers(
        &mut self,
        contexts: &mut StreamContexts,
        stream: &mut HttpStream,
        end_of_stream: bool,
        metrics: &Metrics,
    ) -> RequestVerdict {
        contexts.ids.resize(self.slots.len(), None);
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(matcher) = &slot.matcher
                && !matcher.matches(&Facts::of_request(stream))
            {
                // Not for this request: no HTTP context, as if not configured.
                continue;
            }
            let Some(instance) = slot.supervisor.instance(Instant::now()) else {
                match slot.unavailable(metrics) {
                    Some(response) => return RequestVerdict::Respond(response),
                    None => continue,
                }
            };
            let result = instance.create_http_context().and_then(|id| {
                contexts.ids[index] = Some(id);
                instance.on_request_headers(id, stream, end_of_stream)
            });
            if result.is_ok() {
                slot.supervisor.on_success();
            }
            match result {
                Ok(_) if stream.local_response.is_some() => {
                    metrics.local_responses.get_or_create(&slot.labels()).inc();
                    let response = stream.local_response.take().expect("checked above");
                    return RequestVerdict::Respond(response);
                }
                Ok(Action::Continue) => {}
                Ok(Action::Pause) => {
                    // Resuming a paused stream needs http_call or timers, which
                    // arrive with the complete host; until then nothing could
                    // ever resume it, so fail it rather than hang.
                    tracing::warn!(
                        plugin = slot.supervisor.plugin().name(),
                        "plugin paused request headers without a local response; pausing is not supported yet"
                    );
                    return RequestVerdict::Respond(plugin_failure_response(
                        500,
                        "wasm_pause_unsupported",
                    ));
                }
                Err(error) => {
                    if let Some(response) = slot.fail(error, metrics) {
                        return RequestVerdict::Respond(response);
                    }
                }
            }
        }
        RequestVerdict::Forward
    }

    /// Runs `on_response_headers` through the chain in reverse order. Like
    /// Envoy, local responses pass through here too, so a plugin also sees
    /// (and decorates) the replies that it or another plugin generated.
    /// Returns a replacement response when a FAIL_CLOSED plugin fails.
    pub fn on_response_headers(
        &mut self,
        contexts: &mut StreamContexts,
        stream: &mut HttpStream,
        end_of_stream: bool,
        metrics: &Metrics,
    ) -> Option<LocalResponse> {
        for (index, slot) in self.slots.iter_mut().enumerate().rev() {
            let Some(id) = contexts.ids.get(index).copied().flatten() else {
                continue;
            };
            let Some(instance) = slot.supervisor.instance(Instant::now()) else {
                // The instance that held this context is gone.
                contexts.ids[index] = None;
                continue;
            };
            let result = instance.on_response_headers(id, stream, end_of_stream);
            if let Err(error) = result {
                contexts.ids[index] = None;
                if let Some(response) = slot.fail(error, metrics) {
                    return Some(response);
                }
            }
        }
        None
    }

    /// Ends the stream's contexts (`on_done`, `on_log`, `on_delete`).
    pub fn finish(&mut self, contexts: StreamContexts, stream: &mut HttpStream, metrics: &Metrics) {
        for (index, id) in contexts.ids.into_iter().enumerate() {
            let (Some(id), Some(slot)) = (id, self.slots.get_mut(index)) else {
                continue;
            };
            let Some(instance) = slot.supervisor.instance(Instant::now()) else {
                continue;
            };
            if let Err(error) = instance.finish_http_context(id, stream) {
                // The response is already on its way; only the instance pays.
                let _ = slot.fail(error, metrics);
            }
        }
    }
}

impl Slot {
    fn labels(&self) -> PluginLabels {
        PluginLabels {
            plugin: self.supervisor.plugin().name().to_owned(),
        }
    }

    /// Applies the failure policy after a failed call; returns the response
    /// to send, or `None` when the request continues without the plugin.
    fn fail(&mut self, error: wisp_wasm_host::Error, metrics: &Metrics) -> Option<LocalResponse> {
        metrics.plugin_failures.get_or_create(&self.labels()).inc();
        let action = self.supervisor.on_failure(&error, Instant::now());
        self.respond(action)
    }

    /// The policy for a request that finds no instance (failed, waiting for
    /// its reload backoff, or stopped as crash-looping).
    fn unavailable(&mut self, metrics: &Metrics) -> Option<LocalResponse> {
        metrics
            .plugin_unavailable
            .get_or_create(&self.labels())
            .inc();
        self.respond(self.supervisor.failure_action())
    }

    fn respond(&self, action: FailureAction) -> Option<LocalResponse> {
        match action {
            FailureAction::PassThrough => None,
            FailureAction::Reject => Some(plugin_failure_response(503, WASM_FAIL_DETAILS)),
        }
    }
}

fn plugin_failure_response(status: u16, details: &str) -> LocalResponse {
    LocalResponse {
        status,
        details: details.to_owned(),
        body: format!("{details}\n").into_bytes(),
        headers: Vec::new(),
        grpc_status: -1,
    }
}
