// SPDX-License-Identifier: Apache-2.0
//! The `virtio_net_tx` target: a [`VirtioNet`] over the loopback backend, driven by a script of
//! guest TX frames, RX buffers, frames arriving from the host, ring corruption, resets and
//! link changes. Frames the guest sends come back on RX through the loopback.

use std::sync::Arc;

use devices::GuestMemoryMmap;
use devices::test_utils::{LoopbackHandle, LoopbackNet, RecordingInterrupt, TestQueue};
use devices::virtio::VirtioDevice;
use devices::virtio::net::{NetConfig, VirtioNet};
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Reader, Writer};
use crate::layout::{self, Desc, QUEUE_ADDR};

/// Loopback capacity bounds: the test checks it is never exceeded.
const MAX_LOOPBACK: usize = 8;
/// Operations per input.
const MAX_OPS: usize = 128;

/// What a run did, for the seed tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// The device ended in `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
}

struct Harness<'m> {
    mem: &'m GuestMemoryMmap,
    rxq: TestQueue<'m>,
    txq: TestQueue<'m>,
    sizes: [u16; 2],
    net: VirtioNet,
    lo: LoopbackHandle,
    capacity: usize,
    acked: u64,
}

impl<'m> Harness<'m> {
    fn activate(&mut self) {
        self.rxq = TestQueue::new(self.mem, GuestAddress(QUEUE_ADDR[0]), self.sizes[0]);
        self.txq = TestQueue::new(self.mem, GuestAddress(QUEUE_ADDR[1]), self.sizes[1]);
        self.net.set_acked_features(self.acked);
        let irq = Arc::new(RecordingInterrupt::new());
        self.net
            .activate(
                self.mem.clone(),
                vec![self.rxq.queue(), self.txq.queue()],
                irq,
            )
            .expect("activation with valid queues cannot fail");
    }

    fn check(&self) {
        assert!(
            self.lo.queued().len() <= self.capacity,
            "loopback grew past its bound"
        );
    }

    fn add_tx(&mut self, r: &mut Reader<'_>) {
        let flags = r.u8();
        let gso = r.u8();
        let fields = [r.u16(), r.u16(), r.u16()];
        let ndescs = 1 + r.u8() % layout::MAX_DESCS;
        let indirect = r.u8().is_multiple_of(4);
        let mut descs: Vec<Desc> = (0..ndescs).map(|_| layout::desc(r, false)).collect();
        if let Some(first) = descs.first_mut() {
            if !r.rarely() {
                first.len = first.len.max(12);
            }
            // The virtio-net header: flags, gso_type, hdr_len, gso_size, csum_start, ...
            let _ = self.mem.write_obj(flags, GuestAddress(first.addr));
            let _ = self
                .mem
                .write_obj(gso, GuestAddress(first.addr.wrapping_add(1)));
            for (i, f) in (0u64..).zip(fields) {
                let _ = self
                    .mem
                    .write_obj(f, GuestAddress(first.addr.wrapping_add(2 + 2 * i)));
            }
        }
        layout::push_chain(&self.txq, self.mem, &descs, indirect);
    }

    fn add_rx(&mut self, r: &mut Reader<'_>) {
        let ndescs = 1 + r.u8() % 3;
        let indirect = r.u8().is_multiple_of(4);
        let descs: Vec<Desc> = (0..ndescs).map(|_| layout::desc(r, true)).collect();
        layout::push_chain(&self.rxq, self.mem, &descs, indirect);
    }
}

/// Runs one input; `None` rejects it.
pub fn run(data: &[u8]) -> Option<Report> {
    let mut r = Reader::new(data);
    let vnet = r.bool();
    let ack_mask = r.u64();
    let capacity = 1 + usize::from(r.u8()) % MAX_LOOPBACK;
    let sizes = [layout::queue_size(&mut r), layout::queue_size(&mut r)];
    if sizes
        .iter()
        .any(|s| *s == 0 || !s.is_power_of_two() || *s > 256)
    {
        return None;
    }
    let lo = LoopbackNet::new(capacity, vnet);
    let handle = lo.handle();
    let net = VirtioNet::new(
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: Some(1500),
        },
        Box::new(lo),
    )
    .ok()?;
    let acked = (net.avail_features() & ack_mask) | devices::virtio::VIRTIO_F_VERSION_1;
    let mem = layout::guest_mem();
    let mut h = Harness {
        mem: &mem,
        rxq: TestQueue::new(&mem, GuestAddress(QUEUE_ADDR[0]), sizes[0]),
        txq: TestQueue::new(&mem, GuestAddress(QUEUE_ADDR[1]), sizes[1]),
        sizes,
        net,
        lo: handle,
        capacity,
        acked,
    };
    h.activate();

    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 10 {
            0 | 1 => h.add_tx(&mut r),
            2 => h.add_rx(&mut r),
            3 => {
                let len = if r.rarely() {
                    usize::from(r.u16()) + 0x1_0000
                } else {
                    usize::from(r.u16() % 2000)
                };
                let fill = r.u8();
                h.lo.inject(&vec![fill; len]);
            }
            4 => {
                let _ = h.net.process_tx();
            }
            5 => {
                let _ = h.net.process_rx();
            }
            6 => {
                if r.rarely() {
                    let idx = r.u16();
                    if r.bool() {
                        h.rxq.set_avail_idx(idx);
                    } else {
                        h.txq.set_avail_idx(idx);
                    }
                }
            }
            7 => {
                h.net.reset().expect("net reset cannot fail");
                assert!(!h.net.is_activated() && !h.net.needs_reset());
                h.activate();
            }
            8 => {
                let up = r.bool();
                h.net.set_link_up(up);
            }
            _ => {
                let q = if r.bool() { &h.rxq } else { &h.txq };
                let index = r.u16();
                let (addr, len, flags, next) = (r.u64(), r.u32(), r.u16(), r.u16());
                q.write_desc(index, addr, len, flags, next);
                if r.bool() {
                    q.push_avail(index);
                }
            }
        }
        h.check();
    }
    let _ = h.net.process_tx();
    let _ = h.net.process_rx();
    h.check();
    let m = h.net.metrics();
    Some(Report {
        tx_frames: m.tx_frames,
        rx_frames: m.rx_frames,
        needs_reset: h.net.needs_reset(),
    })
}

/// Seed builder: the setup fields.
pub fn write_setup(w: &mut Writer, vnet: bool, ack_mask: u64, capacity: u8) {
    w.bool(vnet).u64(ack_mask).u8(capacity);
    layout::write_queue_size(w, 4);
    layout::write_queue_size(w, 4);
}

/// Seed builder: a TX chain of one buffer of `len` bytes at `addr`.
pub fn write_tx(w: &mut Writer, addr: u64, len: u16) {
    w.u8(0).u8(0).u8(0).u16(0).u16(0).u16(0);
    w.u8(0).u8(1); // one descriptor, not indirect
    layout::write_desc(w, addr, |w| layout::write_len(w, len));
    w.rarely(false);
}

/// Seed builder: an RX chain of one buffer of `len` bytes at `addr`.
pub fn write_rx(w: &mut Writer, addr: u64, len: u16) {
    w.u8(2).u8(0).u8(1);
    layout::write_desc(w, addr, |w| layout::write_len(w, len));
}

/// Seed builder: a frame of `len` bytes arriving from the host.
pub fn write_inject(w: &mut Writer, len: u16, fill: u8) {
    w.u8(3).rarely(false).u16(len).u8(fill);
}

/// Seed builder: process TX then RX.
pub fn write_process(w: &mut Writer) {
    w.u8(4).u8(5);
}
