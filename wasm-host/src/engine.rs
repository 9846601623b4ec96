//! The process-wide Wasmtime engines and the epoch ticker.
//!
//! Compiled code is only valid with the engine (and settings) that produced
//! it, and sharing one engine shares its code cache, so there is one engine
//! per setting that changes generated code: with and without fuel metering.
//!
//! Both engines use epoch interruption: one ticker thread bumps their epoch
//! every [`EPOCH_TICK`], and each call into a guest sets a deadline a number
//! of ticks ahead (cpp-host's Wasmtime backend does the same since PR #510,
//! but needs an external watchdog; ours is built in). A guest that runs past
//! its deadline traps with `Trap::Interrupt`.

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine};

/// How often the ticker bumps the epoch: the granularity of callback deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

struct Engines {
    plain: Engine,
    fuel: Engine,
}

fn engines() -> Result<&'static Engines, &'static str> {
    static ENGINES: OnceLock<Result<Engines, String>> = OnceLock::new();
    ENGINES
        .get_or_init(|| {
            let build = |fuel: bool| {
                let mut config = Config::new();
                config.epoch_interruption(true);
                config.consume_fuel(fuel);
                Engine::new(&config).map_err(|e| format!("{e:#}"))
            };
            let engines = Engines {
                plain: build(false)?,
                fuel: build(true)?,
            };
            start_ticker(vec![engines.plain.clone(), engines.fuel.clone()])?;
            Ok(engines)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The engine for modules with (`fuel`) or without fuel metering.
pub(crate) fn get(fuel: bool) -> Result<&'static Engine, &'static str> {
    engines().map(|e| if fuel { &e.fuel } else { &e.plain })
}

fn start_ticker(engines: Vec<Engine>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                for engine in &engines {
                    engine.increment_epoch();
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the epoch ticker thread: {e}"))
}

/// Epoch ticks for a deadline: rounded up, plus one because the current tick
/// may be about to end.
pub(crate) fn deadline_ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    let ticks = deadline.as_nanos().div_ceil(tick);
    u64::try_from(ticks)
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up() {
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
        assert_eq!(deadline_ticks(EPOCH_TICK), 2);
        assert_eq!(deadline_ticks(EPOCH_TICK + Duration::from_nanos(1)), 3);
        assert_eq!(deadline_ticks(Duration::MAX), u64::MAX);
    }
}
