// SPDX-License-Identifier: Apache-2.0
//! State that every virtio device keeps the same way: feature negotiation (virtio 1.2 §2.2),
//! queue sizes and queue EventFds, the activate EventFd, and the configuration-space read rule
//! (§4.2.2: bytes outside the device's config space read as zero).
//!
//! A device embeds a [`VirtioBase`] and fills the matching [`VirtioDevice`](super::VirtioDevice)
//! methods with [`delegate_virtio_base!`](crate::virtio::base::delegate_virtio_base), so its own
//! `impl VirtioDevice` holds only what differs (device id, config layout, activation, reset).
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::ActivateError;

/// Feature bits, queue sizes and the EventFds a device creates at construction.
#[derive(Debug)]
pub(crate) struct VirtioBase {
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
}

impl VirtioBase {
    /// Offers `avail_features` on one queue per entry of `queue_max_sizes`, creating a
    /// non-blocking EventFd for each queue and one for activation.
    pub(crate) fn new(avail_features: u64, queue_max_sizes: &[u16]) -> io::Result<Self> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VirtioBase {
            avail_features,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Feature bits the device offers.
    #[inline]
    pub(crate) fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Feature bits the driver acknowledged.
    #[inline]
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Stores the driver's features, keeping only those the device offers.
    pub(crate) fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    /// Forgets the negotiated features (device reset).
    pub(crate) fn reset_features(&mut self) {
        self.acked_features = 0;
    }

    /// Maximum size of each queue.
    pub(crate) fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// The queue EventFds, one per queue.
    pub(crate) fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The EventFd of queue `index`, if there is such a queue.
    #[inline]
    pub(crate) fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_evts.get(index)
    }

    /// Writes the EventFd of queue `index`, as a guest notification would, so the event loop
    /// comes back to the queue (used when a budget runs out). A failure is ignored: the
    /// counter is merely saturated, and the event is then pending anyway.
    #[inline]
    pub(crate) fn kick_queue(&self, index: usize) {
        if let Some(evt) = self.queue_event(index) {
            let _ = evt.write(1);
        }
    }

    /// Consumes a guest notification on queue `index`. A failure (`EAGAIN`) only means that
    /// another wake-up already consumed the count.
    pub(crate) fn drain_queue_event(&self, index: usize) {
        if let Some(evt) = self.queue_event(index) {
            let _ = evt.read();
        }
    }

    /// The EventFd that wakes the event-loop half of the device after activation.
    pub(crate) fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Wakes the event-loop half of the device (called from `activate`, on a vCPU thread).
    pub(crate) fn signal_activate(&self) -> Result<(), ActivateError> {
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        for (dst, src) in data.iter_mut().zip(src) {
            *dst = *src;
        }
    }
}

/// Expands, inside an `impl VirtioDevice`, to the methods that only forward to the
/// [`VirtioBase`] in field `$base`: queue sizes, queue EventFds and the feature bits.
macro_rules! delegate_virtio_base {
    ($base:ident) => {
        fn queue_max_sizes(&self) -> &[u16] {
            self.$base.queue_max_sizes()
        }

        fn queue_events(&self) -> &[::vmm_sys_util::eventfd::EventFd] {
            self.$base.queue_events()
        }

        fn avail_features(&self) -> u64 {
            self.$base.avail_features()
        }

        fn acked_features(&self) -> u64 {
            self.$base.acked_features()
        }

        fn set_acked_features(&mut self, acked: u64) {
            self.$base.set_acked_features(acked);
        }
    };
}
pub(crate) use delegate_virtio_base;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_masked_and_reset() {
        let mut base = VirtioBase::new(0b1010, &[8, 16]).unwrap();
        assert_eq!(base.queue_max_sizes(), &[8, 16]);
        assert_eq!(base.queue_events().len(), 2);
        assert!(base.queue_event(2).is_none());
        base.set_acked_features(0b1111);
        assert_eq!(base.acked_features(), 0b1010);
        base.reset_features();
        assert_eq!(base.acked_features(), 0);
        assert_eq!(base.avail_features(), 0b1010);
    }

    #[test]
    fn kick_and_activate_write_their_eventfds() {
        let base = VirtioBase::new(0, &[4]).unwrap();
        base.kick_queue(0);
        base.kick_queue(7);
        assert_eq!(base.queue_event(0).unwrap().read().unwrap(), 1);
        base.kick_queue(0);
        base.drain_queue_event(0);
        base.drain_queue_event(7);
        let drained = base.queue_event(0).unwrap().read().unwrap_err();
        assert_eq!(drained.kind(), io::ErrorKind::WouldBlock);
        base.signal_activate().unwrap();
        assert_eq!(base.activate_event().read().unwrap(), 1);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 3];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 3]);
    }
}
