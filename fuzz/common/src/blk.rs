// SPDX-License-Identifier: Apache-2.0
//! The `virtio_blk` target: a [`VirtioBlock`] over an in-memory disk, driven through its request
//! queue by a script of guest requests, raw descriptor writes, ring corruption, backing swaps
//! and resets.

use std::sync::Arc;

use devices::GuestMemoryMmap;
use devices::test_utils::{MemDisk, RecordingInterrupt, TestQueue};
use devices::virtio::VirtioDevice;
use devices::virtio::block::defs::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use devices::virtio::block::{DiskBackend, VirtioBlock};
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Reader, Writer};
use crate::layout::{self, Desc, QUEUE_ADDR};

/// Request header location (of slot 0; requests rotate through [`SLOTS`] slots so that the
/// requests queued before one `process` do not share their header).
pub const HDR_ADDR: u64 = 0x6000;
/// Status byte location (of slot 0).
pub const STATUS_ADDR: u64 = 0x6100;
/// Discard / write-zeroes segments location (of slot 0).
pub const SEG_ADDR: u64 = 0x6200;
/// Header/status/segment slots.
const SLOTS: u64 = 8;
/// Sectors of the disk the device starts with.
pub const DISK_SECTORS: usize = 64;
/// Operations per input.
const MAX_OPS: usize = 128;

const TYPES: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

/// What a run did, for the seed tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests completed with `OK`.
    pub ok: u64,
    /// Requests completed with an error (or not completable).
    pub errors: u64,
    /// Requests completed with `UNSUPP`.
    pub unsupported: u64,
    /// The device ended in `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
}

fn disk(kind: u8, bytes: usize) -> Box<dyn DiskBackend> {
    let data: Vec<u8> = (0..bytes).map(|i| (i / 512).to_le_bytes()[0]).collect();
    let d = MemDisk::from_vec(data);
    if kind % 2 == 1 {
        Box::new(d.without_discard())
    } else {
        Box::new(d)
    }
}

struct Harness<'m> {
    mem: &'m GuestMemoryMmap,
    tq: TestQueue<'m>,
    qsize: u16,
    blk: VirtioBlock,
    acked: u64,
    pushed: u64,
    corrupted: bool,
}

impl<'m> Harness<'m> {
    fn activate(&mut self) {
        self.tq = TestQueue::new(self.mem, GuestAddress(QUEUE_ADDR[0]), self.qsize);
        self.blk.set_acked_features(self.acked);
        let irq = Arc::new(RecordingInterrupt::new());
        self.blk
            .activate(self.mem.clone(), vec![self.tq.queue()], irq)
            .expect("activation with a valid queue cannot fail");
    }

    fn request(&mut self, r: &mut Reader<'_>) {
        let sel = r.u8() % 8;
        let rtype = match TYPES.get(usize::from(sel)) {
            Some(t) => *t,
            None => r.u32(),
        };
        let sector = if r.rarely() {
            r.u64()
        } else {
            u64::from(r.u8())
        };
        let split_header = r.bool();
        let short_header = r.rarely();
        let ndata = r.u8() % 4;
        let nseg = r.u8() % 3;
        let segs: Vec<(u64, u32, u32)> = (0..nseg)
            .map(|_| {
                let s = if r.rarely() {
                    r.u64()
                } else {
                    u64::from(r.u8())
                };
                (s, u32::from(r.u8()), u32::from(r.u8() % 3))
            })
            .collect();
        let no_status = r.rarely();
        let indirect = r.u8().is_multiple_of(4);
        let slot = self.pushed % SLOTS;
        let (hdr, status, seg) = (
            HDR_ADDR + 0x20 * slot,
            STATUS_ADDR + slot,
            SEG_ADDR + 0x40 * slot,
        );

        let _ = self.mem.write_obj(rtype, GuestAddress(hdr));
        let _ = self.mem.write_obj(0u32, GuestAddress(hdr + 4));
        let _ = self.mem.write_obj(sector, GuestAddress(hdr + 8));
        let _ = self.mem.write_obj(0xffu8, GuestAddress(status));
        for (i, (s, n, f)) in (0u64..).zip(&segs) {
            let at = seg + 16 * i;
            let _ = self.mem.write_obj(*s, GuestAddress(at));
            let _ = self.mem.write_obj(*n, GuestAddress(at + 8));
            let _ = self.mem.write_obj(*f, GuestAddress(at + 12));
        }

        let mut descs = Vec::new();
        if short_header {
            descs.push(Desc {
                addr: hdr,
                len: u32::from(r.u8() % 16),
                write: false,
            });
        } else if split_header {
            descs.push(Desc {
                addr: hdr,
                len: 4,
                write: false,
            });
            descs.push(Desc {
                addr: hdr + 4,
                len: 12,
                write: false,
            });
        } else {
            descs.push(Desc {
                addr: hdr,
                len: 16,
                write: false,
            });
        }
        let device_writes = matches!(rtype, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        if matches!(rtype, VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) && nseg > 0 {
            descs.push(Desc {
                addr: seg,
                len: 16 * u32::from(nseg),
                write: false,
            });
        }
        for _ in 0..ndata {
            descs.push(layout::desc(r, device_writes));
        }
        if !no_status {
            descs.push(Desc {
                addr: status,
                len: 1,
                write: true,
            });
        }
        layout::push_chain(&self.tq, self.mem, &descs, indirect);
        self.pushed += 1;
    }

    fn process(&mut self) {
        let needs_reset_before = self.blk.needs_reset();
        let irq = self.blk.process_queue();
        if needs_reset_before {
            assert!(!irq, "a device that needs reset must not use its queue");
        }
        let m = self.blk.metrics();
        if !self.corrupted {
            assert!(
                m.requests <= self.pushed,
                "{} requests completed, {} submitted",
                m.requests,
                self.pushed
            );
        }
    }
}

/// Runs one input; `None` rejects it. The first byte picks the disk: 0 empty slot, 1 and 3
/// without discard support, 2 with it, 4 a read-only slot.
pub fn run(data: &[u8]) -> Option<Report> {
    let mut r = Reader::new(data);
    let disk_kind = r.u8() % 5;
    let ack_mask = r.u64();
    let qsize = layout::queue_size(&mut r);
    if qsize == 0 || !qsize.is_power_of_two() || qsize > 256 {
        return None;
    }
    let backend = match disk_kind {
        0 => None,
        k => Some(disk(k, DISK_SECTORS * 512)),
    };
    let read_only = disk_kind == 4;
    let blk = VirtioBlock::with_backend("fuzz-serial", read_only, backend).ok()?;
    let acked = (blk.avail_features() & ack_mask) | devices::virtio::VIRTIO_F_VERSION_1;
    let mem = layout::guest_mem();
    let mut h = Harness {
        mem: &mem,
        tq: TestQueue::new(&mem, GuestAddress(QUEUE_ADDR[0]), qsize),
        qsize,
        blk,
        acked,
        pushed: 0,
        corrupted: false,
    };
    h.activate();

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 10 {
            0..=2 => h.request(&mut r),
            3 | 4 => h.process(),
            5 => {
                // A raw descriptor write, possibly made available.
                let index = r.u16();
                let (addr, len, flags, next) = (r.u64(), r.u32(), r.u16(), r.u16());
                h.tq.write_desc(index, addr, len, flags, next);
                if r.bool() {
                    h.tq.push_avail(index);
                    h.pushed += 1;
                }
            }
            6 => {
                if r.rarely() {
                    h.tq.set_avail_idx(r.u16());
                    h.corrupted = true;
                }
            }
            7 => {
                let kind = r.u8();
                let bytes = usize::from(r.u8()) * 512 + usize::from(r.u8() % 2) * 100;
                let ro = r.bool();
                let _ = h.blk.attach(disk(kind, bytes), ro);
            }
            8 => h.blk.detach(),
            _ => {
                h.blk.reset().expect("block reset cannot fail");
                assert!(!h.blk.is_activated() && !h.blk.needs_reset());
                h.activate();
            }
        }
    }
    h.process();
    let m = h.blk.metrics();
    Some(Report {
        ok: m
            .requests
            .saturating_sub(m.errors)
            .saturating_sub(m.unsupported),
        errors: m.errors,
        unsupported: m.unsupported,
        needs_reset: h.blk.needs_reset(),
    })
}

/// Seed builder: the setup fields.
pub fn write_setup(w: &mut Writer, disk_kind: u8, ack_mask: u64, qsize_shift: u8) {
    w.u8(disk_kind).u64(ack_mask);
    layout::write_queue_size(w, qsize_shift);
}

/// Seed builder: a request of type index `sel` (into IN, OUT, FLUSH, GET_ID, DISCARD,
/// WRITE_ZEROES) at `sector` with `data` buffers of `sectors` sectors each.
pub fn write_request(
    w: &mut Writer,
    sel: u8,
    sector: u8,
    data: &[(u64, u8)],
    segs: &[(u8, u8, u8)],
) {
    w.u8(0); // op: request
    w.u8(sel).rarely(false).u8(sector);
    w.bool(false).rarely(false);
    w.u8(u8::try_from(data.len()).expect("few buffers"));
    w.u8(u8::try_from(segs.len()).expect("few segments"));
    for (s, n, f) in segs {
        w.rarely(false).u8(*s).u8(*n).u8(*f);
    }
    w.rarely(false).u8(1); // status present, not indirect
    for (addr, sectors) in data {
        layout::write_desc(w, *addr, |w| layout::write_len_sectors(w, *sectors));
    }
}

/// Seed builder: process the queue.
pub fn write_process(w: &mut Writer) {
    w.u8(3);
}
