//! `wisp-echo --listen ADDR --name NAME`: the test pods' HTTP server
//! (see `wisp_testbed::echo`).

fn main() -> std::io::Result<()> {
    let mut listen: std::net::SocketAddr = "0.0.0.0:8080".parse().expect("valid default");
    let mut name = String::from("echo");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--listen", Some(v)) => {
                listen = v.parse().map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("--listen {v}: {e}"),
                    )
                })?
            }
            ("--name", Some(v)) => name = v,
            _ => {
                eprintln!("usage: wisp-echo --listen ADDR --name NAME");
                std::process::exit(2);
            }
        }
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(wisp_testbed::echo::serve(listen, name))
}
