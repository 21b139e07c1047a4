// SPDX-License-Identifier: Apache-2.0
//! What a VM snapshot keeps of one virtio-mmio device (DESIGN.md section 8), and bringing a
//! device back from it: the transport's registers (status, feature selectors and the driver's
//! features, queue selection, each queue's size, readiness and ring addresses), the pending
//! interrupt bits, the configuration generation, and where each live queue is.
//!
//! A restored device is activated with queues built from the saved registers, positioned where
//! the snapshot left them, and then told it was restored ([`VirtioDevice::restored`]). The
//! driver in the guest continues as if nothing happened.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::{DRIVER_OK, FEATURES_OK, GenerationCounter, MmioTransport, QueueRegs};
use crate::GuestMemoryMmap;
use crate::sync::Recover;
use crate::virtio::{Interrupt, VIRTIO_RING_F_EVENT_IDX, VirtioDevice};

/// The registers of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegsState {
    /// `QueueNum`.
    pub size: u32,
    /// `QueueReady`.
    pub ready: bool,
    /// `QueueDesc`.
    pub desc: u64,
    /// `QueueDriver` (the available ring).
    pub driver: u64,
    /// `QueueDevice` (the used ring).
    pub device: u64,
}

/// One virtio-mmio device as a snapshot keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    /// The virtio device id, checked against the device it is restored into.
    pub device_type: u32,
    /// `Status` as the driver set it.
    pub status: u32,
    /// Whether the transport reported `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The driver's features.
    pub driver_features: u64,
    /// Whether the driver wrote bits above 63.
    pub driver_features_invalid: bool,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegsState>,
    /// `InterruptStatus` bits not yet acknowledged.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// (`next_avail`, `next_used`) of each queue of a live device, in queue order.
    pub positions: Vec<(u16, u16)>,
}

/// Why a device cannot be brought back from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The device is not of the saved kind.
    #[error("Saved device type {saved} does not match device type {device}")]
    DeviceType {
        /// In the snapshot.
        saved: u32,
        /// Of the device given.
        device: u32,
    },
    /// The device has a different number of queues.
    #[error("Saved {saved} queues, the device has {device}")]
    QueueCount {
        /// In the snapshot.
        saved: usize,
        /// Of the device given.
        device: usize,
    },
    /// A saved queue cannot be built again.
    #[error("Queue {0} cannot be restored: {1}")]
    Queue(usize, String),
    /// The device refused its restored queues.
    #[error("The device refused its restored queues")]
    Activate(#[source] crate::virtio::ActivateError),
}

impl MmioTransport {
    /// The device as a snapshot keeps it. Call between two passes of the event loop (the VMM
    /// thread), with the vCPUs paused: no register write or chain is half done.
    pub fn state(&self) -> MmioState {
        let positions = self.device.lock().recover().queue_positions();
        MmioState {
            device_type: self.device_type,
            status: self.status,
            needs_reset: self.needs_reset,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_invalid: self.driver_features_invalid,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegsState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.generation.load(Ordering::SeqCst),
            positions,
        }
    }

    /// A transport for `device` (new, of the saved kind, never activated) in the saved state.
    /// A device that was live is activated with the saved queues, at the saved positions, and
    /// then told it was restored.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<dyn Interrupt>,
        state: &MmioState,
    ) -> Result<Self, RestoreError> {
        let mut t = MmioTransport::new(mem, device, interrupt);
        if state.device_type != t.device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: t.device_type,
            });
        }
        if state.queues.len() != t.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: t.queues.len(),
            });
        }
        t.status = state.status;
        t.needs_reset = state.needs_reset;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.driver_features_invalid = state.driver_features_invalid;
        t.queue_sel = state.queue_sel;
        for (regs, saved) in t.queues.iter_mut().zip(&state.queues) {
            *regs = QueueRegs {
                max_size: regs.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
            };
        }
        t.interrupt = Arc::new(GenerationCounter {
            inner: Arc::clone(&t.interrupt.inner),
            generation: AtomicU32::new(state.config_generation),
        });
        t.interrupt.restore_status(state.interrupt_status);
        if t.status & FEATURES_OK != 0 {
            let mut dev = t.device.lock().recover();
            let offered = dev.avail_features();
            dev.set_acked_features(state.driver_features & offered);
        }
        let live = t.status & DRIVER_OK != 0 && !t.needs_reset && !state.positions.is_empty();
        if live {
            t.activate_restored(&state.positions)?;
        }
        Ok(t)
    }

    fn activate_restored(&mut self, positions: &[(u16, u16)]) -> Result<(), RestoreError> {
        if positions.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: positions.len(),
                device: self.queues.len(),
            });
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, (regs, &(next_avail, next_used))) in
            self.queues.iter().zip(positions).enumerate()
        {
            let mut queue = regs
                .build(&self.mem, event_idx)
                .map_err(|e| RestoreError::Queue(index, e.to_string()))?;
            queue.set_next_avail(next_avail);
            queue.set_next_used(next_used);
            queues.push(queue);
        }
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        let mut dev = self.device.lock().recover();
        dev.activate(self.mem.clone(), queues, interrupt)
            .map_err(RestoreError::Activate)?;
        dev.restored();
        Ok(())
    }
}
