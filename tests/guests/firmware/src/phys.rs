// SPDX-License-Identifier: Apache-2.0
//! Access to physical memory through the boot code's 4 GiB identity map.
//!
//! Addresses come from VMM-written structures (start_info, boot_params, MP table). They are
//! checked to lie in the mapped window and to be non-null, and read unaligned.
//!
//! Guest instructions are expensive on the project's nested `kvm_pvm` host (about 1 us each,
//! all emulated), so these helpers compile to single loads and stores.

/// End (exclusive) of the identity-mapped window.
pub const MAPPED_END: u64 = 1 << 32;

fn ptr(addr: u64, len: u64) -> Option<*mut u8> {
    let end = addr.checked_add(len)?;
    if addr == 0 || end > MAPPED_END {
        return None;
    }
    Some(core::ptr::with_exposed_provenance_mut(
        usize::try_from(addr).ok()?,
    ))
}

/// Reads a `T` (plain integer) at any alignment, or `None` outside the mapped window.
fn read<T: Copy>(addr: u64) -> Option<T> {
    let p = ptr(addr, core::mem::size_of::<T>() as u64)?.cast::<T>();
    // SAFETY: `p..p + size_of::<T>()` is non-null and inside the identity map set up by the
    // boot code, so the load cannot fault; `read_unaligned` has no alignment requirement and
    // `T` is only instantiated with integers, valid for any bit pattern. The memory is RAM the
    // VMM wrote before the guest started, so a plain (non-volatile) load is enough.
    Some(unsafe { p.read_unaligned() })
}

/// Reads a byte.
pub fn read_u8(addr: u64) -> Option<u8> {
    read(addr)
}

/// Reads a little-endian `u16`.
pub fn read_u16(addr: u64) -> Option<u16> {
    read(addr)
}

/// Reads a little-endian `u32`.
pub fn read_u32(addr: u64) -> Option<u32> {
    read(addr)
}

/// Reads a little-endian `u64`.
pub fn read_u64(addr: u64) -> Option<u64> {
    read(addr)
}

/// Writes a byte; returns `false` outside the mapped window.
pub fn write_u8(addr: u64, value: u8) -> bool {
    let Some(p) = ptr(addr, 1) else { return false };
    // SAFETY: as for `read`. The callers only write memory the guest owns (free low memory,
    // RAM it tested free) or device MMIO.
    unsafe { p.write_volatile(value) };
    true
}

/// Volatile 32-bit MMIO read at a 4-byte-aligned address (APIC registers).
pub fn mmio_read_u32(addr: u64) -> Option<u32> {
    if !addr.is_multiple_of(4) {
        return None;
    }
    let p = ptr(addr, 4)?.cast::<u32>();
    // SAFETY: non-null, mapped (see `ptr`) and 4-byte aligned (checked above).
    Some(unsafe { p.read_volatile() })
}

/// Volatile 32-bit MMIO write at a 4-byte-aligned address; `false` if it was not done.
pub fn mmio_write_u32(addr: u64, value: u32) -> bool {
    if !addr.is_multiple_of(4) {
        return false;
    }
    let Some(p) = ptr(addr, 4) else { return false };
    // SAFETY: as for `mmio_read_u32`.
    unsafe { p.cast::<u32>().write_volatile(value) };
    true
}

/// Integers that [`read_volatile`] and [`write_volatile`] move in one access.
pub trait Scalar: Copy + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {}
    )*};
}
scalar!(u8, u16, u32, u64);

/// Volatile load of a naturally aligned integer (device registers, virtqueue rings); `None`
/// if `addr` is misaligned or outside the mapped window.
pub fn read_volatile<T: Scalar>(addr: u64) -> Option<T> {
    let size = core::mem::size_of::<T>() as u64;
    if !addr.is_multiple_of(size) {
        return None;
    }
    let p = ptr(addr, size)?.cast::<T>();
    // SAFETY: non-null, mapped (see `ptr`) and naturally aligned (checked above); `T` is a
    // plain integer, valid for any bit pattern.
    Some(unsafe { p.read_volatile() })
}

/// Volatile store of a naturally aligned integer; `false` if it was not done.
pub fn write_volatile<T: Scalar>(addr: u64, value: T) -> bool {
    let size = core::mem::size_of::<T>() as u64;
    if !addr.is_multiple_of(size) {
        return false;
    }
    let Some(p) = ptr(addr, size) else {
        return false;
    };
    // SAFETY: as for `read_volatile`. Callers only write memory they own (their DMA buffers
    // and rings) or device registers.
    unsafe { p.cast::<T>().write_volatile(value) };
    true
}

/// Volatile aligned 64-bit store, for the memory test; `false` if it was not done.
pub fn write_u64(addr: u64, value: u64) -> bool {
    if !addr.is_multiple_of(8) {
        return false;
    }
    let Some(p) = ptr(addr, 8) else { return false };
    // SAFETY: non-null, mapped and 8-byte aligned (checked above); the caller owns the RAM.
    unsafe { p.cast::<u64>().write_volatile(value) };
    true
}

/// Volatile aligned 64-bit load, for the memory test.
pub fn read_u64_aligned(addr: u64) -> Option<u64> {
    if !addr.is_multiple_of(8) {
        return None;
    }
    let p = ptr(addr, 8)?.cast::<u64>();
    // SAFETY: non-null, mapped and 8-byte aligned (checked above).
    Some(unsafe { p.read_volatile() })
}

/// Length of the NUL-terminated string at `addr`, looking at no more than `max` bytes (`max`
/// when there is no NUL among them), or `None` when those bytes leave the mapped window. One
/// `repne scasb`: a single instruction for the emulator, where a loop costs several per byte.
pub fn strnlen(addr: u64, max: u64) -> Option<u64> {
    if max == 0 {
        return Some(0);
    }
    let p = ptr(addr, max)?;
    let mut left = usize::try_from(max).ok()?;
    // SAFETY: `p..p + max` is inside the identity map (checked by `ptr`), so the scan reads
    // only mapped RAM; it stops after at most `max` bytes (rcx). The direction flag is clear
    // (the ABI requires it on entry to and exit from every function).
    unsafe {
        core::arch::asm!(
            "repne scasb",
            inout("rcx") left,
            inout("rdi") p => _,
            in("al") 0u8,
            options(nostack, readonly),
        );
    }
    let left = u64::try_from(left).ok()?;
    if left > 0 {
        // Stopped on the NUL: it is the (max - left)th byte scanned.
        return Some(max - left - 1);
    }
    // Scanned everything: the last byte may still have been the NUL.
    Some(if read_u8(addr + max - 1) == Some(0) {
        max - 1
    } else {
        max
    })
}

/// Copies `dst.len()` bytes from `addr` into `dst` (one block copy), or `None` when they leave
/// the mapped window.
pub fn copy_to(addr: u64, dst: &mut [u8]) -> Option<()> {
    let p = ptr(addr, u64::try_from(dst.len()).ok()?)?;
    // SAFETY: the source range is inside the identity map (checked by `ptr`) and is guest RAM
    // the VMM wrote, which no Rust reference aliases; `dst` is an exclusive borrow of the same
    // length, so the ranges cannot overlap.
    unsafe { core::ptr::copy_nonoverlapping(p.cast_const(), dst.as_mut_ptr(), dst.len()) };
    Some(())
}
