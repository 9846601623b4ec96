//! Bounds-checked access to guest memory, and handing data to the guest
//! through its own allocator.
//!
//! Every pointer and length a guest passes is untrusted: each access is checked
//! against the memory's current size and fails with [`GuestError::OutOfBounds`]
//! instead of panicking. Pointers are wasm32 `i32`s reinterpreted as `u32`.

use std::ops::Range;

use wasmtime::{AsContext, AsContextMut};

use crate::state::{HostState, Restriction};

/// Why a guest-memory operation failed.
#[derive(Debug)]
pub(crate) enum GuestError {
    /// The range lies (partly) outside guest memory.
    OutOfBounds,
    /// The guest allocator returned 0 or a block outside its memory.
    AllocationFailed,
    /// The guest allocator trapped; the trap must unwind the guest.
    Trap(wasmtime::Error),
}

/// The byte range `[ptr, ptr + len)`, if it does not overflow.
fn range(ptr: i32, len: usize) -> Option<Range<usize>> {
    let start = ptr as u32 as usize;
    Some(start..start.checked_add(len)?)
}

fn data(store: &impl AsContext<Data = HostState>) -> &[u8] {
    let store = store.as_context();
    match store.data().memory {
        Some(memory) => memory.data(store),
        None => &[],
    }
}

fn data_mut(store: &mut impl AsContextMut<Data = HostState>) -> &mut [u8] {
    let store = store.as_context_mut();
    match store.data().memory {
        Some(memory) => memory.data_mut(store),
        None => &mut [],
    }
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(crate) fn read(
    store: &impl AsContext<Data = HostState>,
    ptr: i32,
    len: i32,
) -> Result<Vec<u8>, GuestError> {
    let range = range(ptr, len as u32 as usize).ok_or(GuestError::OutOfBounds)?;
    data(store)
        .get(range)
        .map(<[u8]>::to_vec)
        .ok_or(GuestError::OutOfBounds)
}

pub(crate) fn read_u32(
    store: &impl AsContext<Data = HostState>,
    ptr: i32,
) -> Result<u32, GuestError> {
    let bytes = read(store, ptr, 4)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Writes `bytes` at `ptr`.
pub(crate) fn write(
    store: &mut impl AsContextMut<Data = HostState>,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), GuestError> {
    let range = range(ptr, bytes.len()).ok_or(GuestError::OutOfBounds)?;
    data_mut(store)
        .get_mut(range)
        .ok_or(GuestError::OutOfBounds)?
        .copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(
    store: &mut impl AsContextMut<Data = HostState>,
    ptr: i32,
    value: u32,
) -> Result<(), GuestError> {
    write(store, ptr, &value.to_le_bytes())
}

pub(crate) fn write_u64(
    store: &mut impl AsContextMut<Data = HostState>,
    ptr: i32,
    value: u64,
) -> Result<(), GuestError> {
    write(store, ptr, &value.to_le_bytes())
}

/// Whether `len` bytes at `ptr` are inside guest memory.
pub(crate) fn check(
    store: &impl AsContext<Data = HostState>,
    ptr: i32,
    len: usize,
) -> Result<(), GuestError> {
    let range = range(ptr, len).ok_or(GuestError::OutOfBounds)?;
    if range.end <= data(store).len() {
        Ok(())
    } else {
        Err(GuestError::OutOfBounds)
    }
}

/// Allocates `len` bytes with the guest's allocator and returns the pointer.
///
/// The Rust SDK rebuilds a `Vec` with capacity = length = the size we report,
/// so the block must be allocated with exactly that size.
pub(crate) fn allocate(
    store: &mut impl AsContextMut<Data = HostState>,
    len: usize,
) -> Result<i32, GuestError> {
    let mut store = store.as_context_mut();
    let allocator = store
        .data()
        .allocator
        .clone()
        .ok_or(GuestError::AllocationFailed)?;
    let size = i32::try_from(len).map_err(|_| GuestError::AllocationFailed)?;
    // cpp-host allows only logging and clocks inside the allocator.
    let saved = std::mem::replace(
        &mut store.data_mut().call.restriction,
        Restriction::Allocator,
    );
    let result = allocator.call(&mut store, size);
    store.data_mut().call.restriction = saved;
    let ptr = result.map_err(GuestError::Trap)?;
    if ptr == 0 {
        return Err(GuestError::AllocationFailed);
    }
    // Memory may have grown during the call; check against the new size.
    check(&store, ptr, len).map_err(|_| GuestError::AllocationFailed)?;
    Ok(ptr)
}

/// Hands `bytes` to the guest: allocates a copy in guest memory and writes its
/// pointer and size to `ptr_ptr` / `size_ptr` (cpp-host's `copyToPointerSize`).
/// Empty data is reported as pointer 0, size 0 without allocating.
pub(crate) fn copy_out(
    store: &mut impl AsContextMut<Data = HostState>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> Result<(), GuestError> {
    // Check the out-parameters first so a bad one does not leak an allocation.
    check(store, ptr_ptr, 4)?;
    check(store, size_ptr, 4)?;
    let ptr = if bytes.is_empty() {
        0
    } else {
        let ptr = allocate(store, bytes.len())?;
        write(store, ptr, bytes)?;
        ptr
    };
    write_u32(store, ptr_ptr, ptr as u32)?;
    // `allocate` bounded the length by i32::MAX.
    write_u32(store, size_ptr, bytes.len() as u32)
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
