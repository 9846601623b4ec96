//! Bounds-checked access to guest memory, and handing data to the guest
//! through its own allocator.
//!
//! Every pointer and length a guest passes is untrusted: each access is checked
//! against the memory's current size and fails with [`GuestError::OutOfBounds`]
//! instead of panicking. Pointers are wasm32 `i32`s reinterpreted as `u32`.

use std::ops::Range;

use crate::guest::HostContext;
use crate::state::Restriction;

/// Why a guest-memory operation failed; `T` is the engine's trap.
#[derive(Debug)]
pub(crate) enum GuestError<T> {
    /// The range lies (partly) outside guest memory.
    OutOfBounds,
    /// The guest allocator returned 0 or a block outside its memory.
    AllocationFailed,
    /// The guest allocator trapped; the trap must unwind the guest.
    Trap(T),
}

/// The byte range `[ptr, ptr + len)`, if it does not overflow.
fn range(ptr: i32, len: usize) -> Option<Range<usize>> {
    let start = ptr as u32 as usize;
    Some(start..start.checked_add(len)?)
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(crate) fn read<G: HostContext>(
    g: &G,
    ptr: i32,
    len: i32,
) -> Result<Vec<u8>, GuestError<G::Trap>> {
    borrow(g, ptr, len).map(<[u8]>::to_vec)
}

/// The `len` bytes at `ptr` in guest memory, borrowed (no copy).
pub(crate) fn borrow<G: HostContext>(
    g: &G,
    ptr: i32,
    len: i32,
) -> Result<&[u8], GuestError<G::Trap>> {
    slice(g.memory(), ptr, len)
}

/// The `len` bytes at `ptr` of `memory` (from [`HostContext::memory_and_state_mut`]).
pub(crate) fn slice<T>(memory: &[u8], ptr: i32, len: i32) -> Result<&[u8], GuestError<T>> {
    let range = range(ptr, len as u32 as usize).ok_or(GuestError::OutOfBounds)?;
    memory.get(range).ok_or(GuestError::OutOfBounds)
}

pub(crate) fn read_u32<G: HostContext>(g: &G, ptr: i32) -> Result<u32, GuestError<G::Trap>> {
    let bytes = borrow(g, ptr, 4)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Writes `bytes` at `ptr`.
pub(crate) fn write<G: HostContext>(
    g: &mut G,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), GuestError<G::Trap>> {
    let range = range(ptr, bytes.len()).ok_or(GuestError::OutOfBounds)?;
    g.memory_mut()
        .get_mut(range)
        .ok_or(GuestError::OutOfBounds)?
        .copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32<G: HostContext>(
    g: &mut G,
    ptr: i32,
    value: u32,
) -> Result<(), GuestError<G::Trap>> {
    write(g, ptr, &value.to_le_bytes())
}

pub(crate) fn write_u64<G: HostContext>(
    g: &mut G,
    ptr: i32,
    value: u64,
) -> Result<(), GuestError<G::Trap>> {
    write(g, ptr, &value.to_le_bytes())
}

/// Whether `len` bytes at `ptr` are inside guest memory.
pub(crate) fn check<G: HostContext>(
    g: &G,
    ptr: i32,
    len: usize,
) -> Result<(), GuestError<G::Trap>> {
    let range = range(ptr, len).ok_or(GuestError::OutOfBounds)?;
    if range.end <= g.memory().len() {
        Ok(())
    } else {
        Err(GuestError::OutOfBounds)
    }
}

/// Allocates `len` bytes with the guest's allocator and returns the pointer.
///
/// The Rust SDK rebuilds a `Vec` with capacity = length = the size we report,
/// so the block must be allocated with exactly that size.
pub(crate) fn allocate<G: HostContext>(g: &mut G, len: usize) -> Result<i32, GuestError<G::Trap>> {
    let size = i32::try_from(len).map_err(|_| GuestError::AllocationFailed)?;
    // cpp-host allows only logging and clocks inside the allocator.
    let saved = std::mem::replace(&mut g.state_mut().call.restriction, Restriction::Allocator);
    let result = g.call_allocator(size);
    g.state_mut().call.restriction = saved;
    let ptr = result
        .ok_or(GuestError::AllocationFailed)?
        .map_err(GuestError::Trap)?;
    if ptr == 0 {
        return Err(GuestError::AllocationFailed);
    }
    // Memory may have grown during the call; check against the new size.
    check(g, ptr, len).map_err(|_| GuestError::AllocationFailed)?;
    Ok(ptr)
}

/// Hands `bytes` to the guest: allocates a copy in guest memory and writes its
/// pointer and size to `ptr_ptr` / `size_ptr` (cpp-host's `copyToPointerSize`).
/// Empty data is reported as pointer 0, size 0 without allocating.
pub(crate) fn copy_out<G: HostContext>(
    g: &mut G,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> Result<(), GuestError<G::Trap>> {
    // Check the out-parameters first so a bad one does not leak an allocation.
    check(g, ptr_ptr, 4)?;
    check(g, size_ptr, 4)?;
    let ptr = if bytes.is_empty() {
        0
    } else {
        let ptr = allocate(g, bytes.len())?;
        write(g, ptr, bytes)?;
        ptr
    };
    write_u32(g, ptr_ptr, ptr as u32)?;
    // `allocate` bounded the length by i32::MAX.
    write_u32(g, size_ptr, bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::range;

    #[test]
    fn ranges_never_overflow() {
        assert_eq!(range(0, 0), Some(0..0));
        assert_eq!(range(-1, 1), Some(0xffff_ffff..0x1_0000_0000));
        assert_eq!(range(-1, usize::MAX), None);
    }
}
