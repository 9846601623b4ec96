//! [`HeaderMap`]: the ordered header multimap plugins read and write.

/// An ordered HTTP header multimap, as a Proxy-Wasm plugin sees it.
///
/// Names are stored lower-case (HTTP/2 style; Envoy lower-cases every name a
/// plugin passes) and looked up ASCII case-insensitively; values are raw bytes.
/// Pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`, `:status`) are
/// ordinary entries, as in Envoy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(String, Vec<u8>)>,
}

impl HeaderMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map with room for `entries` entries (no regrowth while it
    /// is filled from a request's headers).
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            entries: Vec::with_capacity(entries),
        }
    }

    /// The first value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Appends a value, keeping any existing ones (`proxy_add_header_map_value`).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.entries
            .push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Sets `name` to exactly one value: the first existing entry is updated in
    /// place and the others are dropped; if there is none, the value is appended
    /// (`proxy_replace_header_map_value` is add-or-replace).
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        let Some(first) = self
            .entries
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
        else {
            return self.add(name, value);
        };
        self.entries[first].1 = value.to_vec();
        let mut index = 0;
        self.entries.retain(|(n, _)| {
            let keep = index <= first || !n.eq_ignore_ascii_case(name);
            index += 1;
            keep
        });
    }

    /// Removes every value of `name`; absent names are fine.
    pub fn remove(&mut self, name: &str) {
        self.entries.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// All entries in order, names lower-case.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of entries (a name with two values counts twice).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

impl FromIterator<(String, Vec<u8>)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (String, Vec<u8>)>>(iter: I) -> Self {
        let entries = iter
            .into_iter()
            .map(|(mut name, value)| {
                name.make_ascii_lowercase();
                (name, value)
            })
            .collect();
        Self { entries }
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        iter.into_iter()
            .map(|(n, v)| (n.to_owned(), v.as_bytes().to_vec()))
            .collect()
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
}
