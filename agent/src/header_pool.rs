//! Spare plugin header maps, one pool per worker thread.
//!
//! Every request builds two [`HeaderMap`]s for its plugins (request and
//! response headers), three buffers each. A worker takes them from here and
//! gives them back when the stream ends, so a request in the steady state
//! allocates none of them. The pool is per thread because a worker is one
//! thread: no lock, and a map is reused on the core that last touched it.

use std::cell::RefCell;

use wisp_wasm_host::HeaderMap;

/// Idle maps kept per thread: enough for the requests a worker has in
/// flight at once in the benchmarks (32 connections, two maps each), about
/// 1 KiB each.
const MAX_SPARE_MAPS: usize = 64;

/// A map that grew past this (a request with a large cookie, say) is
/// dropped instead of kept: a pool of large maps would hold memory that
/// ordinary requests never use.
const MAX_KEPT_BYTES: usize = 8 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map: a spare one, or a new one with room for `entries`.
pub fn take(entries: usize) -> HeaderMap {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| HeaderMap::with_capacity(entries))
}

/// Keeps `map`'s buffers for a later [`take`] on this thread, if there is
/// room and the map is not oversized.
pub fn give_back(mut map: HeaderMap) {
    let bytes = map.capacity_bytes();
    if bytes == 0 || bytes > MAX_KEPT_BYTES {
        return;
    }
    map.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < MAX_SPARE_MAPS {
            spare.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        let mut map = take(8);
        map.add("x-one", b"1");
        let room = map.capacity_bytes();
        give_back(map);
        let again = take(8);
        assert!(again.is_empty());
        assert_eq!(again.capacity_bytes(), room);
    }

    #[test]
    fn oversized_and_empty_maps_are_not_kept() {
        // Drain what other tests on this thread left.
        SPARE.with_borrow_mut(Vec::clear);
        let mut big = HeaderMap::new();
        big.add("cookie", &vec![b'a'; 2 * MAX_KEPT_BYTES]);
        give_back(big);
        give_back(HeaderMap::new());
        assert_eq!(SPARE.with_borrow(Vec::len), 0);
    }

    #[test]
    fn the_pool_is_bounded() {
        SPARE.with_borrow_mut(Vec::clear);
        for _ in 0..MAX_SPARE_MAPS + 10 {
            give_back(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), MAX_SPARE_MAPS);
    }
}
