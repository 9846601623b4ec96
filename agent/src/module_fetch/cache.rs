//! The content-addressed module cache: `<dir>/sha256/<hex>` holds the module
//! whose sha256 is `<hex>`, and `<dir>/aliases/<hex>` names the module an
//! OCI image manifest digest stands for. Files are written to a temporary
//! name and renamed, so a reader (another agent, a crash) never sees half a
//! module, and every read is hashed again, so a damaged file is dropped and
//! fetched anew rather than loaded.
//!
//! The total size of the modules is capped: after each insert the least
//! recently used ones (oldest modification time; a hit touches the file) are
//! removed until the rest fit.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{FetchError, sha256_hex};

/// Temporary files older than this are leftovers of a crashed write.
const STALE_TEMP: Duration = Duration::from_secs(3600);

pub(super) struct ModuleCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ModuleCache {
    /// Nothing is created until the first insert, so a configuration with
    /// only local modules never touches the cache directory.
    pub(super) fn new(dir: PathBuf, max_bytes: u64) -> ModuleCache {
        ModuleCache { dir, max_bytes }
    }

    fn modules(&self) -> PathBuf {
        self.dir.join("sha256")
    }

    fn aliases(&self) -> PathBuf {
        self.dir.join("aliases")
    }

    /// The module that satisfies every pin (each either its own sha256 or
    /// an alias of it), with its sha256; `None` when it is not cached.
    pub(super) fn lookup(&self, pins: &[String]) -> Result<Option<(Vec<u8>, String)>, FetchError> {
        let mut content: Option<String> = None;
        for pin in pins {
            let resolved = if self.modules().join(pin).is_file() {
                pin.clone()
            } else {
                match std::fs::read_to_string(self.aliases().join(pin)) {
                    Ok(target) => target.trim().to_owned(),
                    Err(_) => return Ok(None),
                }
            };
            match &content {
                Some(existing) if *existing != resolved => return Ok(None),
                _ => content = Some(resolved),
            }
        }
        let Some(sha) = content else {
            return Ok(None);
        };
        let path = self.modules().join(&sha);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(FetchError::Cache { path, source }),
        };
        if sha256_hex(&bytes) != sha {
            tracing::warn!(path = %path.display(), "cached module is damaged; removing it and fetching again");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        // The modification time is the LRU clock.
        if let Ok(file) = std::fs::File::options().write(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Ok(Some((bytes, sha)))
    }

    /// Stores a verified module (and the manifest digests that stand for
    /// it), then evicts past the size cap.
    pub(super) fn insert(
        &self,
        sha: &str,
        bytes: &[u8],
        aliases: &[String],
    ) -> Result<(), FetchError> {
        if bytes.len() as u64 > self.max_bytes {
            return Ok(());
        }
        let modules = self.modules();
        create_dir(&modules)?;
        write_atomically(&modules.join(sha), bytes)?;
        if !aliases.is_empty() {
            let dir = self.aliases();
            create_dir(&dir)?;
            for alias in aliases.iter().filter(|a| *a != sha) {
                write_atomically(&dir.join(alias), sha.as_bytes())?;
            }
        }
        self.evict(sha)
    }

    /// Removes the least recently used modules until the rest fit in the
    /// cap, never `keep` (the one just inserted); then aliases left without
    /// their module.
    fn evict(&self, keep: &str) -> Result<(), FetchError> {
        let dir = self.modules();
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in read_dir(&dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with('.') {
                if modified.elapsed().is_ok_and(|age| age > STALE_TEMP) {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            total += meta.len();
            entries.push((modified, name, meta.len()));
        }
        entries.sort();
        for (_, name, len) in entries {
            if total <= self.max_bytes {
                break;
            }
            if name == keep {
                continue;
            }
            let path = dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    tracing::info!(sha256 = %name, bytes = len, "evicted from the module cache (size cap)");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
                Err(source) => return Err(FetchError::Cache { path, source }),
            }
        }
        let aliases = self.aliases();
        if aliases.is_dir() {
            for entry in read_dir(&aliases)? {
                let target = std::fs::read_to_string(entry.path()).unwrap_or_default();
                if !dir.join(target.trim()).is_file() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

fn create_dir(dir: &Path) -> Result<(), FetchError> {
    std::fs::create_dir_all(dir).map_err(|source| FetchError::Cache {
        path: dir.to_owned(),
        source,
    })
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, FetchError> {
    let entries = std::fs::read_dir(dir).map_err(|source| FetchError::Cache {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries.flatten().collect())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(
        ".tmp-{}-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&temp, bytes)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&temp);
            FetchError::Cache {
                path: path.to_owned(),
                source,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(n: u8, len: usize) -> (Vec<u8>, String) {
        let mut bytes = b"\0asm".to_vec();
        bytes.resize(len, n);
        let sha = sha256_hex(&bytes);
        (bytes, sha)
    }

    fn age(cache: &ModuleCache, sha: &str, seconds_ago: u64) {
        let file = std::fs::File::options()
            .write(true)
            .open(cache.modules().join(sha))
            .unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(seconds_ago))
            .unwrap();
    }

    #[test]
    fn lookup_finds_by_sha_or_alias_and_refuses_disagreeing_pins() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().join("c"), 1 << 20);
        let (bytes, sha) = module(1, 100);
        let manifest = "f".repeat(64);
        assert!(cache.lookup(std::slice::from_ref(&sha)).unwrap().is_none());
        cache
            .insert(&sha, &bytes, std::slice::from_ref(&manifest))
            .unwrap();
        assert_eq!(
            cache.lookup(std::slice::from_ref(&sha)).unwrap().unwrap().0,
            bytes
        );
        assert_eq!(
            cache
                .lookup(std::slice::from_ref(&manifest))
                .unwrap()
                .unwrap()
                .1,
            sha
        );
        assert!(
            cache
                .lookup(&[sha.clone(), manifest.clone()])
                .unwrap()
                .is_some()
        );
        let (_, other) = module(2, 100);
        assert!(cache.lookup(&[sha, other]).unwrap().is_none());
    }

    #[test]
    fn a_damaged_entry_is_dropped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().to_owned(), 1 << 20);
        let (bytes, sha) = module(3, 64);
        cache.insert(&sha, &bytes, &[]).unwrap();
        std::fs::write(cache.modules().join(&sha), b"\0asm tampered").unwrap();
        assert!(cache.lookup(std::slice::from_ref(&sha)).unwrap().is_none());
        assert!(!cache.modules().join(&sha).exists());
    }

    #[test]
    fn the_size_cap_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().to_owned(), 250);
        let (a, sha_a) = module(1, 100);
        let (b, sha_b) = module(2, 100);
        let (c, sha_c) = module(3, 100);
        cache.insert(&sha_a, &a, &["e".repeat(64)]).unwrap();
        cache.insert(&sha_b, &b, &[]).unwrap();
        age(&cache, &sha_a, 300);
        age(&cache, &sha_b, 200);
        // A hit makes a the most recently used.
        assert!(
            cache
                .lookup(std::slice::from_ref(&sha_a))
                .unwrap()
                .is_some()
        );
        cache.insert(&sha_c, &c, &[]).unwrap();
        assert!(cache.modules().join(&sha_a).is_file());
        assert!(
            !cache.modules().join(&sha_b).exists(),
            "b was least recently used"
        );
        assert!(cache.modules().join(&sha_c).is_file());
        // A module larger than the whole cache is not stored.
        let (big, sha_big) = module(4, 300);
        cache.insert(&sha_big, &big, &[]).unwrap();
        assert!(!cache.modules().join(&sha_big).exists());
        // Evicting a drops its alias too.
        age(&cache, &sha_a, 500);
        let (d, sha_d) = module(5, 100);
        cache.insert(&sha_d, &d, &[]).unwrap();
        assert!(!cache.modules().join(&sha_a).exists());
        assert!(!cache.aliases().join("e".repeat(64)).exists());
    }
}
