// Rebuild the BPF object when the linker changes (a new bpf-linker can emit
// different BTF), as aya-template does.
fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_CFG_BPF_TARGET_ARCH");
}
