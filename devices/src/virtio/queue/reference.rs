// SPDX-License-Identifier: Apache-2.0
//! The reference the queue layer is checked against (feature `test-utils`): `virtio-queue`'s own
//! available-ring iterator and descriptor chain iterator, gathered into [`ChainBuffers`] with the
//! same checks as [`ChainBuffers::walk`].
//!
//! No device uses it. The differential unit tests and the `queue` fuzz target compare the
//! layer's [`RingPass`](super::RingPass) and [`ChainBuffers::walk`] with it, so the fast paths
//! keep the exact semantics of the crate the rest of the rust-vmm world relies on.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};

use super::chain::{ChainBuffers, ChainError, Gather};
use super::view::GuestView;
use crate::GuestMemoryMmap;

/// The next available chain as `virtio-queue`'s iterator yields it; an error means the driver
/// corrupted the available ring (or the queue is not ready).
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    let mut iter = queue.iter(mem)?;
    Ok(iter.next())
}

impl ChainBuffers {
    /// Gathers `chain` (consuming its descriptors). Fails on more than `max_descs` descriptors or
    /// on a readable descriptor after a writable one; segments outside guest memory are recorded
    /// and reported by [`ChainBuffers::check_in_memory`].
    ///
    /// The descriptor iterator of `virtio-queue` ends the chain on a broken `next` index, on a
    /// descriptor it cannot read, on loops (its TTL is the table size) and when the chain would
    /// exceed 4 GiB; such a chain arrives here shortened.
    pub fn collect(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        max_descs: usize,
    ) -> Result<Self, ChainError> {
        let view = GuestView::new(mem);
        let mut bufs = ChainBuffers::default();
        let mut g = Gather::new(&view, &mut bufs, max_descs);
        for desc in chain {
            g.push(desc.addr(), desc.len(), desc.is_write_only())?;
        }
        Ok(bufs)
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};

    const MEM: usize = 0x10_0000;

    #[test]
    fn pop_reports_corrupt_avail_index() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        let mut queue = q.queue();
        assert!(next_chain(&mut queue, &m).unwrap().is_none());
        q.set_avail_idx(17);
        next_chain(&mut queue, &m).unwrap_err();
        queue.set_ready(false);
        next_chain(&mut queue, &m).unwrap_err();
    }
}
