// SPDX-License-Identifier: Apache-2.0
//! Frame handling over virtio-net queues (virtio 1.2 §5.1.6): pure functions of a queue pass, a
//! gathered chain and a byte buffer, with no backend and no event loop.
//!
//! - TX (§5.1.6.2): a chain is a device-readable `virtio_net_hdr_v1` followed by the frame, in
//!   any framing. [`read_tx_frame`] copies a gathered chain into a bounded buffer.
//! - RX (§5.1.6.3, §5.1.6.4): [`deliver_rx_frame`] scatters one header+frame into one chain, or
//!   with `VIRTIO_NET_F_MRG_RXBUF` into as many chains as needed, and sets `num_buffers`. If the
//!   guest has not posted enough buffers nothing is used and the chains go back to the
//!   available ring, so the frame can be retried later.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::defs::{NET_HDR_LEN, NUM_BUFFERS_OFFSET};
use crate::virtio::queue::{ChainBuffers, ChainError, GuestView, RingPass};

/// [`NET_HDR_LEN`] as a `u32`.
const NET_HDR_LEN_U32: u32 = 12;
const _: () = assert!(NET_HDR_LEN_U32 as usize == NET_HDR_LEN);

/// Why a TX chain carries no frame.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The chain is unusable.
    #[error("Invalid descriptor chain")]
    Chain(#[source] ChainError),
    /// TX buffers must all be device-readable (§5.1.6.2).
    #[error("TX chain has device-writable descriptors")]
    WritableDescriptor,
    /// Shorter than the virtio-net header.
    #[error("TX chain of {0} bytes is shorter than the header")]
    TooShort(u32),
    /// Longer than the device's frame buffer.
    #[error("TX chain of {0} bytes is larger than the frame buffer")]
    TooLong(u32),
}

/// Copies the header and frame of a gathered TX chain into `buf` and returns their total
/// length.
pub fn read_tx_frame(
    chain: &ChainBuffers,
    view: &GuestView<'_>,
    buf: &mut [u8],
) -> Result<usize, TxError> {
    chain.check_in_memory().map_err(TxError::Chain)?;
    if chain.writable_len() != 0 {
        return Err(TxError::WritableDescriptor);
    }
    let len = chain.readable_len();
    let ulen = usize::try_from(len).map_err(|_| TxError::TooLong(len))?;
    if ulen < NET_HDR_LEN {
        return Err(TxError::TooShort(len));
    }
    let dst = buf.get_mut(..ulen).ok_or(TxError::TooLong(len))?;
    chain.read_at_in(view, 0, dst).map_err(TxError::Chain)?;
    Ok(ulen)
}

/// What happened to an RX frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written and used in this many chains.
    Delivered(u16),
    /// Not enough buffers posted yet; nothing was used, retry after the next RX notification.
    NoBuffers,
    /// Dropped: it can never fit (no merging and a buffer too small, or larger than the whole
    /// ring). The chains were given back to the available ring.
    TooLarge,
    /// Dropped because the guest posted a broken chain; the chains involved were used with
    /// length 0, so the driver gets them back (and recycles them).
    BadChain,
}

/// The chains one RX frame takes, kept by the device between frames so that delivering a
/// frame allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct RxChains {
    /// Head and bytes written of every chain popped for the frame so far.
    used: Vec<(u16, u32)>,
    /// The first chain: `num_buffers` lives in its header.
    first: ChainBuffers,
    /// The chain being filled after the first.
    next: ChainBuffers,
}

/// Writes `frame` (a 12-byte `virtio_net_hdr_v1` followed by the packet) into the RX queue of
/// `ring`. The used elements are written; publishing them is the caller's
/// ([`RingPass::publish`]).
///
/// Errors are queue corruption (the device then needs a reset).
pub fn deliver_rx_frame(
    ring: &mut RingPass<'_, '_>,
    chains: &mut RxChains,
    frame: &[u8],
    mergeable: bool,
) -> Result<RxOutcome, virtio_queue::Error> {
    let frame_len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    let size = usize::from(ring.queue_size());
    let view = *ring.view();
    chains.used.clear();
    let mut offset = 0u32;
    let mut outcome = None;
    while offset < frame_len || chains.used.is_empty() {
        if !mergeable && !chains.used.is_empty() {
            break;
        }
        if chains.used.len() >= size {
            outcome = Some(RxOutcome::TooLarge);
            break;
        }
        let Some(head) = ring.pop()? else {
            outcome = Some(RxOutcome::NoBuffers);
            break;
        };
        let first = chains.used.is_empty();
        let bufs = if first {
            &mut chains.first
        } else {
            &mut chains.next
        };
        let usable = ring.chain_into(head, size, bufs).is_ok()
            && bufs.readable_len() == 0
            && bufs.writable_len() != 0
            && bufs.check_in_memory().is_ok();
        if !usable {
            chains.used.push((head, 0));
            outcome = Some(RxOutcome::BadChain);
            break;
        }
        let room = bufs.writable_len();
        // The header must fit in the first buffer (§5.1.6.3.1 for mergeable buffers; without
        // merging the whole frame must fit).
        let first_min = if mergeable {
            NET_HDR_LEN_U32
        } else {
            frame_len
        };
        if first && room < first_min {
            chains.used.push((head, 0));
            outcome = Some(if mergeable {
                RxOutcome::BadChain
            } else {
                RxOutcome::TooLarge
            });
            break;
        }
        let n = room.min(frame_len.saturating_sub(offset));
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = usize::try_from(offset.saturating_add(n)).unwrap_or(usize::MAX);
        let written = frame
            .get(start..end)
            .is_some_and(|piece| bufs.write_at_in(&view, 0, piece).is_ok());
        if !written {
            chains.used.push((head, 0));
            outcome = Some(RxOutcome::BadChain);
            break;
        }
        offset = offset.saturating_add(n);
        chains.used.push((head, n));
    }

    match outcome {
        Some(RxOutcome::NoBuffers) | Some(RxOutcome::TooLarge) => {
            // Hand every chain back untouched (from the driver's point of view).
            for _ in 0..chains.used.len() {
                ring.undo_pop();
            }
            Ok(outcome.unwrap_or(RxOutcome::NoBuffers))
        }
        Some(RxOutcome::BadChain) => {
            for &(head, _) in &chains.used {
                ring.add_used(head, 0)?;
            }
            Ok(RxOutcome::BadChain)
        }
        _ => {
            let count = u16::try_from(chains.used.len()).unwrap_or(u16::MAX);
            // num_buffers (§5.1.6.4): the number of chains this frame used.
            if chains
                .first
                .write_at_in(&view, NUM_BUFFERS_OFFSET, &count.to_le_bytes())
                .is_err()
            {
                for &(head, _) in &chains.used {
                    ring.add_used(head, 0)?;
                }
                return Ok(RxOutcome::BadChain);
            }
            for &(head, len) in &chains.used {
                ring.add_used(head, len)?;
            }
            Ok(RxOutcome::Delivered(count))
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]
mod tests {
    use crate::GuestMemoryMmap;
    use proptest::prelude::*;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};

    const W: bool = true;
    const R: bool = false;
    const BUF: u64 = 0x10_0000;

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f[..NET_HDR_LEN].fill(0);
        f
    }

    fn tx(
        m: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        buf_len: usize,
    ) -> Result<usize, TxError> {
        let q = TestQueue::new(m, GuestAddress(0), 16);
        q.add_chain(descs);
        let mut queue = q.queue();
        let mut ring = RingPass::new(&mut queue, GuestView::new(m)).unwrap();
        let head = ring.pop().unwrap().unwrap();
        let mut chain = ChainBuffers::default();
        ring.chain_into(head, 16, &mut chain)
            .map_err(TxError::Chain)?;
        let mut buf = vec![0u8; buf_len];
        read_tx_frame(&chain, ring.view(), &mut buf)
    }

    #[test]
    fn tx_gathers_any_framing() {
        let m = single_region_mem(0x40_0000);
        let f = frame(100);
        m.write_slice(&f, GuestAddress(BUF)).unwrap();
        assert_eq!(tx(&m, &[(BUF, 100, R)], 1000).unwrap(), 100);
        assert_eq!(
            tx(&m, &[(BUF, 12, R), (BUF + 12, 88, R)], 1000).unwrap(),
            100
        );
        assert_eq!(tx(&m, &[(BUF, 5, R), (BUF + 5, 95, R)], 1000).unwrap(), 100);
    }

    #[test]
    fn tx_rejects_malformed() {
        let m = single_region_mem(0x40_0000);
        assert!(matches!(
            tx(&m, &[(BUF, 11, R)], 1000),
            Err(TxError::TooShort(11))
        ));
        assert!(matches!(
            tx(&m, &[(BUF, 1001, R)], 1000),
            Err(TxError::TooLong(1001))
        ));
        assert!(matches!(
            tx(&m, &[(BUF, 100, R), (BUF, 1, W)], 1000),
            Err(TxError::WritableDescriptor)
        ));
        assert!(matches!(
            tx(&m, &[(0x3f_fff0, 100, R)], 1000),
            Err(TxError::Chain(ChainError::OutOfRange { .. }))
        ));
        assert!(matches!(
            tx(&m, &[(BUF, 12, R), (BUF, 12, R), (BUF, 12, R)], 1000).map(|_| ()),
            Ok(())
        ));
    }

    struct Rx<'a> {
        q: TestQueue<'a>,
        queue: Queue,
    }

    fn rx_env(m: &GuestMemoryMmap) -> Rx<'_> {
        let q = TestQueue::new(m, GuestAddress(0), 16);
        let queue = q.queue();
        Rx { q, queue }
    }

    /// [`deliver_rx_frame`] in a pass of its own, published.
    fn deliver(
        queue: &mut Queue,
        m: &GuestMemoryMmap,
        frame: &[u8],
        mergeable: bool,
    ) -> Result<RxOutcome, virtio_queue::Error> {
        let mut ring = RingPass::new(queue, GuestView::new(m))?;
        let outcome = deliver_rx_frame(&mut ring, &mut RxChains::default(), frame, mergeable)?;
        ring.publish()?;
        Ok(outcome)
    }

    #[test]
    fn rx_single_buffer() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        rx.q.add_chain(&[(BUF, 2048, W)]);
        let f = frame(1000);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, false).unwrap(),
            RxOutcome::Delivered(1)
        );
        assert_eq!(rx.q.used_elem(0), (0, 1000));
        let mut got = vec![0u8; 1000];
        m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(BUF + 10)).unwrap(), 1);
        got[10..12].fill(0);
        assert_eq!(got, f);
    }

    #[test]
    fn rx_no_buffers_then_retry() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        let f = frame(100);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, false).unwrap(),
            RxOutcome::NoBuffers
        );
        rx.q.add_chain(&[(BUF, 2048, W)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, false).unwrap(),
            RxOutcome::Delivered(1)
        );
    }

    #[test]
    fn rx_too_small_without_merge_is_dropped_and_buffer_kept() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        rx.q.add_chain(&[(BUF, 100, W)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(200), false).unwrap(),
            RxOutcome::TooLarge
        );
        assert_eq!(rx.q.used_idx(), 0);
        // The buffer is still there for a frame that fits.
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(80), false).unwrap(),
            RxOutcome::Delivered(1)
        );
    }

    #[test]
    fn rx_mergeable_spans_chains() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        for i in 0..4 {
            rx.q.add_chain(&[(BUF + i * 0x1000, 100, W)]);
        }
        let f = frame(250);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, true).unwrap(),
            RxOutcome::Delivered(3)
        );
        assert_eq!(rx.q.used_idx(), 3);
        assert_eq!(rx.q.used_elem(0).1, 100);
        assert_eq!(rx.q.used_elem(1).1, 100);
        assert_eq!(rx.q.used_elem(2).1, 50);
        assert_eq!(m.read_obj::<u16>(GuestAddress(BUF + 10)).unwrap(), 3);
        let mut tail = [0u8; 50];
        m.read_slice(&mut tail, GuestAddress(BUF + 0x2000)).unwrap();
        assert_eq!(&tail[..], &f[200..]);
    }

    #[test]
    fn rx_mergeable_waits_for_enough_buffers() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        rx.q.add_chain(&[(BUF, 100, W)]);
        let f = frame(150);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, true).unwrap(),
            RxOutcome::NoBuffers
        );
        assert_eq!(rx.q.used_idx(), 0);
        rx.q.add_chain(&[(BUF + 0x1000, 100, W)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &f, true).unwrap(),
            RxOutcome::Delivered(2)
        );
    }

    #[test]
    fn rx_mergeable_larger_than_ring_is_dropped() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        for i in 0..16 {
            rx.q.add_chain(&[(BUF + i * 0x100, 16, W)]);
        }
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(1000), true).unwrap(),
            RxOutcome::TooLarge
        );
        assert_eq!(rx.q.used_idx(), 0);
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(40), true).unwrap(),
            RxOutcome::Delivered(3)
        );
    }

    #[test]
    fn rx_bad_chains_are_returned_empty() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        // Device-readable RX buffer.
        rx.q.add_chain(&[(BUF, 100, R)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(50), false).unwrap(),
            RxOutcome::BadChain
        );
        assert_eq!(rx.q.used_elem(0), (0, 0));
        // Outside guest memory.
        rx.q.add_chain(&[(0x3f_fff0, 100, W)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(50), true).unwrap(),
            RxOutcome::BadChain
        );
        // Mergeable first buffer smaller than the header.
        rx.q.add_chain(&[(BUF, 8, W)]);
        assert_eq!(
            deliver(&mut rx.queue, &m, &frame(50), true).unwrap(),
            RxOutcome::BadChain
        );
        assert_eq!(rx.q.used_idx(), 3);
    }

    #[test]
    fn rx_corrupt_ring_is_an_error() {
        let m = single_region_mem(0x40_0000);
        let mut rx = rx_env(&m);
        rx.q.set_avail_idx(100);
        deliver(&mut rx.queue, &m, &frame(50), true).unwrap_err();
    }

    proptest! {
        /// Whatever buffers the guest posts, a frame is either delivered intact across the
        /// chains it reports, or nothing is published.
        #[test]
        fn rx_delivers_intact_or_nothing(
            sizes in prop::collection::vec(1u32..600, 0..16),
            len in 12usize..3000,
            mergeable in any::<bool>(),
        ) {
            let m = single_region_mem(0x40_0000);
            let mut rx = rx_env(&m);
            for (i, s) in sizes.iter().enumerate() {
                rx.q.add_chain(&[(BUF + i as u64 * 0x1000, *s, W)]);
            }
            let f = frame(len);
            match deliver(&mut rx.queue, &m, &f, mergeable).unwrap() {
                RxOutcome::Delivered(n) => {
                    prop_assert_eq!(rx.q.used_idx(), n);
                    let mut got = Vec::new();
                    for i in 0..n {
                        let (id, l) = rx.q.used_elem(i);
                        let mut part = vec![0u8; l as usize];
                        m.read_slice(&mut part, GuestAddress(BUF + u64::from(id) * 0x1000)).unwrap();
                        got.extend(part);
                    }
                    prop_assert_eq!(u16::from_le_bytes([got[10], got[11]]), n);
                    got[10..12].fill(0);
                    prop_assert_eq!(got, f);
                }
                RxOutcome::BadChain => prop_assert!(rx.q.used_idx() > 0),
                RxOutcome::NoBuffers | RxOutcome::TooLarge => prop_assert_eq!(rx.q.used_idx(), 0),
            }
        }
    }
}
