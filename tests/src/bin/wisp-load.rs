//! `wisp-load --target ADDR [--path P] [--connections N] [--seconds S] [--connects M]`:
//! closed-loop HTTP load from inside a pod; prints a JSON `LoadReport`
//! (see `wisp_testbed::loadgen`).

fn main() -> std::io::Result<()> {
    let mut target = None;
    let mut path = String::from("/");
    let (mut connections, mut seconds, mut connects) = (4usize, 5u64, 100usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let bad = |e: &dyn std::fmt::Display| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{flag} {value}: {e}"),
            )
        };
        match flag.as_str() {
            "--target" => {
                target = Some(value.parse::<std::net::SocketAddr>().map_err(|e| bad(&e))?)
            }
            "--path" => path = value,
            "--connections" => connections = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => seconds = value.parse().map_err(|e| bad(&e))?,
            "--connects" => connects = value.parse().map_err(|e| bad(&e))?,
            _ => {
                eprintln!(
                    "usage: wisp-load --target ADDR [--path P] [--connections N] [--seconds S] [--connects M]"
                );
                std::process::exit(2);
            }
        }
    }
    let Some(target) = target else {
        eprintln!("wisp-load: --target is required");
        std::process::exit(2);
    };
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(wisp_testbed::loadgen::run(
            target,
            &path,
            connections,
            std::time::Duration::from_secs(seconds),
            connects,
        ));
    println!(
        "{}",
        serde_json::to_string(&report).map_err(std::io::Error::other)?
    );
    Ok(())
}
