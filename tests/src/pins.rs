//! [`PinGuard`]: removes a bpffs pin directory when dropped, so a test whose
//! agent pinned its programs (and was killed, or kept them on exit) leaves
//! nothing attached — also when it fails. Unpinning a link that no process
//! holds detaches its program.

use std::path::{Path, PathBuf};

pub struct PinGuard {
    path: PathBuf,
}

impl PinGuard {
    /// Guards `path`, removing what an earlier, killed run left there first.
    pub fn new(path: impl Into<PathBuf>) -> PinGuard {
        let guard = PinGuard { path: path.into() };
        guard.remove();
        guard
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn remove(&self) {
        if self.path.exists()
            && let Err(error) = std::fs::remove_dir_all(&self.path)
        {
            eprintln!(
                "testbed: could not remove the pins under {}: {error}",
                self.path.display()
            );
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.remove();
    }
}
