//! [`HostState`]: what a plugin instance's `Store` holds, i.e. everything a
//! hostcall can see.
//!
//! The store owns no borrowed data: the embedder's [`HttpStream`] is moved in
//! for the duration of one callback ([`CallScope`]) and moved back out after it.

use std::collections::BTreeMap;
use std::time::Duration;

use wasmtime::{Memory, TypedFunc};

use crate::abi::AbiVersion;
use crate::plugin::Plugin;
use crate::stream::{HttpStream, StreamRequest};

/// The kind of a context the guest knows about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContextKind {
    Root,
    Http,
}

/// Which configuration buffer the running callback may read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ConfigPhase {
    #[default]
    None,
    /// `proxy_on_configure`: PLUGIN_CONFIGURATION is readable.
    Configure,
}

/// State of the callback that is running right now.
#[derive(Debug, Default)]
pub(crate) struct CallScope {
    /// The context hostcalls act on: the one the host called into (0 = none,
    /// e.g. `_initialize`) until `proxy_set_effective_context` changes it.
    pub effective_context_id: u32,
    /// The embedder's stream, lent for this call, and the context it belongs to.
    pub stream: Option<(u32, HttpStream)>,
    pub phase: ConfigPhase,
    /// Set by `proxy_send_local_response`: the header callback's own result is
    /// then ignored and the stream stops (cpp-host's `stopNextIteration`).
    pub local_response_sent: bool,
}

pub(crate) struct HostState {
    pub plugin: Plugin,
    /// Filled in right after instantiation.
    pub memory: Option<Memory>,
    pub allocator: Option<TypedFunc<i32, i32>>,
    /// Live contexts by id; ids start at 1 and are never reused.
    pub contexts: BTreeMap<u32, ContextKind>,
    pub root_context_id: u32,
    pub call: CallScope,
    /// `proxy_set_tick_period_milliseconds` (recorded; ticks are not delivered yet).
    pub tick_period: Option<Duration>,
    /// `proxy_continue_stream` / `proxy_close_stream` calls, until the embedder takes them.
    pub stream_requests: Vec<StreamRequest>,
}

impl HostState {
    pub fn new(plugin: Plugin) -> Self {
        HostState {
            plugin,
            memory: None,
            allocator: None,
            contexts: BTreeMap::new(),
            root_context_id: 0,
            call: CallScope::default(),
            tick_period: None,
            stream_requests: Vec::new(),
        }
    }

    pub fn plugin_name(&self) -> &str {
        self.plugin.name()
    }

    pub fn abi(&self) -> AbiVersion {
        self.plugin.abi_version()
    }

    /// The lent stream, if it belongs to the effective context.
    pub fn stream_mut(&mut self) -> Option<&mut HttpStream> {
        match &mut self.call.stream {
            Some((id, stream)) if *id == self.call.effective_context_id => Some(stream),
            _ => None,
        }
    }

    pub fn stream(&self) -> Option<&HttpStream> {
        match &self.call.stream {
            Some((id, stream)) if *id == self.call.effective_context_id => Some(stream),
            _ => None,
        }
    }
}
