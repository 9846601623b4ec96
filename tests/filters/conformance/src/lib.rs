//! `wisp-conformance-filter`: a Proxy-Wasm plugin that exercises every host
//! call the proxy-wasm Rust SDK 0.2.5 exposes, so a host can be checked
//! against the SDK's expectations (status codes, memory hand-over, callback
//! order). Built for both `wasm32-wasip1` and `wasm32-unknown-unknown`.
//!
//! The root id picks the mode: `"tcp"` gives a network (stream) filter,
//! anything else an HTTP filter. In HTTP mode the request's `:path` picks a
//! scenario; each one reports what it saw in `x-conf-*` headers (request
//! headers while the request is in flight, response headers afterwards), so
//! the host test reads results from the maps it lent.
//!
//! | `:path` | what happens |
//! |---|---|
//! | `/headers` | reads all request headers, adds/replaces/removes some, sets the map |
//! | `/local` | local response 418 with a header and a body |
//! | `/body` | buffers the request body until end of stream, upper-cases it; prefixes/appends to the response body |
//! | `/trailers` | adds request and response trailers |
//! | `/properties` | reads `plugin_name`, `source.address`; sets and reads back `wisp.test` |
//! | `/shared` | increments the shared counter `hits` with CAS, deletes `scratch` |
//! | `/queue` | enqueues the `x-item` header into the queue `conformance` |
//! | `/metrics` | counter, gauge and histogram; reads the counter back |
//! | `/callout` | http call to upstream `backend`, paused until the answer |
//! | `/callout-unknown` | http call to an unknown upstream: 502 with the status |
//! | `/grpc` | unary gRPC call to `grpc-backend`, paused until the answer |
//! | `/foreign` | calls foreign function `echo` |
//! | `/time` | current time and log level |
//!
//! The root context: `on_vm_start` stores the VM configuration in shared data
//! `vm_config`; `on_configure` sets the tick period from the plugin
//! configuration (milliseconds as text, empty = no ticks) and registers the
//! queue `conformance`; `on_tick` counts ticks in shared data `ticks`;
//! `on_queue_ready` moves items to shared data `last_item`;
//! `on_foreign_function` stores its arguments in shared data `foreign_args`.
//!
//! In TCP mode, the plugin configuration `authz:<path>` makes every new
//! connection wait for an authorization callout: `on_new_connection` POSTs
//! the source address to `<path>` on cluster `backend` and pauses (the
//! upstream connect waits); the answer is logged as
//! `tcp #<id> authz <status>: <body>`, and any status but 200 closes the
//! connection.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        // The root id is readable while the root context is created.
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .unwrap_or_default();
        Box::new(Root { tcp: root_id == b"tcp", queue: 0, authz: None })
    });
}}

const QUEUE: &str = "conformance";

fn shared_string(key: &str) -> String {
    match hostcalls::get_shared_data(key) {
        Ok((Some(value), _)) => String::from_utf8_lossy(&value).into_owned(),
        _ => String::new(),
    }
}

fn set_shared(key: &str, value: &[u8]) {
    if let Err(status) = hostcalls::set_shared_data(key, Some(value), None) {
        log::error!("set_shared_data({key}) failed: {status:?}");
    }
}

struct Root {
    tcp: bool,
    queue: u32,
    /// TCP mode: the path on `backend` that authorizes new connections.
    authz: Option<String>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        log::info!("root done");
        true
    }

    fn on_foreign_function(&mut self, function_id: u32, arguments_size: usize) {
        let args =
            hostcalls::get_buffer(proxy_wasm::types::BufferType::CallData, 0, arguments_size)
                .ok()
                .flatten()
                .unwrap_or_default();
        let mut value = function_id.to_string().into_bytes();
        value.push(b':');
        value.extend_from_slice(&args);
        set_shared("foreign_args", &value);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let config = self.get_vm_configuration().unwrap_or_default();
        set_shared("vm_config", &config);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        if text == "reject" {
            return false;
        }
        if let Some(path) = text.strip_prefix("authz:") {
            self.authz = Some(path.to_owned());
        }
        if let Ok(millis) = text.trim().parse::<u64>() {
            self.set_tick_period(Duration::from_millis(millis));
        }
        self.queue = self.register_shared_queue(QUEUE);
        true
    }

    fn on_tick(&mut self) {
        let ticks: u64 = shared_string("ticks").parse().unwrap_or(0);
        set_shared("ticks", (ticks + 1).to_string().as_bytes());
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            set_shared("last_item", &item);
        }
        // Drained: the host answers EMPTY, which the SDK maps to None.
        assert!(matches!(self.dequeue_shared_queue(queue_id), Ok(None)));
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.tcp {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            path: String::new(),
        }))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp {
            context_id,
            authz: self.authz.clone(),
        }))
    }
}

struct Http {
    context_id: u32,
    path: String,
}

impl Http {
    fn report(&self, name: &str, value: &str) {
        self.set_http_request_header(&format!("x-conf-{name}"), Some(value));
    }

    fn scenario(&mut self) -> Action {
        match self.path.as_str() {
            "/headers" => {
                let all = self.get_http_request_headers();
                self.report("count", &all.len().to_string());
                self.add_http_request_header("x-added", "1");
                self.set_http_request_header("x-replaced", Some("new"));
                self.remove_http_request_header("x-remove-me");
                let mut headers = self.get_http_request_headers();
                headers.push(("x-via-set-map".into(), "yes".into()));
                let refs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                self.set_http_request_headers(refs);
                let missing = self.get_http_request_header("x-missing").is_none();
                self.report("missing-is-none", &missing.to_string());
                Action::Continue
            }
            "/local" => {
                self.send_http_response(418, vec![("x-local", "yes")], Some(b"short and stout"));
                Action::Pause
            }
            "/properties" => {
                let get = |path: Vec<&str>| {
                    self.get_property(path)
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                        .unwrap_or_else(|| "<none>".into())
                };
                self.report("plugin-name", &get(vec!["plugin_name"]));
                self.report("source", &get(vec!["source", "address"]));
                self.report("absent", &get(vec!["no", "such"]));
                self.set_property(vec!["wisp", "test"], Some(b"set-by-plugin"));
                self.report("roundtrip", &get(vec!["wisp", "test"]));
                Action::Continue
            }
            "/shared" => {
                loop {
                    let (value, cas) = self.get_shared_data("hits");
                    let hits: u64 = value
                        .and_then(|v| String::from_utf8(v).ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let next = (hits + 1).to_string();
                    match self.set_shared_data("hits", Some(next.as_bytes()), cas) {
                        Ok(()) => {
                            self.report("hits", &next);
                            break;
                        }
                        Err(Status::CasMismatch) => continue,
                        Err(status) => panic!("set_shared_data: {status:?}"),
                    }
                }
                // A stale CAS is refused.
                let stale = self.set_shared_data("hits", Some(b"0"), Some(u32::MAX - 7));
                self.report("stale-cas", &format!("{stale:?}"));
                self.set_shared_data("scratch", Some(b"x"), None).unwrap();
                self.remove_shared_data("scratch", None).unwrap();
                let (gone, _) = self.get_shared_data("scratch");
                self.report("deleted", &gone.is_none().to_string());
                Action::Continue
            }
            "/queue" => {
                let item = self.get_http_request_header("x-item").unwrap_or_default();
                let vm_id = self
                    .get_property(vec!["plugin_vm_id"])
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                match self.resolve_shared_queue(&vm_id, QUEUE) {
                    Some(queue) => {
                        self.enqueue_shared_queue(queue, Some(item.as_bytes()))
                            .unwrap();
                        self.report("queued", "true");
                    }
                    None => self.report("queued", "no queue"),
                }
                let unknown = self.resolve_shared_queue(&vm_id, "no-such-queue");
                self.report("unknown-queue", &format!("{unknown:?}"));
                Action::Continue
            }
            "/metrics" => {
                let counter =
                    hostcalls::define_metric(MetricType::Counter, "conf_requests").unwrap();
                let gauge = hostcalls::define_metric(MetricType::Gauge, "conf_inflight").unwrap();
                let histogram =
                    hostcalls::define_metric(MetricType::Histogram, "conf_sizes").unwrap();
                hostcalls::increment_metric(counter, 1).unwrap();
                hostcalls::increment_metric(gauge, 5).unwrap();
                hostcalls::increment_metric(gauge, -2).unwrap();
                hostcalls::record_metric(histogram, 42).unwrap();
                self.report(
                    "counter",
                    &hostcalls::get_metric(counter).unwrap().to_string(),
                );
                self.report("gauge", &hostcalls::get_metric(gauge).unwrap().to_string());
                Action::Continue
            }
            "/callout" => {
                let body = self
                    .get_http_request_header("x-callout-body")
                    .unwrap_or_default();
                match self.dispatch_http_call(
                    "backend",
                    vec![
                        (":method", "POST"),
                        (":path", "/check"),
                        (":authority", "backend"),
                    ],
                    Some(body.as_bytes()),
                    vec![("x-trailer", "t")],
                    Duration::from_secs(5),
                ) {
                    Ok(token) => {
                        self.report("token", &token.to_string());
                        Action::Pause
                    }
                    Err(status) => {
                        self.report("dispatch", &format!("{status:?}"));
                        Action::Continue
                    }
                }
            }
            "/callout-unknown" => {
                let result = self.dispatch_http_call(
                    "nowhere",
                    vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
                    None,
                    vec![],
                    Duration::from_secs(1),
                );
                let status = format!("{:?}", result.err());
                self.send_http_response(502, vec![("x-dispatch", &status)], None);
                Action::Pause
            }
            "/grpc" => {
                match self.dispatch_grpc_call(
                    "grpc-backend",
                    "wisp.Check",
                    "Allow",
                    vec![("x-md", b"1")],
                    Some(b"request-message"),
                    Duration::from_secs(5),
                ) {
                    Ok(_) => Action::Pause,
                    Err(status) => {
                        self.report("grpc-dispatch", &format!("{status:?}"));
                        Action::Continue
                    }
                }
            }
            "/foreign" => {
                let result = self.call_foreign_function("echo", Some(b"ping"));
                let text = match result {
                    Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    other => format!("{other:?}"),
                };
                self.report("foreign", &text);
                let missing = self.call_foreign_function("no_such_function", None);
                self.report("foreign-missing", &format!("{:?}", missing.err()));
                Action::Continue
            }
            "/time" => {
                let now = self.get_current_time();
                let after_2020 = now
                    .duration_since(UNIX_EPOCH)
                    .is_ok_and(|d| d.as_secs() > 1_577_836_800);
                self.report("time-ok", &after_2020.to_string());
                let level = hostcalls::get_log_level().map(|l| l as u32);
                self.report("log-level", &format!("{level:?}"));
                for level in [
                    LogLevel::Trace,
                    LogLevel::Debug,
                    LogLevel::Info,
                    LogLevel::Warn,
                    LogLevel::Error,
                    LogLevel::Critical,
                ] {
                    hostcalls::log(level, "conformance log line").unwrap();
                }
                Action::Continue
            }
            _ => Action::Continue,
        }
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if num_headers == 0 {
            let (code, message) = hostcalls::get_grpc_status().unwrap_or((0, None));
            self.send_http_response(
                503,
                vec![(
                    "x-callout-failed",
                    &format!("{code}:{}", message.unwrap_or_default()),
                )],
                None,
            );
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let trailer = self
            .get_http_call_response_trailer("x-answer-trailer")
            .unwrap_or_default();
        self.report("callout-status", &status);
        self.report("callout-body", &body);
        self.report("callout-trailer", &trailer);
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        if status_code != 0 {
            let (code, message) = self.get_grpc_status();
            self.report(
                "grpc-failed",
                &format!("{code}:{}", message.unwrap_or_default()),
            );
        } else {
            let body = self
                .get_grpc_call_response_body(0, response_size)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            self.report("grpc-message", &body);
        }
        self.resume_http_request();
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        log::debug!("#{} {}", self.context_id, self.path);
        self.scenario()
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.path != "/body" {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        if self.path == "/trailers" {
            self.add_http_request_trailer("x-trailers-seen", &num_trailers.to_string());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-conformance", "1");
        if self.path == "/body" {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.path == "/body" {
            if body_size > 0 {
                self.set_http_response_body(0, 0, b"<<");
            }
            if end_of_stream {
                self.set_http_response_body(usize::MAX >> 1, 0, b">>");
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.path == "/trailers" {
            self.set_http_response_trailer("x-response-trailer", Some("added"));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        log::info!("#{} done {}", self.context_id, self.path);
    }
}

/// Network filter: tags downstream data, counts upstream bytes, records
/// closes; optionally authorizes each connection with a callout.
struct Tcp {
    context_id: u32,
    authz: Option<String>,
}

impl Context for Tcp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "none".to_owned());
        let body = self
            .get_http_call_response_body(0, body_size)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        log::info!("tcp #{} authz {status}: {body}", self.context_id);
        if status != "200" {
            self.close_downstream();
        }
    }
}

impl StreamContext for Tcp {
    fn on_new_connection(&mut self) -> Action {
        let source = self
            .get_property(vec!["source", "address"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        set_shared(
            &format!("tcp_{}_source", self.context_id),
            source.as_bytes(),
        );
        let Some(path) = self.authz.clone() else {
            return Action::Continue;
        };
        match self.dispatch_http_call(
            "backend",
            vec![
                (":method", "POST"),
                (":path", &path),
                (":authority", "backend"),
            ],
            Some(source.as_bytes()),
            vec![],
            Duration::from_secs(5),
        ) {
            Ok(_) => Action::Pause,
            Err(status) => {
                log::error!("tcp #{} authz call failed: {status:?}", self.context_id);
                self.close_downstream();
                Action::Pause
            }
        }
    }

    fn on_downstream_data(&mut self, data_size: usize, end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if !end_of_stream && !data.ends_with(b"\n") {
            // Wait for a whole line.
            return Action::Pause;
        }
        self.set_downstream_data(0, data_size, &[b"[wisp] ", &data[..]].concat());
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.set_upstream_data(data_size, 0, b"<eom>");
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer_type: PeerType) {
        set_shared(
            &format!("tcp_{}_downstream_close", self.context_id),
            (peer_type as u32).to_string().as_bytes(),
        );
    }

    fn on_upstream_close(&mut self, peer_type: PeerType) {
        set_shared(
            &format!("tcp_{}_upstream_close", self.context_id),
            (peer_type as u32).to_string().as_bytes(),
        );
    }
}
