//! nginx (Debian `nginx-light`) as a fast, boring upstream for benchmarks:
//! every request gets a small fixed 200 response.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{AgentError, fresh_dir};
use crate::process::ChildGuard;

/// A running nginx; dropping it stops the master process by pid.
pub struct Nginx {
    child: ChildGuard,
    dir: std::path::PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx in the foreground on `addr` with `workers` worker processes.
    pub fn start(addr: SocketAddr, workers: usize) -> Result<Nginx, AgentError> {
        let dir = fresh_dir()?;
        let io = |what: &'static str| {
            move |source| AgentError::Io {
                what: what.into(),
                source,
            }
        };
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes {workers};\n\
                 daemon off;\n\
                 pid {dir}/nginx.pid;\n\
                 error_log {dir}/error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n\
                   access_log off;\n\
                   client_body_temp_path {dir};\n\
                   keepalive_requests 1000000;\n\
                   server {{\n\
                     listen {addr} reuseport;\n\
                     location / {{ return 200 \"hello from nginx\\n\"; }}\n\
                   }}\n\
                 }}\n",
                dir = dir.display()
            ),
        )
        .map_err(io("writing nginx.conf"))?;
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(
                "starting nginx (is nginx-light installed? cargo xtask setup)",
            ))?;
        let nginx = Nginx {
            child: ChildGuard::new("nginx", child),
            dir,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return Err(AgentError::NotReady(
                    Duration::from_secs(10),
                    "nginx did not listen".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop; its workers exit with the master.
        self.child
            .stop_with(nix::sys::signal::Signal::SIGQUIT, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
