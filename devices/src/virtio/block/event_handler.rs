// SPDX-License-Identifier: Apache-2.0
//! Event-manager glue for [`VirtioBlock`]: maps ready EventFds to core calls, nothing else.
//!
//! `init` registers the activate EventFd. [`VirtioDevice::activate`] runs on a vCPU thread and
//! writes it; the event loop then registers the queue EventFd (once per device lifetime: after a
//! reset it stays registered and is simply ignored until the next activation) and processes the
//! queue in case the driver queued requests before its notification was seen.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::VirtioBlock;
use crate::virtio::{VirtioDevice, guest_warn};

impl VirtioBlock {
    /// Event data of the activate EventFd.
    pub const PROCESS_ACTIVATE: u32 = 0;
    /// Event data of the request queue EventFd.
    pub const PROCESS_QUEUE: u32 = 1;

    fn register_queue_event(&mut self, ops: &mut EventOps) {
        if self.queue_evt_registered {
            return;
        }
        let Some(evt) = self.queue_events().first() else {
            return;
        };
        match ops.add(Events::with_data(evt, Self::PROCESS_QUEUE, EventSet::IN)) {
            Ok(()) => self.queue_evt_registered = true,
            Err(e) => log::error!("virtio-blk: failed to register the queue event: {e}"),
        }
    }

    fn run_queue(&mut self) {
        if self.process_queue() {
            self.signal_used_queue();
        }
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.activate_event(),
            Self::PROCESS_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: failed to register the activate event: {e}");
        }
        if self.is_activated() {
            self.register_queue_event(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            Self::PROCESS_ACTIVATE => {
                let _ = self.activate_event().read();
                self.register_queue_event(ops);
                self.run_queue();
            }
            Self::PROCESS_QUEUE => {
                self.base.drain_queue_event(0);
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

        let q = TestQueue::new(&m, GuestAddress(0), 256);
        let irq = Arc::new(RecordingInterrupt::new());
        blk.lock()
            .unwrap()
            .activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        // Activation event: registers the queue EventFd.
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert!(blk.lock().unwrap().queue_evt_registered);

        m.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        m.write_obj(0u64, GuestAddress(0x10_0008)).unwrap();
        m.write_obj(0xffu8, GuestAddress(0x30_0000)).unwrap();
        q.add_chain(&[
            (0x10_0000, 16, false),
            (0x20_0000, 512, true),
            (0x30_0000, 1, true),
        ]);
        blk.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(irq.count(InterruptKind::Queue), 1);

        // Reset and re-activate: the queue EventFd is not registered twice.
        blk.lock().unwrap().reset().unwrap();
        blk.lock()
            .unwrap()
            .activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    }
}
