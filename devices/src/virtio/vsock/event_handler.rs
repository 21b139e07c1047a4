// SPDX-License-Identifier: Apache-2.0
//! Event-manager glue for [`Vsock`]: maps event ids to the device's handlers, nothing else.
//!
//! At `init` only the notify EventFd is watched (the driver's notifications of any of the three
//! queues, activation, and the device's own kick when it yields with work left). The first time
//! it fires with the device active, the backend's fd is added. Both stay registered across a
//! device reset; events that arrive while the device is inactive are drained and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, warn};
use vmm_sys_util::epoll::EventSet;

use super::backend::VsockBackend;
use super::device::Vsock;
use crate::virtio::VirtioDevice;

impl<B: VsockBackend> Vsock<B> {
    /// Event data of the notify EventFd.
    pub const PROCESS_NOTIFY: u32 = 0;
    /// Event data of the backend's fd.
    pub const PROCESS_BACKEND: u32 = 1;

    fn register_backend(&mut self, ops: &mut EventOps) {
        if self.runtime_events_registered {
            return;
        }
        let interest = self.backend().interest();
        if let Err(e) = ops.add(Events::with_data(
            self.backend(),
            Self::PROCESS_BACKEND,
            interest,
        )) {
            error!("vsock: cannot watch the backend: {e}");
        }
        self.runtime_events_registered = true;
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            Self::PROCESS_NOTIFY => {
                self.base.drain_notify();
                if self.is_activated() {
                    self.register_backend(ops);
                    // TX first: what the guest sent may produce replies for RX.
                    self.handle_txq_event();
                }
            }
            Self::PROCESS_BACKEND => {
                self.handle_backend_event(events.event_set());
            }
            other => warn!("vsock: unexpected event id {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.notify_event()
            && let Err(e) = ops.add(Events::with_data(evt, Self::PROCESS_NOTIFY, EventSet::IN))
        {
            error!("vsock: cannot watch the notify event: {e}");
        }
        if self.is_activated() {
            self.register_backend(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::virtio::vsock::backend::VsockMuxer;
    use crate::virtio::vsock::defs::{OP_REQUEST, OP_RESPONSE, OP_RW, VSOCK_HOST_CID};
    use crate::virtio::vsock::test_utils::{Driver, hdr, test_mem};

    #[test]
    fn event_loop_drives_device_end_to_end() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let muxer = VsockMuxer::new(3, None).unwrap();
        let handle = muxer.handle();
        let listener = handle.listen(1234).unwrap();
        let dev = Arc::new(Mutex::new(Vsock::new(3, muxer).unwrap()));

        let mut manager = EventManager::<Arc<Mutex<Vsock<VsockMuxer>>>>::new().unwrap();
        let id = manager.add_subscriber(Arc::clone(&dev));
        // Nothing but the activate event is watched yet.
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

        let irq = drv.activate(&mut *dev.lock().unwrap());
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        drv.add_rx(8, 4096);
        dev.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        manager.run_with_timeout(100).unwrap();

        // The guest connects to host port 1234.
        drv.send(&hdr(3, 5000, 1234, OP_REQUEST), &[]);
        dev.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        manager.run_with_timeout(100).unwrap();
        let got = drv.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RESPONSE);
        assert!(irq.count() >= 1);
        let (mut host, port) = listener.accept().unwrap();
        assert_eq!(port, 5000);

        // Host data arrives through the backend fd.
        host.write_all(b"from host").unwrap();
        let mut data = Vec::new();
        for _ in 0..10 {
            manager.run_with_timeout(100).unwrap();
            data.extend(drv.recv().into_iter().flat_map(|(h, d)| {
                assert_eq!((h.op, h.src_cid, h.dst_cid), (OP_RW, VSOCK_HOST_CID, 3));
                d
            }));
            if data.len() >= 9 {
                break;
            }
        }
        assert_eq!(data, b"from host");

        // Guest data reaches the host stream.
        let mut rw = hdr(3, 5000, 1234, OP_RW);
        rw.len = 8;
        drv.send(&rw, b"to host!");
        dev.lock()
            .unwrap()
            .notify_event()
            .unwrap()
            .write(1)
            .unwrap();
        manager.run_with_timeout(100).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to host!");

        // Reset keeps the registrations; re-activation works without duplicates.
        dev.lock().unwrap().reset().unwrap();
        let drv2 = Driver::new(&mem);
        let _irq = drv2.activate(&mut *dev.lock().unwrap());
        manager.run_with_timeout(100).unwrap();
        assert!(dev.lock().unwrap().is_activated());
        manager.remove_subscriber(id).unwrap();
    }
}
