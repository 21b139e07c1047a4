// SPDX-License-Identifier: Apache-2.0
//! Guest memory layout and descriptor-chain building shared by the targets.

use devices::GuestMemoryMmap;
use devices::test_utils::TestQueue;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Reader, Writer};

/// Guest memory size: small, so each run maps little.
pub const MEM_SIZE: usize = 0x10_0000;
/// Where queue `i`'s rings start (room for 256 entries each).
pub const QUEUE_ADDR: [u64; 3] = [0x0, 0x2000, 0x4000];
/// First byte of the area buffers point into.
pub const DATA_START: u64 = 0x8000;
/// End of guest memory.
pub const DATA_END: u64 = MEM_SIZE as u64;
/// Where indirect descriptor tables go.
pub const INDIRECT_TABLE: u64 = 0xf_0000;
/// Most descriptors in a generated chain.
pub const MAX_DESCS: u8 = 6;

/// Creates guest memory.
pub fn guest_mem() -> GuestMemoryMmap {
    devices::test_utils::single_region_mem(MEM_SIZE)
}

/// A queue size: a power of two up to 256 (rarely anything at all).
pub fn queue_size(r: &mut Reader<'_>) -> u16 {
    if r.rarely() {
        return r.u16();
    }
    1u16 << (r.u8() % 9)
}

/// Writes a [`queue_size`] of `1 << shift`.
pub fn write_queue_size(w: &mut Writer, shift: u8) {
    w.rarely(false).u8(shift);
}

/// A buffer address: mostly inside the data area and 8-byte aligned, rarely anything.
pub fn addr(r: &mut Reader<'_>) -> u64 {
    if r.rarely() {
        return r.u64();
    }
    DATA_START + (u64::from(r.u16()) * 8) % (DATA_END - DATA_START)
}

/// Writes an [`addr`] (`a` must be 8-aligned inside the data area).
pub fn write_addr(w: &mut Writer, a: u64) {
    let slot = u16::try_from((a - DATA_START) / 8).expect("seed address out of the data area");
    w.rarely(false).u16(slot);
}

/// A buffer length: whole sectors, small odd sizes, or rarely anything.
pub fn len(r: &mut Reader<'_>) -> u32 {
    match r.u8() % 4 {
        0 => 512 * u32::from(r.u8() % 9),
        1 => u32::from(r.u16() % 2048),
        2 => u32::from(r.u8() % 24),
        _ => {
            if r.rarely() {
                r.u32()
            } else {
                u32::from(r.u16())
            }
        }
    }
}

/// Writes a [`len`] of `n` sectors (`n` < 9).
pub fn write_len_sectors(w: &mut Writer, n: u8) {
    w.u8(0).u8(n);
}

/// Writes a [`len`] of `n` (< 24) bytes.
pub fn write_len_small(w: &mut Writer, n: u8) {
    w.u8(2).u8(n);
}

/// Writes a [`len`] of `n` (< 2048) bytes.
pub fn write_len(w: &mut Writer, n: u16) {
    w.u8(1).u16(n);
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A buffer whose direction is `write`, flipped rarely.
pub fn desc(r: &mut Reader<'_>, write: bool) -> Desc {
    let addr = addr(r);
    let len = len(r);
    let write = write ^ r.rarely();
    Desc { addr, len, write }
}

/// Writes a [`desc`] with the expected direction; `len` is written by `write_len`.
pub fn write_desc(w: &mut Writer, a: u64, write_len: impl FnOnce(&mut Writer)) {
    write_addr(w, a);
    write_len(w);
    w.rarely(false);
}

/// Writes the address and length fields of a descriptor (`len` < 2048).
pub fn write_desc_fields(w: &mut Writer, a: u64, len: u16) {
    write_addr(w, a);
    write_len(w, len);
}

/// Makes `descs` available on `tq`, through an indirect table if `indirect`.
pub fn push_chain(tq: &TestQueue<'_>, mem: &GuestMemoryMmap, descs: &[Desc], indirect: bool) {
    let bufs: Vec<(u64, u32, bool)> = descs.iter().map(|d| (d.addr, d.len, d.write)).collect();
    if !indirect || descs.is_empty() {
        tq.add_chain(&bufs);
        return;
    }
    // Table entries chained with NEXT, the head pointing at the table with INDIRECT.
    let n = u16::try_from(descs.len()).unwrap_or(u16::MAX);
    for (i, d) in (0u16..).zip(descs) {
        let mut flags = if d.write { 2u16 } else { 0 };
        if i + 1 < n {
            flags |= 1;
        }
        let at = GuestAddress(INDIRECT_TABLE + 16 * u64::from(i));
        let _ = mem.write_obj(d.addr, at);
        let _ = mem.write_obj(d.len, GuestAddress(at.0 + 8));
        let _ = mem.write_obj(flags, GuestAddress(at.0 + 12));
        let _ = mem.write_obj(i + 1, GuestAddress(at.0 + 14));
    }
    let head = tq.add_chain(&[(INDIRECT_TABLE, 16 * u32::from(n), false)]);
    let indirect_flag = u16::try_from(VRING_DESC_F_INDIRECT).unwrap_or(4);
    tq.write_desc(head, INDIRECT_TABLE, 16 * u32::from(n), indirect_flag, 0);
}
