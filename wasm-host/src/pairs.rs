//! The Proxy-Wasm map ("header pairs") wire format.
//!
//! Little-endian: `u32` pair count N, then N × (`u32` key length, `u32` value
//! length), then N × (key bytes, `0x00`, value bytes, `0x00`).
//!
//! An empty map is sent to the guest as nothing at all (pointer 0, size 0, as
//! cpp-host does): the Rust SDK reads 4 bytes from any non-empty buffer, so the
//! spec's alternative 1-byte `0x00` form would make it trap. From the guest we
//! accept all three empty forms: no bytes, one `0x00`, or a zero count (the
//! Rust SDK sends `00 00 00 00`).

/// cpp-host's `PROXY_WASM_HOST_PAIRS_MAX_BYTES`: larger guest buffers are refused.
pub const MAX_BYTES: usize = 1 << 20;
/// cpp-host's `PROXY_WASM_HOST_PAIRS_MAX_COUNT`: maps with more pairs are refused.
pub const MAX_COUNT: usize = 1024;

/// Why a guest-supplied map could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    #[error("serialized map is {0} bytes, more than the {MAX_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("serialized map has {0} pairs, more than the {MAX_COUNT}-pair limit")]
    TooManyPairs(usize),
    #[error("serialized map is truncated")]
    Truncated,
    #[error("serialized map lacks the NUL terminator after a key or value")]
    MissingNul,
    #[error("serialized map has {0} bytes left over after the last pair")]
    TrailingBytes(usize),
}

/// Size in bytes of the serialized form of `pairs` (0 for an empty map).
pub fn serialized_size<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> usize {
    let mut count = 0;
    let mut size = 4;
    for (key, value) in pairs {
        count += 1;
        size += 8 + key.len() + 1 + value.len() + 1;
    }
    if count == 0 { 0 } else { size }
}

/// Serializes `pairs`; an empty map becomes an empty buffer.
pub fn serialize<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
    I::IntoIter: Clone,
{
    let pairs = pairs.into_iter();
    let size = serialized_size(pairs.clone());
    if size == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(size);
    let count = pairs.clone().count();
    out.extend_from_slice(&len_u32(count).to_le_bytes());
    for (key, value) in pairs.clone() {
        out.extend_from_slice(&len_u32(key.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    debug_assert_eq!(out.len(), size);
    out
}

/// Parses a guest-supplied map. Keys that are not UTF-8 are converted lossily.
pub fn deserialize(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, PairsError> {
    if bytes.len() > MAX_BYTES {
        return Err(PairsError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let mut reader = Reader { bytes, pos: 0 };
    let count = reader.u32()? as usize;
    if count > MAX_COUNT {
        return Err(PairsError::TooManyPairs(count));
    }
    let mut lengths = Vec::with_capacity(count);
    for _ in 0..count {
        lengths.push((reader.u32()? as usize, reader.u32()? as usize));
    }
    let mut pairs = Vec::with_capacity(count);
    for (key_len, value_len) in lengths {
        let key = reader.terminated(key_len)?;
        let value = reader.terminated(value_len)?;
        pairs.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    match bytes.len() - reader.pos {
        0 => Ok(pairs),
        left => Err(PairsError::TrailingBytes(left)),
    }
}

/// Lengths are bounded by guest memory (4 GiB) or by [`MAX_BYTES`], so they fit.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], PairsError> {
        let end = self.pos.checked_add(len).ok_or(PairsError::Truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or(PairsError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, PairsError> {
        let raw = self.take(4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    /// `len` bytes followed by a NUL.
    fn terminated(&mut self, len: usize) -> Result<&'a [u8], PairsError> {
        let data = self.take(len)?;
        match self.take(1)? {
            [0] => Ok(data),
            _ => Err(PairsError::MissingNul),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static [u8])> {
        pairs.iter().map(|&(k, v)| (k, v.as_bytes())).collect()
    }

    #[test]
    fn round_trip() {
        let pairs = map(&[(":method", "GET"), (":path", "/"), ("x-empty", "")]);
        let bytes = serialize(pairs.iter().copied());
        assert_eq!(bytes.len(), serialized_size(pairs.iter().copied()));
        let back = deserialize(&bytes).unwrap();
        let back: Vec<(&str, &[u8])> = back
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(back, pairs);
    }

    #[test]
    fn matches_the_spec_example() {
        // spec §Serialization, {"a": "1", "b": "22"}, with the erratum fixed
        // ('1' and '2' are 0x31 and 0x32).
        let bytes = serialize(map(&[("a", "1"), ("b", "22")]));
        let expected: &[u8] = &[
            2, 0, 0, 0, // count
            1, 0, 0, 0, 1, 0, 0, 0, // "a" / "1"
            1, 0, 0, 0, 2, 0, 0, 0, // "b" / "22"
            b'a', 0, b'1', 0, b'b', 0, b'2', b'2', 0,
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn empty_map_serializes_to_nothing() {
        assert!(serialize(map(&[])).is_empty());
        assert_eq!(serialized_size(map(&[])), 0);
    }

    #[test]
    fn accepts_every_empty_form() {
        // No bytes, the spec's single NUL, and the Rust SDK's zero count.
        for empty in [&[][..], &[0], &[0, 0, 0, 0]] {
            assert_eq!(deserialize(empty).unwrap(), Vec::new(), "{empty:?}");
        }
    }

    #[test]
    fn rejects_malformed_input() {
        let good = serialize(map(&[("k", "v")]));
        assert_eq!(
            deserialize(&good[..good.len() - 1]),
            Err(PairsError::Truncated)
        );
        let mut no_nul = good.clone();
        no_nul[13] = b'x'; // the NUL after the key
        assert_eq!(deserialize(&no_nul), Err(PairsError::MissingNul));
        let mut trailing = good.clone();
        trailing.push(7);
        assert_eq!(deserialize(&trailing), Err(PairsError::TrailingBytes(1)));
        // A huge count must not make us allocate or read out of bounds.
        assert_eq!(
            deserialize(&[0xff, 0xff, 0xff, 0xff]),
            Err(PairsError::TooManyPairs(0xffff_ffff))
        );
        assert_eq!(deserialize(&[2, 0, 0, 0, 1, 0]), Err(PairsError::Truncated));
        assert_eq!(
            deserialize(&vec![0; MAX_BYTES + 1]),
            Err(PairsError::TooLarge(MAX_BYTES + 1))
        );
    }

    #[test]
    fn length_prefix_overflow_is_truncation() {
        // key length u32::MAX must not overflow the cursor.
        let bytes = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0];
        assert_eq!(deserialize(&bytes), Err(PairsError::Truncated));
    }
}
