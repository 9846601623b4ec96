//! Loading, start-up and callback behaviour, with small hand-written WAT
//! plugins (in the spirit of cpp-host's `test/test_data` modules).
//!
//! The guests check their own arguments and trap (`unreachable`) or return a
//! telling value when something is off, so these tests only need the public API.

use wisp_wasm_host::{
    AbiVersion, Action, Error, HeaderMap, HttpStream, Plugin, PluginConfig, PluginInstance,
};

/// Memory, a bump allocator and the ABI marker, around `body`.
fn module(marker: &str, body: &str) -> String {
    format!(
        r#"(module
            {body}
            (memory (export "memory") 1)
            (global $heap (mut i32) (i32.const 32768))
            (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $ptr i32)
                (local.set $ptr (global.get $heap))
                (global.set $heap (i32.add (global.get $heap) (local.get $size)))
                (local.get $ptr))
            (func (export "{marker}")))"#
    )
}

fn config(name: &str) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        ..Default::default()
    }
}

fn compile(name: &str, wat: &str) -> Result<Plugin, Error> {
    Plugin::compile(config(name), wat.as_bytes())
}

fn start(name: &str, wat: &str) -> Result<PluginInstance, Error> {
    compile(name, wat)?.instantiate()
}

fn stream(headers: &[(&str, &str)]) -> HttpStream {
    HttpStream {
        request_headers: headers.iter().copied().collect(),
        ..Default::default()
    }
}

#[test]
fn plugins_are_shareable_and_instances_movable() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Plugin>();
    send::<PluginInstance>();
    send_sync::<Error>();
}

/// Without the `wasmedge` feature, choosing WasmEdge is a clear compile-time
/// error (with it, the conformance suite runs on WasmEdge instead).
#[cfg(not(feature = "wasmedge"))]
#[test]
fn the_wasmedge_engine_needs_its_feature() {
    let config = PluginConfig {
        engine: wisp_wasm_host::EngineKind::WasmEdge,
        ..config("edge")
    };
    let wat = module("proxy_abi_version_0_2_1", "");
    let error = Plugin::compile(config, wat.as_bytes()).unwrap_err();
    assert!(matches!(error, Error::Engine { .. }), "{error}");
    assert!(error.to_string().contains("`wasmedge` feature"), "{error}");
}

#[test]
fn rejects_what_it_cannot_run() {
    let error = compile("junk", "not wasm at all").unwrap_err();
    assert!(matches!(error, Error::Compile { .. }), "{error}");

    let error = compile("nomarker", "(module (memory (export \"memory\") 1))").unwrap_err();
    assert!(matches!(error, Error::UnknownAbiVersion { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("plugin nomarker: missing or unknown Proxy-Wasm ABI version")
    );

    let vnext = module("proxy_abi_version_0_x_x", "");
    assert!(matches!(
        compile("vnext", &vnext),
        Err(Error::UnknownAbiVersion { .. })
    ));

    let no_memory = r#"(module (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#;
    let error = compile("nomem", no_memory).unwrap_err();
    assert!(
        matches!(
            error,
            Error::MissingExport {
                export: "memory",
                ..
            }
        ),
        "{error}"
    );

    let no_allocator =
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#;
    let error = compile("noalloc", no_allocator).unwrap_err();
    assert!(matches!(error, Error::MissingExport { .. }), "{error}");

    let bad_malloc = r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
        (func (export "malloc") (param i64) (result i32) (i32.const 0)))"#;
    let error = compile("badmalloc", bad_malloc).unwrap_err();
    assert!(
        matches!(error, Error::ExportType { ref export, .. } if export == "malloc"),
        "{error}"
    );
}

#[test]
fn link_errors_name_the_import() {
    let other_module = module("proxy_abi_version_0_2_1", r#"(import "foo" "bar" (func))"#);
    let error = compile("foo", &other_module).unwrap_err();
    assert!(matches!(error, Error::Link { .. }), "{error}");
    assert!(error.to_string().contains("foo"), "{error}");

    let wrong_signature = module(
        "proxy_abi_version_0_2_1",
        r#"(import "env" "proxy_log" (func (param i32)))"#,
    );
    let error = compile("sig", &wrong_signature).unwrap_err();
    assert!(matches!(error, Error::Link { .. }), "{error}");
    assert!(error.to_string().contains("proxy_log"), "{error}");
}

#[test]
fn start_up_order_ids_and_sizes() {
    // _initialize, then the root context (1, parent 0), then on_vm_start with
    // the root id and the VM config size, then on_configure with the plugin
    // config size; HTTP contexts get the root as parent.
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"
        (global $init (mut i32) (i32.const 0))
        (global $root_created (mut i32) (i32.const 0))
        (func (export "_initialize") (global.set $init (i32.const 1)))
        (func (export "proxy_on_context_create") (param $id i32) (param $parent i32)
            (if (i32.eqz (local.get $parent))
                (then
                    (if (i32.or (i32.ne (local.get $id) (i32.const 1)) (i32.eqz (global.get $init)))
                        (then unreachable))
                    (global.set $root_created (i32.const 1)))
                (else
                    (if (i32.ne (local.get $parent) (i32.const 1)) (then unreachable)))))
        (func (export "proxy_on_vm_start") (param $root i32) (param $size i32) (result i32)
            (i32.and (global.get $root_created)
                (i32.and (i32.eq (local.get $root) (i32.const 1)) (i32.eq (local.get $size) (i32.const 9)))))
        (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
            (i32.and (i32.eq (local.get $root) (i32.const 1)) (i32.eq (local.get $size) (i32.const 13))))
        "#,
    );
    let compiled = compile("order", &wat).unwrap();
    let good = PluginConfig {
        name: "order".into(),
        vm_configuration: b"vm-config".to_vec(),
        configuration: b"plugin-config".to_vec(),
        ..Default::default()
    };
    let mut instance = compiled
        .with_config(good.clone())
        .unwrap()
        .instantiate()
        .unwrap();
    assert_eq!(instance.root_context_id(), 1);
    assert_eq!(instance.create_http_context().unwrap(), 2);
    assert_eq!(instance.create_http_context().unwrap(), 3);

    let bad_vm_config = PluginConfig {
        vm_configuration: b"other".to_vec(),
        ..good.clone()
    };
    let error = compiled
        .with_config(bad_vm_config)
        .unwrap()
        .instantiate()
        .err()
        .unwrap();
    assert!(matches!(error, Error::VmStartFailed { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "plugin order: proxy_on_vm_start returned false (VM start failed)"
    );

    let bad_config = PluginConfig {
        configuration: b"nope".to_vec(),
        ..good
    };
    let error = compiled
        .with_config(bad_config)
        .unwrap()
        .instantiate()
        .err()
        .unwrap();
    assert!(matches!(error, Error::ConfigureFailed { .. }), "{error}");
}

#[test]
fn reactor_main_runs_after_initialize() {
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"
        (global $step (mut i32) (i32.const 0))
        (func (export "_initialize") (global.set $step (i32.const 1)))
        (func (export "main") (param i32 i32) (result i32)
            (if (i32.ne (global.get $step) (i32.const 1)) (then unreachable))
            (global.set $step (i32.const 2))
            (i32.const 0))
        (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
            (i32.eq (global.get $step) (i32.const 2)))
        "#,
    );
    start("reactor", &wat).unwrap();
}

#[test]
fn command_start_may_exit_zero() {
    let exit_with = |code: i32| {
        module(
            "proxy_abi_version_0_2_1",
            &format!(
                r#"(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (func (export "_start") (call $exit (i32.const {code})))"#
            ),
        )
    };
    start("command", &exit_with(0)).unwrap();
    let error = start("command", &exit_with(3)).err().unwrap();
    assert!(
        matches!(
            error,
            Error::Exit {
                callback: "_start",
                code: 3,
                ..
            }
        ),
        "{error}"
    );
}

/// Header callbacks that return Continue (0) only for 4 headers and
/// end_of_stream = true.
fn header_callbacks_0_2(marker: &str) -> String {
    module(
        marker,
        r#"
        (func (export "proxy_on_request_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
            (i32.eqz (i32.and (i32.eq (local.get $n) (i32.const 4)) (local.get $eos))))
        (func (export "proxy_on_response_headers") (param $id i32) (param $n i32) (param $eos i32) (result i32)
            (i32.eqz (i32.and (i32.eq (local.get $n) (i32.const 1)) (local.get $eos))))
        "#,
    )
}

#[test]
fn header_callbacks_get_end_of_stream_since_0_2_0() {
    for marker in ["proxy_abi_version_0_2_0", "proxy_abi_version_0_2_1"] {
        let mut instance = start("eos", &header_callbacks_0_2(marker)).unwrap();
        let id = instance.create_http_context().unwrap();
        let mut s = stream(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            (":scheme", "http"),
        ]);
        assert_eq!(
            instance.on_request_headers(id, &mut s, true).unwrap(),
            Action::Continue
        );
        assert_eq!(
            instance.on_request_headers(id, &mut s, false).unwrap(),
            Action::Pause
        );
        s.response_headers.add(":status", b"200");
        assert_eq!(
            instance.on_response_headers(id, &mut s, true).unwrap(),
            Action::Continue
        );
    }
}

#[test]
fn abi_0_1_0_header_callbacks_take_two_arguments() {
    let wat = module(
        "proxy_abi_version_0_1_0",
        r#"(func (export "proxy_on_request_headers") (param $id i32) (param $n i32) (result i32)
            (i32.ne (local.get $n) (i32.const 2)))"#,
    );
    let plugin = compile("v010", &wat).unwrap();
    assert_eq!(plugin.abi_version(), AbiVersion::V0_1_0);
    let mut instance = plugin.instantiate().unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = stream(&[("a", "1"), ("b", "2")]);
    assert_eq!(
        instance.on_request_headers(id, &mut s, true).unwrap(),
        Action::Continue
    );
    // No response callback exported: Continue.
    assert_eq!(
        instance.on_response_headers(id, &mut s, true).unwrap(),
        Action::Continue
    );

    // A 0.2.1 module must use the 3-argument form.
    let mismatched = wat.replace("proxy_abi_version_0_1_0", "proxy_abi_version_0_2_1");
    let error = start("mismatch", &mismatched).err().unwrap();
    assert!(
        matches!(error, Error::ExportType { ref export, .. } if export == "proxy_on_request_headers"),
        "{error}"
    );
}

#[test]
fn local_response_pauses_whatever_the_plugin_returns() {
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"
        (import "env" "proxy_send_local_response"
            (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
        (data (i32.const 100) "no")
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (if (call $reply (i32.const 418) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2)
                    (i32.const 0) (i32.const 0) (i32.const -1))
                (then unreachable))
            (i32.const 0))
        (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 3))
        "#,
    );
    let mut instance = start("teapot", &wat).unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = HttpStream::default();
    assert_eq!(
        instance.on_request_headers(id, &mut s, true).unwrap(),
        Action::Pause
    );
    let reply = s.local_response.as_ref().unwrap();
    assert_eq!((reply.status, reply.body.as_slice()), (418, &b"no"[..]));
    // Any non-zero action is a stop.
    assert_eq!(
        instance.on_response_headers(id, &mut s, true).unwrap(),
        Action::Pause
    );
}

#[test]
fn a_trap_fails_the_instance_but_returns_the_stream() {
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)"#,
    );
    let mut instance = start("trapper", &wat).unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = stream(&[(":path", "/kept")]);

    let error = instance.on_request_headers(id, &mut s, true).unwrap_err();
    assert!(
        matches!(error, Error::Trap { ref plugin, callback: "proxy_on_request_headers", .. } if plugin == "trapper"),
        "{error}"
    );
    assert!(error.is_runtime_failure());
    let message = error.to_string();
    assert!(
        message.starts_with("plugin trapper: proxy_on_request_headers trapped: "),
        "{message}"
    );
    assert!(message.contains("unreachable"), "{message}");

    let expected: HeaderMap = [(":path", "/kept")].into_iter().collect();
    assert_eq!(s.request_headers, expected, "the stream comes back");
    assert!(instance.is_failed());
    let again = instance.on_request_headers(id, &mut s, true).unwrap_err();
    assert!(matches!(again, Error::InstanceFailed { .. }), "{again}");
    assert!(matches!(
        instance.create_http_context(),
        Err(Error::InstanceFailed { .. })
    ));

    // A fresh instance of the same plugin works.
    let mut fresh = instance.plugin().instantiate().unwrap();
    assert!(fresh.create_http_context().is_ok());
}

#[test]
fn proc_exit_in_a_callback_is_an_exit_error() {
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
            (call $exit (i32.const 3)) (i32.const 0))"#,
    );
    let mut instance = start("exiter", &wat).unwrap();
    let id = instance.create_http_context().unwrap();
    let error = instance
        .on_response_headers(id, &mut HttpStream::default(), true)
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Exit {
                callback: "proxy_on_response_headers",
                code: 3,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.plugin(), "exiter");
    assert!(instance.is_failed());
}

#[test]
fn finishing_runs_done_log_delete_in_order_with_the_stream() {
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"
        (import "env" "proxy_get_header_map_size" (func $size (param i32 i32) (result i32)))
        (global $step (mut i32) (i32.const 0))
        (func (export "proxy_on_done") (param i32) (result i32)
            (global.set $step (i32.const 1)) (i32.const 1))
        (func (export "proxy_on_log") (param i32)
            (if (i32.ne (global.get $step) (i32.const 1)) (then unreachable))
            ;; request headers are readable while logging
            (if (call $size (i32.const 0) (i32.const 64)) (then unreachable))
            (global.set $step (i32.const 2)))
        (func (export "proxy_on_delete") (param i32)
            (if (i32.ne (global.get $step) (i32.const 2)) (then unreachable))
            (global.set $step (i32.const 0)))
        "#,
    );
    let mut instance = start("finisher", &wat).unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = stream(&[(":path", "/")]);
    instance.finish_http_context(id, &mut s).unwrap();

    let error = instance.finish_http_context(id, &mut s).unwrap_err();
    assert!(
        matches!(error, Error::UnknownContext { context_id, .. } if context_id == id),
        "{error}"
    );
    let root = instance.root_context_id();
    let error = instance.finish_http_context(root, &mut s).unwrap_err();
    assert!(
        matches!(error, Error::UnknownContext { .. }),
        "the root is not an HTTP context: {error}"
    );
    assert!(!instance.is_failed());
}

#[test]
fn a_module_without_callbacks_is_a_no_op_filter() {
    let mut instance = start("empty", &module("proxy_abi_version_0_2_1", "")).unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = stream(&[(":path", "/")]);
    assert_eq!(
        instance.on_request_headers(id, &mut s, true).unwrap(),
        Action::Continue
    );
    assert_eq!(
        instance.on_response_headers(id, &mut s, true).unwrap(),
        Action::Continue
    );
    instance.finish_http_context(id, &mut s).unwrap();
    assert_eq!(instance.tick_period(), None);
}

#[test]
fn malloc_is_used_when_proxy_on_memory_allocate_is_absent() {
    let wat = r#"(module
        (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (global $calls (mut i32) (i32.const 0))
        (data (i32.const 0) "x-key")
        (func (export "malloc") (param $size i32) (result i32)
            (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
            (i32.const 4096))
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (if (call $get (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 100) (i32.const 104))
                (then unreachable))
            ;; one allocation, at 4096, of 5 bytes holding "value"
            (if (i32.ne (global.get $calls) (i32.const 1)) (then unreachable))
            (if (i32.ne (i32.load (i32.const 100)) (i32.const 4096)) (then unreachable))
            (if (i32.ne (i32.load (i32.const 104)) (i32.const 5)) (then unreachable))
            (i32.ne (i32.load8_u (i32.const 4096)) (i32.const 118)))
        )"#;
    let mut instance = start("malloc", wat).unwrap();
    let id = instance.create_http_context().unwrap();
    let mut s = stream(&[("x-key", "value")]);
    assert_eq!(
        instance.on_request_headers(id, &mut s, true).unwrap(),
        Action::Continue
    );
}

#[test]
fn root_shutdown_waits_for_proxy_done() {
    // The root's on_done says "not yet"; the next tick calls proxy_done;
    // on_delete then runs (it traps if called before proxy_done).
    let wat = module(
        "proxy_abi_version_0_2_1",
        r#"(import "env" "proxy_done" (func $done (result i32)))
        (global $finished (mut i32) (i32.const 0))
        (func (export "proxy_on_done") (param i32) (result i32) (i32.const 0))
        (func (export "proxy_on_tick") (param i32)
            (if (i32.ne (call $done) (i32.const 0)) (then unreachable))
            (global.set $finished (i32.const 1)))
        (func (export "proxy_on_delete") (param i32)
            (if (i32.eqz (global.get $finished)) (then unreachable)))"#,
    );
    let mut instance = start("shutdown", &wat).unwrap();
    assert!(!instance.shutdown().unwrap(), "on_done returned false");
    assert!(!instance.is_done().unwrap());
    instance.on_tick().unwrap();
    assert!(instance.is_done().unwrap(), "proxy_done finished the root");
}
