//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the agent.
//!
//! The kernel programs need a different target, `-Z build-std=core` and
//! bpf-linker, so xtask builds them (`cargo xtask build`, `test` and `demo` do
//! it first); this script only copies the result into OUT_DIR. Set
//! `WISP_EBPF_OBJECT` to use an object from elsewhere.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=WISP_EBPF_OBJECT");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = match std::env::var_os("WISP_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
        None => out_dir
            .ancestors()
            .nth(4)
            .expect("OUT_DIR lies inside the target directory")
            .join("ebpf/bpfel-unknown-none/release/wisp-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (`cargo xtask build`, `test` and `demo` do it for you)",
            object.display()
        );
    }
    std::fs::copy(&object, out_dir.join("wisp-ebpf.o")).expect("copy the eBPF object");
}
