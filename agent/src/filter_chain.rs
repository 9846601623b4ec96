//! One worker's Proxy-Wasm filter chain: its own instance of each plugin, run
//! in order on request headers and in reverse order on response headers, as
//! Envoy's HTTP filter manager does.
//!
//! A plugin that fails (a trap or a host error) gives the request its failure
//! policy — FAIL_CLOSED answers 503, FAIL_OPEN skips the plugin — and its
//! instance is thrown away and re-created for the next request, since a
//! trapped instance's memory can no longer be trusted.

use wisp_wasm_host::{Action, FailurePolicy, HttpStream, LocalResponse, Plugin, PluginInstance};

use crate::metrics::{Metrics, PluginLabels};

/// The response details Envoy gives a stream failed by a Wasm plugin.
pub const WASM_FAIL_DETAILS: &str = "wasm_fail_stream";

struct Slot {
    plugin: Plugin,
    /// `None` after a failure until re-created.
    instance: Option<PluginInstance>,
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
                    instance: Some(plugin.instantiate()?),
                    plugin: plugin.clone(),
                })
            })
            .collect::<Result<_, wisp_wasm_host::Error>>()?;
        Ok(FilterChain { slots })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
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
            let result = slot.instance_mut().and_then(|instance| {
                let id = instance.create_http_context()?;
                contexts.ids[index] = Some(id);
                instance.on_request_headers(id, stream, end_of_stream)
            });
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
                        plugin = slot.plugin.config().name,
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
            let result = slot
                .instance_mut()
                .and_then(|instance| instance.on_response_headers(id, stream, end_of_stream));
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
            let result = slot
                .instance_mut()
                .and_then(|instance| instance.finish_http_context(id, stream));
            if let Err(error) = result {
                // The response is already on its way; only the instance pays.
                let _ = slot.fail(error, metrics);
            }
        }
    }
}

impl Slot {
    fn labels(&self) -> PluginLabels {
        PluginLabels {
            plugin: self.plugin.config().name.clone(),
        }
    }

    /// The live instance, re-created if an earlier failure discarded it.
    fn instance_mut(&mut self) -> Result<&mut PluginInstance, wisp_wasm_host::Error> {
        if self.instance.is_none() {
            tracing::info!(
                plugin = self.plugin.config().name,
                "re-creating plugin instance"
            );
            self.instance = Some(self.plugin.instantiate()?);
        }
        Ok(self.instance.as_mut().expect("just set"))
    }

    /// Applies the failure policy; returns the response to send for
    /// FAIL_CLOSED, `None` when the request continues without the plugin.
    fn fail(&mut self, error: wisp_wasm_host::Error, metrics: &Metrics) -> Option<LocalResponse> {
        let policy = self.plugin.config().failure_policy;
        tracing::error!(plugin = self.plugin.config().name, ?policy, %error, "plugin failed");
        metrics.plugin_failures.get_or_create(&self.labels()).inc();
        self.instance = None;
        match policy {
            FailurePolicy::FailOpen => None,
            FailurePolicy::FailClosed => Some(plugin_failure_response(503, WASM_FAIL_DETAILS)),
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
