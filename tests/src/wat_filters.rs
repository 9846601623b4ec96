//! Tiny Proxy-Wasm filters in the text format, for tests that need a
//! plugin whose every effect is visible and nothing else.

/// Adds the request header named by its plugin configuration, value `1`:
/// with several instances configured differently, a request shows exactly
/// which of them ran.
pub fn header_marker() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 100) "1")
  (global $name (mut i32) (i32.const 0))
  (global $len (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32) (param $size i32) (result i32)
    (drop (call $buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 8) (i32.const 12)))
    (global.set $name (i32.load (i32.const 8)))
    (global.set $len (i32.load (i32.const 12)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (global.get $name) (global.get $len) (i32.const 100) (i32.const 1)))
    (i32.const 0)))
"#
    )
}

/// What every Proxy-Wasm module needs besides its callbacks: memory, a bump
/// allocator for `proxy_on_memory_allocate`, the ABI marker, context
/// creation and a VM start that succeeds. Splice it into a module with
/// `format!("(module {imports} {PREAMBLE} ...)")`.
pub const PREAMBLE: &str = r#"
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
"#;
