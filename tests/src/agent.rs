//! Running the real `wisp` binary for a test or the demo: write its config,
//! start it, wait until its admin endpoint says ready, read its metrics, and
//! stop it by pid with SIGTERM.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::http::Reply;
use crate::process::ChildGuard;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("wisp exited during start-up ({status}); its log:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("wisp was not ready within {0:?}; its log:\n{1}")]
    NotReady(Duration, String),
}

/// One plugin of the agent's filter chain.
pub struct PluginSpec {
    pub name: String,
    pub module: PathBuf,
    pub configuration: String,
    pub failure_policy: &'static str,
}

/// The parts of the agent's configuration tests vary.
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub workers: usize,
    pub plugins: Vec<PluginSpec>,
    /// (workload name, network namespace path)
    pub workloads: Vec<(String, PathBuf)>,
}

impl AgentConfig {
    /// The YAML `wisp run --config` reads.
    pub fn to_yaml(&self) -> String {
        // Each test agent pins its programs in a directory of its own, so
        // agents running at the same time never adopt each other's state.
        let mut yaml = format!(
            "outbound:\n  listen: {}\nadmin:\n  listen: {}\nworkers: {}\nebpf:\n  pin_path: {}\n",
            self.listen,
            self.admin,
            self.workers,
            test_pin_path(self.listen.port()).display()
        );
        yaml.push_str("plugins:\n");
        for p in &self.plugins {
            yaml.push_str(&format!(
                "  - name: {}\n    module: {}\n    configuration: '{}'\n    failure_policy: {}\n",
                p.name,
                p.module.display(),
                p.configuration.replace('\'', "''"),
                p.failure_policy
            ));
        }
        yaml.push_str("workloads:\n");
        for (name, netns) in &self.workloads {
            yaml.push_str(&format!(
                "  - name: {name}\n    netns: {}\n",
                netns.display()
            ));
        }
        yaml
    }
}

/// A running agent. Dropping it stops the process and removes its files.
pub struct Agent {
    child: ChildGuard,
    dir: PathBuf,
    admin: SocketAddr,
}

impl Agent {
    /// Writes the config to a fresh directory and starts `wisp run` on it.
    pub fn start(wisp_bin: &Path, config: &AgentConfig) -> Result<Agent, AgentError> {
        Agent::start_yaml(wisp_bin, &config.to_yaml(), config.admin)
    }

    /// Starts `wisp run` on a config written by the caller; `admin` must be
    /// its `admin.listen`.
    pub fn start_yaml(wisp_bin: &Path, yaml: &str, admin: SocketAddr) -> Result<Agent, AgentError> {
        let dir = fresh_dir()?;
        let config_path = dir.join("wisp.yaml");
        std::fs::write(&config_path, yaml).map_err(io("writing wisp.yaml"))?;
        let mut command = std::process::Command::new(wisp_bin);
        command.args(["run", "--config"]).arg(&config_path);
        Agent::spawn(command, dir, admin)
    }

    /// Starts `wisp proxy ARGS…` (quick mode); `admin` must match `--admin`.
    pub fn start_proxy(
        wisp_bin: &Path,
        args: &[String],
        admin: SocketAddr,
    ) -> Result<Agent, AgentError> {
        let mut command = std::process::Command::new(wisp_bin);
        command.arg("proxy").args(args);
        Agent::spawn(command, fresh_dir()?, admin)
    }

    /// A one-worker `wisp proxy` on `listen` that terminates TLS with the
    /// PKI's server certificate, requires client certificates (mTLS) and
    /// forwards to `upstream`: the TLS-only server of the TLS tests.
    pub fn start_mtls_front(
        wisp_bin: &Path,
        listen: SocketAddr,
        upstream: SocketAddr,
        admin: SocketAddr,
        pki: &crate::pki::TestPki,
    ) -> Result<Agent, AgentError> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.to_string(),
            "--upstream".into(),
            upstream.to_string(),
            "--admin".into(),
            admin.to_string(),
            "--workers".into(),
            "1".into(),
        ];
        args.extend(pki.mtls_server_flags());
        Agent::start_proxy(wisp_bin, &args, admin)
    }

    /// Like [`Agent::start_proxy`], logging only warnings and errors, as the
    /// benchmarks run Envoy.
    pub fn start_proxy_quiet(
        wisp_bin: &Path,
        args: &[String],
        admin: SocketAddr,
    ) -> Result<Agent, AgentError> {
        let mut command = std::process::Command::new(wisp_bin);
        command.arg("proxy").args(args).env("WISP_LOG", "warn");
        Agent::spawn(command, fresh_dir()?, admin)
    }

    /// Like [`Agent::start`], logging only warnings and errors (benchmarks).
    pub fn start_quiet(wisp_bin: &Path, config: &AgentConfig) -> Result<Agent, AgentError> {
        let dir = fresh_dir()?;
        let config_path = dir.join("wisp.yaml");
        std::fs::write(&config_path, config.to_yaml()).map_err(io("writing wisp.yaml"))?;
        let mut command = std::process::Command::new(wisp_bin);
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("WISP_LOG", "warn");
        Agent::spawn(command, dir, config.admin)
    }

    /// Starts a prepared wisp command (e.g. one that runs inside a pod, from
    /// [`crate::node::Pod::command`]) with its log in `dir`, and waits until
    /// its admin listener at `admin` says ready.
    pub fn spawn(
        mut command: std::process::Command,
        dir: PathBuf,
        admin: SocketAddr,
    ) -> Result<Agent, AgentError> {
        let log = std::fs::File::create(dir.join("wisp.log")).map_err(io("creating wisp.log"))?;
        // The caller may have chosen a log level (benchmarks log at warn, as
        // Envoy does); otherwise WISP_LOG from our environment, or info.
        if !command.get_envs().any(|(key, _)| key == "WISP_LOG") {
            command.env(
                "WISP_LOG",
                std::env::var("WISP_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("wisp.log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting wisp"))?;
        let mut agent = Agent {
            child: ChildGuard::new("wisp", child),
            dir,
            admin,
        };
        agent.wait_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait() {
                return Err(AgentError::Exited {
                    status,
                    log: self.log(),
                });
            }
            if self.admin_get("/ready").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(AgentError::NotReady(timeout, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The config file `wisp run` was started with (for reload tests).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("wisp.yaml")
    }

    /// Sends `signal` to the agent (by its pid).
    pub fn send_signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.pid() as i32), signal);
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("wisp.log")).unwrap_or_default()
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self) -> Result<String, AgentError> {
        Ok(self.admin_get("/metrics")?.body)
    }

    /// GET on the admin listener (from the host namespace).
    pub fn admin_get(&self, path: &str) -> Result<Reply, AgentError> {
        get_host(self.admin, path).map_err(|source| AgentError::Io {
            what: format!("GET {path} from the admin listener {}", self.admin),
            source,
        })
    }

    /// SIGKILL: the agent dies without cleaning up (what a crash or an OOM
    /// kill does). Returns how it exited.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.child
            .stop_with(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10))
    }

    /// SIGTERM, wait up to 10 s; returns how the agent exited.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.child
            .stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
    }
}

/// A new directory for one agent's config and log.
pub fn fresh_dir() -> Result<PathBuf, AgentError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wisp-agent-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io("creating the agent's directory"))?;
    Ok(dir)
}

/// A [`fresh_dir`] that is removed when dropped, passed or failed (a test's
/// certificates, modules, config files).
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new() -> Result<TestDir, AgentError> {
        fresh_dir().map(TestDir)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.to_owned();
    move |source| AgentError::Io { what, source }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.child.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bpffs pin path [`AgentConfig::to_yaml`] gives the agent listening on
/// `port`.
pub fn test_pin_path(port: u16) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/wisp-test-{port}"))
}

/// A minimal HTTP/1.1 GET from the host namespace (for the admin listener).
pub fn get_host(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    Ok(crate::http::parse(&raw))
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(text, "wisp_http_requests_total", &[("response_code", "200")])`.
/// Labels not given are not checked; all matching samples are summed.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
