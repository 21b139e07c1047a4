// SPDX-License-Identifier: Apache-2.0
//! Event-manager glue for [`VirtioBlock`]: maps ready EventFds to core calls, nothing else.
//!
//! `init` registers the notify EventFd, if the slot has one. It is signalled by the driver's
//! notifications, by activation (on a vCPU thread) and by the device when it yields with
//! requests left; each time the queue is processed (a no-op while the device is not
//! activated). An empty slot has no notify EventFd ([`VirtioBlock::attach`] creates it): the
//! VMM calls `init` again once it has registered the new EventFd with KVM, and `init`
//! registers it then (once per device lifetime).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::VirtioBlock;
use crate::virtio::{VirtioDevice, guest_warn};

impl VirtioBlock {
    /// Event data of the notify EventFd.
    pub const PROCESS_NOTIFY: u32 = 0;

    fn register_notify_event(&mut self, ops: &mut EventOps) {
        if self.notify_registered {
            return;
        }
        let Some(evt) = self.notify_event() else {
            return;
        };
        match ops.add(Events::with_data(evt, Self::PROCESS_NOTIFY, EventSet::IN)) {
            Ok(()) => self.notify_registered = true,
            Err(e) => log::error!("virtio-blk: failed to register the notify event: {e}"),
        }
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn init(&mut self, ops: &mut EventOps) {
        self.register_notify_event(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            Self::PROCESS_NOTIFY => {
                self.base.drain_notify();
                self.run_queue();
            }
            other => guest_warn!("virtio-blk: unexpected event {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{MemDisk, RecordingInterrupt, TestQueue, single_region_mem};
    use crate::virtio::InterruptKind;
    use crate::virtio::block::defs::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

    #[test]
    fn event_loop_drives_activation_and_queue() {
        let m = single_region_mem(0x40_0000);
        let blk = Arc::new(Mutex::new(
            VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap(),
        ));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(blk.clone());
        assert!(blk.lock().unwrap().notify_registered);

        let q = TestQueue::new(&m, GuestAddress(0), 256);
        let irq = Arc::new(RecordingInterrupt::new());
        blk.lock()
            .unwrap()
            .activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        // Activation wakes the loop through the notify EventFd; nothing is queued yet.
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(irq.count(InterruptKind::Queue), 0);

        m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        m.write_obj(0u64, GuestAddress(0x10_0008)).unwrap();
        m.write_obj(0xffu8, GuestAddress(0x30_0000)).unwrap();
        q.add_chain(&[
            (0x10_0000, 16, false),
            (0x20_0000, 512, true),
            (0x30_0000, 1, true),
        ]);
        blk.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(irq.count(InterruptKind::Queue), 1);

        // Reset and re-activate: the notify EventFd is still registered, once.
        blk.lock().unwrap().reset().unwrap();
        blk.lock()
            .unwrap()
            .activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    }

    #[test]
    fn an_empty_slot_is_registered_when_initialised_again_after_its_first_disk() {
        let blk = Arc::new(Mutex::new(
            VirtioBlock::with_backend("x", false, None).unwrap(),
        ));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        let id = em.add_subscriber(blk.clone());
        assert!(!blk.lock().unwrap().notify_registered);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);

        blk.lock()
            .unwrap()
            .attach(Box::new(MemDisk::new(4096)), false)
            .unwrap();
        blk.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "not registered yet");
        let mut ops = em.event_ops(id).unwrap();
        blk.lock().unwrap().init(&mut ops);
        assert!(blk.lock().unwrap().notify_registered);
        assert_eq!(
            em.run_with_timeout(1000).unwrap(),
            1,
            "the pending notification"
        );
        // A second init registers nothing twice.
        let mut ops = em.event_ops(id).unwrap();
        blk.lock().unwrap().init(&mut ops);
    }
}
