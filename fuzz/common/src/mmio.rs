// SPDX-License-Identifier: Apache-2.0
//! The `mmio_transport` target: sequences of guest register reads and writes on an
//! [`MmioTransport`] in front of a dummy, block or net device, with a "driver init" macro so
//! that deep states (live device, queues in use) are reached often.
//!
//! After every step it checks: `Status` only ever shows defined bits; a device is live whenever
//! `Status` says `DRIVER_OK` without `DEVICE_NEEDS_RESET`, and never when `Status` reads 0;
//! `ConfigGeneration` never goes backwards.

use std::sync::{Arc, Mutex};

use devices::GuestMemoryMmap;
use devices::test_utils::{
    DummyDevice, LoopbackHandle, LoopbackNet, MemDisk, RecordingInterrupt, TestQueue,
};
use devices::virtio::block::VirtioBlock;
use devices::virtio::block::defs::VIRTIO_BLK_T_IN;
use devices::virtio::net::{NetConfig, VirtioNet};
use devices::virtio::transport::MmioTransport;
use devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use crate::blk::{HDR_ADDR, STATUS_ADDR};
use crate::input::{Reader, Writer};
use crate::layout::{self, QUEUE_ADDR};

/// The virtio-mmio registers (virtio 1.2 §4.2.2) plus the first config byte.
pub const REGS: [u64; 27] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0b8, 0x0fc,
    0x100,
];
/// Index of `Status` in [`REGS`].
pub const REG_STATUS: u8 = 15;
const STATUS: u64 = 0x070;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Status values a driver writes, in order, plus some it should not.
const STATUS_VALUES: [u32; 9] = [0, 1, 3, 0xb, 0xf, 0x80, 0x83, 0x43, 0x8b];
/// Operations per input.
const MAX_OPS: usize = 256;

enum Dev {
    Dummy(Arc<Mutex<DummyDevice>>),
    Blk(Arc<Mutex<VirtioBlock>>),
    Net(Arc<Mutex<VirtioNet>>, LoopbackHandle),
}

impl Dev {
    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Dev::Dummy(d) => d.clone(),
            Dev::Blk(d) => d.clone(),
            Dev::Net(d, _) => d.clone(),
        }
    }

    fn is_activated(&self) -> bool {
        self.virtio().lock().expect("poisoned").is_activated()
    }
}

/// What a run did, for the seed tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The device was live at some point.
    pub activated: bool,
    /// The last `Status` read.
    pub status: u32,
}

struct Harness<'m> {
    mem: &'m GuestMemoryMmap,
    t: MmioTransport,
    dev: Dev,
    tqs: Vec<TestQueue<'m>>,
    last_generation: u32,
    report: Report,
}

impl<'m> Harness<'m> {
    fn rd(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }

    fn check(&mut self) {
        let st = self.rd(STATUS);
        assert_eq!(st & !0xcf, 0, "undefined status bits in {st:#x}");
        let live = self.dev.is_activated();
        if st & 0x04 != 0 && st & 0x40 == 0 {
            assert!(live, "DRIVER_OK without a live device: {st:#x}");
        }
        if st == 0 {
            assert!(!live, "live device with status 0");
        }
        self.report.activated |= live;
        self.report.status = st;
        let generation = self.rd(CONFIG_GENERATION);
        assert!(
            generation >= self.last_generation,
            "ConfigGeneration went back"
        );
        self.last_generation = generation;
    }

    /// The legal initialization sequence of §3.1.1 / §4.2.3, with the given features and
    /// queue sizes (capped at each queue's maximum).
    fn init(&mut self, r: &mut Reader<'_>) {
        let mask = r.u64();
        let drop_version = r.rarely();
        let nq = self
            .dev
            .virtio()
            .lock()
            .expect("poisoned")
            .queue_max_sizes()
            .len();
        let shifts: Vec<u8> = (0..nq).map(|_| r.u8()).collect();
        let offered = self.dev.virtio().lock().expect("poisoned").avail_features();
        let mut acked = offered & (mask | VIRTIO_F_VERSION_1);
        if drop_version {
            acked &= !VIRTIO_F_VERSION_1;
        }
        self.wr(STATUS, 0);
        self.wr(STATUS, 1);
        self.wr(STATUS, 3);
        self.wr(0x024, 0);
        self.wr(0x020, (acked & 0xffff_ffff) as u32);
        self.wr(0x024, 1);
        self.wr(0x020, (acked >> 32) as u32);
        self.wr(STATUS, 0xb);
        self.tqs.clear();
        for (i, shift) in shifts.iter().enumerate().take(QUEUE_ADDR.len()) {
            self.wr(0x030, u32::try_from(i).unwrap_or(u32::MAX));
            let max = self.rd(0x034);
            let size = (1u32 << (shift % 9)).min(max.max(1));
            let size16 = u16::try_from(size).unwrap_or(1);
            let tq = TestQueue::new(self.mem, GuestAddress(QUEUE_ADDR[i]), size16);
            self.wr(0x038, size);
            for (reg, addr) in [
                (0x080, tq.desc_table_addr().0),
                (0x090, tq.avail_addr().0),
                (0x0a0, tq.used_addr().0),
            ] {
                self.wr(reg, (addr & 0xffff_ffff) as u32);
                self.wr(reg + 4, (addr >> 32) as u32);
            }
            self.wr(0x044, 1);
            self.tqs.push(tq);
        }
        self.wr(STATUS, 0xf);
    }

    /// Puts one valid request in the device's queues and runs them.
    fn process(&mut self) {
        match &self.dev {
            Dev::Dummy(_) => {}
            Dev::Blk(blk) => {
                if let Some(tq) = self.tqs.first() {
                    let _ = self.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR_ADDR));
                    let _ = self.mem.write_obj(1u64, GuestAddress(HDR_ADDR + 8));
                    tq.add_chain(&[
                        (HDR_ADDR, 16, false),
                        (layout::DATA_START, 512, true),
                        (STATUS_ADDR, 1, true),
                    ]);
                }
                let mut b = blk.lock().expect("poisoned");
                if b.process_queue() {
                    b.signal_used_queue();
                }
            }
            Dev::Net(net, lo) => {
                if let (Some(rx), Some(tx)) = (self.tqs.first(), self.tqs.get(1)) {
                    rx.add_chain(&[(layout::DATA_START, 2048, true)]);
                    tx.add_chain(&[(layout::DATA_START + 0x1000, 60, false)]);
                }
                lo.inject(&[0xab; 60]);
                let mut n = net.lock().expect("poisoned");
                let _ = n.process_tx();
                let _ = n.process_rx();
            }
        }
    }

    fn value(&mut self, r: &mut Reader<'_>) -> u32 {
        match r.u8() % 6 {
            0 => r.u32(),
            1 => STATUS_VALUES[usize::from(r.u8()) % STATUS_VALUES.len()],
            2 => 1u32 << (r.u8() % 10),
            3 => u32::from(r.u16()) * 16,
            4 => {
                let f = self.dev.virtio().lock().expect("poisoned").avail_features();
                if r.bool() {
                    (f >> 32) as u32
                } else {
                    (f & 0xffff_ffff) as u32
                }
            }
            _ => u32::from(r.u8()),
        }
    }

    fn offset(r: &mut Reader<'_>) -> u64 {
        let sel = r.u8();
        match REGS.get(usize::from(sel)) {
            Some(off) => *off,
            None => u64::from(r.u16() % 0x1000),
        }
    }

    fn width(r: &mut Reader<'_>) -> usize {
        if r.rarely() {
            usize::from(r.u8() % 9)
        } else {
            4
        }
    }
}

/// Runs one input; `None` rejects it.
pub fn run(data: &[u8]) -> Option<Report> {
    let mut r = Reader::new(data);
    let mem = layout::guest_mem();
    let dev = match r.u8() % 3 {
        0 => {
            let nq = 1 + usize::from(r.u8() % 3);
            let sizes: Vec<u16> = (0..nq).map(|_| 1u16 << (r.u8() % 9)).collect();
            let mut d = DummyDevice::new(r.u8().into(), &sizes);
            d.avail_features = r.u64() | VIRTIO_F_VERSION_1;
            Dev::Dummy(Arc::new(Mutex::new(d)))
        }
        1 => {
            let disk = MemDisk::new(64 * 512);
            let blk = VirtioBlock::with_backend("fuzz", r.bool(), Some(Box::new(disk))).ok()?;
            Dev::Blk(Arc::new(Mutex::new(blk)))
        }
        _ => {
            let lo = LoopbackNet::new(4, r.bool());
            let h = lo.handle();
            let net = VirtioNet::new(NetConfig::default(), Box::new(lo)).ok()?;
            Dev::Net(Arc::new(Mutex::new(net)), h)
        }
    };
    let irq = Arc::new(RecordingInterrupt::new());
    let t = MmioTransport::new(mem.clone(), dev.virtio(), irq);
    let mut h = Harness {
        mem: &mem,
        t,
        dev,
        tqs: Vec::new(),
        last_generation: 0,
        report: Report::default(),
    };
    h.check();
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 9 {
            0 | 1 => {
                let off = Harness::offset(&mut r);
                let width = Harness::width(&mut r);
                let v = h.value(&mut r);
                let bytes = v.to_le_bytes();
                let data: Vec<u8> = bytes.iter().copied().cycle().take(width).collect();
                h.t.write(off, &data);
            }
            2 => {
                let off = Harness::offset(&mut r);
                let width = Harness::width(&mut r);
                let mut data = vec![0u8; width];
                h.t.read(off, &mut data);
            }
            3 => {
                let off = 0x100 + u64::from(r.u8());
                let width = if r.rarely() {
                    usize::from(r.u8() % 16)
                } else {
                    1 << (r.u8() % 4)
                };
                let mut data = vec![0u8; width];
                if r.bool() {
                    h.t.read(off, &mut data);
                } else {
                    data.fill(r.u8());
                    h.t.write(off, &data);
                }
            }
            4 => h.init(&mut r),
            5 => h.process(),
            6 => {
                let q = u32::from(r.u8() % 4);
                h.wr(0x050, q);
            }
            7 => match &h.dev {
                Dev::Dummy(d) => {
                    let mut d = d.lock().expect("poisoned");
                    match r.u8() % 3 {
                        0 => d.fail_activate = !d.fail_activate,
                        1 => d.fail_reset = !d.fail_reset,
                        _ => d.needs_reset = !d.needs_reset,
                    }
                }
                Dev::Blk(b) => {
                    let mut b = b.lock().expect("poisoned");
                    if r.bool() {
                        let _ = b.attach(Box::new(MemDisk::new(usize::from(r.u8()) * 512)), false);
                    } else {
                        b.detach();
                    }
                }
                Dev::Net(n, _) => {
                    let up = r.bool();
                    n.lock().expect("poisoned").set_link_up(up);
                }
            },
            _ => {
                // Acknowledge interrupts, as the guest's handler does.
                let st = h.rd(0x060);
                h.wr(0x064, st);
            }
        }
        h.check();
    }
    Some(h.report)
}

/// Seed builder: the device choice (0 dummy with one 16-entry queue, 1 block, 2 net).
pub fn write_setup(w: &mut Writer, kind: u8) {
    w.u8(kind);
    match kind {
        0 => {
            w.u8(0).u8(4).u8(42).u64(0);
        }
        _ => {
            w.bool(false);
        }
    }
}

/// Seed builder: the init macro accepting every offered feature, queues of 16 entries.
pub fn write_init(w: &mut Writer, queues: usize) {
    w.u8(4).u64(u64::MAX).rarely(false);
    for _ in 0..queues {
        w.u8(4);
    }
}

/// Seed builder: one register write of `value` picked raw.
pub fn write_reg(w: &mut Writer, reg_index: u8, value: u32) {
    w.u8(0).u8(reg_index).rarely(false).u8(0).u32(value);
}

/// Seed builder: process the device's queues.
pub fn write_process(w: &mut Writer) {
    w.u8(5);
}
