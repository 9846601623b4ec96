//! [`HostState`]: what a plugin instance holds on any engine, i.e. everything
//! a hostcall can see (engine handles live in the backend, see [`crate::guest`]).
//!
//! The embedder's [`HttpStream`] is lent to the store for the duration of one
//! callback ([`CallScope`]) as a [`LentStream`] pointer; its
//! [`TcpConnection`] is moved in and back out.

use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::abi::AbiVersion;
use crate::embedder::{Embedder, HttpCallResponse};
use crate::headers::HeaderMap;
use crate::plugin::Plugin;
use crate::shared::QueueOwner;
use crate::stream::{HttpStream, StreamRequest, TcpConnection};

/// The kind of a context the guest knows about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContextKind {
    Root,
    Http,
    Tcp,
}

/// Which configuration buffer the running callback may read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ConfigPhase {
    #[default]
    None,
    /// `proxy_on_configure`: PLUGIN_CONFIGURATION is readable.
    Configure,
}

/// Hostcalls the guest may make right now (cpp-host `startVm` / `allocMemory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Restriction {
    #[default]
    None,
    /// `_initialize` / `_start` / `main`: logging and WASI only.
    Start,
    /// Inside the guest allocator: `proxy_log`, `fd_write`, `clock_time_get`
    /// and `poll_oneoff` only; anything else traps (cpp-host fails the VM).
    Allocator,
}

impl Restriction {
    /// Whether `name` (an `env` or WASI function name) may run now.
    pub(crate) fn allows(self, name: &str) -> bool {
        match self {
            Restriction::None => true,
            Restriction::Allocator => matches!(
                name,
                "proxy_log" | "fd_write" | "clock_time_get" | "poll_oneoff"
            ),
            Restriction::Start => !name.starts_with("proxy_") || name == "proxy_log",
        }
    }
}

/// What kind of callout a token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CalloutKind {
    Http,
    GrpcCall,
    GrpcStream,
}

impl CalloutKind {
    /// cpp-host keeps the kind in the low 2 bits of the token.
    pub(crate) fn bits(self) -> u32 {
        match self {
            CalloutKind::Http => 0,
            CalloutKind::GrpcCall => 1,
            CalloutKind::GrpcStream => 2,
        }
    }
}

/// The embedder's stream, lent to the store for one guest call.
///
/// A pointer rather than the stream moved in: a request makes about seven
/// guest calls, and moving the ~500-byte stream in and out of the store around
/// each (plus building the empty one left behind) was ~5% of a proxied
/// request's instructions (callgrind: 57.7k -> 54.9k).
///
/// Soundness rests on [`LentStream::lend`]'s contract, which the instance's
/// `with_stream` and `root_event` keep: the stream is exclusively borrowed for
/// the whole call and [`CallScope::finish`] clears the pointer before that
/// borrow ends, so the pointer is never dereferenced after it.
#[derive(Debug)]
pub(crate) struct LentStream(NonNull<HttpStream>);

// SAFETY: the pointer is only set while the embedder's `&mut HttpStream`
// borrow is held by the thread running the call; `HttpStream` is `Send`.
unsafe impl Send for LentStream {}

impl LentStream {
    /// # Safety
    /// `stream` must stay exclusively borrowed, and in place, until the
    /// scope holding this is [`CallScope::finish`]ed.
    pub(crate) unsafe fn lend(stream: &mut HttpStream) -> LentStream {
        LentStream(NonNull::from(stream))
    }

    pub(crate) fn get(&self) -> &HttpStream {
        // SAFETY: see `lend`: the borrow outlives the scope holding `self`.
        unsafe { self.0.as_ref() }
    }

    pub(crate) fn get_mut(&mut self) -> &mut HttpStream {
        // SAFETY: as above, and `&mut self` makes this the only access.
        unsafe { self.0.as_mut() }
    }
}

/// State of the callback that is running right now.
#[derive(Debug, Default)]
pub(crate) struct CallScope {
    /// The context hostcalls act on: the one the host called into (0 = none,
    /// e.g. `_initialize`) until `proxy_set_effective_context` changes it.
    pub effective_context_id: u32,
    /// The embedder's stream, lent for this call, and the context it belongs to.
    pub stream: Option<(u32, LentStream)>,
    /// The embedder's TCP connection, lent for this call.
    pub tcp: Option<(u32, TcpConnection)>,
    pub phase: ConfigPhase,
    /// Set by `proxy_send_local_response`: the header callback's own result is
    /// then ignored and the stream stops (cpp-host's `stopNextIteration`).
    pub local_response_sent: bool,
    /// `proxy_on_http_call_response`: maps 6/7 and buffer 4 (read-only).
    pub http_call_response: Option<HttpCallResponse>,
    /// gRPC callbacks: maps 4/5 and buffer 5 (read-only).
    pub grpc_initial_metadata: Option<HeaderMap>,
    pub grpc_trailing_metadata: Option<HeaderMap>,
    pub grpc_message: Option<Vec<u8>>,
    /// `proxy_on_foreign_function`: buffer 8.
    pub foreign_arguments: Option<Vec<u8>>,
    /// What `proxy_get_status` reports: (code, message).
    pub status: Option<(u32, Vec<u8>)>,
    pub restriction: Restriction,
}

/// What a finished call hands back to the embedder's side (the lent stream
/// needs no handing back: the pointer is simply dropped).
pub(crate) struct CallEnd {
    pub tcp: Option<(u32, TcpConnection)>,
    pub local_response_sent: bool,
}

impl CallScope {
    /// Ends the call: takes what was lent and clears the rest in place.
    /// (The scope is about 1 KiB; rebuilding and moving it on every guest
    /// call was a measurable part of a request.)
    pub(crate) fn finish(&mut self) -> CallEnd {
        // Listed without `..`, so a new field cannot be forgotten here.
        let CallScope {
            effective_context_id,
            stream,
            tcp,
            phase,
            local_response_sent,
            http_call_response,
            grpc_initial_metadata,
            grpc_trailing_metadata,
            grpc_message,
            foreign_arguments,
            status,
            restriction,
        } = self;
        *effective_context_id = 0;
        *phase = ConfigPhase::default();
        *http_call_response = None;
        *grpc_initial_metadata = None;
        *grpc_trailing_metadata = None;
        *grpc_message = None;
        *foreign_arguments = None;
        *status = None;
        *restriction = Restriction::default();
        *stream = None;
        CallEnd {
            tcp: tcp.take(),
            local_response_sent: std::mem::take(local_response_sent),
        }
    }
}

pub(crate) struct HostState {
    pub plugin: Plugin,
    /// Live contexts by id; ids start at 1 and are never reused.
    pub contexts: BTreeMap<u32, ContextKind>,
    pub root_context_id: u32,
    pub call: CallScope,
    /// `proxy_set_tick_period_milliseconds`; the embedder calls `on_tick`.
    pub tick_period: Option<Duration>,
    /// `proxy_continue_stream` / `proxy_close_stream` calls, until the embedder takes them.
    pub stream_requests: Vec<StreamRequest>,
    pub embedder: Embedder,
    /// Shared queues this instance registered wake it through this.
    pub queue_owner: Arc<QueueOwner>,
    /// Callouts in flight, by token: kind and the context that started it.
    pub callouts: HashMap<u32, (CalloutKind, u32)>,
    pub last_callout_index: u32,
    /// Properties set with `proxy_set_property` outside a stream.
    pub properties: HashMap<String, Vec<u8>>,
    /// Root contexts whose `proxy_on_done` returned false: waiting for `proxy_done`.
    pub pending_done: Vec<u32>,
    /// Root contexts that called `proxy_done` while pending.
    pub done: Vec<u32>,
}

impl HostState {
    pub fn new(plugin: Plugin, embedder: Embedder) -> Self {
        let waker = embedder.queue_waker.clone();
        HostState {
            plugin,
            contexts: BTreeMap::new(),
            root_context_id: 0,
            call: CallScope::default(),
            tick_period: None,
            stream_requests: Vec::new(),
            embedder,
            queue_owner: QueueOwner::new(waker),
            callouts: HashMap::new(),
            last_callout_index: 0,
            properties: HashMap::new(),
            pending_done: Vec::new(),
            done: Vec::new(),
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
            Some((id, stream)) if *id == self.call.effective_context_id => Some(stream.get_mut()),
            _ => None,
        }
    }

    pub fn stream(&self) -> Option<&HttpStream> {
        match &self.call.stream {
            Some((id, stream)) if *id == self.call.effective_context_id => Some(stream.get()),
            _ => None,
        }
    }

    /// The lent TCP connection, if it belongs to the effective context.
    pub fn tcp_mut(&mut self) -> Option<&mut TcpConnection> {
        match &mut self.call.tcp {
            Some((id, conn)) if *id == self.call.effective_context_id => Some(conn),
            _ => None,
        }
    }

    /// A fresh callout token of `kind` (index << 2 | kind, never 0 for HTTP).
    pub fn new_callout(&mut self, kind: CalloutKind) -> u32 {
        self.last_callout_index = self.last_callout_index.wrapping_add(1).max(1) & (u32::MAX >> 2);
        let token = (self.last_callout_index << 2) | kind.bits();
        self.callouts
            .insert(token, (kind, self.call.effective_context_id));
        token
    }
}
