//! Giving the memory that glibc's allocator keeps after a burst back to the
//! kernel.
//!
//! glibc gives threads their own arenas (up to eight per core) and keeps
//! freed memory in them; only the top of the main heap goes back to the
//! kernel by itself. Compiling Wasm modules (Cranelift, on Wasmtime's
//! compile threads) and instantiating them on every worker allocate and free
//! several MiB, so an idle agent kept about 8 MiB of such garbage resident on
//! our build machine. [`release_free_memory`] runs `malloc_trim` once such a
//! burst is over (start-up, a plugin swap), off the request path.
//!
//! The number of arenas is deliberately left at glibc's default. Capping it
//! (we tried `workers + 1`) let two workers end up on the same arena once
//! the compile threads had taken the others: both then took its lock on the
//! request path, which showed as ~1 futex call per request and cost a third
//! of the throughput with two workers, for about 1 MiB of idle RSS saved.

/// Returns freed heap pages of all malloc arenas to the kernel.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is
    // thread-safe (it takes each arena's lock) and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
