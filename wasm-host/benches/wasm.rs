//! Criterion benchmarks of the host (`cargo xtask bench wasm`):
//!
//! * `request/header-filter`: one request (context create, request headers,
//!   response headers, finish) through the SDK-built header filter on a shared
//!   instance — the per-request cost of a header-rewriting filter;
//! * `request/per-request-instance`: the same with a fresh instance per
//!   request (per-request isolation) from on-demand allocation; the
//!   difference is its overhead; `…-pooled`: the same plugin configured
//!   `IsolationMode::PerRequest`, whose instances come from the pooling
//!   allocator;
//! * `instantiate/<mode>`: creating an instance as each isolation mode does
//!   (per worker / plugin / use all instantiate the same way; per request adds
//!   a context on top), from a compiled `Plugin`;
//! * memory per idle instance, printed once (linear memory of a started
//!   instance), for the header filter.
//!
//! Needs the filters built (`cargo xtask build-filters`).

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use wisp_wasm_host::{HttpStream, IsolationMode, Plugin, PluginConfig};

fn module(name: &str) -> Vec<u8> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("in the workspace")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |dir| workspace.join(dir));
    let path = target
        .join("wasm32-wasip1/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `cargo xtask build-filters` first",
            path.display()
        )
    })
}

fn header_filter() -> Plugin {
    header_filter_with(IsolationMode::PerWorker)
}

/// With `PerRequest`, instances come from the pooling allocator.
fn header_filter_with(isolation: IsolationMode) -> Plugin {
    let config = PluginConfig {
        name: "bench".into(),
        configuration: br#"{"header_value": "bench"}"#.to_vec(),
        isolation,
        ..Default::default()
    };
    let plugin = Plugin::compile(config, &module("wisp_header_filter")).expect("compiles");
    if isolation == IsolationMode::PerRequest {
        assert!(plugin.uses_pool(), "{:?}", plugin.pool_refusal());
    }
    plugin
}

fn request() -> HttpStream {
    HttpStream {
        request_headers: [
            (":method", "GET"),
            (":path", "/bench"),
            (":authority", "svc.local"),
            (":scheme", "http"),
            ("user-agent", "criterion"),
            ("accept", "*/*"),
        ]
        .into_iter()
        .collect(),
        response_headers: [(":status", "200"), ("content-type", "text/plain")]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn one_request(instance: &mut wisp_wasm_host::PluginInstance, template: &HttpStream) {
    let mut stream = template.clone();
    let id = instance.create_http_context().unwrap();
    instance.on_request_headers(id, &mut stream, true).unwrap();
    instance.on_response_headers(id, &mut stream, true).unwrap();
    instance.finish_http_context(id, &mut stream).unwrap();
    assert!(stream.response_headers.contains("x-wisp-filter"));
}

fn requests(c: &mut Criterion) {
    let plugin = header_filter();
    let template = request();
    let mut group = c.benchmark_group("request");
    // Baseline: what cloning the test stream costs on its own.
    group.bench_function("clone-stream-only", |b| b.iter(|| template.clone()));
    let mut shared = plugin.instantiate().unwrap();
    group.bench_function("header-filter", |b| {
        b.iter(|| one_request(&mut shared, &template))
    });
    group.bench_function("per-request-instance", |b| {
        b.iter(|| {
            let mut instance = plugin.instantiate().unwrap();
            one_request(&mut instance, &template);
        })
    });
    let pooled = header_filter_with(IsolationMode::PerRequest);
    group.bench_function("per-request-instance-pooled", |b| {
        b.iter(|| {
            let mut instance = pooled.instantiate().unwrap();
            one_request(&mut instance, &template);
        })
    });
    group.finish();
}

fn instantiation(c: &mut Criterion) {
    let plugin = header_filter();
    let mut group = c.benchmark_group("instantiate");
    for mode in ["per-worker", "per-plugin", "per-use"] {
        // These modes differ in how many instances exist, not in how one is made.
        group.bench_function(mode, |b| b.iter(|| plugin.instantiate().unwrap()));
    }
    group.bench_function("per-request", |b| {
        b.iter(|| {
            let mut instance = plugin.instantiate().unwrap();
            instance.create_http_context().unwrap()
        })
    });
    let pooled = header_filter_with(IsolationMode::PerRequest);
    group.bench_function("per-request-pooled", |b| {
        b.iter(|| {
            let mut instance = pooled.instantiate().unwrap();
            instance.create_http_context().unwrap()
        })
    });
    group.bench_function("compile-cached", |b| {
        let wasm = module("wisp_header_filter");
        let _keep = header_filter();
        b.iter(|| Plugin::compile(PluginConfig::default(), &wasm).unwrap())
    });
    group.finish();

    let idle = plugin.instantiate().unwrap();
    let conformance = Plugin::compile(PluginConfig::default(), &module("wisp_conformance_filter"))
        .unwrap()
        .instantiate()
        .unwrap();
    println!(
        "memory/idle-instance: header filter {} KiB, conformance filter {} KiB of linear memory",
        idle.memory_bytes() / 1024,
        conformance.memory_bytes() / 1024
    );
}

criterion_group!(benches, requests, instantiation);
criterion_main!(benches);
