//! Feature probing at start: before loading anything, check that the kernel
//! and the machine have what wisp's programs need, and name what is missing
//! and how to fix it.

use std::path::PathBuf;

use aya::programs::ProgramType;

use super::pins::{self, CGROUP2_SUPER_MAGIC};
use super::{DataplaneOptions, EbpfError, find_cgroup2_mount};
use wisp_common::programs;

/// Root, a cgroup v2 hierarchy, bpffs at the pin path (mounted when absent),
/// and the program types. Returns the cgroup directory to attach to.
pub fn check(options: &DataplaneOptions) -> Result<PathBuf, EbpfError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(EbpfError::NotPrivileged);
    }
    let cgroup_root = match &options.cgroup_root {
        Some(path) => {
            match pins::fs_magic(path) {
                Ok(CGROUP2_SUPER_MAGIC) => {}
                Ok(_) => return Err(EbpfError::NotCgroup2(path.clone())),
                Err(source) => {
                    return Err(EbpfError::OpenCgroup {
                        path: path.clone(),
                        source,
                    });
                }
            }
            path.clone()
        }
        None => find_cgroup2_mount()?.ok_or(EbpfError::NoCgroup2)?,
    };
    pins::ensure_bpffs(&options.pin_path).map_err(EbpfError::Bpffs)?;
    for (program_type, what, program) in [
        (
            ProgramType::CgroupSockAddr,
            "cgroup_sock_addr",
            programs::CONNECT4,
        ),
        (ProgramType::SockOps, "sock_ops", programs::SOCK_OPS),
        (ProgramType::SkLookup, "sk_lookup", programs::SK_LOOKUP),
    ] {
        // A probe that cannot run at all is not proof of absence: loading
        // will report the real error then.
        if let Ok(false) = aya::sys::is_program_supported(program_type) {
            return Err(EbpfError::ProgramTypeMissing { what, program });
        }
    }
    Ok(cgroup_root)
}
