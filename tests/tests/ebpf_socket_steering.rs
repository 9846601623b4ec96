//! Socket steering (`ebpf.socket_steering: true`): the sockets of same-node
//! pairs — pod a's socket and the agent's accepted one, the agent's upstream
//! socket and pod b's server socket — go into the sockhash, and `sk_msg`
//! hands each send straight to the peer socket. What a user would check:
//! every byte arrives, in order, both ways at once, for a large transfer and
//! for many connections at the same time; a half-close (shutdown of one
//! direction) reaches the far end while the other direction keeps flowing;
//! HTTP (whose detection peeks at the first bytes) still works; the kernel
//! really redirected messages; and the sockhash is empty again once the
//! connections are closed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use wisp_testbed::agent::{Agent, metric};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{connect, http_get, in_netns, unmap};
use wisp_testbed::{artifacts, leftovers};

const LISTEN_PORT: u16 = 19401;
const ADMIN: &str = "127.0.0.1:19491";
const PIN_PATH: &str = "/sys/fs/bpf/wisp-test-d1";
const STREAM_PORT: u16 = 9000;
const ECHO_PORT: u16 = 8080;

/// Deterministic bytes (xorshift), different for each `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The server in pod b: echoes every byte back as it arrives; when the
/// client's direction ends (its half-close reached us), finishes sending
/// and closes ours. Reports each connection's peer and byte count.
fn spawn_stream_server(listener: TcpListener) -> std::sync::mpsc::Receiver<(SocketAddr, usize)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let peer = stream.peer_addr().unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0;
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n;
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
                let _ = tx.send((peer, total));
            });
        }
    });
    rx
}

/// Sends `data` on `stream` in writes of varying sizes, half-closes, and
/// reads everything echoed back at the same time; returns what came back.
///
/// Non-blocking with poll(2), as event-loop programs (Go, tokio, Node,
/// nginx, Java NIO) do. A *blocking* socket in a sockhash can see read(2)
/// fail with EAGAIN when another thread's writes wake it (the kernel's
/// `tcp_bpf_recvmsg` returns EAGAIN after a wake-up that brought no data);
/// that is one reason socket steering is off by default.
fn exchange(stream: TcpStream, data: &[u8]) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    stream.set_nonblocking(true).unwrap();
    let mut stream = stream;
    let mut received = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 256 * 1024];
    let (mut offset, mut size, mut write_open) = (0, 1, true);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the exchange stalled: {} of {} bytes back",
            received.len(),
            data.len()
        );
        let mut events = libc::POLLIN;
        if write_open {
            events |= libc::POLLOUT;
        }
        let mut fd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, 1000) };
        if write_open && fd.revents & libc::POLLOUT != 0 {
            // 1 byte … 192 KiB: small messages and ones larger than a
            // socket buffer, so redirected sends split and wait.
            size = (size * 7 + 13) % (192 * 1024) + 1;
            let end = (offset + size).min(data.len());
            match stream.write(&data[offset..end]) {
                Ok(n) => offset += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
            if offset == data.len() {
                stream.shutdown(Shutdown::Write).unwrap();
                write_open = false;
            }
        }
        if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match stream.read(&mut buf) {
                Ok(0) => return received,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

#[test]
fn socket_steering_keeps_every_byte_in_order_and_cleans_up() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let node = SimNode::create("d1", 70, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let echo = artifacts::echo_bin().unwrap();
    let echo_b = b.spawn_echo(&echo, ECHO_PORT).unwrap();
    let listener = in_netns(&b.netns_path(), || {
        TcpListener::bind(("0.0.0.0", STREAM_PORT))
    })
    .unwrap()
    .unwrap();
    let served = spawn_stream_server(listener);

    let yaml = format!(
        "outbound:\n  listen: {}:{LISTEN_PORT}\n  ports: {{{STREAM_PORT}: tcp}}\nadmin:\n  listen: {ADMIN}\nworkers: 2\n\
         ebpf:\n  pin_path: {PIN_PATH}\n  socket_steering: true\n\
         workloads:\n  - name: a\n    netns: {}\n  - name: b\n    netns: {}\n",
        node.node_ip(),
        a.netns_path().display(),
        b.netns_path().display(),
    );
    let mut agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();
    let stream_addr = SocketAddr::from((b.ip, STREAM_PORT));

    // One large transfer, both ways at once, ending in half-closes.
    let big = pattern(1, 32 * 1024 * 1024);
    let back = in_netns(&a.netns_path(), || {
        let stream = connect(None, stream_addr, Duration::from_secs(5)).unwrap();
        exchange(stream, &big)
    })
    .unwrap();
    assert_eq!(back.len(), big.len(), "bytes lost\n{}", agent.log());
    assert!(back == big, "the echoed bytes differ from those sent");
    let (peer, total) = served.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(total, big.len(), "the server did not get every byte");
    assert_eq!(peer.ip().to_string(), node.node_ip().to_string());

    // Many connections at the same time, each with its own bytes.
    const CONNECTIONS: usize = 48;
    const EACH: usize = 512 * 1024;
    let results = in_netns(&a.netns_path(), || {
        let streams: Vec<TcpStream> = (0..CONNECTIONS)
            .map(|_| connect(None, stream_addr, Duration::from_secs(5)).unwrap())
            .collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, stream)| {
                    scope.spawn(move || {
                        let data = pattern(100 + i as u64, EACH);
                        exchange(stream, &data) == data
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<bool>>()
        })
    })
    .unwrap();
    let bad = results.iter().filter(|ok| !**ok).count();
    assert_eq!(
        bad, 0,
        "{bad} of {CONNECTIONS} connections lost or reordered bytes"
    );
    for _ in 0..CONNECTIONS {
        let (_, total) = served.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(total, EACH);
    }

    // The kernel redirected messages (not everything fell back to TCP).
    let metrics = agent.metrics().unwrap();
    let redirected = metric(
        &metrics,
        "wisp_kernel_program_actions_total",
        &[("program", "wisp_sk_msg")],
    );
    assert!(
        redirected > 100.0,
        "sk_msg redirected {redirected} messages\n{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_program_errors_total",
            &[("program", "wisp_sk_msg")]
        ),
        0.0,
        "{metrics}"
    );

    // Closed sockets leave the sockhash.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left;
    loop {
        left = metric(
            &agent.metrics().unwrap(),
            "wisp_kernel_steered_sockets",
            &[],
        );
        if left == 0.0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        left, 0.0,
        "sockets left in the sockhash after every connection closed"
    );

    // HTTP (last: its pooled upstream connection stays open): protocol
    // detection peeks at redirected bytes.
    let reply = http_get(
        &a.netns_path(),
        SocketAddr::from((b.ip, ECHO_PORT)),
        "/peek",
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.echo().unwrap()["path"], "/peek");
    assert_eq!(
        unmap(reply.echo().unwrap()["peer"].as_str().unwrap()),
        node.node_ip().to_string(),
        "through the agent"
    );

    assert!(agent.stop().unwrap().success(), "{}", agent.log());
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
    drop(agent);
    drop(echo_b);
    drop(node);
    assert_eq!(leftovers::find(Some("d1")), Vec::<String>::new());
}
