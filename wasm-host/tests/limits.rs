//! Limits and safety with hand-written WAT plugins: memory cap, callback
//! deadline, fuel, capability allow-list, hostcalls forbidden inside the
//! allocator and during start-up, a trap in every callback, and the
//! supervisor's failure policies.

use std::time::{Duration, Instant};

use wisp_wasm_host::{
    Error, FailureAction, FailurePolicy, HttpCallResponse, HttpStream, IsolationMode, ModuleSource,
    PeerType, Plugin, PluginConfig, PluginCounters, PluginInstance, PoolLimits, ResourceLimits,
    Supervisor, TcpConnection, sha256_hex,
};

/// Memory (`pages` of 64 KiB), a bump allocator and the 0.2.1 marker, around `body`.
fn module_with(pages: u32, allocator_extra: &str, body: &str) -> String {
    format!(
        r#"(module
            {body}
            (memory (export "memory") {pages})
            (global $heap (mut i32) (i32.const 32768))
            (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $ptr i32)
                {allocator_extra}
                (local.set $ptr (global.get $heap))
                (global.set $heap (i32.add (global.get $heap) (local.get $size)))
                (local.get $ptr))
            (func (export "proxy_abi_version_0_2_1")))"#
    )
}

fn module(body: &str) -> String {
    module_with(1, "", body)
}

fn compile(name: &str, wat: &str, config: PluginConfig) -> Result<Plugin, Error> {
    Plugin::compile(
        PluginConfig {
            name: name.into(),
            ..config
        },
        wat.as_bytes(),
    )
}

fn counter(value: &std::sync::atomic::AtomicU64) -> u64 {
    PluginCounters::get(value)
}

#[test]
fn memory_growth_stops_at_the_limit() {
    // on_vm_start grows memory one page at a time until memory.grow fails,
    // and succeeds only if it did fail before 64 pages (4 MiB).
    let wat = module(
        r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (local $i i32)
            (loop $grow
                (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
                    (then (return (i32.lt_u (local.get $i) (i32.const 64)))))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $grow))
            (i32.const 0))"#,
    );
    let limits = ResourceLimits {
        max_memory_bytes: 1 << 20,
        ..Default::default()
    };
    let plugin = compile(
        "bomb",
        &wat,
        PluginConfig {
            limits,
            ..Default::default()
        },
    )
    .unwrap();
    let instance = plugin.instantiate().expect("growth is refused, not fatal");
    assert_eq!(instance.memory_bytes(), 1 << 20);

    // A module whose initial memory is already past the limit cannot start.
    let big = module_with(32, "", "");
    let limits = ResourceLimits {
        max_memory_bytes: 1 << 20,
        ..Default::default()
    };
    let error = compile(
        "big",
        &big,
        PluginConfig {
            limits,
            ..Default::default()
        },
    )
    .unwrap()
    .instantiate()
    .err()
    .expect("refused");
    assert!(matches!(error, Error::Instantiate { .. }), "{error}");
}

const SPIN: &str = r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $spin (br $spin)) (i32.const 0))"#;

#[test]
fn an_infinite_loop_is_stopped_at_the_deadline() {
    let limits = ResourceLimits {
        callback_deadline: Duration::from_millis(50),
        ..Default::default()
    };
    let plugin = compile(
        "spin",
        &module(SPIN),
        PluginConfig {
            limits,
            ..Default::default()
        },
    )
    .unwrap();
    let mut instance = plugin.instantiate().unwrap();
    let id = instance.create_http_context().unwrap();
    let started = Instant::now();
    let error = instance
        .on_request_headers(id, &mut HttpStream::default(), true)
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert!(took >= Duration::from_millis(45), "took {took:?}");
    match &error {
        Error::Trap {
            reason, callback, ..
        } => {
            assert_eq!(*callback, "proxy_on_request_headers");
            assert!(reason.contains("deadline exceeded"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert!(error.is_runtime_failure());
    assert_eq!(counter(&plugin.counters().deadline_exceeded), 1);
    assert_eq!(counter(&plugin.counters().runtime_failures), 1);
    assert!(instance.is_failed());
}

#[test]
fn fuel_limits_a_callback() {
    let limits = ResourceLimits {
        fuel: Some(100_000),
        callback_deadline: Duration::from_secs(30),
        ..Default::default()
    };
    let plugin = compile(
        "fuel",
        &module(SPIN),
        PluginConfig {
            limits,
            ..Default::default()
        },
    )
    .unwrap();
    let mut instance = plugin.instantiate().unwrap();
    let id = instance.create_http_context().unwrap();
    let error = instance
        .on_request_headers(id, &mut HttpStream::default(), true)
        .unwrap_err();
    assert!(error.to_string().contains("fuel exhausted"), "{error}");
    // Fuel is per callback: a fresh instance gets the full amount again.
    assert!(plugin.instantiate().is_ok());
}

#[test]
fn capability_restriction() {
    // on_vm_start succeeds iff proxy_get_property answers INTERNAL_FAILURE
    // and random_get answers ENOTCAPABLE, while proxy_log still works.
    let wat = module(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
        (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
        (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
            (i32.and
                (i32.and
                    (i32.eq (call $log (i32.const 2) (i32.const 0) (i32.const 4)) (i32.const 0))
                    (i32.eq (call $prop (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 20)) (i32.const 10)))
                (i32.eq (call $random (i32.const 0) (i32.const 4)) (i32.const 76))))"#,
    );
    let config = PluginConfig {
        allowed_capabilities: Some(["proxy_log".to_owned()].into()),
        ..Default::default()
    };
    let plugin = compile("restricted", &wat, config).unwrap();
    plugin
        .instantiate()
        .expect("statuses as cpp-host returns them");
    assert_eq!(counter(&plugin.counters().restricted_hostcalls), 1);
    assert_eq!(counter(&plugin.counters().restricted_wasi_calls), 1);

    // Unrestricted, the same module gets real answers (NOT_FOUND, SUCCESS).
    let open = compile("open", &wat, PluginConfig::default()).unwrap();
    assert!(matches!(
        open.instantiate(),
        Err(Error::VmStartFailed { .. })
    ));
}

/// A module whose allocator calls `import` first; on_vm_start asks for the
/// VM configuration, which makes the host allocate.
fn allocator_calling(import: &str, call: &str) -> String {
    module_with(
        1,
        call,
        &format!(
            r#"{import}
            (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
                (i32.eqz (call $get (i32.const 6) (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 20))))"#
        ),
    )
}

#[test]
fn the_allocator_may_log_but_not_call_other_hostcalls() {
    let config = || PluginConfig {
        vm_configuration: b"vm".to_vec(),
        ..Default::default()
    };
    let logs = allocator_calling(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))"#,
        "(drop (call $log (i32.const 1) (i32.const 0) (i32.const 1)))",
    );
    compile("alloc-log", &logs, config())
        .unwrap()
        .instantiate()
        .expect("logging inside malloc is allowed");

    let done = allocator_calling(
        r#"(import "env" "proxy_done" (func $done (result i32)))"#,
        "(drop (call $done))",
    );
    let error = compile("alloc-done", &done, config())
        .unwrap()
        .instantiate()
        .err()
        .expect("forbidden");
    match error {
        Error::Trap {
            reason, callback, ..
        } => {
            assert_eq!(callback, "proxy_on_vm_start");
            assert!(reason.contains("proxy_done is forbidden"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn initialize_may_only_log_and_use_wasi() {
    let wat = module(
        r#"(import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
        (func (export "_initialize") (drop (call $tick (i32.const 10))))"#,
    );
    let error = compile("init", &wat, PluginConfig::default())
        .unwrap()
        .instantiate()
        .err()
        .expect("forbidden");
    assert!(
        matches!(&error, Error::Trap { callback: "_initialize", reason, .. } if reason.contains("forbidden")),
        "{error}"
    );
}

/// Drives one callback of a fresh instance; the module traps only there.
fn drive(instance: &mut PluginInstance, export: &str) -> Result<(), Error> {
    let mut stream = HttpStream::default();
    let mut conn = TcpConnection::default();
    match export {
        "proxy_on_request_headers"
        | "proxy_on_response_headers"
        | "proxy_on_request_body"
        | "proxy_on_response_body"
        | "proxy_on_request_trailers"
        | "proxy_on_response_trailers"
        | "proxy_on_done"
        | "proxy_on_log"
        | "proxy_on_delete" => {
            let id = instance.create_http_context()?;
            match export {
                "proxy_on_request_headers" => {
                    instance.on_request_headers(id, &mut stream, true).map(drop)
                }
                "proxy_on_response_headers" => instance
                    .on_response_headers(id, &mut stream, true)
                    .map(drop),
                "proxy_on_request_body" => {
                    instance.on_request_body(id, &mut stream, true).map(drop)
                }
                "proxy_on_response_body" => {
                    instance.on_response_body(id, &mut stream, true).map(drop)
                }
                "proxy_on_request_trailers" => {
                    instance.on_request_trailers(id, &mut stream).map(drop)
                }
                "proxy_on_response_trailers" => {
                    instance.on_response_trailers(id, &mut stream).map(drop)
                }
                _ => instance.finish_http_context(id, &mut stream),
            }
        }
        "proxy_on_new_connection"
        | "proxy_on_downstream_data"
        | "proxy_on_upstream_data"
        | "proxy_on_downstream_connection_close"
        | "proxy_on_upstream_connection_close" => {
            let id = instance.create_tcp_context()?;
            match export {
                "proxy_on_new_connection" => instance.on_new_connection(id, &mut conn).map(drop),
                "proxy_on_downstream_data" => {
                    instance.on_downstream_data(id, &mut conn, false).map(drop)
                }
                "proxy_on_upstream_data" => {
                    instance.on_upstream_data(id, &mut conn, false).map(drop)
                }
                "proxy_on_downstream_connection_close" => {
                    instance.on_downstream_connection_close(id, &mut conn, PeerType::Remote)
                }
                _ => instance.on_upstream_connection_close(id, &mut conn, PeerType::Local),
            }
        }
        "proxy_on_tick" => instance.on_tick(),
        "proxy_on_foreign_function" => instance.on_foreign_function(1, b"x".to_vec()),
        "proxy_on_queue_ready" => {
            // Not reachable without a queue: covered by the conformance suite.
            Ok(())
        }
        other => panic!("no driver for {other}"),
    }
}

#[test]
fn a_trap_in_any_callback_fails_the_instance() {
    let callbacks: &[(&str, &str, bool)] = &[
        ("proxy_on_context_create", "(param i32 i32)", false),
        ("proxy_on_vm_start", "(param i32 i32) (result i32)", false),
        ("proxy_on_configure", "(param i32 i32) (result i32)", false),
        (
            "proxy_on_request_headers",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_response_headers",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_request_body",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_response_body",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_request_trailers",
            "(param i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_response_trailers",
            "(param i32 i32) (result i32)",
            true,
        ),
        ("proxy_on_done", "(param i32) (result i32)", true),
        ("proxy_on_log", "(param i32)", true),
        ("proxy_on_delete", "(param i32)", true),
        ("proxy_on_new_connection", "(param i32) (result i32)", true),
        (
            "proxy_on_downstream_data",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_upstream_data",
            "(param i32 i32 i32) (result i32)",
            true,
        ),
        (
            "proxy_on_downstream_connection_close",
            "(param i32 i32)",
            true,
        ),
        (
            "proxy_on_upstream_connection_close",
            "(param i32 i32)",
            true,
        ),
        ("proxy_on_tick", "(param i32)", true),
        ("proxy_on_foreign_function", "(param i32 i32 i32)", true),
    ];
    for &(export, signature, after_start) in callbacks {
        let wat = module(&format!(
            r#"(func (export "{export}") {signature} unreachable)"#
        ));
        let plugin = compile("trapper", &wat, PluginConfig::default()).unwrap();
        let error = match plugin.instantiate() {
            Err(error) => {
                assert!(!after_start, "{export} trapped at start-up");
                error
            }
            Ok(mut instance) => {
                assert!(after_start, "{export} did not trap at start-up");
                let error = drive(&mut instance, export).expect_err(export);
                assert!(instance.is_failed(), "{export}");
                error
            }
        };
        match &error {
            Error::Trap {
                callback, reason, ..
            } => {
                assert_eq!(*callback, export);
                assert!(reason.contains("unreachable"), "{reason}");
            }
            other => panic!("{export}: {other}"),
        }
    }
}

#[test]
fn out_of_bounds_pointers_get_invalid_memory_access() {
    // Every call gets a pointer or length past the 64 KiB memory; on_vm_start
    // succeeds only if each answered INVALID_MEMORY_ACCESS (6).
    let wat = module(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
        (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_define_metric" (func $metric (param i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
        (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
            (i32.and (i32.and (i32.and (i32.and
                (i32.eq (call $log (i32.const 2) (i32.const 65530) (i32.const 100)) (i32.const 6))
                (i32.eq (call $prop (i32.const -1) (i32.const 2) (i32.const 16) (i32.const 20)) (i32.const 6)))
                (i32.eq (call $set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const -1) (i32.const 0)) (i32.const 6)))
                (i32.eq (call $metric (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 70000)) (i32.const 6)))
                (i32.eq (call $buf (i32.const 6) (i32.const 0) (i32.const 10) (i32.const 65535) (i32.const 20)) (i32.const 6))))"#,
    );
    let config = PluginConfig {
        vm_configuration: b"some config".to_vec(),
        vm_id: "oob".into(),
        ..Default::default()
    };
    compile("oob", &wat, config)
        .unwrap()
        .instantiate()
        .expect("every call answered INVALID_MEMORY_ACCESS without trapping");
}

/// `bytes` as a WAT string literal.
fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

#[test]
fn malformed_header_maps_from_the_guest() {
    // 1-byte map: the spec's empty form (OK, map emptied). 1025 pairs and
    // more than 1 MiB: refused with BAD_ARGUMENT, map untouched.
    let many: Vec<(String, Vec<u8>)> = (0..1025)
        .map(|i| (format!("k{i}"), b"v".to_vec()))
        .collect();
    let many =
        wisp_wasm_host::pairs::serialize(many.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let body = format!(
        r#"(import "env" "proxy_set_header_map_pairs" (func $set (param i32 i32 i32) (result i32)))
        (data (i32.const 4096) "{many}")
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (if (i32.ne (call $set (i32.const 0) (i32.const 4096) (i32.const {len})) (i32.const 2)) (then unreachable))
            (if (i32.ne (call $set (i32.const 0) (i32.const 0) (i32.const 1048577)) (i32.const 2)) (then unreachable))
            (if (i32.ne (call $set (i32.const 2) (i32.const 100) (i32.const 1)) (i32.const 0)) (then unreachable))
            (i32.const 0))"#,
        many = wat_bytes(&many),
        len = many.len(),
    );
    let wat = module_with(17, "", &body);
    let plugin = compile("maps", &wat, PluginConfig::default()).unwrap();
    let mut instance = plugin.instantiate().unwrap();
    let id = instance.create_http_context().unwrap();
    let mut stream = HttpStream {
        request_headers: [("x-a", "1")].into_iter().collect(),
        response_headers: [("x-b", "2")].into_iter().collect(),
        ..Default::default()
    };
    instance.on_request_headers(id, &mut stream, true).unwrap();
    assert_eq!(
        stream.request_headers.len(),
        1,
        "refused maps leave the headers alone"
    );
    assert!(stream.response_headers.is_empty(), "a 1-byte map is empty");
}

#[test]
fn canary_and_module_sources() {
    let wat = module(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32)
            (i32.ne (local.get 1) (i32.const 3)))"#,
    );
    let good = Plugin::from_source(
        PluginConfig {
            name: "canary".into(),
            configuration: b"good config".to_vec(),
            ..Default::default()
        },
        &ModuleSource::Fetched {
            origin: "oci://example/canary".into(),
            bytes: wat.clone().into_bytes(),
            sha256: sha256_hex(wat.as_bytes()),
        },
    )
    .unwrap();
    good.canary().expect("accepted");
    assert_eq!(good.code_sha256(), sha256_hex(wat.as_bytes()));
    let bad = good
        .with_config(PluginConfig {
            name: "canary".into(),
            configuration: b"bad".to_vec(),
            ..Default::default()
        })
        .unwrap();
    assert!(matches!(bad.canary(), Err(Error::ConfigureFailed { .. })));
    let tampered = Plugin::from_source(
        PluginConfig::default(),
        &ModuleSource::Fetched {
            origin: "oci://example/canary".into(),
            bytes: wat.into_bytes(),
            sha256: sha256_hex(b"something else"),
        },
    );
    assert!(matches!(tampered, Err(Error::Source { .. })));
}

#[test]
fn per_request_instances_are_independent() {
    // Per-request isolation: each request gets a fresh instance, so state a
    // plugin keeps in its memory never leaks between requests.
    let wat = module(
        r#"(global $seen (mut i32) (i32.const 0))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
            (i32.ne (global.get $seen) (i32.const 1)))"#,
    );
    let plugin = compile("per-request", &wat, PluginConfig::default()).unwrap();
    for _ in 0..3 {
        let mut instance = plugin.instantiate().unwrap();
        let id = instance.create_http_context().unwrap();
        let action = instance
            .on_request_headers(id, &mut HttpStream::default(), true)
            .unwrap();
        assert_eq!(action, wisp_wasm_host::Action::Continue);
    }
    let mut shared = plugin.instantiate().unwrap();
    let id = shared.create_http_context().unwrap();
    shared
        .on_request_headers(id, &mut HttpStream::default(), true)
        .unwrap();
    let id = shared.create_http_context().unwrap();
    let action = shared
        .on_request_headers(id, &mut HttpStream::default(), true)
        .unwrap();
    assert_eq!(
        action,
        wisp_wasm_host::Action::Pause,
        "a shared instance remembers"
    );
}

#[test]
fn per_request_instances_come_from_the_pool_and_reuse_its_slots() {
    // The same counting module as above, with per-request isolation: its
    // instances come from the pooling allocator. More instances than the
    // pool has slots, one after the other, prove that a dropped instance
    // frees its slot and that a reused slot starts clean.
    let wat = module(
        r#"(global $seen (mut i32) (i32.const 0))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
            (i32.store (i32.const 100) (i32.add (i32.load (i32.const 100)) (i32.const 1)))
            (i32.ne (i32.load (i32.const 100)) (i32.const 1)))"#,
    );
    let config = PluginConfig {
        isolation: IsolationMode::PerRequest,
        ..Default::default()
    };
    let plugin = compile("pooled", &wat, config).unwrap();
    assert!(plugin.uses_pool(), "refused: {:?}", plugin.pool_refusal());
    assert_eq!(plugin.pool_refusal(), None);
    for _ in 0..PoolLimits::DEFAULT.instances + 50 {
        let mut instance = plugin.instantiate().unwrap();
        let id = instance.create_http_context().unwrap();
        let action = instance
            .on_request_headers(id, &mut HttpStream::default(), true)
            .unwrap();
        assert_eq!(
            action,
            wisp_wasm_host::Action::Continue,
            "memory is clean in a reused slot"
        );
    }
}

#[test]
fn a_plugin_that_does_not_fit_the_pool_says_which_limit() {
    let per_request = |limits: ResourceLimits| PluginConfig {
        isolation: IsolationMode::PerRequest,
        limits,
        ..Default::default()
    };
    // A memory limit above the pool's slot: on-demand allocation, and why.
    let big_limit = ResourceLimits {
        max_memory_bytes: PoolLimits::DEFAULT.memory_bytes * 2,
        ..Default::default()
    };
    let plugin = compile("big-limit", &module(""), per_request(big_limit.clone())).unwrap();
    assert!(!plugin.uses_pool());
    let reason = plugin.pool_refusal().expect("a reason");
    assert!(reason.contains("max_memory_bytes"), "{reason}");
    plugin.instantiate().expect("still runs, on-demand");

    // A module whose initial memory is larger than a slot (2049 pages > 128
    // MiB): the pool refuses it at compile time and names the memory.
    let wat = module_with(2049, "", "");
    let plugin = compile("big-memory", &wat, per_request(big_limit.clone())).unwrap();
    assert!(!plugin.uses_pool());
    let reason = plugin.pool_refusal().expect("a reason");
    assert!(reason.contains("memory"), "{reason}");

    // Other isolation modes never use the pool.
    let plugin = compile("per-worker", &module(""), PluginConfig::default()).unwrap();
    assert!(!plugin.uses_pool());
    assert_eq!(plugin.pool_refusal(), None);
    // And a pooled plugin cannot be re-configured past its slot.
    let pooled = compile(
        "pooled-2",
        &module(""),
        per_request(ResourceLimits::default()),
    )
    .unwrap();
    assert!(pooled.uses_pool());
    let error = pooled
        .with_config(per_request(big_limit.clone()))
        .expect_err("past the slot");
    assert!(error.to_string().contains("max_memory_bytes"), "{error}");
}

const TRAP_ON_HEADERS: &str =
    r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)"#;

fn supervised(policy: FailurePolicy) -> Supervisor {
    let config = PluginConfig {
        failure_policy: policy,
        ..Default::default()
    };
    let plugin = compile("supervised", &module(TRAP_ON_HEADERS), config).unwrap();
    Supervisor::new(plugin, Default::default()).unwrap()
}

fn fail_once(supervisor: &mut Supervisor, now: Instant) -> FailureAction {
    let instance = supervisor.instance(now).expect("an instance");
    let id = instance.create_http_context().unwrap();
    let error = instance
        .on_request_headers(id, &mut HttpStream::default(), true)
        .unwrap_err();
    supervisor.on_failure(&error, now)
}

#[test]
fn fail_closed_and_fail_open_do_not_reload() {
    let now = Instant::now();
    let mut closed = supervised(FailurePolicy::FailClosed);
    assert_eq!(fail_once(&mut closed, now), FailureAction::Reject);
    assert!(closed.instance(now + Duration::from_secs(3600)).is_none());
    assert_eq!(closed.failure_action(), FailureAction::Reject);

    let mut open = supervised(FailurePolicy::FailOpen);
    assert_eq!(fail_once(&mut open, now), FailureAction::PassThrough);
    assert!(open.instance(now).is_none());
    assert_eq!(counter(&open.plugin().counters().reloads), 0);
}

#[test]
fn fail_reload_backs_off_and_stops_a_crash_loop() {
    use wisp_wasm_host::ReloadConfig;

    let config = PluginConfig {
        failure_policy: FailurePolicy::FailReload,
        reload: ReloadConfig {
            base_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(8),
            crash_loop_limit: 3,
            crash_loop_window: Duration::from_secs(60),
        },
        ..Default::default()
    };
    let plugin = compile("reload", &module(TRAP_ON_HEADERS), config).unwrap();
    let mut supervisor = Supervisor::new(plugin.clone(), Default::default()).unwrap();
    let t0 = Instant::now();
    assert_eq!(supervisor.generation(), 0);
    assert_eq!(fail_once(&mut supervisor, t0), FailureAction::Reject);
    // The trapped instance is gone: what it started must not reach the next.
    assert_eq!(supervisor.generation(), 1);
    // Within the backoff: no instance, counted.
    assert!(
        supervisor
            .instance(t0 + Duration::from_millis(500))
            .is_none()
    );
    assert_eq!(counter(&plugin.counters().reload_backoffs), 1);
    // After 1.5 s (the jitter's upper bound) it reloads.
    let t1 = t0 + Duration::from_millis(1500);
    assert_eq!(fail_once(&mut supervisor, t1), FailureAction::Reject);
    assert_eq!(counter(&plugin.counters().reloads), 1);
    assert_eq!(supervisor.generation(), 2);
    // The second backoff is at least 2 s.
    assert!(
        supervisor
            .instance(t1 + Duration::from_millis(1900))
            .is_none()
    );
    let t2 = t1 + Duration::from_secs(3);
    fail_once(&mut supervisor, t2);
    // Third failure within a minute: crash loop, no more reloads.
    assert!(supervisor.is_stopped());
    assert_eq!(counter(&plugin.counters().crash_loop_stops), 1);
    assert!(
        supervisor
            .instance(t2 + Duration::from_secs(3600))
            .is_none()
    );
}

#[test]
fn callout_answers_need_a_live_token() {
    let mut instance = compile("tokens", &module(""), PluginConfig::default())
        .unwrap()
        .instantiate()
        .unwrap();
    let error = instance
        .on_http_call_response(4, Some(HttpCallResponse::default()), None)
        .unwrap_err();
    assert!(
        matches!(error, Error::UnknownContext { context_id: 4, .. }),
        "{error}"
    );
    assert!(instance.on_grpc_close(5, 0, "", None).is_err());
    assert!(
        !instance.is_failed(),
        "embedder mistakes do not fail the instance"
    );
}
