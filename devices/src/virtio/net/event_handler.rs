// SPDX-License-Identifier: Apache-2.0
//! Event-manager glue for [`VirtioNet`]: maps ready fds to core calls, nothing else.
//!
//! `init` registers the notify EventFd (signalled by the driver's notifications of either
//! queue, by activation and by the device when it yields with work left). The first time it
//! fires with the device active, the backend fd is registered too (edge-triggered: the device
//! reads the backend until it would block, or until the guest has no room, and resumes on the
//! next notification). Both stay registered across resets and are ignored while the device is
//! not active.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::VirtioNet;
use crate::virtio::{VirtioDevice, guest_warn};

impl VirtioNet {
    /// Event data of the notify EventFd.
    pub const PROCESS_NOTIFY: u32 = 0;
    /// Event data of the backend fd.
    pub const PROCESS_BACKEND: u32 = 1;

    fn register_backend(&mut self, ops: &mut EventOps) {
        if self.fds_registered {
            return;
        }
        if let Err(e) = ops.add(Events::with_data_raw(
            self.backend().as_raw_fd(),
            Self::PROCESS_BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            log::error!("virtio-net: failed to register the backend: {e}");
        }
        self.fds_registered = true;
    }

    fn run_rx(&mut self) {
        if self.process_rx() {
            self.signal_used_queue();
        }
    }

    fn run_tx(&mut self) {
        if self.process_tx() {
            self.signal_used_queue();
        }
    }
}

impl MutEventSubscriber for VirtioNet {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.notify_event()
            && let Err(e) = ops.add(Events::with_data(evt, Self::PROCESS_NOTIFY, EventSet::IN))
        {
            log::error!("virtio-net: failed to register the notify event: {e}");
        }
        if self.is_activated() {
            self.register_backend(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            Self::PROCESS_NOTIFY => {
                self.base.drain_notify();
                if self.is_activated() {
                    self.register_backend(ops);
                    self.run_tx();
                    self.run_rx();
                }
            }
            Self::PROCESS_BACKEND => self.run_rx(),
            other => guest_warn!("virtio-net: unexpected event {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{LoopbackNet, RecordingInterrupt, TestQueue, single_region_mem};
    use crate::virtio::net::NetConfig;
    use crate::virtio::{InterruptKind, VIRTIO_F_VERSION_1};

    #[test]
    fn event_loop_moves_frames_tx_to_rx() {
        let m = single_region_mem(0x40_0000);
        let lo = LoopbackNet::new(8, false);
        let net = Arc::new(Mutex::new(
            VirtioNet::new(NetConfig::default(), Box::new(lo)).unwrap(),
        ));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(net.clone());

        let rxq = TestQueue::new(&m, GuestAddress(0), 16);
        let txq = TestQueue::new(&m, GuestAddress(0x1_0000), 16);
        let irq = Arc::new(RecordingInterrupt::new());
        {
            let mut n = net.lock().unwrap();
            n.set_acked_features(VIRTIO_F_VERSION_1);
            n.activate(m.clone(), vec![rxq.queue(), txq.queue()], irq.clone())
                .unwrap();
        }
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

        rxq.add_chain(&[(0x20_0000, 2048, true)]);
        m.write_slice(&[0u8; 12], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&[0x77u8; 64], GuestAddress(0x10_000c))
            .unwrap();
        txq.add_chain(&[(0x10_0000, 76, false)]);
        net.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        // TX event, then the loopback fd becomes readable: the frame comes back on RX.
        let mut rounds = 0;
        while rxq.used_idx() == 0 && rounds < 10 {
            em.run_with_timeout(1000).unwrap();
            rounds += 1;
        }
        assert_eq!(txq.used_idx(), 1);
        assert_eq!(rxq.used_idx(), 1);
        assert_eq!(rxq.used_elem(0), (0, 76));
        assert!(irq.count(InterruptKind::Queue) >= 2);
        // Nothing left to do: the loop goes idle instead of spinning.
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    }
}
