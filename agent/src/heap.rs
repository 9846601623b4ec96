//! How the agent uses glibc's allocator, and giving freed memory back.
//!
//! glibc gives every thread that allocates its own arena (up to eight per
//! core) and keeps freed memory in it; only the top of the main heap goes
//! back to the kernel by itself. Compiling Wasm modules (Cranelift, on
//! Wasmtime's compile threads) and instantiating them on every worker
//! allocate and free several MiB, so an idle agent kept about 8 MiB of such
//! garbage resident on our build machine. Two measures, both off the
//! request path:
//! - [`limit_arenas`]: one arena per worker plus one for everything else,
//!   so threads that only ran once (compilation) do not each pin an arena;
//! - [`release_free_memory`]: `malloc_trim` once a burst of compiling and
//!   instantiating is over (start-up, a plugin swap).
//!
//! The request path is unaffected: small allocations are served by glibc's
//! per-thread caches without touching an arena's lock.

/// Caps glibc's arenas at `workers + 1`. Call before starting threads.
pub fn limit_arenas(workers: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = libc::c_int::try_from(workers.saturating_add(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator; called
        // before other threads allocate, and valid at any time anyway.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = workers;
}

/// Returns freed heap pages of all malloc arenas to the kernel.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is
    // thread-safe (it takes each arena's lock) and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
