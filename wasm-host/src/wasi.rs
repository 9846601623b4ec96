//! The WASI preview 1 subset a Proxy-Wasm plugin needs, hand-written rather
//! than `wasmtime-wasi`: a plugin gets no files, no sockets and no host
//! environment, only what the spec's "WASI" section lists.
//!
//! Registered under `wasi_snapshot_preview1` and the legacy `wasi_unstable`
//! (as cpp-host does). Any other WASI function a module imports is linked as a
//! stub returning `NOTSUP` (see [`crate::link`]).
//!
//! | function | behaviour |
//! |---|---|
//! | `fd_write` | fd 1 → plugin log at INFO, fd 2 → ERROR (one trailing newline dropped); other fds `BADF` |
//! | `clock_time_get` | REALTIME (0) and MONOTONIC (1); other clocks `NOTSUP` |
//! | `random_get` | up to 64 KiB (cpp-host's limit), more is `INVAL` |
//! | `environ_sizes_get`, `environ_get` | the plugin's configured environment |
//! | `args_sizes_get`, `args_get` | no arguments |
//! | `proc_exit` | traps, ending the instance |
//! | `sched_yield` | returns at once |

use std::fmt;
use std::sync::OnceLock;
use std::time::Instant;

use rand::RngCore;

use crate::abi::LogLevel;
use crate::guest::HostContext;
use crate::hostcalls::logging;
use crate::memory::{self, GuestError};
use crate::state::HostState;

/// The module names WASI preview 1 is imported from.
pub(crate) const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

pub(crate) const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
pub(crate) const ERRNO_NOTSUP: i32 = 58;

const CLOCK_REALTIME: i32 = 0;
const CLOCK_MONOTONIC: i32 = 1;

/// cpp-host's `PROXY_WASM_HOST_WASI_RANDOM_GET_MAX_SIZE_BYTES`.
pub const RANDOM_GET_MAX_BYTES: usize = 64 * 1024;
/// Longest message one `fd_write` turns into a log line; the rest is dropped
/// (but reported as written) so a guest cannot make the host buffer gigabytes.
const FD_WRITE_MAX_LOG_BYTES: usize = 64 * 1024;

/// The trap `proc_exit` raises; the instance turns it into [`crate::Error::Exit`].
#[derive(Debug)]
pub(crate) struct ProcExit(pub i32);

impl fmt::Display for ProcExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// A WASI call's outcome: `Err(errno)` on failure.
type Errno = Result<(), i32>;

/// Any guest-memory failure in a WASI call is `FAULT` (WASI calls never
/// allocate in the guest, so there is no trap to carry).
impl<T> From<GuestError<T>> for i32 {
    fn from(_: GuestError<T>) -> i32 {
        ERRNO_FAULT
    }
}

pub(crate) fn errno(result: Errno) -> i32 {
    match result {
        Ok(()) => ERRNO_SUCCESS,
        Err(errno) => errno,
    }
}

/// Expands `$m!($imports, module, name, |g, args..| -> ret { body })` for
/// every WASI function under `$module` (see [`crate::hostcalls::for_each_hostcall!`]).
macro_rules! for_each_wasi {
    ($m:ident!($imports:expr), $module:expr) => {{
        use $crate::wasi::{self as wasi, ERRNO_SUCCESS};
        let module: &'static str = $module;
        $m!($imports, module, "fd_write", |g,
                                           fd: i32,
                                           iovs: i32,
                                           iovs_len: i32,
                                           nwritten: i32|
         -> i32 {
            Ok(wasi::errno(wasi::fd_write(g, fd, iovs, iovs_len, nwritten)))
        });
        $m!($imports, module, "clock_time_get", |g,
                                                 id: i32,
                                                 _precision: i64,
                                                 time: i32|
         -> i32 {
            Ok(wasi::errno(wasi::clock_time_get(g, id, time)))
        });
        $m!($imports, module, "random_get", |g,
                                             buf: i32,
                                             len: i32|
         -> i32 {
            $crate::hostcalls::check_restriction(g, "random_get")?;
            Ok(wasi::errno(wasi::random_get(g, buf, len)))
        });
        $m!($imports, module, "environ_sizes_get", |g,
                                                    count: i32,
                                                    size: i32|
         -> i32 {
            $crate::hostcalls::check_restriction(g, "environ_sizes_get")?;
            Ok(wasi::errno(wasi::environ_sizes_get(g, count, size)))
        });
        $m!($imports, module, "environ_get", |g,
                                              environ: i32,
                                              buf: i32|
         -> i32 {
            $crate::hostcalls::check_restriction(g, "environ_get")?;
            Ok(wasi::errno(wasi::environ_get(g, environ, buf)))
        });
        $m!($imports, module, "args_sizes_get", |g,
                                                 argc: i32,
                                                 size: i32|
         -> i32 {
            $crate::hostcalls::check_restriction(g, "args_sizes_get")?;
            Ok(wasi::errno(wasi::args_sizes_get(g, argc, size)))
        });
        $m!($imports, module, "args_get", |g,
                                           _argv: i32,
                                           _buf: i32|
         -> i32 {
            let _ = g;
            Ok(ERRNO_SUCCESS)
        });
        $m!($imports, module, "proc_exit", |g, code: i32| -> () {
            $crate::hostcalls::check_restriction(g, "proc_exit")?;
            Err($crate::hostcalls::Restricted::exit_trap(g, code))
        });
        $m!($imports, module, "sched_yield", |g| -> i32 {
            let _ = g;
            Ok(ERRNO_SUCCESS)
        });
    }};
}
pub(crate) use for_each_wasi;

/// `fd_write(fd, iovs, iovs_len, nwritten)`: stdout and stderr become plugin logs.
pub(crate) fn fd_write<G: HostContext>(
    caller: &mut G,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten_ptr: i32,
) -> Errno {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Err(ERRNO_BADF),
    };
    let mut message = Vec::new();
    let mut written: u32 = 0;
    for i in 0..iovs_len as u32 {
        // Each iovec is (u32 buf, u32 len); an address past 4 GiB is a fault,
        // never a wrap-around.
        let iov = offset(iovs, u64::from(i) * 8)?;
        let buf = memory::read_u32(caller, iov)?;
        let len = memory::read_u32(caller, offset(iov, 4)?)?;
        memory::check(caller, buf as i32, len as usize)?;
        written = written.saturating_add(len);
        let room = FD_WRITE_MAX_LOG_BYTES.saturating_sub(message.len());
        let take = (len as usize).min(room);
        if take > 0 {
            message.extend(memory::read(caller, buf as i32, take as i32)?);
        }
    }
    if message.last() == Some(&b'\n') {
        message.pop();
    }
    if !message.is_empty() {
        let state = caller.state();
        logging::emit(
            state.plugin_name(),
            state.call.effective_context_id,
            level,
            &String::from_utf8_lossy(&message),
        );
    }
    memory::write_u32(caller, nwritten_ptr, written)?;
    Ok(())
}

/// `clock_time_get(id, precision, time)`: nanoseconds since the Unix epoch
/// (REALTIME) or since an arbitrary fixed point in this process (MONOTONIC).
pub(crate) fn clock_time_get<G: HostContext>(caller: &mut G, id: i32, time_ptr: i32) -> Errno {
    let now = match id {
        CLOCK_REALTIME => crate::hostcalls::context::unix_time_nanos(),
        CLOCK_MONOTONIC => {
            static START: OnceLock<Instant> = OnceLock::new();
            let elapsed = START.get_or_init(Instant::now).elapsed();
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        }
        _ => return Err(ERRNO_NOTSUP),
    };
    memory::write_u64(caller, time_ptr, now)?;
    Ok(())
}

/// `random_get(buf, len)`: cryptographically secure bytes.
pub(crate) fn random_get<G: HostContext>(caller: &mut G, buf: i32, len: i32) -> Errno {
    let len = len as u32 as usize;
    if len > RANDOM_GET_MAX_BYTES {
        return Err(ERRNO_INVAL);
    }
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    memory::write(caller, buf, &bytes)?;
    Ok(())
}

/// The configured environment as WASI lays it out: `KEY=VALUE\0` strings.
fn environment(state: &HostState) -> Vec<Vec<u8>> {
    state
        .plugin
        .config()
        .environment
        .iter()
        .map(|(key, value)| format!("{key}={value}\0").into_bytes())
        .collect()
}

/// `environ_sizes_get(count, buf_size)`.
pub(crate) fn environ_sizes_get<G: HostContext>(
    caller: &mut G,
    count_ptr: i32,
    size_ptr: i32,
) -> Errno {
    let env = environment(caller.state());
    let size: usize = env.iter().map(Vec::len).sum();
    memory::write_u32(
        caller,
        count_ptr,
        u32::try_from(env.len()).map_err(|_| ERRNO_INVAL)?,
    )?;
    memory::write_u32(
        caller,
        size_ptr,
        u32::try_from(size).map_err(|_| ERRNO_INVAL)?,
    )?;
    Ok(())
}

/// `environ_get(environ, buf)`: pointers to each string go to `environ`, the
/// strings themselves to `buf`, sized as `environ_sizes_get` said.
pub(crate) fn environ_get<G: HostContext>(caller: &mut G, environ_ptr: i32, buf_ptr: i32) -> Errno {
    let mut slot = environ_ptr;
    let mut buf = buf_ptr;
    for entry in environment(caller.state()) {
        memory::write_u32(caller, slot, buf as u32)?;
        memory::write(caller, buf, &entry)?;
        slot = offset(slot, 4)?;
        buf = offset(buf, entry.len() as u64)?;
    }
    Ok(())
}

/// `ptr + delta` as a wasm32 address; FAULT past 4 GiB.
fn offset(ptr: i32, delta: u64) -> Result<i32, i32> {
    let address = u64::from(ptr as u32) + delta;
    u32::try_from(address)
        .map(|a| a as i32)
        .map_err(|_| ERRNO_FAULT)
}

/// `args_sizes_get(argc, buf_size)`: a plugin has no arguments.
pub(crate) fn args_sizes_get<G: HostContext>(
    caller: &mut G,
    argc_ptr: i32,
    size_ptr: i32,
) -> Errno {
    memory::write_u32(caller, argc_ptr, 0)?;
    memory::write_u32(caller, size_ptr, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use wasmtime::Val;

    use super::*;
    use crate::abi::AbiVersion;
    use crate::plugin::PluginConfig;
    use crate::test_guest::{Guest, HEAP, OUT_OF_BOUNDS};

    /// Writes iovecs for `parts` and returns (iovs, count).
    fn iovecs(guest: &mut Guest, parts: &[&[u8]]) -> (i32, i32) {
        let mut table = Vec::new();
        for part in parts {
            let (ptr, len) = guest.put(part);
            table.extend_from_slice(&(ptr as u32).to_le_bytes());
            table.extend_from_slice(&(len as u32).to_le_bytes());
        }
        (guest.put(&table).0, parts.len() as i32)
    }

    #[test]
    fn fd_write_logs_stdout_and_stderr() {
        let mut guest = Guest::new();
        let (iovs, count) = iovecs(&mut guest, &[b"hello ", b"world\n"]);
        let (nwritten, _) = guest.slots();
        assert_eq!(
            guest.wasi("fd_write", &[1, iovs, count, nwritten]),
            ERRNO_SUCCESS
        );
        assert_eq!(guest.read_u32(nwritten), 12);
        assert_eq!(
            guest.wasi("fd_write", &[2, iovs, count, nwritten]),
            ERRNO_SUCCESS
        );
        assert_eq!(
            guest.wasi("fd_write", &[3, iovs, count, nwritten]),
            ERRNO_BADF
        );
        assert_eq!(
            guest.wasi("fd_write", &[1, OUT_OF_BOUNDS, 1, nwritten]),
            ERRNO_FAULT
        );
        assert_eq!(
            guest.wasi("fd_write", &[1, iovs, count, OUT_OF_BOUNDS]),
            ERRNO_FAULT
        );
        let (bad, count) = {
            let table: Vec<u8> = [OUT_OF_BOUNDS as u32, 4]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (guest.put(&table).0, 1)
        };
        assert_eq!(
            guest.wasi("fd_write", &[1, bad, count, nwritten]),
            ERRNO_FAULT
        );
        // An iovec table running past 4 GiB is a fault, not a wrap-around.
        assert_eq!(guest.wasi("fd_write", &[1, -8, 2, nwritten]), ERRNO_FAULT);
        // Also linked under the legacy module name.
        let args = [1, iovs, 2, nwritten].map(Val::I32);
        assert_eq!(
            guest.try_call("wasi_unstable", "fd_write", &args).unwrap(),
            Some(ERRNO_SUCCESS)
        );
    }

    #[test]
    fn clocks() {
        let mut guest = Guest::new();
        let (time, _) = guest.slots();
        let clock = |guest: &mut Guest, id: i32, ptr: i32| {
            let args = [Val::I32(id), Val::I64(1), Val::I32(ptr)];
            guest
                .try_call("wasi_snapshot_preview1", "clock_time_get", &args)
                .unwrap()
                .unwrap()
        };
        assert_eq!(clock(&mut guest, CLOCK_REALTIME, time), ERRNO_SUCCESS);
        let realtime = guest.read_u64(time);
        assert!(realtime > 1_600_000_000 * 1_000_000_000, "{realtime}");
        assert_eq!(clock(&mut guest, CLOCK_MONOTONIC, time), ERRNO_SUCCESS);
        let first = guest.read_u64(time);
        assert_eq!(clock(&mut guest, CLOCK_MONOTONIC, time), ERRNO_SUCCESS);
        assert!(guest.read_u64(time) >= first);
        assert_eq!(clock(&mut guest, 2, time), ERRNO_NOTSUP);
        assert_eq!(
            clock(&mut guest, CLOCK_REALTIME, OUT_OF_BOUNDS),
            ERRNO_FAULT
        );
    }

    #[test]
    fn random_get_is_capped_at_64_kib() {
        let mut guest = Guest::new();
        let max = RANDOM_GET_MAX_BYTES as i32;
        assert_eq!(guest.wasi("random_get", &[HEAP, max]), ERRNO_SUCCESS);
        assert!(guest.read(HEAP, max).iter().any(|&b| b != 0));
        assert_eq!(guest.wasi("random_get", &[HEAP, max + 1]), ERRNO_INVAL);
        assert_eq!(guest.wasi("random_get", &[OUT_OF_BOUNDS, 16]), ERRNO_FAULT);
        assert_eq!(guest.wasi("random_get", &[HEAP, 0]), ERRNO_SUCCESS);
    }

    #[test]
    fn environment_is_the_configured_one() {
        let mut guest = Guest::with(
            AbiVersion::V0_2_1,
            PluginConfig {
                environment: vec![("A".into(), "1".into()), ("LONGER".into(), "x=y".into())],
                ..Default::default()
            },
        );
        let (count, size) = guest.slots();
        assert_eq!(
            guest.wasi("environ_sizes_get", &[count, size]),
            ERRNO_SUCCESS
        );
        assert_eq!(guest.read_u32(count), 2);
        assert_eq!(guest.read_u32(size), 15); // "A=1\0" + "LONGER=x=y\0"

        let (environ, _) = guest.slots();
        let (buf, _) = guest.put(&[0; 15]);
        assert_eq!(guest.wasi("environ_get", &[environ, buf]), ERRNO_SUCCESS);
        let first = guest.read_u32(environ) as i32;
        let second = guest.read_u32(environ + 4) as i32;
        assert_eq!((first, second), (buf, buf + 4));
        assert_eq!(guest.read(buf, 15), b"A=1\0LONGER=x=y\0");
        assert_eq!(
            guest.wasi("environ_get", &[OUT_OF_BOUNDS, buf]),
            ERRNO_FAULT
        );
        assert_eq!(
            guest.wasi("environ_sizes_get", &[OUT_OF_BOUNDS, size]),
            ERRNO_FAULT
        );
    }

    #[test]
    fn host_environment_never_leaks() {
        let mut guest = Guest::new();
        let (count, size) = guest.slots();
        assert_eq!(
            guest.wasi("environ_sizes_get", &[count, size]),
            ERRNO_SUCCESS
        );
        assert_eq!((guest.read_u32(count), guest.read_u32(size)), (0, 0));
    }

    #[test]
    fn args_are_empty_and_sched_yield_returns() {
        let mut guest = Guest::new();
        let (argc, size) = guest.slots();
        guest.put(&[0xff; 8]);
        assert_eq!(guest.wasi("args_sizes_get", &[argc, size]), ERRNO_SUCCESS);
        assert_eq!((guest.read_u32(argc), guest.read_u32(size)), (0, 0));
        assert_eq!(guest.wasi("args_get", &[argc, size]), ERRNO_SUCCESS);
        assert_eq!(
            guest.wasi("args_sizes_get", &[OUT_OF_BOUNDS, size]),
            ERRNO_FAULT
        );
        assert_eq!(guest.wasi("sched_yield", &[]), ERRNO_SUCCESS);
    }

    #[test]
    fn proc_exit_unwinds_with_its_code() {
        let mut guest = Guest::new();
        let error = guest
            .try_call("wasi_snapshot_preview1", "proc_exit", &[Val::I32(7)])
            .unwrap_err();
        let exit = error.chain().find_map(|e| e.downcast_ref::<ProcExit>());
        assert_eq!(exit.map(|e| e.0), Some(7), "{error:?}");
    }
}
