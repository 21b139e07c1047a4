// SPDX-License-Identifier: Apache-2.0
//! Unit tests of the virtio-blk device: requests, errors, budgets, slots.
#![allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_utils::{MemDisk, RecordingInterrupt, TestQueue, single_region_mem};
use crate::virtio::block::defs::*;

const W: bool = true;
const R: bool = false;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM: usize = 0x40_0000;

struct Env<'a> {
    mem: &'a GuestMemoryMmap,
    q: TestQueue<'a>,
    blk: VirtioBlock,
    irq: Arc<RecordingInterrupt>,
}

fn env<'a>(mem: &'a GuestMemoryMmap, disk: Option<MemDisk>, ro: bool) -> Env<'a> {
    let backend = disk.map(|d| Box::new(d) as Box<dyn DiskBackend>);
    let mut blk = VirtioBlock::with_backend("serial-0123456789abcdef", ro, backend).unwrap();
    let q = TestQueue::new(mem, GuestAddress(0), 256);
    let irq = Arc::new(RecordingInterrupt::new());
    blk.set_acked_features(blk.avail_features());
    blk.activate(mem.clone(), vec![q.queue()], irq.clone())
        .unwrap();
    Env { mem, q, blk, irq }
}

fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
    mem.write_obj(t, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

/// Submits one request and returns (status byte, used len).
fn submit(e: &mut Env, descs: &[(u64, u32, bool)]) -> (u8, u32) {
    e.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let before = e.q.used_idx();
    e.q.add_chain(descs);
    e.blk.process_queue();
    assert_eq!(
        e.q.used_idx(),
        before.wrapping_add(1),
        "request not completed"
    );
    let (_, len) = e.q.used_elem(before);
    (e.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), len)
}

fn disk_with_pattern(sectors: usize) -> MemDisk {
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    MemDisk::from_vec(data)
}

#[test]
fn features_and_config() {
    let blk = VirtioBlock::with_backend("abc", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
    let f = blk.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut v = [0u8; 4];
    blk.read_config(12, &mut v);
    assert_eq!(u32::from_le_bytes(v), 254);
    blk.read_config(20, &mut v);
    assert_eq!(u32::from_le_bytes(v), 512);
    blk.read_config(40, &mut v);
    assert_eq!(u32::from_le_bytes(v), MAX_DISCARD_SEGMENTS);
    // Past the end reads zero.
    let mut v = [0xffu8; 8];
    blk.read_config(58, &mut v);
    assert_eq!(v, [0; 8]);
    blk.read_config(u64::MAX, &mut v);
    assert_eq!(v, [0; 8]);

    let ro = VirtioBlock::with_backend("abc", true, None).unwrap();
    assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(ro.avail_features() & VIRTIO_BLK_F_DISCARD, 0);
    // A backing without discard support does not offer it.
    let plain = VirtioBlock::with_backend(
        "abc",
        false,
        Some(Box::new(MemDisk::new(512).without_discard())),
    )
    .unwrap();
    assert_eq!(plain.avail_features() & VIRTIO_BLK_F_DISCARD, 0);
}

#[test]
fn read_write_roundtrip() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(16)), false);
    header(&m, VIRTIO_BLK_T_IN, 2);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1025));
    let mut buf = vec![0u8; 1024];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 2));
    assert!(buf[512..].iter().all(|&b| b == 3));

    m.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 15);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
    header(&m, VIRTIO_BLK_T_IN, 15);
    // Split across odd-sized descriptors.
    let (s, _) = submit(
        &mut e,
        &[
            (HDR, 16, R),
            (DATA + 0x1000, 100, W),
            (DATA + 0x2000, 412, W),
            (STATUS, 1, W),
        ],
    );
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let mut a = [0u8; 100];
    m.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(a, [0xee; 100]);
    let metrics = e.blk.metrics();
    assert_eq!(metrics.requests, 3);
    assert_eq!(metrics.read_bytes, 1536);
    assert_eq!(metrics.write_bytes, 512);
    assert!(
        e.irq.count(InterruptKind::Queue) == 0,
        "irq is raised by the caller"
    );
}

#[test]
fn large_read_uses_chunks() {
    let m = single_region_mem(MEM);
    let sectors = 2 * BOUNCE_SIZE / 512 + 3;
    let mut e = env(&m, Some(disk_with_pattern(sectors)), false);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let len = u32::try_from(sectors * 512).unwrap();
    let (s, used) = submit(&mut e, &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)]);
    assert_eq!((s, used), (VIRTIO_BLK_S_OK, len + 1));
    let mut b = [0u8; 1];
    m.read_slice(&mut b, GuestAddress(DATA + (sectors as u64 - 1) * 512))
        .unwrap();
    assert_eq!(b[0], (sectors - 1) as u8);
}

#[test]
fn sector_bounds() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    header(&m, VIRTIO_BLK_T_IN, 7);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    header(&m, VIRTIO_BLK_T_IN, 7);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
    header(&m, VIRTIO_BLK_T_IN, 8);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // sector * 512 overflows u64.
    header(&m, VIRTIO_BLK_T_OUT, u64::MAX / 256);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    header(&m, VIRTIO_BLK_T_IN, u64::MAX);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // A zero-length read at the end is fine.
    header(&m, VIRTIO_BLK_T_IN, 8);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
}

#[test]
fn partial_trailing_sector_is_hidden() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(MemDisk::new(1000)), false);
    assert_eq!(e.blk.capacity(), 1);
    header(&m, VIRTIO_BLK_T_IN, 1);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
}

#[test]
fn write_to_read_only() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), true);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);

    // A read-only backing in a writable slot.
    let mut e = env(&m, None, false);
    e.blk.attach(Box::new(disk_with_pattern(8)), true).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // A read-only slot keeps any backing read-only.
    let mut e = env(&m, None, true);
    e.blk.attach(Box::new(disk_with_pattern(8)), false).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
}

#[test]
fn flush_and_get_id() {
    let m = single_region_mem(MEM);
    let disk = MemDisk::new(4096);
    let flushes = disk.flush_counter();
    let mut e = env(&m, Some(disk), false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 1);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
    // A short buffer gets a prefix.
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA + 100, 4, W), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 5));
}

#[test]
fn short_serial_is_nul_padded() {
    let m = single_region_mem(MEM);
    let q = TestQueue::new(&m, GuestAddress(0), 256);
    let mut blk = VirtioBlock::new(BlockConfig {
        id: "ab".into(),
        ..Default::default()
    })
    .unwrap();
    blk.activate(
        m.clone(),
        vec![q.queue()],
        Arc::new(RecordingInterrupt::new()),
    )
    .unwrap();
    let mut e = Env {
        mem: &m,
        q,
        blk,
        irq: Arc::new(RecordingInterrupt::new()),
    };
    m.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..3], b"ab\0");
}

fn discard_req(m: &GuestMemoryMmap, t: u32, segs: &[(u64, u32, u32)]) -> u32 {
    header(m, t, 0);
    for (i, (sector, n, flags)) in segs.iter().enumerate() {
        let a = DATA + 16 * i as u64;
        m.write_obj(*sector, GuestAddress(a)).unwrap();
        m.write_obj(*n, GuestAddress(a + 8)).unwrap();
        m.write_obj(*flags, GuestAddress(a + 12)).unwrap();
    }
    16 * segs.len() as u32
}

#[test]
fn discard_and_write_zeroes() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(MemDisk::from_vec(vec![0xab; 8 * 512])), false);
    let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 2, 0), (6, 1, 1)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    let mut buf = vec![0u8; 4096];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    for (i, sector) in buf.chunks(512).enumerate() {
        let expect = if matches!(i, 1 | 2 | 6) { 0 } else { 0xab };
        assert!(sector.iter().all(|&b| b == expect), "sector {i}");
    }

    let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    // Unmap flag on discard and unknown flags: UNSUPP (§5.2.6.2).
    let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
    let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
    // Out of range, and sector overflow.
    let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(7, 2, 0)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX, u32::MAX, 0)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
}

#[test]
fn discard_unsupported_by_backing_or_not_negotiated() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, None, false);
    e.blk
        .attach(Box::new(MemDisk::new(4096).without_discard()), false)
        .unwrap();
    let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);

    let mut e = env(&m, Some(MemDisk::new(4096)), false);
    e.blk.set_acked_features(VIRTIO_F_VERSION_1);
    let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn malformed_requests_complete_with_errors() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    header(&m, 42, 0);
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!((s, len), (VIRTIO_BLK_S_UNSUPP, 1));
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (s, _) = submit(&mut e, &[(HDR, 8, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    let (s, _) = submit(
        &mut e,
        &[(HDR, 16, R), (MEM as u64 - 256, 512, W), (STATUS, 1, W)],
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // No status byte: completed with length 0, status untouched.
    let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R)]);
    assert_eq!((s, len), (0xff, 0));
    let metrics = e.blk.metrics();
    assert_eq!(metrics.unsupported, 1);
    assert_eq!(metrics.errors, 4);
    assert!(!e.blk.needs_reset());
}

#[test]
fn empty_slot_fails_io_and_attach_signals() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, None, false);
    assert_eq!(e.blk.capacity(), 0);
    assert!(!e.blk.is_attached());
    header(&m, VIRTIO_BLK_T_IN, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);

    e.blk
        .attach(Box::new(disk_with_pattern(32)), false)
        .unwrap();
    assert_eq!(e.irq.count(InterruptKind::Config), 1);
    let mut cap = [0u8; 8];
    e.blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 32);
    header(&m, VIRTIO_BLK_T_IN, 31);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);

    // Swap for a smaller disk: old sectors are now out of range.
    e.blk.attach(Box::new(disk_with_pattern(4)), false).unwrap();
    assert_eq!(e.irq.count(InterruptKind::Config), 2);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_IOERR);

    e.blk.detach();
    assert_eq!(e.irq.count(InterruptKind::Config), 3);
    e.blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 0);
    // Detaching an empty slot changes nothing.
    e.blk.detach();
    assert_eq!(e.irq.count(InterruptKind::Config), 3);
}

#[test]
fn attach_before_activation_signals_on_activation() {
    let m = single_region_mem(MEM);
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    blk.attach(Box::new(MemDisk::new(4096)), false).unwrap();
    let q = TestQueue::new(&m, GuestAddress(0), 256);
    let irq = Arc::new(RecordingInterrupt::new());
    blk.activate(m.clone(), vec![q.queue()], irq.clone())
        .unwrap();
    assert_eq!(irq.count(InterruptKind::Config), 1);
    // A plain activation does not.
    blk.reset().unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    blk.activate(m.clone(), vec![q.queue()], irq.clone())
        .unwrap();
    assert_eq!(irq.count(InterruptKind::Config), 0);
    assert_eq!(blk.notify_event().unwrap().read().unwrap(), 2);
}

#[test]
fn an_empty_slot_has_no_notify_eventfd_and_serves_notifications_itself() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, None, false);
    assert!(e.blk.notify_event().is_none());
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    e.q.add_chain(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    e.blk.queue_notified(0).unwrap();
    assert_eq!(e.q.used_idx(), 1, "completed on the notifying thread");
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(e.irq.count(InterruptKind::Queue), 1);

    // Many at once: all of them are done on this call (nothing would come back later).
    header(&m, VIRTIO_BLK_T_IN, 0);
    for _ in 0..200 {
        e.q.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    }
    e.blk.queue_notified(0).unwrap();
    assert_eq!(e.q.used_idx(), 201);

    // The first disk brings the EventFd: notifications go to the event loop from now on.
    e.blk.attach(Box::new(MemDisk::new(4096)), false).unwrap();
    let evt = e.blk.notify_event().expect("created by the attach");
    assert!(evt.read().is_err(), "nothing signalled yet");
    e.q.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    e.blk.queue_notified(0).unwrap();
    assert_eq!(e.q.used_idx(), 201, "left to the event loop");
    assert_eq!(e.blk.notify_event().unwrap().read().unwrap(), 1);
    e.blk.detach();
    assert!(e.blk.notify_event().is_some(), "kept after a detach");
}

#[test]
fn activation_checks_queue_count() {
    let m = single_region_mem(MEM);
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    let err = blk.activate(m.clone(), vec![], irq.clone()).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    assert!(!blk.is_activated());
}

#[test]
fn corrupt_avail_index_needs_reset() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    // The driver claims 1000 new entries in a 256-entry ring.
    e.q.set_avail_idx(1000);
    assert!(!e.blk.process_queue());
    assert!(e.blk.needs_reset());
    assert_eq!(e.irq.count(InterruptKind::Config), 1);
    // Nothing more happens until reset.
    assert!(!e.blk.process_queue());
    e.blk.reset().unwrap();
    assert!(!e.blk.needs_reset());
    assert!(!e.blk.is_activated());
    assert_eq!(e.blk.acked_features(), 0);
}

#[test]
fn out_of_range_head_index_needs_reset() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    e.q.push_avail(300);
    e.blk.process_queue();
    assert!(e.blk.needs_reset());
}

#[test]
fn unreadable_avail_entry_needs_reset() {
    // The available index is readable but its ring entries lie past the end of guest memory.
    // This used to look like an empty ring that always had work (an endless loop).
    use virtio_queue::QueueT;
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let mut queue = Queue::new(256).unwrap();
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0xffc), Some(0));
    queue.set_used_ring_address(Some(0x800), Some(0));
    queue.set_ready(true);
    m.write_obj(1u16, GuestAddress(0xffe)).unwrap();
    let mut blk =
        VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    blk.activate(m.clone(), vec![queue], irq.clone()).unwrap();
    assert!(!blk.process_queue());
    assert!(blk.needs_reset());
    assert_eq!(irq.count(InterruptKind::Config), 1);
}

#[test]
fn completions_before_a_corrupt_entry_are_published() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    e.q.push_avail(300);
    assert!(e.blk.process_queue());
    assert!(e.blk.needs_reset());
    assert_eq!(e.q.used_idx(), 2);
}

#[test]
fn event_idx_suppresses_interrupts() {
    use virtio_queue::QueueT;
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    e.blk.reset().unwrap();
    let mut queue = e.q.queue();
    queue.set_event_idx(true);
    e.blk.set_acked_features(e.blk.avail_features());
    e.blk
        .activate(m.clone(), vec![queue], e.irq.clone())
        .unwrap();
    let used_event = |v: u16| {
        m.write_obj(v, GuestAddress(e.q.avail_addr().0 + 4 + 2 * 256))
            .unwrap()
    };
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    // The driver wants an interrupt once the used index passes 5.
    used_event(5);
    for _ in 0..3 {
        e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    assert!(!e.blk.process_queue());
    for _ in 0..3 {
        e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    assert!(e.blk.process_queue());
    assert_eq!(e.q.used_idx(), 6);
    // The device asked to be notified from the next available entry on.
    let avail_event: u16 = m
        .read_obj(GuestAddress(e.q.used_addr().0 + 4 + 8 * 256))
        .unwrap();
    assert_eq!(avail_event, 6);
}

#[test]
fn many_requests_in_one_pass() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, Some(disk_with_pattern(8)), false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..200 {
        e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    assert!(e.blk.process_queue());
    assert_eq!(e.q.used_idx(), 200);
    assert_eq!(e.blk.metrics().requests, 200);
}

#[test]
fn not_activated_does_nothing() {
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    assert!(!blk.process_queue());
    blk.signal_used_queue();
}

#[test]
fn config_writes_are_ignored() {
    let mut blk =
        VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
    blk.write_config(0, &[0xff; 8]);
    assert_eq!(blk.capacity(), 8);
}

#[test]
fn file_backed_slot() {
    use std::io::Write;
    let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
    t.as_file().write_all(&[5u8; 2048]).unwrap();
    let blk = VirtioBlock::new(BlockConfig {
        id: "f".into(),
        path: Some(t.as_path().to_path_buf()),
        read_only: false,
    })
    .unwrap();
    assert_eq!(blk.capacity(), 4);
    let err = VirtioBlock::new(BlockConfig {
        id: "f".into(),
        path: Some("/nonexistent".into()),
        read_only: true,
    })
    .unwrap_err();
    assert!(matches!(err, BlockError::OpenBackingFile(..)));
}

#[test]
fn a_restored_disk_is_served_at_once_and_the_driver_is_not_told() {
    let m = single_region_mem(MEM);
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    let disk = DiskInfo {
        read_only: false,
        sectors: 32,
    };
    blk.restore_disk(Box::new(disk_with_pattern(32)), disk)
        .unwrap();
    assert_eq!(blk.disk_info(), Some(disk));
    let evt = blk.notify_event().expect("a first disk brings the EventFd");
    assert!(evt.read().is_err(), "nothing signalled yet");
    // The transport restores the queue (activation): no configuration interrupt, but the event
    // loop is woken once, so requests the guest made available before the handover are served.
    let q = TestQueue::new(&m, GuestAddress(0), 256);
    let irq = Arc::new(RecordingInterrupt::new());
    blk.set_acked_features(blk.avail_features());
    blk.activate(m.clone(), vec![q.queue()], irq.clone())
        .unwrap();
    assert_eq!(irq.count(InterruptKind::Config), 0);
    assert_eq!(blk.notify_event().unwrap().read().unwrap(), 1);
    let mut e = Env {
        mem: &m,
        q,
        blk,
        irq,
    };
    header(&m, VIRTIO_BLK_T_IN, 31);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    assert_eq!(m.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 31);
    header(&m, VIRTIO_BLK_T_OUT, 2);
    let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(s, VIRTIO_BLK_S_OK);
    // A detach after the restore tells the driver, as any detach does.
    e.blk.detach();
    assert_eq!(e.irq.count(InterruptKind::Config), 1);
    assert_eq!(e.blk.capacity(), 0);
}

#[test]
fn a_restored_disk_must_have_the_capacity_the_guest_knows() {
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    let err = blk
        .restore_disk(
            Box::new(disk_with_pattern(16)),
            DiskInfo {
                read_only: false,
                sectors: 32,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::CapacityChanged {
                recorded: 32,
                found: 16
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("16 sectors"), "{err}");
    assert!(!blk.is_attached(), "the slot stays as it was");
    assert!(blk.notify_event().is_none());
}

#[test]
fn a_disk_is_restored_only_into_a_slot_not_yet_running() {
    let m = single_region_mem(MEM);
    let mut e = env(&m, None, false);
    let disk = DiskInfo {
        read_only: false,
        sectors: 8,
    };
    let err = e
        .blk
        .restore_disk(Box::new(disk_with_pattern(8)), disk)
        .unwrap_err();
    assert!(matches!(err, BlockError::RestoreActive), "{err}");
    assert!(!e.blk.is_attached());
}

#[test]
fn a_read_only_slot_keeps_a_restored_disk_read_only() {
    let mut blk = VirtioBlock::with_backend("x", true, None).unwrap();
    let disk = DiskInfo {
        read_only: false,
        sectors: 8,
    };
    blk.restore_disk(Box::new(disk_with_pattern(8)), disk)
        .unwrap();
    assert_eq!(
        blk.disk_info(),
        Some(DiskInfo {
            read_only: true,
            sectors: 8
        })
    );
}

#[test]
fn only_a_disk_with_a_file_can_be_handed_over() {
    let empty = VirtioBlock::with_backend("x", false, None).unwrap();
    assert!(empty.handover_file().is_none());
    let mem = VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
    let err = mem.handover_file().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");

    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(8192).unwrap();
    let file = FileDisk::open(image.as_path(), false).unwrap();
    let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
    blk.attach(Box::new(file), true).unwrap();
    let passed = blk.handover_file().unwrap().unwrap();
    assert_eq!((passed.read_only, passed.sectors), (true, 16));
    // The descriptor rebuilds the same disk in another slot.
    let mut again = VirtioBlock::with_backend("x", false, None).unwrap();
    let disk = DiskInfo {
        read_only: passed.read_only,
        sectors: passed.sectors,
    };
    let backend = FileDisk::from_file(passed.file, passed.read_only).unwrap();
    again.restore_disk(Box::new(backend), disk).unwrap();
    assert_eq!(again.disk_info(), blk.disk_info());
}
