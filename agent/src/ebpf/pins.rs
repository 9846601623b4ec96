//! wisp's state in bpffs: where each program, link and map is pinned, and
//! the few bpf(2) calls aya does not expose (opening a pin, force-detaching a
//! link).
//!
//! ```text
//! <pin_path>/                    default /sys/fs/bpf/wisp
//!   links/wisp_connect4 …        the cgroup attachments (keep the programs attached)
//!   progs/wisp_connect4 …        the programs
//!   maps/WISP_ENROLLED …         the maps (enrollment, original destinations, counters, policy)
//! ```

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use wisp_common::{maps, programs};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `statfs` magic of cgroup v2.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The pin layout under one pin path.
#[derive(Clone, Debug)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Pins {
        Pins {
            root: root.to_owned(),
        }
    }
    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }
    pub fn program(&self, program: &str) -> PathBuf {
        self.root.join("progs").join(program)
    }
    pub fn map(&self, map: &str) -> PathBuf {
        self.root.join("maps").join(map)
    }

    /// Every link, program and map of a complete set is pinned.
    pub fn complete(&self) -> bool {
        programs::ALL
            .iter()
            .all(|p| self.link(p).exists() && self.program(p).exists())
            && self.program(programs::SK_LOOKUP).exists()
            && self.program(programs::SK_MSG).exists()
            && maps::ALL.iter().all(|m| self.map(m).exists())
    }

    /// Anything at all is pinned here.
    pub fn any(&self) -> bool {
        !self.list().is_empty()
    }

    /// `(kind, name, path)` of everything pinned, links first.
    pub fn list(&self) -> Vec<(&'static str, String, PathBuf)> {
        let mut found = Vec::new();
        for (kind, dir) in [("link", "links"), ("program", "progs"), ("map", "maps")] {
            let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            let mut names: Vec<_> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                let path = self.root.join(dir).join(&name);
                found.push((kind, name, path));
            }
        }
        found
    }

    pub fn create_dirs(&self) -> std::io::Result<()> {
        for dir in ["links", "progs", "maps"] {
            std::fs::create_dir_all(self.root.join(dir))?;
        }
        Ok(())
    }

    /// Removes every pin (links first, force-detaching them so that a
    /// process still holding one cannot keep it attached) and the
    /// directories. Returns what was removed.
    pub fn remove_all(&self, force_detach: bool) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for (kind, name, path) in self.list() {
            if kind == "link"
                && force_detach
                && let Ok(fd) = obj_get(&path)
            {
                // ENOENT/EINVAL: already detached; the unpin below is what counts.
                let _ = link_detach(&fd);
            }
            std::fs::remove_file(&path)?;
            removed.push(format!("{kind} {name}"));
        }
        for dir in ["links", "progs", "maps"] {
            match std::fs::remove_dir(self.root.join(dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(removed)
    }
}

/// The filesystem type magic of `path` (`statfs`).
pub fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string; `st` is a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Makes sure `pin_path` can be created on a bpf filesystem: finds its
/// nearest existing ancestor and, when that is the conventional
/// `/sys/fs/bpf` without bpffs mounted on it, mounts bpffs there.
/// Returns the bpffs mount point used, or a message saying what is wrong.
pub fn ensure_bpffs(pin_path: &Path) -> Result<PathBuf, String> {
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(existing.to_owned());
    }
    let conventional = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(conventional) && !is_bpffs(conventional) {
        std::fs::create_dir_all(conventional)
            .map_err(|e| format!("cannot create {}: {e}", conventional.display()))?;
        nix::mount::mount(
            Some("bpf"),
            conventional,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "bpffs is not mounted at {} and mounting it failed ({e}); mount it with `mount -t bpf bpf {}` (in a container: mount the host's /sys/fs/bpf)",
                conventional.display(),
                conventional.display()
            )
        })?;
        tracing::info!(path = %conventional.display(), "mounted bpffs");
        return Ok(conventional.to_owned());
    }
    Err(format!(
        "{} is not on a bpf filesystem ({} is not bpffs); pick a path under a bpffs mount such as /sys/fs/bpf/wisp, or mount one with `mount -t bpf bpf DIR`",
        pin_path.display(),
        existing.display()
    ))
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the attr struct and the path it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_DETACH`: detaches a link even while other descriptors (a running
/// agent) still hold it.
pub fn link_detach(link: &OwnedFd) -> std::io::Result<()> {
    let attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const attr,
            std::mem::size_of::<LinkDetachAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
