// SPDX-License-Identifier: Apache-2.0
//! The `queue` target: arbitrary descriptor tables, available rings and indirect tables, walked
//! by the devices' queue layer (`devices::virtio::queue`) and its parsers (block request
//! parsing, net TX gathering and RX scattering), differentially against `virtio-queue`'s own
//! iterators (the layer's `reference`): every pop of the layer's `RingPass` must return the head
//! the available-ring iterator returns, and every chain the layer's walk gathers must equal
//! what the descriptor chain iterator yields.

use devices::test_utils::TestQueue;
use devices::virtio::block::Request;
use devices::virtio::net::packet::{RxChains, RxOutcome, TxError, deliver_rx_frame, read_tx_frame};
use devices::virtio::queue::reference::next_chain;
use devices::virtio::queue::{ChainBuffers, ChainError, GuestView, RingPass};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::input::{Reader, Writer};
use crate::layout::{self, QUEUE_ADDR};

/// Chains walked per input.
const MAX_CHAINS: usize = 64;
/// Descriptor flags the generator picks from: none, NEXT, WRITE, NEXT|WRITE, INDIRECT.
const FLAGS: [u16; 5] = [0, 1, 2, 3, 4];

/// What a run did, for the seed tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Chains gathered successfully.
    pub chains: usize,
    /// Block requests parsed successfully.
    pub requests: usize,
    /// RX frames delivered.
    pub delivered: usize,
}

/// What a gathered chain amounts to, for comparing the two gatherers.
fn summary(r: &Result<ChainBuffers, ChainError>) -> String {
    match r {
        Ok(b) => format!(
            "ok {:?} {:?} {} {} {:?}",
            b.readable(),
            b.writable(),
            b.readable_len(),
            b.writable_len(),
            b.check_in_memory().map_err(|e| e.to_string())
        ),
        Err(e) => format!("err {e:?}"),
    }
}

/// Runs one input; `None` rejects it.
pub fn run(data: &[u8]) -> Option<Report> {
    let mut r = Reader::new(data);
    let size = layout::queue_size(&mut r);
    if size == 0 || !size.is_power_of_two() || size > 256 {
        return None;
    }
    let event_idx = r.bool();
    let mem = layout::guest_mem();
    let tq = TestQueue::new(&mem, GuestAddress(QUEUE_ADDR[0]), size);

    // Descriptor table.
    let ndesc = r.u8();
    for _ in 0..ndesc {
        let index = if r.rarely() { r.u16() } else { r.u16() % size };
        let addr = layout::addr(&mut r);
        let len = layout::len(&mut r);
        let flags = if r.rarely() {
            r.u16()
        } else {
            FLAGS[usize::from(r.u8()) % FLAGS.len()]
        };
        let next = if r.rarely() { r.u16() } else { r.u16() % size };
        tq.write_desc(index, addr, len, flags, next);
    }
    // Raw bytes in the data area (indirect tables, headers).
    let nblobs = r.u8() % 8;
    for _ in 0..nblobs {
        let at = layout::addr(&mut r);
        let blob = r.bytes(512);
        let _ = mem.write_slice(&blob, GuestAddress(at));
    }
    // Available ring.
    let navail = r.u8();
    for _ in 0..navail {
        let head = if r.rarely() { r.u16() } else { r.u16() % size };
        tq.push_avail(head);
    }
    if r.rarely() {
        tq.set_avail_idx(r.u16());
    }

    let mut queue = tq.queue();
    queue.set_event_idx(event_idx);
    // The reference queue: virtio-queue's iterator on the same rings, kept in step.
    let mut reference = tq.queue();
    reference.set_event_idx(event_idx);
    let mut report = Report::default();
    let mut tx_buf = vec![0u8; 4096];
    let frame: Vec<u8> = (0..usize::from(r.u16() % 3000).max(12))
        .map(|i| i.to_le_bytes()[0])
        .collect();
    let mergeable = r.bool();
    let mut rx_chains = RxChains::default();
    let mut bufs = ChainBuffers::default();
    for _ in 0..MAX_CHAINS {
        let max_descs = 1 + usize::from(r.u8());
        reference.set_next_avail(queue.next_avail());
        let Ok(mut ring) = RingPass::new(&mut queue, GuestView::new(&mem)) else {
            break;
        };
        match r.u8() % 4 {
            0..=2 => {
                let expected = next_chain(&mut reference, &mem);
                match (ring.pop(), expected) {
                    (Ok(Some(head)), Ok(Some(chain))) => {
                        assert_eq!(head, chain.head_index());
                        match r.u8() % 3 {
                            0 => {
                                // The layer's walk of the table must gather exactly what
                                // virtio-queue's iterator yields (or fail the same way).
                                let walked = ring.chain_into(head, max_descs, &mut bufs);
                                let walked = walked.map(|()| bufs.clone());
                                let collected = ChainBuffers::collect(chain, &mem, max_descs);
                                assert_eq!(summary(&walked), summary(&collected));
                                if let Ok(bufs) = walked {
                                    report.chains += 1;
                                    let total = u64::from(bufs.readable_len())
                                        + u64::from(bufs.writable_len());
                                    assert!(total <= u64::from(u32::MAX));
                                    // Reading past the end must fail, not panic.
                                    let mut b = [0u8; 8];
                                    let past = u64::from(bufs.readable_len());
                                    assert!(bufs.read_at(&mem, past, &mut b).is_err());
                                }
                            }
                            1 => {
                                if let Ok(req) = Request::parse(&ring, head, max_descs) {
                                    report.requests += 1;
                                    assert!(req.buffers().readable_len() >= 16);
                                    assert!(req.buffers().writable_len() >= 1);
                                }
                            }
                            _ => {
                                let read = ring
                                    .chain_into(head, max_descs, &mut bufs)
                                    .map_err(TxError::Chain)
                                    .and_then(|()| read_tx_frame(&bufs, ring.view(), &mut tx_buf));
                                if let Ok(n) = read {
                                    assert!((12..=tx_buf.len()).contains(&n));
                                }
                            }
                        }
                    }
                    (Ok(None), Ok(None)) => break,
                    // An available entry that cannot be read: the pass reports it, the
                    // iterator ends there (the one documented difference).
                    (Err(virtio_queue::Error::GuestMemory(_)), Ok(None)) => break,
                    (Err(a), Err(b)) => {
                        assert_eq!(a.to_string(), b.to_string());
                        break;
                    }
                    (pass, reference) => {
                        panic!("the pass popped {pass:?}, virtio-queue {reference:?}")
                    }
                }
            }
            _ => {
                let before = tq.used_idx();
                let outcome = deliver_rx_frame(&mut ring, &mut rx_chains, &frame, mergeable);
                if ring.publish().is_err() {
                    break;
                }
                match outcome {
                    Ok(RxOutcome::Delivered(n)) => {
                        report.delivered += 1;
                        assert_eq!(tq.used_idx(), before.wrapping_add(n));
                        assert!(mergeable || n == 1);
                    }
                    Ok(RxOutcome::NoBuffers) | Ok(RxOutcome::TooLarge) => {
                        assert_eq!(tq.used_idx(), before);
                    }
                    Ok(RxOutcome::BadChain) => {}
                    Err(_) => break,
                }
            }
        }
        drop(ring);
        if r.is_empty() {
            break;
        }
    }
    Some(report)
}

/// Seed builder: a queue of 16 entries holding the given chains (each a list of
/// `(addr, len, write)`) back to back.
pub fn write_chains(w: &mut Writer, chains: &[&[(u64, u16, bool)]], frame_len: u16, ops: &[u8]) {
    layout::write_queue_size(w, 4);
    w.bool(false);
    let total: usize = chains.iter().map(|c| c.len()).sum();
    w.u8(u8::try_from(total).expect("few descriptors"));
    let mut index = 0u16;
    let mut heads = Vec::new();
    for chain in chains {
        heads.push(index);
        for (i, (addr, len, write)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = u8::from(!last) | (u8::from(*write) << 1);
            w.rarely(false).u16(index);
            layout::write_desc_fields(w, *addr, *len);
            w.rarely(false).u8(flags);
            w.rarely(false).u16(index + 1);
            index += 1;
        }
    }
    w.u8(0); // no blobs
    w.u8(u8::try_from(heads.len()).expect("few chains"));
    for h in heads {
        w.rarely(false).u16(h);
    }
    w.rarely(false);
    w.u16(frame_len).bool(true);
    // `ops`: 0 gather, 1 parse a block request, 2 gather a TX frame, 3 deliver an RX frame.
    for op in ops {
        w.u8(63); // max_descs = 64
        match op {
            0..=2 => w.u8(0).u8(*op),
            _ => w.u8(3),
        };
    }
}
