//! A real OCI registry for module-pull tests: Debian's `docker-registry`
//! (the CNCF distribution registry) started as a child on a loopback port
//! with TLS from [`crate::pki`] and storage in a temporary directory, both
//! removed on drop; and pushes with `oras` (PyPI, in the tools venv that
//! `cargo xtask setup` fills) in either form of the Wasm OCI image spec.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::{MissingArtifact, target_dir};
use crate::pki::TestPki;
use crate::process::ChildGuard;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Missing(#[from] MissingArtifact),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("docker-registry on {addr} did not answer /v2/ within {wait:?}; its log:\n{log}")]
    NotReady {
        addr: SocketAddr,
        wait: Duration,
        log: String,
    },
    #[error("oras push {target} failed: {output}")]
    Push { target: String, output: String },
}

/// How an image holds its module (the two forms Istio reads).
#[derive(Clone, Copy, Debug)]
pub enum ImageForm {
    /// An OCI artifact with one `application/vnd.module.wasm.content.layer.v1+wasm` layer.
    WasmLayer,
    /// An OCI image with one tar.gz layer holding `plugin.wasm`.
    Compat,
}

pub struct Registry {
    pub addr: SocketAddr,
    ca: PathBuf,
    dir: PathBuf,
    child: ChildGuard,
}

/// `docker-registry` from Debian (`cargo xtask setup` installs it).
pub fn registry_bin() -> Result<PathBuf, MissingArtifact> {
    let path = PathBuf::from("/usr/bin/docker-registry");
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingArtifact {
            what: "docker-registry (Debian package docker-registry)",
            path,
            fix: "cargo xtask setup",
        })
    }
}

/// The venv's Python, with `oras` installed.
pub fn oras_python() -> Result<PathBuf, MissingArtifact> {
    let venv = target_dir().join("tools/envoy-venv");
    let python = venv.join("bin/python");
    let has_oras = std::fs::read_dir(venv.join("lib"))
        .ok()
        .is_some_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.path().join("site-packages/oras/provider.py").is_file()))
        });
    if python.is_file() && has_oras {
        Ok(python)
    } else {
        Err(MissingArtifact {
            what: "oras (PyPI) in the tools venv",
            path: venv,
            fix: "cargo xtask setup",
        })
    }
}

impl Registry {
    /// Starts a registry serving HTTPS on `addr` with `pki`'s server
    /// certificate (valid for 127.0.0.1).
    pub fn start(addr: SocketAddr, pki: &TestPki) -> Result<Registry, RegistryError> {
        let bin = registry_bin()?;
        let dir = crate::agent::fresh_dir().map_err(|e| RegistryError::Io {
            what: "creating the registry's directory".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let config = dir.join("config.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: {addr}\n  secret: wisp-test\n  tls:\n    certificate: {cert}\n    key: {key}\n",
            storage = dir.join("storage").display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        std::fs::write(&config, yaml).map_err(|source| RegistryError::Io {
            what: format!("writing {}", config.display()),
            source,
        })?;
        let log = std::fs::File::create(dir.join("registry.log")).map_err(|source| {
            RegistryError::Io {
                what: "creating the registry log".into(),
                source,
            }
        })?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| RegistryError::Io {
                what: "registry log".into(),
                source,
            })?)
            .stderr(log)
            .spawn()
            .map_err(|source| RegistryError::Io {
                what: format!("starting {}", bin.display()),
                source,
            })?;
        let mut registry = Registry {
            addr,
            ca: pki.ca.clone(),
            dir,
            child: ChildGuard::new("docker-registry", child),
        };
        registry.wait_ready(Duration::from_secs(20))?;
        Ok(registry)
    }

    fn wait_ready(&mut self, wait: Duration) -> Result<(), RegistryError> {
        let deadline = Instant::now() + wait;
        let url = format!("https://{}/v2/", self.addr);
        while Instant::now() < deadline {
            let answered = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&self.ca)
                .arg(&url)
                .output()
                .is_ok_and(|out| out.stdout == b"200");
            if answered {
                return Ok(());
            }
            if self.child.try_wait().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(RegistryError::NotReady {
            addr: self.addr,
            wait,
            log: self.log(),
        })
    }

    /// The registry's own log (requests, errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// Pushes `module` as `repo:tag` in `form`; returns the manifest digest
    /// (`sha256:…`).
    pub fn push(
        &self,
        repo_tag: &str,
        module: &Path,
        form: ImageForm,
    ) -> Result<String, RegistryError> {
        let python = oras_python()?;
        let target = format!("{}/{repo_tag}", self.addr);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/scripts/oras_push.py");
        let form_arg = match form {
            ImageForm::WasmLayer => "wasm",
            ImageForm::Compat => "compat",
        };
        let out = Command::new(&python)
            .arg(script)
            .args([form_arg, &target])
            .arg(module)
            .arg(&self.ca)
            .output()
            .map_err(|source| RegistryError::Io {
                what: format!("running {}", python.display()),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || !stdout.starts_with("sha256:") {
            return Err(RegistryError::Push {
                target,
                output: format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(stdout)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.child.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
