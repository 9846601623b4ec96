//! The process-wide Wasmtime engines and the epoch ticker.
//!
//! Compiled code is only valid with the engine (and settings) that produced
//! it, and sharing one engine shares its code cache, so there is one engine
//! per setting that changes generated code or allocation: with and without
//! fuel metering, and with on-demand or pooling instance allocation.
//!
//! The pooling engines serve [`IsolationMode::PerRequest`](crate::IsolationMode)
//! plugins: their instances, memories and tables come from slots reserved
//! once ([`PoolLimits`]), so a fresh instance per request costs a slot reset
//! instead of mmap/munmap calls. They are created on first use, so a process
//! without per-request plugins reserves nothing.
//!
//! Every engine uses epoch interruption: one ticker thread bumps the epoch of
//! each engine created so far every [`EPOCH_TICK`], and each call into a
//! guest sets a deadline a number of ticks ahead (cpp-host's Wasmtime backend
//! does the same since PR #510, but needs an external watchdog; ours is built
//! in). A guest that runs past its deadline traps with `Trap::Interrupt`.

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::limits::PoolLimits;

/// How often the ticker bumps the epoch: the granularity of callback deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The settings that select an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EngineKey {
    pub fuel: bool,
    pub pooled: bool,
}

type Slot = OnceLock<Result<Engine, String>>;

/// plain, fuel, pooled, pooled + fuel.
static ENGINES: [Slot; 4] = [
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
];

fn slot(key: EngineKey) -> &'static Slot {
    &ENGINES[usize::from(key.fuel) | usize::from(key.pooled) << 1]
}

fn build(key: EngineKey) -> Result<Engine, String> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(key.fuel);
    if key.pooled {
        let limits = PoolLimits::DEFAULT;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(limits.instances)
            .total_memories(limits.instances)
            .total_tables(limits.instances * limits.tables_per_instance)
            .max_memories_per_module(1)
            .max_tables_per_module(limits.tables_per_instance)
            .max_memory_size(limits.memory_bytes)
            .table_elements(limits.table_elements);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).map_err(|e| {
        if key.pooled {
            format!(
                "cannot create the pooling allocator ({:?}): {e:#}",
                PoolLimits::DEFAULT
            )
        } else {
            format!("{e:#}")
        }
    })
}

/// The engine for `key`, created (and ticked) on first use.
pub(crate) fn get(key: EngineKey) -> Result<&'static Engine, &'static str> {
    ticker()?;
    slot(key)
        .get_or_init(|| build(key))
        .as_ref()
        .map_err(String::as_str)
}

/// Starts the one thread that bumps the epoch of every engine created so far.
fn ticker() -> Result<(), &'static str> {
    static TICKER: OnceLock<Result<(), String>> = OnceLock::new();
    TICKER
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(EPOCH_TICK);
                        for engine in ENGINES.iter().filter_map(|e| e.get()?.as_ref().ok()) {
                            engine.increment_epoch();
                        }
                    }
                })
                .map(drop)
                .map_err(|e| format!("cannot start the epoch ticker thread: {e}"))
        })
        .as_ref()
        .map(|&()| ())
        .map_err(String::as_str)
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
