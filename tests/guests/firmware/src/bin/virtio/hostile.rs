// SPDX-License-Identifier: Apache-2.0
//! `virtio.test=hostile hostile.case=<case>`: a guest that attacks its VMM, forever, the way a
//! compromised guest kernel could. The host's tests start one beside a healthy VM and check
//! that the hostile one stays contained: its VM is stopped or runs on harmlessly, Stop returns
//! in time, the process's memory and descriptors stay bounded, and the healthy VM answers.
//!
//! Cases (every device found on the command line is attacked unless the case names one):
//!
//! | case | what the guest does, in a loop |
//! |---|---|
//! | `vsock-flood` | keeps the vsock TX queue full of connection requests and data for ports nobody listens on, never posts an RX buffer, so every reply the host owes has nowhere to go |
//! | `desc-loop` | posts descriptor chains that loop (a descriptor whose `next` is itself, and a two-descriptor cycle) on every queue of every device |
//! | `huge-len` | posts descriptors of length `u32::MAX` (and a vsock header whose `len` says 4 GiB) on every queue |
//! | `oob-addr` | posts descriptors at addresses outside guest memory or straddling its end, and rings placed there |
//! | `status-abuse` | drives the MMIO status register through invalid transitions and writes every register at the wrong time, with bad values |
//! | `config-oob` | writes and reads the configuration space at every offset up to the window's end, 1, 2, 4 and 8 bytes wide |
//! | `notify-flood` | writes `QueueNotify` for every queue index as fast as it can, with nothing or the same chain on the ring |
//! | `serial-flood` | writes the serial port as fast as it can, never waiting for the transmitter |
//! | `spin` | spins with interrupts off, never exiting to the VMM |
//!
//! Console: `hostile: <case> attacking, <r> of <n> devices reacted` once the first round is
//! done (the host waits for it): for the ring attacks (`desc-loop`, `huge-len`, `oob-addr`,
//! `vsock-flood`), `r` devices of the `n` attacked showed they took the attack in (asked for a
//! reset or used a buffer); the other cases count none. Then nothing but what the attack
//! itself writes. An unknown case prints
//! `hostile: FAIL unknown case <case>` and triple faults.

use core::sync::atomic::{Ordering, fence};

use firmware::dma::{Arena, DmaBuf};
use firmware::serial::{COM1, outb};
use firmware::virtio::mmio::{Transport, reg, status};
use firmware::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use firmware::virtio::vsock::{HDR_LEN, HOST_CID, Header, OP_REQUEST, OP_RW, TYPE_STREAM};
use firmware::virtio::{self, DEVICE_ID_BLK, DEVICE_ID_NET, DEVICE_ID_VSOCK, MAX_DEVICES};
use firmware::{exit, phys, println};

use crate::{Devices, Text};

/// Entries of every queue the attacks set up.
const QUEUE_SIZE: u16 = 16;
/// Queues of each device type (blk: requestq; net: rx, tx; vsock: rx, tx, event).
const fn queues_of(id: u32) -> u16 {
    match id {
        DEVICE_ID_BLK => 1,
        DEVICE_ID_NET => 2,
        DEVICE_ID_VSOCK => 3,
        _ => 0,
    }
}
/// Ring offsets in a queue's page (as in `firmware::virtio::queue`).
const AVAIL_OFFSET: u64 = 1024;
const USED_OFFSET: u64 = 2048;
/// Addresses no guest of these tests has RAM at: the top of the address space, far beyond
/// any RAM, and a page straddling 4 GiB (the MMIO gap below it, nothing or high RAM above).
const OOB_ADDRS: [u64; 3] = [0xffff_ffff_ffff_f000, 1 << 40, (1 << 32) - 0x800];
/// A vsock header's length as a descriptor length (44).
#[expect(clippy::cast_possible_truncation, reason = "HDR_LEN is 44")]
const HDR: u32 = HDR_LEN as u32;
/// Size of an MMIO device's register window.
const WINDOW: u64 = 0x1000;
/// Status and used-ring reads the first round waits for a device to react.
const REACTION_POLLS: u32 = 2000;
/// Guest ports the vsock flood dials from (one per TX slot and round).
const FLOOD_PORT_BASE: u32 = 40_000;
/// Host port nobody listens on.
const DEAD_PORT: u32 = 4_000_000;

/// A split virtqueue the guest writes by hand: rings in one page, descriptors as the attack
/// wants them.
#[derive(Debug, Clone, Copy)]
struct RawQueue {
    index: u16,
    size: u16,
    ring: u64,
    avail: u16,
    notify: u64,
}

impl RawQueue {
    /// Sets up queue `index` of `t` on `page` (zeroed here): `None` if the device has no
    /// such queue.
    fn setup(t: &Transport, index: u16, page: &mut DmaBuf) -> Option<Self> {
        let max = t.queue_max(index);
        if max == 0 {
            return None;
        }
        let size = QUEUE_SIZE.min(1 << (15 - max.leading_zeros()));
        page.zero();
        let ring = page.addr();
        t.setup_queue(index, size, ring, ring + AVAIL_OFFSET, ring + USED_OFFSET);
        Some(Self {
            index,
            size,
            ring,
            avail: 0,
            notify: t.notify_addr(),
        })
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.ring + 16 * u64::from(i % self.size);
        phys::write_volatile(d, addr);
        phys::write_volatile(d + 8, len);
        phys::write_volatile(d + 12, flags);
        phys::write_volatile(d + 14, next);
    }

    /// Puts `head` on the available ring (no notification).
    fn publish(&mut self, head: u16) {
        let avail = self.ring + AVAIL_OFFSET;
        phys::write_volatile(avail + 4 + 2 * u64::from(self.avail % self.size), head);
        self.avail = self.avail.wrapping_add(1);
        fence(Ordering::Release);
        phys::write_volatile(avail + 2, self.avail);
    }

    fn kick(&self) {
        fence(Ordering::SeqCst);
        phys::mmio_write_u32(self.notify, u32::from(self.index));
    }

    fn used_idx(&self) -> u16 {
        phys::read_volatile(self.ring + USED_OFFSET + 2).unwrap_or(0)
    }
}

/// What the first round saw: devices attacked, and how many of them showed they took the
/// attack in (asked for a reset, or used a buffer of a bad chain).
#[derive(Debug, Default)]
struct Tally {
    devices: u32,
    reacted: u32,
}

impl Tally {
    /// Counts `target`, and whether it reacted to what was just kicked on `queues`.
    fn note(&mut self, target: &Target, queues: &[Option<RawQueue>]) {
        self.devices += 1;
        for _ in 0..REACTION_POLLS {
            let reset = target.t.read(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0;
            if reset || queues.iter().flatten().any(|q| q.used_idx() != 0) {
                self.reacted += 1;
                return;
            }
        }
    }
}

/// One device under attack: its transport, a page per queue and a data page.
struct Target {
    t: Transport,
    id: u32,
    pages: [Option<DmaBuf>; 3],
    data: DmaBuf,
}

impl Target {
    /// Resets the device, accepts only `VERSION_1`, sets up every queue on its page and sets
    /// `DRIVER_OK`; returns the queues (absent ones `None`).
    fn bring_up(&mut self) -> [Option<RawQueue>; 3] {
        let mut queues = [None; 3];
        if self.t.negotiate(0).is_err() {
            return queues;
        }
        for (i, (slot, page)) in queues.iter_mut().zip(self.pages.iter_mut()).enumerate() {
            if let (Some(page), Ok(index)) = (page, u16::try_from(i)) {
                *slot = RawQueue::setup(&self.t, index, page);
            }
        }
        // A device that refuses now is attacked anyway: every step below must be harmless.
        let _ = self.t.driver_ok();
        queues
    }

    fn reset(&self) {
        self.t.write(reg::STATUS, 0);
    }
}

/// The devices to attack, set up with their memory; at most [`MAX_DEVICES`].
fn targets(devices: &Devices, arena: &mut Arena) -> ([Option<Target>; MAX_DEVICES], usize) {
    let mut out: [Option<Target>; MAX_DEVICES] = Default::default();
    let mut n = 0;
    for id in [DEVICE_ID_VSOCK, DEVICE_ID_BLK, DEVICE_ID_NET] {
        for dev in devices.of_type(id) {
            let Ok(t) = Transport::probe(dev) else {
                continue;
            };
            let mut pages: [Option<DmaBuf>; 3] = Default::default();
            for page in pages.iter_mut().take(usize::from(queues_of(id))) {
                *page = arena.pages(1);
            }
            let (Some(data), Some(slot)) = (arena.pages(4), out.get_mut(n)) else {
                return (out, n);
            };
            *slot = Some(Target { t, id, pages, data });
            n += 1;
        }
    }
    (out, n)
}

/// Runs `case` forever.
pub fn run(cmdline: &[u8], devices: &Devices, arena: &mut Arena) -> ! {
    let case = virtio::param(cmdline, b"hostile.case").unwrap_or_default();
    let (mut all, n) = targets(devices, arena);
    let targets = all.get_mut(..n).unwrap_or_default();
    let round: fn(&mut [Option<Target>], &mut Tally) = match case {
        b"vsock-flood" => vsock_flood,
        b"desc-loop" => desc_loop,
        b"huge-len" => huge_len,
        b"oob-addr" => oob_addr,
        b"status-abuse" => status_abuse,
        b"config-oob" => config_oob,
        b"notify-flood" => notify_flood,
        b"serial-flood" => serial_flood,
        b"spin" => {
            println!("hostile: spin attacking, 0 of 0 devices reacted");
            spin()
        }
        other => {
            println!("hostile: FAIL unknown case {}", Text(other));
            exit::triple_fault()
        }
    };
    let mut tally = Tally::default();
    round(targets, &mut tally);
    println!(
        "hostile: {} attacking, {} of {} devices reacted",
        Text(case),
        tally.reacted,
        tally.devices
    );
    let mut ignored = Tally::default();
    loop {
        round(targets, &mut ignored);
    }
}

fn each(targets: &mut [Option<Target>]) -> impl Iterator<Item = &mut Target> {
    targets.iter_mut().flatten()
}

/// Every queue of every device: a self-loop and a two-descriptor cycle, published and
/// kicked; then the device is reset (it may have asked for one) for the next round.
fn desc_loop(targets: &mut [Option<Target>], tally: &mut Tally) {
    for target in each(targets) {
        let data = target.data.addr();
        let queues = target.bring_up();
        for mut q in queues.into_iter().flatten() {
            let flags = VIRTQ_DESC_F_NEXT | if q.index == 0 { VIRTQ_DESC_F_WRITE } else { 0 };
            q.desc(0, data, 64, flags, 0);
            q.desc(1, data + 64, 64, flags, 2);
            q.desc(2, data + 128, 64, flags, 1);
            // A chain that walks every descriptor and then comes back to its head.
            for i in 3..q.size {
                q.desc(i, data + 256, 16, VIRTQ_DESC_F_NEXT, (i + 1) % q.size);
            }
            q.publish(0);
            q.publish(1);
            q.publish(3);
            q.kick();
        }
        tally.note(target, &queues);
        target.reset();
    }
}

/// Descriptors of `u32::MAX` bytes, readable and writable, on every queue; a blk request whose
/// data buffer is 4 GiB; a vsock packet whose header says 4 GiB of payload follow.
fn huge_len(targets: &mut [Option<Target>], tally: &mut Tally) {
    for target in each(targets) {
        let data = target.data.addr();
        let id = target.id;
        let queues = target.bring_up();
        for mut q in queues.into_iter().flatten() {
            q.desc(0, data, u32::MAX, 0, 0);
            q.desc(1, data, u32::MAX, VIRTQ_DESC_F_WRITE, 0);
            match id {
                DEVICE_ID_BLK => {
                    // Header (IN, sector 0) -> 4 GiB data -> status.
                    phys::write_volatile(data + 512, 0u32);
                    phys::write_volatile(data + 520, 0u64);
                    q.desc(2, data + 512, 16, VIRTQ_DESC_F_NEXT, 3);
                    q.desc(
                        3,
                        data + 1024,
                        u32::MAX,
                        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                        4,
                    );
                    q.desc(4, data + 600, 1, VIRTQ_DESC_F_WRITE, 0);
                }
                DEVICE_ID_VSOCK => {
                    let hdr = Header {
                        src_cid: 3,
                        dst_cid: HOST_CID,
                        src_port: FLOOD_PORT_BASE,
                        dst_port: DEAD_PORT,
                        len: u32::MAX,
                        kind: TYPE_STREAM,
                        op: OP_RW,
                        ..Header::default()
                    };
                    write_bytes(data + 512, &hdr.to_bytes());
                    q.desc(2, data + 512, HDR, VIRTQ_DESC_F_NEXT, 3);
                    q.desc(3, data + 1024, u32::MAX, 0, 0);
                    q.desc(4, data + 512, u32::MAX, 0, 0);
                }
                _ => {
                    q.desc(2, data, u32::MAX, VIRTQ_DESC_F_NEXT, 3);
                    q.desc(3, data, u32::MAX, 0, 0);
                    q.desc(4, data, 0, 0, 0);
                }
            }
            for head in 0..5 {
                q.publish(head);
            }
            q.kick();
        }
        tally.note(target, &queues);
        target.reset();
    }
}

/// Descriptors at addresses with no guest memory, and queues whose rings are there.
fn oob_addr(targets: &mut [Option<Target>], tally: &mut Tally) {
    for target in each(targets) {
        let queues = target.bring_up();
        for mut q in queues.into_iter().flatten() {
            for (i, addr) in (0u16..).zip(OOB_ADDRS) {
                q.desc(2 * i, addr, 4096, VIRTQ_DESC_F_NEXT, 2 * i + 1);
                q.desc(2 * i + 1, addr, 4096, VIRTQ_DESC_F_WRITE, 0);
                q.publish(2 * i);
            }
            // A head index past the queue's end.
            q.publish(q.size + 3);
            q.kick();
        }
        tally.note(target, &queues);
        target.reset();
        // Rings outside memory, made live.
        if target.t.negotiate(0).is_ok() {
            for (index, addr) in (0u16..queues_of(target.id)).zip(OOB_ADDRS.iter().cycle()) {
                target
                    .t
                    .setup_queue(index, QUEUE_SIZE, *addr, addr + 1024, addr + 2048);
            }
            let _ = target.t.driver_ok();
            for index in 0..queues_of(target.id) {
                phys::mmio_write_u32(target.t.notify_addr(), u32::from(index));
            }
        }
        target.reset();
    }
}

/// Invalid status transitions and registers written at the wrong time.
fn status_abuse(targets: &mut [Option<Target>], _tally: &mut Tally) {
    const ACK: u32 = status::ACKNOWLEDGE;
    const DRV: u32 = status::DRIVER;
    const FOK: u32 = status::FEATURES_OK;
    const DOK: u32 = status::DRIVER_OK;
    let sequences: [&[u32]; 7] = [
        // DRIVER_OK straight from reset, and without FEATURES_OK.
        &[DOK],
        &[ACK, DRV, ACK | DRV | DOK],
        // Bits taken away, every bit at once, FAILED and then on.
        &[ACK, DRV, ACK | DRV | FOK, ACK],
        &[0xff, 0xffff_ffff],
        &[status::FAILED, ACK | DRV | FOK | DOK],
        // FEATURES_OK twice, DRIVER_OK then NEEDS_RESET written by the driver.
        &[
            ACK,
            ACK | DRV,
            ACK | DRV | FOK,
            ACK | DRV | FOK,
            ACK | DRV | FOK | DOK,
            0x40,
        ],
        &[
            ACK | DRV | FOK | DOK,
            ACK | DRV | FOK | DOK | status::DEVICE_NEEDS_RESET,
        ],
    ];
    for target in each(targets) {
        let t = &target.t;
        let data = target.data.addr();
        for seq in sequences {
            t.write(reg::STATUS, 0);
            for &s in seq {
                t.write(reg::STATUS, s);
                // Features changed after FEATURES_OK, queues programmed while live.
                t.write(reg::DRIVER_FEATURES_SEL, s & 3);
                t.write(reg::DRIVER_FEATURES, 0xffff_ffff);
                for (sel, num) in [(0, 0), (1, 3), (2, 0xffff), (0xffff, 16), (7, 1 << 20)] {
                    t.write(reg::QUEUE_SEL, sel);
                    t.write(reg::QUEUE_NUM, num);
                    // Misaligned, and above anything the guest has.
                    t.write(reg::QUEUE_DESC_LOW, low32(data).wrapping_add(1));
                    t.write(reg::QUEUE_DESC_HIGH, 0xffff_ffff);
                    t.write(reg::QUEUE_READY, 1);
                    t.write(reg::QUEUE_NOTIFY, sel);
                }
                t.write(reg::INTERRUPT_ACK, 0xffff_ffff);
                t.write(reg::QUEUE_READY, 0);
            }
        }
        // Read-only registers written, every register read.
        for off in [
            reg::MAGIC_VALUE,
            reg::VERSION,
            reg::DEVICE_ID,
            reg::QUEUE_NUM_MAX,
        ] {
            t.write(off, 0xdead_beef);
        }
        for off in (0..reg::CONFIG).step_by(4) {
            let _ = t.read(off);
            t.write(off, 0xffff_ffff);
        }
        t.write(reg::STATUS, 0);
    }
}

/// Configuration space written and read at every offset, 1, 2, 4 and 8 bytes wide.
fn config_oob(targets: &mut [Option<Target>], _tally: &mut Tally) {
    for target in each(targets) {
        let base = target.t.base();
        let _ = target.t.negotiate(0);
        for off in (reg::CONFIG..WINDOW).step_by(8) {
            let at = base + off;
            phys::write_volatile(at, 0xffff_ffff_ffff_ffffu64);
            let _: Option<u64> = phys::read_volatile(at);
            phys::write_volatile(at + 4, 0xdead_beefu32);
            phys::write_volatile(at + 6, 0xbeefu16);
            phys::write_u8(at + 7, 0xff);
            let _: Option<u8> = phys::read_volatile(at + 7);
            let _: Option<u16> = phys::read_volatile(at + 2);
        }
        target.reset();
    }
}

/// `QueueNotify` as fast as the guest can write it: for absent queues, for queues with
/// nothing on them, and for a queue whose ring holds the same readable chain again and again.
fn notify_flood(targets: &mut [Option<Target>], _tally: &mut Tally) {
    for target in each(targets) {
        let data = target.data.addr();
        let queues = target.bring_up();
        for _ in 0..64 {
            for index in 0..8 {
                phys::mmio_write_u32(target.t.notify_addr(), index);
            }
        }
        for mut q in queues.into_iter().flatten() {
            q.desc(0, data, 64, 0, 0);
            for _ in 0..64 {
                q.publish(0);
                q.kick();
            }
        }
        target.reset();
    }
}

/// The vsock TX queue kept full of connection requests (and data for connections that do not
/// exist) to a host port nobody listens on; no RX buffer is ever posted, so the resets the host
/// owes pile up on its side.
fn vsock_flood(targets: &mut [Option<Target>], tally: &mut Tally) {
    for target in each(targets).filter(|t| t.id == DEVICE_ID_VSOCK) {
        let data = target.data.addr();
        let [_rx, tx, _event] = target.bring_up();
        let Some(mut tx) = tx else {
            continue;
        };
        let guest_cid = target.t.config_u32(0);
        // One header per TX slot, each a request or a write from its own port.
        for slot in 0..tx.size {
            let hdr = Header {
                src_cid: u64::from(guest_cid),
                dst_cid: HOST_CID,
                src_port: FLOOD_PORT_BASE + u32::from(slot),
                dst_port: DEAD_PORT,
                len: if slot % 2 == 0 { 0 } else { 16 },
                kind: TYPE_STREAM,
                op: if slot % 2 == 0 { OP_REQUEST } else { OP_RW },
                buf_alloc: 1 << 16,
                ..Header::default()
            };
            let at = data + 64 * u64::from(slot);
            write_bytes(at, &hdr.to_bytes());
            tx.desc(slot, at, HDR + 16, 0, 0);
            tx.publish(slot);
        }
        tx.kick();
        // Refill as the device takes them, for a while; the next round starts over.
        let mut used = 0u16;
        for _ in 0..256 {
            let now = tx.used_idx();
            while used != now {
                tx.publish(used % tx.size);
                used = used.wrapping_add(1);
            }
            tx.kick();
        }
        tally.note(target, &[Some(tx)]);
        target.reset();
    }
}

/// The serial port written without waiting for its transmitter, with the line control
/// registers thrown in.
fn serial_flood(_targets: &mut [Option<Target>], _tally: &mut Tally) {
    for i in 0..4096u32 {
        outb(COM1, b'!'.wrapping_add(i.to_le_bytes()[0] % 90));
        if i % 1024 == 0 {
            outb(COM1 + 3, 0x80); // DLAB on
            outb(COM1, 0xff);
            outb(COM1 + 3, 0x03); // 8N1, DLAB off
            outb(COM1 + 1, 0xff); // every interrupt enabled
        }
    }
}

/// Never exits to the VMM: interrupts off, no I/O.
fn spin() -> ! {
    // SAFETY: clears the interrupt flag and jumps to itself for ever: no memory, no stack, no
    // return.
    unsafe { core::arch::asm!("cli", "2:", "jmp 2b", options(noreturn, nomem, nostack)) }
}

/// The low 32 bits of an address.
fn low32(addr: u64) -> u32 {
    let [a, b, c, d, ..] = addr.to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

fn write_bytes(addr: u64, bytes: &[u8]) {
    for (a, &b) in (addr..).zip(bytes) {
        phys::write_u8(a, b);
    }
}
