// SPDX-License-Identifier: Apache-2.0
//! State that every virtio device keeps the same way: feature negotiation (virtio 1.2 §2.2),
//! queue sizes, the notify EventFd, and the configuration-space read rule (§4.2.2: bytes
//! outside the device's config space read as zero).
//!
//! A device embeds a [`VirtioBase`] and fills the matching [`VirtioDevice`](super::VirtioDevice)
//! methods with [`delegate_virtio_base!`](crate::virtio::base::delegate_virtio_base), so its own
//! `impl VirtioDevice` holds only what differs (device id, config layout, activation, reset).
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::ActivateError;

/// Feature bits, queue sizes and the notify EventFd of a device.
#[derive(Debug)]
pub(crate) struct VirtioBase {
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    /// Signalled by a notification of any queue, by activation and by the device itself when
    /// it yields with work left (see the `virtio` module docs). `None` until the device needs
    /// it ([`VirtioBase::without_notify`]).
    notify_evt: Option<EventFd>,
}

impl VirtioBase {
    /// Offers `avail_features` on one queue per entry of `queue_max_sizes`, with a
    /// non-blocking notify EventFd.
    pub(crate) fn new(avail_features: u64, queue_max_sizes: &[u16]) -> io::Result<Self> {
        let mut base = Self::without_notify(avail_features, queue_max_sizes);
        base.ensure_notify_event()?;
        Ok(base)
    }

    /// The same without a notify EventFd (a device that needs none yet; see
    /// [`VirtioBase::ensure_notify_event`]).
    pub(crate) fn without_notify(avail_features: u64, queue_max_sizes: &[u16]) -> Self {
        VirtioBase {
            avail_features,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            notify_evt: None,
        }
    }

    /// Creates the notify EventFd if there is none yet.
    pub(crate) fn ensure_notify_event(&mut self) -> io::Result<()> {
        if self.notify_evt.is_none() {
            self.notify_evt = Some(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        }
        Ok(())
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

    /// The notify EventFd, if the device has one.
    #[inline]
    pub(crate) fn notify_event(&self) -> Option<&EventFd> {
        self.notify_evt.as_ref()
    }

    /// Writes the notify EventFd, as a guest notification would, so the event loop comes back
    /// to the device (used when a budget runs out). Returns false when there is no notify
    /// EventFd (the caller must go on itself). A failed write is ignored: the counter is
    /// merely saturated, and the event is then pending anyway.
    #[inline]
    pub(crate) fn kick(&self) -> bool {
        match &self.notify_evt {
            Some(evt) => {
                let _ = evt.write(1);
                true
            }
            None => false,
        }
    }

    /// Consumes the pending notifications. A failure (`EAGAIN`) only means that another
    /// wake-up already consumed the count.
    pub(crate) fn drain_notify(&self) {
        if let Some(evt) = &self.notify_evt {
            let _ = evt.read();
        }
    }

    /// Wakes the event-loop half of the device after activation (called from `activate`, on a
    /// vCPU thread). Nothing to do without a notify EventFd.
    pub(crate) fn signal_activate(&self) -> Result<(), ActivateError> {
        match &self.notify_evt {
            Some(evt) => evt.write(1).map_err(ActivateError::WakeEventLoop),
            None => Ok(()),
        }
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
/// [`VirtioBase`] in field `$base`: queue sizes, the notify EventFd and the feature bits.
macro_rules! delegate_virtio_base {
    ($base:ident) => {
        fn queue_max_sizes(&self) -> &[u16] {
            self.$base.queue_max_sizes()
        }

        fn notify_event(&self) -> Option<&::vmm_sys_util::eventfd::EventFd> {
            self.$base.notify_event()
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
        base.set_acked_features(0b1111);
        assert_eq!(base.acked_features(), 0b1010);
        base.reset_features();
        assert_eq!(base.acked_features(), 0);
        assert_eq!(base.avail_features(), 0b1010);
    }

    #[test]
    fn kick_and_activate_write_the_one_notify_eventfd() {
        let base = VirtioBase::new(0, &[4, 4]).unwrap();
        assert!(base.kick());
        base.signal_activate().unwrap();
        assert_eq!(base.notify_event().unwrap().read().unwrap(), 2);
        base.kick();
        base.drain_notify();
        let drained = base.notify_event().unwrap().read().unwrap_err();
        assert_eq!(drained.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_device_without_notify_eventfd_gets_one_on_demand() {
        let mut base = VirtioBase::without_notify(0, &[4]);
        assert!(base.notify_event().is_none());
        assert!(!base.kick(), "nothing to kick: the caller goes on itself");
        base.drain_notify();
        base.signal_activate().unwrap();
        base.ensure_notify_event().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(base.notify_event().unwrap());
        base.ensure_notify_event().unwrap();
        assert_eq!(
            std::os::fd::AsRawFd::as_raw_fd(base.notify_event().unwrap()),
            fd,
            "created once"
        );
        assert!(base.kick());
        assert_eq!(base.notify_event().unwrap().read().unwrap(), 1);
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
