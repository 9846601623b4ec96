//! Process-wide state plugins share across instances and workers: shared data
//! (a key-value store with compare-and-swap per vm_id) and shared queues.
//!
//! As in cpp-host (`src/shared_data.cc`, `src/shared_queue.cc`) both live for
//! the whole process and are keyed by vm_id, so every instance of the same VM
//! on every worker sees the same data. Two wisp additions close gaps the
//! ecosystem complains about (envoy#28339, spec#32): an empty value deletes a
//! key (the Rust SDK's `remove_shared_data` writes one), and each vm_id's data
//! has a size cap ([`crate::ResourceLimits::shared_data_max_bytes`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use crate::abi::Status;
use crate::embedder::QueueWaker;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps inconsistent
    // (every update is a single insert/remove), so poisoning is ignored.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === shared data ===

#[derive(Default)]
struct DataStore {
    by_vm: HashMap<String, VmData>,
    /// Last CAS handed out; each successful set gets a fresh one (never 0).
    last_cas: u32,
}

#[derive(Default)]
struct VmData {
    entries: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    /// Sum of key and value lengths, checked against the cap.
    bytes: usize,
}

fn data_store() -> &'static Mutex<DataStore> {
    static STORE: OnceLock<Mutex<DataStore>> = OnceLock::new();
    STORE.get_or_init(Default::default)
}

/// `proxy_get_shared_data`: the value and its CAS.
pub(crate) fn get_data(vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
    lock(data_store())
        .by_vm
        .get(vm_id)?
        .entries
        .get(key)
        .cloned()
}

/// `proxy_set_shared_data`: `cas` 0 always writes; otherwise it must match
/// the stored CAS (CAS_MISMATCH). An empty value deletes the key. A write
/// that would take the vm_id's data past `max_bytes` is INTERNAL_FAILURE.
pub(crate) fn set_data(
    vm_id: &str,
    key: &[u8],
    value: &[u8],
    cas: u32,
    max_bytes: usize,
) -> Result<(), Status> {
    let mut store = lock(data_store());
    let store = &mut *store;
    let vm = store.by_vm.entry(vm_id.to_owned()).or_default();
    let old_size = match vm.entries.get(key) {
        Some((old, stored_cas)) => {
            if cas != 0 && cas != *stored_cas {
                return Err(Status::CasMismatch);
            }
            key.len() + old.len()
        }
        None => 0,
    };
    if value.is_empty() {
        vm.entries.remove(key);
        vm.bytes -= old_size;
        return Ok(());
    }
    let new_total = vm.bytes - old_size + key.len() + value.len();
    if new_total > max_bytes {
        return Err(Status::InternalFailure);
    }
    store.last_cas = store.last_cas.wrapping_add(1).max(1);
    vm.entries
        .insert(key.to_vec(), (value.to_vec(), store.last_cas));
    vm.bytes = new_total;
    Ok(())
}

/// The value of shared-data `key` under `vm_id` (for admin dumps and tests).
pub fn shared_data(vm_id: &str, key: &str) -> Option<Vec<u8>> {
    get_data(vm_id, key.as_bytes()).map(|(value, _)| value)
}

/// Bytes (keys + values) stored under `vm_id`, for operators and tests.
pub fn shared_data_bytes(vm_id: &str) -> usize {
    lock(data_store()).by_vm.get(vm_id).map_or(0, |vm| vm.bytes)
}

// === shared queues ===

/// The instance that registered a queue: `proxy_on_queue_ready` goes to its
/// root context. One per instance; the queue registry only holds a weak
/// reference, so a dropped instance stops receiving.
pub(crate) struct QueueOwner {
    pending: Mutex<BTreeSet<u32>>,
    waker: Option<QueueWaker>,
}

impl QueueOwner {
    pub(crate) fn new(waker: Option<QueueWaker>) -> Arc<Self> {
        Arc::new(QueueOwner {
            pending: Mutex::default(),
            waker,
        })
    }

    /// Queue ids with items enqueued since the last take.
    pub(crate) fn take_pending(&self) -> BTreeSet<u32> {
        std::mem::take(&mut *lock(&self.pending))
    }

    pub(crate) fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    owner: Weak<QueueOwner>,
}

#[derive(Default)]
struct QueueStore {
    ids: HashMap<(String, Vec<u8>), u32>,
    queues: HashMap<u32, Queue>,
    last_id: u32,
}

fn queue_store() -> &'static Mutex<QueueStore> {
    static STORE: OnceLock<Mutex<QueueStore>> = OnceLock::new();
    STORE.get_or_init(Default::default)
}

/// `proxy_register_shared_queue`: creates the queue, or takes over an
/// existing one of the same name (so a re-created instance, e.g. after
/// FAIL_RELOAD, gets its queue back).
pub(crate) fn register_queue(vm_id: &str, name: &[u8], owner: &Arc<QueueOwner>) -> u32 {
    let mut store = lock(queue_store());
    let store = &mut *store;
    let key = (vm_id.to_owned(), name.to_vec());
    if let Some(&id) = store.ids.get(&key) {
        if let Some(queue) = store.queues.get_mut(&id) {
            queue.owner = Arc::downgrade(owner);
        }
        return id;
    }
    store.last_id = store.last_id.wrapping_add(1).max(1);
    let id = store.last_id;
    store.ids.insert(key, id);
    store.queues.insert(
        id,
        Queue {
            items: VecDeque::new(),
            owner: Arc::downgrade(owner),
        },
    );
    id
}

/// `proxy_resolve_shared_queue`.
pub(crate) fn resolve_queue(vm_id: &str, name: &[u8]) -> Option<u32> {
    lock(queue_store())
        .ids
        .get(&(vm_id.to_owned(), name.to_vec()))
        .copied()
}

/// `proxy_enqueue_shared_queue`: NOT_FOUND for an unknown id; wakes the owner.
pub(crate) fn enqueue(id: u32, value: Vec<u8>) -> Result<(), Status> {
    let owner = {
        let mut store = lock(queue_store());
        let queue = store.queues.get_mut(&id).ok_or(Status::NotFound)?;
        queue.items.push_back(value);
        queue.owner.upgrade()
    };
    // Outside the store lock: the waker is the embedder's code.
    if let Some(owner) = owner {
        lock(&owner.pending).insert(id);
        if let Some(waker) = &owner.waker {
            waker();
        }
    }
    Ok(())
}

/// `proxy_dequeue_shared_queue`: NOT_FOUND for an unknown id, EMPTY when
/// nothing is queued.
pub(crate) fn dequeue(id: u32) -> Result<Vec<u8>, Status> {
    let mut store = lock(queue_store());
    let queue = store.queues.get_mut(&id).ok_or(Status::NotFound)?;
    queue.items.pop_front().ok_or(Status::Empty)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn cas_and_delete_by_empty_value() {
        let vm = "shared-test-cas";
        assert_eq!(get_data(vm, b"k"), None);
        set_data(vm, b"k", b"v1", 0, 1000).unwrap();
        let (value, cas) = get_data(vm, b"k").unwrap();
        assert_eq!(value, b"v1");
        assert_ne!(cas, 0);
        assert_eq!(
            set_data(vm, b"k", b"v2", cas + 1, 1000),
            Err(Status::CasMismatch)
        );
        set_data(vm, b"k", b"v2", cas, 1000).unwrap();
        let (_, cas2) = get_data(vm, b"k").unwrap();
        assert_ne!(cas, cas2);
        assert_eq!(shared_data_bytes(vm), 3);
        set_data(vm, b"k", b"", 0, 1000).unwrap();
        assert_eq!(get_data(vm, b"k"), None);
        assert_eq!(shared_data_bytes(vm), 0);
        // Other vm_ids are separate.
        set_data(vm, b"k", b"x", 0, 1000).unwrap();
        assert_eq!(get_data("shared-test-other", b"k"), None);
    }

    #[test]
    fn size_cap_is_enforced_and_replacing_counts_the_difference() {
        let vm = "shared-test-cap";
        set_data(vm, b"a", b"123456789", 0, 10).unwrap();
        assert_eq!(
            set_data(vm, b"b", b"1", 0, 10),
            Err(Status::InternalFailure)
        );
        // Replacing with a value of the same size fits.
        set_data(vm, b"a", b"987654321", 0, 10).unwrap();
        set_data(vm, b"a", b"", 0, 10).unwrap();
        set_data(vm, b"b", b"1", 0, 10).unwrap();
    }

    #[test]
    fn queues_wake_their_owner() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&wakes);
        let owner = QueueOwner::new(Some(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })));
        let id = register_queue("shared-test-q", b"q", &owner);
        assert_eq!(resolve_queue("shared-test-q", b"q"), Some(id));
        assert_eq!(resolve_queue("shared-test-q", b"other"), None);
        assert_eq!(dequeue(id), Err(Status::Empty));
        enqueue(id, b"one".to_vec()).unwrap();
        enqueue(id, b"two".to_vec()).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        assert!(owner.has_pending());
        assert_eq!(owner.take_pending().into_iter().collect::<Vec<_>>(), [id]);
        assert!(!owner.has_pending());
        assert_eq!(dequeue(id).unwrap(), b"one");
        assert_eq!(dequeue(id).unwrap(), b"two");
        assert_eq!(enqueue(u32::MAX, Vec::new()), Err(Status::NotFound));
        assert_eq!(dequeue(u32::MAX), Err(Status::NotFound));
        // Registering again returns the same queue; a dropped owner is not woken.
        let other = QueueOwner::new(None);
        assert_eq!(register_queue("shared-test-q", b"q", &other), id);
        drop(other);
        enqueue(id, b"three".to_vec()).unwrap();
        assert!(!owner.has_pending());
    }
}
