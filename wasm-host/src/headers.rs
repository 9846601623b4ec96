//! [`HeaderMap`]: the ordered header multimap plugins read and write.

use std::fmt;
use std::ops::Range;

/// An ordered HTTP header multimap, as a Proxy-Wasm plugin sees it.
///
/// Names are stored lower-case (HTTP/2 style; Envoy lower-cases every name a
/// plugin passes) and looked up ASCII case-insensitively; values are raw bytes.
/// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`, `:status`) are
/// ordinary entries, as in Envoy.
///
/// Every request builds a few of these, so the entries are packed: all names
/// in one string, all values in one buffer, and per entry only their ranges
/// — three allocations for a map instead of two per header. What `replace`
/// and `remove` drop stays in the buffers until it outweighs the rest.
#[derive(Clone, Default)]
pub struct HeaderMap {
    names: String,
    values: Vec<u8>,
    entries: Vec<Entry>,
    /// Bytes of `names` and `values` that entries still point to.
    live: usize,
    /// How many leading entries no `replace` or `remove` has touched since
    /// [`HeaderMap::mark_untouched`] (see [`HeaderMap::untouched`]).
    untouched: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    name: Span,
    value: Span,
}

/// A range in one of the buffers; `u32` keeps an entry at 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// The span of `len` bytes at `start`. A header map past 4 GiB is far
/// beyond any limit the agent enforces (headers are capped at 60 KiB, plugin
/// writes by the guest's 4 GiB memory).
fn span(start: usize, len: usize) -> Span {
    Span {
        start: u32::try_from(start).expect("header map under 4 GiB"),
        len: u32::try_from(len).expect("header under 4 GiB"),
    }
}

/// Whether `entry` (its name in `names`) is called `name`, ASCII
/// case-insensitively. Lengths first: most names in a map differ in length
/// from the one looked up, and bytes need no UTF-8 boundary checks.
fn is_named(names: &str, entry: &Entry, name: &str) -> bool {
    entry.name.len as usize == name.len()
        && names.as_bytes()[entry.name.range()].eq_ignore_ascii_case(name.as_bytes())
}

/// Below this much dead space the buffers are never compacted.
const COMPACT_SLACK: usize = 1024;

impl HeaderMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map with room for `entries` entries (no regrowth of the
    /// entry list while it is filled from a request's headers).
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            names: String::with_capacity(entries * 16),
            values: Vec::with_capacity(entries * 32),
            entries: Vec::with_capacity(entries),
            live: 0,
            untouched: 0,
        }
    }

    /// Marks every entry present now as untouched.
    pub fn mark_untouched(&mut self) {
        self.untouched = self.entries.len();
    }

    /// How many leading entries are still exactly as they were at the last
    /// [`HeaderMap::mark_untouched`]: `replace` and `remove` lower it to the
    /// first entry they change, `add` appends after it. An embedder that
    /// built the map from its own headers can then keep those and apply only
    /// what was appended, instead of rebuilding them all.
    pub fn untouched(&self) -> usize {
        self.untouched
    }

    /// The entries from index `start` on, in order.
    pub fn iter_from(&self, start: usize) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries
            .get(start..)
            .unwrap_or_default()
            .iter()
            .map(|e| (self.name_of(e), self.value_of(e)))
    }

    fn name_of(&self, entry: &Entry) -> &str {
        &self.names[entry.name.range()]
    }

    fn value_of(&self, entry: &Entry) -> &[u8] {
        &self.values[entry.value.range()]
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| is_named(&self.names, e, name))
    }

    /// The first value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> {
        self.entries
            .iter()
            .filter(move |e| is_named(&self.names, e, name))
            .map(|e| self.value_of(e))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Appends a value, keeping any existing ones (`proxy_add_header_map_value`).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        let start = self.names.len();
        self.push(name, value);
        self.names[start..].make_ascii_lowercase();
    }

    /// [`HeaderMap::add`] for a name known to be lowercase already, as every
    /// `http::HeaderName` is: an embedder converting hyper's headers skips
    /// lowercasing each name again.
    pub fn add_lowercase(&mut self, name: &str, value: &[u8]) {
        debug_assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "{name} is not lowercase"
        );
        self.push(name, value);
    }

    /// Appends an entry with `name` as it is.
    fn push(&mut self, name: &str, value: &[u8]) {
        let name_span = span(self.names.len(), name.len());
        self.names.push_str(name);
        let value_span = span(self.values.len(), value.len());
        self.values.extend_from_slice(value);
        self.live += name.len() + value.len();
        self.entries.push(Entry {
            name: name_span,
            value: value_span,
        });
    }

    /// Sets `name` to exactly one value: the first existing entry is updated in
    /// place and the others are dropped; if there is none, the value is appended
    /// (`proxy_replace_header_map_value` is add-or-replace).
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        let Some(first) = self.position(name) else {
            return self.add(name, value);
        };
        self.untouched = self.untouched.min(first);
        let old = self.entries[first].value;
        self.live = self.live - old.len as usize + value.len();
        if value.len() <= old.len as usize {
            // Fits where the old value was.
            let start = old.start as usize;
            self.values[start..start + value.len()].copy_from_slice(value);
            self.entries[first].value.len = value.len() as u32;
        } else {
            self.entries[first].value = span(self.values.len(), value.len());
            self.values.extend_from_slice(value);
        }
        let mut index = 0;
        let mut dropped = 0;
        let names = &self.names;
        self.entries.retain(|e| {
            let keep = index <= first || !is_named(names, e, name);
            if !keep {
                dropped += e.name.len as usize + e.value.len as usize;
            }
            index += 1;
            keep
        });
        self.live -= dropped;
        self.compact_if_sparse();
    }

    /// Removes every value of `name`; absent names are fine.
    pub fn remove(&mut self, name: &str) {
        let Some(first) = self.position(name) else {
            return;
        };
        self.untouched = self.untouched.min(first);
        let mut dropped = 0;
        let names = &self.names;
        self.entries.retain(|e| {
            let keep = !is_named(names, e, name);
            if !keep {
                dropped += e.name.len as usize + e.value.len as usize;
            }
            keep
        });
        self.live -= dropped;
        self.compact_if_sparse();
    }

    /// Rewrites the buffers without what no entry points to any more, once
    /// that is more than the rest (a plugin replacing a header in a loop
    /// must not grow the map without bound).
    fn compact_if_sparse(&mut self) {
        let dead = self.names.len() + self.values.len() - self.live;
        if dead <= COMPACT_SLACK || dead <= self.live {
            return;
        }
        let mut compacted = HeaderMap::with_capacity(self.entries.len());
        for (name, value) in self.iter() {
            compacted.add(name, value);
        }
        // Same entries in the same order: what was untouched still is.
        compacted.untouched = self.untouched;
        *self = compacted;
    }

    /// All entries in order, names lower-case.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.entries
            .iter()
            .map(|e| (self.name_of(e), self.value_of(e)))
    }

    /// The buffer all values are stored in. With [`Self::value_ranges`], lets
    /// a caller copy all values at once and hand out slices of the copy
    /// instead of copying each.
    pub fn value_buffer(&self) -> &[u8] {
        &self.values
    }

    /// Every entry's name with its value's range in [`Self::value_buffer`],
    /// in order.
    pub fn value_ranges(&self) -> impl Iterator<Item = (&str, Range<usize>)> {
        self.entries
            .iter()
            .map(|e| (self.name_of(e), e.value.range()))
    }

    /// Number of entries (a name with two values counts twice).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the map's buffers have room for, used or not.
    pub fn capacity_bytes(&self) -> usize {
        self.names.capacity()
            + self.values.capacity()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// Drops every entry; the buffers keep their room for the next use.
    pub fn clear(&mut self) {
        self.names.clear();
        self.values.clear();
        self.entries.clear();
        self.live = 0;
        self.untouched = 0;
    }
}

/// Two maps are equal when they hold the same entries in the same order,
/// whatever their buffers hold besides.
impl PartialEq for HeaderMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for HeaderMap {}

impl fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(name, value)| (name, String::from_utf8_lossy(value))),
            )
            .finish()
    }
}

impl FromIterator<(String, Vec<u8>)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (String, Vec<u8>)>>(iter: I) -> Self {
        let mut map = HeaderMap::new();
        for (name, value) in iter {
            map.add(&name, &value);
        }
        map
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        let mut map = HeaderMap::new();
        for (name, value) in iter {
            map.add(name, value.as_bytes());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(map: &HeaderMap) -> Vec<(&str, &str)> {
        map.iter()
            .map(|(n, v)| (n, std::str::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn names_are_lower_cased_and_matched_case_insensitively() {
        let mut map = HeaderMap::new();
        map.add("Content-Type", b"text/plain");
        assert_eq!(map.get("content-type"), Some(&b"text/plain"[..]));
        assert_eq!(map.get("CONTENT-TYPE"), Some(&b"text/plain"[..]));
        assert_eq!(entries(&map), [("content-type", "text/plain")]);
        let collected: HeaderMap = [("X-A".to_owned(), b"1".to_vec())].into_iter().collect();
        assert_eq!(entries(&collected), [("x-a", "1")]);
    }

    #[test]
    fn add_lowercase_stores_what_add_would() {
        let mut added = HeaderMap::new();
        added.add("X-Trace", b"1");
        added.add(":path", b"/");
        let mut lowercase = HeaderMap::new();
        lowercase.add_lowercase("x-trace", b"1");
        lowercase.add_lowercase(":path", b"/");
        assert_eq!(entries(&added), entries(&lowercase));
        assert_eq!(lowercase.get("X-TRACE"), Some(&b"1"[..]));
    }

    #[test]
    fn untouched_counts_the_leading_entries_no_write_changed() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2"), ("c", "3")].into_iter().collect();
        assert_eq!(
            map.untouched(),
            0,
            "nothing is marked until the embedder marks it"
        );
        map.mark_untouched();
        map.add("d", b"4");
        assert_eq!(map.untouched(), 3, "appending keeps the prefix");
        assert_eq!(map.iter_from(3).collect::<Vec<_>>(), [("d", &b"4"[..])]);
        map.remove("absent");
        assert_eq!(map.untouched(), 3);
        map.replace("c", b"x");
        assert_eq!(map.untouched(), 2, "an in-place replace counts");
        map.remove("b");
        assert_eq!(map.untouched(), 1);
        map.replace("new", b"5");
        assert_eq!(map.untouched(), 1, "replacing a missing name appends");
        map.clear();
        assert_eq!(map.untouched(), 0);
        assert!(map.iter_from(5).next().is_none());
    }

    #[test]
    fn add_keeps_duplicates_in_order() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2")].into_iter().collect();
        map.add("a", b"3");
        assert_eq!(entries(&map), [("a", "1"), ("b", "2"), ("a", "3")]);
        assert_eq!(map.get("a"), Some(&b"1"[..]));
        assert_eq!(map.get_all("a").collect::<Vec<_>>(), [&b"1"[..], b"3"]);
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn replace_updates_the_first_value_in_place_and_drops_the_rest() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2"), ("A", "3")].into_iter().collect();
        map.replace("a", b"x");
        assert_eq!(entries(&map), [("a", "x"), ("b", "2")]);
    }

    #[test]
    fn replace_adds_a_missing_name() {
        let mut map: HeaderMap = [("a", "1")].into_iter().collect();
        map.replace("B", b"2");
        assert_eq!(entries(&map), [("a", "1"), ("b", "2")]);
    }

    #[test]
    fn remove_drops_every_value_and_tolerates_absent_names() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        map.remove("A");
        assert_eq!(entries(&map), [("b", "2")]);
        map.remove("missing");
        assert_eq!(entries(&map), [("b", "2")]);
        map.remove("b");
        assert!(map.is_empty());
        assert_eq!(map.get("b"), None);
    }

    #[test]
    fn replacing_in_a_loop_keeps_the_buffers_bounded() {
        let mut map: HeaderMap = [("a", "1"), ("b", "2")].into_iter().collect();
        for i in 0..10_000 {
            // Growing values cannot be written in place.
            map.replace("a", format!("{i:0>64}-{}", "x".repeat(i % 7)).as_bytes());
        }
        let last = format!("{:0>64}-{}", 9_999, "x".repeat(9_999 % 7));
        assert_eq!(entries(&map), [("a", last.as_str()), ("b", "2")]);
        assert!(
            map.names.len() + map.values.len() < 4 * COMPACT_SLACK,
            "buffers hold {} + {} bytes",
            map.names.len(),
            map.values.len()
        );
    }

    #[test]
    fn a_shorter_value_is_written_in_place() {
        let mut map: HeaderMap = [("a", "long value"), ("b", "2")].into_iter().collect();
        let before = map.values.len();
        map.replace("a", b"short");
        assert_eq!(map.values.len(), before);
        assert_eq!(entries(&map), [("a", "short"), ("b", "2")]);
        map.replace("a", b"");
        assert_eq!(map.get("a"), Some(&b""[..]));
    }

    #[test]
    fn equality_ignores_what_the_buffers_hold_besides_the_entries() {
        let mut edited: HeaderMap = [("a", "1"), ("x", "gone"), ("b", "2")]
            .into_iter()
            .collect();
        edited.remove("x");
        edited.replace("b", b"2");
        let fresh: HeaderMap = [("a", "1"), ("b", "2")].into_iter().collect();
        assert_eq!(edited, fresh);
        assert_ne!(edited, [("b", "2"), ("a", "1")].into_iter().collect());
        assert_eq!(format!("{fresh:?}"), r#"{"a": "1", "b": "2"}"#);
    }

    #[test]
    fn value_ranges_locate_every_value_in_one_buffer() {
        let mut map: HeaderMap = [("a", "1"), ("b", "22"), ("c", "333")]
            .into_iter()
            .collect();
        map.remove("b");
        let buffer = map.value_buffer();
        let found: Vec<(&str, &[u8])> = map
            .value_ranges()
            .map(|(name, range)| (name, &buffer[range]))
            .collect();
        assert_eq!(found, [("a", &b"1"[..]), ("c", b"333")]);
    }

    #[test]
    fn clear_empties_the_buffers() {
        let mut map: HeaderMap = [("a", "1")].into_iter().collect();
        map.clear();
        assert!(map.is_empty());
        map.add("B", b"2");
        assert_eq!(entries(&map), [("b", "2")]);
    }
}
