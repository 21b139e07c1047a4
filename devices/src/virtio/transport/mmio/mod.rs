// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio version 2 register file (virtio 1.2 §4.2.2) in front of a [`VirtioDevice`].
//!
//! The transport owns everything the driver negotiates through registers: the device status
//! state machine (§2.1, §3.1.1), 64-bit feature negotiation paged through 32-bit selectors
//! (§2.2, §4.2.2), queue selection and setup (§2.7, §4.2.3.2), the `InterruptStatus`/
//! `InterruptACK` pair (§4.2.2, backed by the device's [`Interrupt`]) and `ConfigGeneration`
//! (§2.5.1). On `DRIVER_OK` it builds `virtio_queue::Queue`s from the validated registers and
//! calls [`VirtioDevice::activate`].
//!
//! Every value written here comes from the guest: bad accesses and illegal transitions are
//! ignored with a rate-limited log line, never a panic.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;
use crate::sync::Recover;
use crate::virtio::{
    Interrupt, InterruptKind, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, guest_warn,
};

mod state;
#[cfg(test)]
mod tests;

pub use state::{MmioState, QueueRegsState, RestoreError};

/// Offset of the `QueueNotify` register; the VMM registers the device's notify EventFd as a KVM
/// ioeventfd at `base + NOTIFY_REG_OFFSET` for any value written (every queue).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Size of one device's MMIO window (registers plus configuration space).
pub const MMIO_REGION_SIZE: u64 = 0x1000;

// Register offsets, virtio 1.2 §4.2.2 table "MMIO Device Register Layout".
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// "virt" in little endian (§4.2.2).
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version 2: the modern (virtio 1.x) register layout (§4.2.2).
const MMIO_VERSION: u32 = 2;
const VENDOR: u32 = 0;

// Device status bits (virtio 1.2 §2.1).
/// The guest found the device.
pub(crate) const ACKNOWLEDGE: u32 = 0x01;
/// The guest knows how to drive the device.
pub(crate) const DRIVER: u32 = 0x02;
/// The driver is set up and ready to drive the device.
pub(crate) const DRIVER_OK: u32 = 0x04;
/// The driver acknowledged the features it understands; negotiation is complete.
pub(crate) const FEATURES_OK: u32 = 0x08;
/// The device hit an error it cannot recover from without a reset.
pub(crate) const DEVICE_NEEDS_RESET: u32 = 0x40;
/// The driver gave up on the device.
pub(crate) const FAILED: u32 = 0x80;

/// Driver status writes that move the state machine forward. The driver sets the bits one at a
/// time in this order and never clears one (§2.1.1 "The driver MUST NOT clear a device status
/// bit", initialization order §3.1.1). Besides these, writing 0 resets the device (§2.4) and
/// `FAILED` may be added in any state (§2.1, §3.1.1 "If any of these steps go irrecoverably
/// wrong, the driver SHOULD set the FAILED status bit").
const STATUS_TRANSITIONS: &[(u32, u32)] = &[
    // §3.1.1 step 2: the guest OS noticed the device.
    (0, ACKNOWLEDGE),
    // §3.1.1 step 3: the guest OS knows how to drive the device.
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER),
    // §3.1.1 steps 4-5: features written, negotiation closed (checked by `features_ok`).
    (ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK),
    // §3.1.1 step 8: queues and config are set up, the device goes live.
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ),
];

/// Whether the driver may move the device status from `from` to `to` (`to` != 0, != `from`).
fn transition_allowed(from: u32, to: u32) -> bool {
    (from & FAILED == 0 && to == from | FAILED) || STATUS_TRANSITIONS.contains(&(from, to))
}

/// Why a queue the driver configured cannot be used.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("Queue {0} is not ready")]
    NotReady(usize),
    #[error("Invalid queue size {0}")]
    Size(u32),
    #[error("Invalid maximum queue size {0}")]
    MaxSize(u16),
    #[error("Misaligned {0} address {1:#x}")]
    Alignment(&'static str, u64),
    #[error("The {0} at {1:#x} is not in guest memory")]
    Range(&'static str, u64),
}

/// The queue registers of one queue, as last written by the driver.
#[derive(Clone, Debug)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds a ready `Queue` from the registers, checking what §2.7 and §4.2.3.2 require: a
    /// power-of-two size no larger than the maximum (split ring), the alignment of each area
    /// (§2.7: descriptor table 16, available ring 2, used ring 4) and that each area lies in
    /// guest memory.
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, QueueSetupError> {
        let mut queue =
            Queue::new(self.max_size).map_err(|_| QueueSetupError::MaxSize(self.max_size))?;
        let size = u16::try_from(self.size).map_err(|_| QueueSetupError::Size(self.size))?;
        queue
            .try_set_size(size)
            .map_err(|_| QueueSetupError::Size(self.size))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| QueueSetupError::Alignment("descriptor table", self.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| QueueSetupError::Alignment("available ring", self.driver))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| QueueSetupError::Alignment("used ring", self.device))?;
        // `virtio-queue` treats an available ring at address 0 as "not set up" and refuses to
        // iterate it, so such a queue would silently never run.
        if self.driver == 0 {
            return Err(QueueSetupError::Range("available ring", 0));
        }
        // Sizes from §2.7: 16 bytes per descriptor; flags, idx, ring[size] and used_event for
        // the available ring; flags, idx, ring[size] of 8 bytes and avail_event for the used
        // ring. `size` <= 32768 so none of this can overflow.
        let n = usize::from(size);
        let areas = [
            ("descriptor table", self.desc, n.saturating_mul(16)),
            (
                "available ring",
                self.driver,
                n.saturating_mul(2).saturating_add(6),
            ),
            (
                "used ring",
                self.device,
                n.saturating_mul(8).saturating_add(6),
            ),
        ];
        for (what, addr, len) in areas {
            if !mem.check_range(GuestAddress(addr), len) {
                return Err(QueueSetupError::Range(what, addr));
            }
        }
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(queue)
    }
}

/// Wraps the device's interrupt so that every configuration change notification also bumps
/// `ConfigGeneration` (§2.5.1 / §4.2.2.1: the device MUST change it whenever the driver could
/// otherwise read an inconsistent configuration). Devices signal every config change through
/// this interrupt, so no change goes uncounted while the device is live.
#[derive(Debug)]
struct GenerationCounter {
    inner: Arc<dyn Interrupt>,
    generation: AtomicU32,
}

impl Interrupt for GenerationCounter {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        if kind == InterruptKind::Config {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.trigger(kind)
    }

    fn status(&self) -> u32 {
        self.inner.status()
    }

    fn ack(&self, bits: u32) {
        self.inner.ack(bits)
    }

    fn restore_status(&self, bits: u32) {
        self.inner.restore_status(bits)
    }
}

/// A virtio-mmio (version 2) device: the register file plus the device behind it.
///
/// The VMM maps it at a 4 KiB MMIO window ([`MMIO_REGION_SIZE`]) and forwards guest accesses
/// to [`MmioTransport::read`] and [`MmioTransport::write`] (on the vCPU thread).
#[derive(Debug)]
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<GenerationCounter>,
    device_type: u32,
    /// Status bits set by the driver (never `DEVICE_NEEDS_RESET`).
    status: u32,
    /// Set when activation or reset failed; reported as `DEVICE_NEEDS_RESET`.
    needs_reset: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote non-zero feature bits through a selector above 1 (no such features).
    driver_features_invalid: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
}

impl MmioTransport {
    /// Creates the transport for `device`. `interrupt` is the device's interrupt (an
    /// [`crate::virtio::IrqTrigger`] on a line the VMM provides); the transport
    /// hands it to the device on activation and serves `InterruptStatus`/`InterruptACK` from it.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Self {
        let (device_type, queues) = {
            let dev = device.lock().recover();
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueRegs::new(max))
                .collect();
            (dev.device_type(), queues)
        };
        MmioTransport {
            mem,
            device,
            interrupt: Arc::new(GenerationCounter {
                inner: interrupt,
                generation: AtomicU32::new(0),
            }),
            device_type,
            status: 0,
            needs_reset: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_invalid: false,
            queue_sel: 0,
            queues,
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The virtio device id (§5).
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The `Status` register as the driver reads it.
    pub fn status(&self) -> u32 {
        let device_needs_reset = self.device.lock().recover().needs_reset();
        if self.needs_reset || device_needs_reset {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                data.fill(0);
                guest_warn!(
                    "virtio-mmio: bad config read size {} at {offset:#x}",
                    data.len()
                );
                return;
            }
            let dev = self.device.lock().recover();
            dev.read_config(offset.saturating_sub(CONFIG_SPACE), data);
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            data.fill(0);
            guest_warn!(
                "virtio-mmio: bad register read size {} at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            *out = [0; 4];
            guest_warn!("virtio-mmio: unaligned register read at {offset:#x}");
            return;
        }
        *out = self.read_reg(offset).to_le_bytes();
    }

    /// Handles a guest write of `data` at `offset` in the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                guest_warn!(
                    "virtio-mmio: bad config write size {} at {offset:#x}",
                    data.len()
                );
                return;
            }
            let mut dev = self.device.lock().recover();
            dev.write_config(offset.saturating_sub(CONFIG_SPACE), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: bad register write size {} at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let features = self.device.lock().recover().avail_features();
                match self.device_features_sel {
                    0 => low_u32(features),
                    1 => high_u32(features),
                    _ => 0,
                }
            }
            // §4.2.2.2: QueueNumMax reads 0 for a queue that does not exist.
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            // There are no shared memory regions: §4.2.2 "Reading from a non-existent region
            // results in a length of -1".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => {
                // Read under the device lock so a change in progress is either fully before
                // or fully after this read.
                let _dev = self.device.lock().recover();
                self.interrupt.generation.load(Ordering::SeqCst)
            }
            _ => {
                guest_warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, val: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = val,
            DRIVER_FEATURES_SEL => self.driver_features_sel = val,
            DRIVER_FEATURES => self.write_driver_features(val),
            QUEUE_SEL => self.queue_sel = val,
            QUEUE_NUM => self.update_queue(|q| q.size = val),
            QUEUE_READY => self.write_queue_ready(val),
            QUEUE_NOTIFY => self.notify(val),
            INTERRUPT_ACK => self.interrupt.ack(val),
            STATUS => self.write_status(val),
            QUEUE_DESC_LOW => self.update_queue(|q| q.desc = set_low(q.desc, val)),
            QUEUE_DESC_HIGH => self.update_queue(|q| q.desc = set_high(q.desc, val)),
            QUEUE_DRIVER_LOW => self.update_queue(|q| q.driver = set_low(q.driver, val)),
            QUEUE_DRIVER_HIGH => self.update_queue(|q| q.driver = set_high(q.driver, val)),
            QUEUE_DEVICE_LOW => self.update_queue(|q| q.device = set_low(q.device, val)),
            QUEUE_DEVICE_HIGH => self.update_queue(|q| q.device = set_high(q.device, val)),
            // No shared memory regions; selecting one is harmless.
            SHM_SEL => {}
            _ => guest_warn!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// Features are written between `DRIVER` and `FEATURES_OK` (§3.1.1 step 4); afterwards they
    /// are frozen.
    fn write_driver_features(&mut self, val: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            guest_warn!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = set_low(self.driver_features, val),
            1 => self.driver_features = set_high(self.driver_features, val),
            // Feature bits above 63 do not exist: accepting one is accepting an unoffered feature.
            _ if val != 0 => self.driver_features_invalid = true,
            _ => {}
        }
    }

    /// Queue registers may be written only during queue setup (§4.2.3.2: after `FEATURES_OK`,
    /// before `DRIVER_OK`) and only while the queue is not ready (§4.2.2.3 "The driver MUST NOT
    /// access QueueNum, QueueDesc*, QueueDriver*, QueueDevice* ... when QueueReady is not 0").
    fn update_queue<F: FnOnce(&mut QueueRegs)>(&mut self, f: F) {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            guest_warn!("virtio-mmio: queue setup in status {:#x}", self.status);
            return;
        }
        let Some(queue) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            guest_warn!("virtio-mmio: setup of missing queue {}", self.queue_sel);
            return;
        };
        if queue.ready {
            guest_warn!("virtio-mmio: setup of ready queue {}", self.queue_sel);
            return;
        }
        f(queue);
    }

    fn write_queue_ready(&mut self, val: u32) {
        if val == 0 {
            // Turning a queue off is allowed before the device is live (drivers do it while
            // tearing down a failed probe); after DRIVER_OK it would need VIRTIO_F_RING_RESET.
            if self.status & DRIVER_OK != 0 {
                guest_warn!("virtio-mmio: queue disabled after DRIVER_OK");
                return;
            }
            if let Some(q) = usize::try_from(self.queue_sel)
                .ok()
                .and_then(|i| self.queues.get_mut(i))
            {
                q.ready = false;
            }
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.clone();
        let sel = self.queue_sel;
        self.update_queue(|q| match q.build(&mem, event_idx) {
            Ok(_) => q.ready = true,
            Err(e) => guest_warn!("virtio-mmio: queue {sel} not made ready: {e}"),
        });
    }

    /// A `QueueNotify` write that reached user space (no ioeventfd took it): the device
    /// decides what a notification it sees this way means ([`VirtioDevice::queue_notified`]).
    fn notify(&mut self, val: u32) {
        let exists = usize::try_from(val).is_ok_and(|i| i < self.queues.len());
        if !exists {
            guest_warn!("virtio-mmio: notification of missing queue {val}");
            return;
        }
        let result = self.device.lock().recover().queue_notified(val);
        if let Err(e) = result {
            guest_warn!("virtio-mmio: queue {val} notification failed: {e}");
        }
    }

    fn write_status(&mut self, val: u32) {
        // DEVICE_NEEDS_RESET belongs to the device; drivers that read-modify-write Status may
        // echo it back.
        let val = val & !DEVICE_NEEDS_RESET;
        if val == 0 {
            self.reset();
            return;
        }
        if val == self.status {
            return;
        }
        if !transition_allowed(self.status, val) {
            guest_warn!(
                "virtio-mmio: invalid status transition {:#x} -> {val:#x}",
                self.status
            );
            return;
        }
        let added = val & !self.status;
        if added == FEATURES_OK && !self.features_ok() {
            // §2.2.1 / §3.1.1 step 6: the device refuses by leaving FEATURES_OK clear; the driver
            // reads Status back and gives up.
            return;
        }
        self.status = val;
        if added == DRIVER_OK {
            self.activate();
        }
    }

    /// Checks the driver's features when it sets `FEATURES_OK` and hands them to the device.
    fn features_ok(&mut self) -> bool {
        let mut dev = self.device.lock().recover();
        let offered = dev.avail_features();
        let acked = self.driver_features;
        if self.driver_features_invalid || acked & !offered != 0 {
            // §2.2.1: "The driver MUST NOT accept a feature which the device did not offer".
            guest_warn!(
                "virtio-mmio: driver accepted features {acked:#x} not in offered {offered:#x}"
            );
            return false;
        }
        if acked & VIRTIO_F_VERSION_1 == 0 {
            // This is a modern-only device (§6.1: a device MAY fail FEATURES_OK without it).
            guest_warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        dev.set_acked_features(acked);
        true
    }

    /// `DRIVER_OK`: build the queues and start the device. A failure leaves the device in
    /// `DEVICE_NEEDS_RESET` and tells the driver through a config change (§2.1.2).
    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues: Result<Vec<Queue>, QueueSetupError> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if q.ready {
                    q.build(&self.mem, event_idx)
                } else {
                    Err(QueueSetupError::NotReady(i))
                }
            })
            .collect();
        let result = match queues {
            Ok(queues) => {
                let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
                let mut dev = self.device.lock().recover();
                dev.activate(self.mem.clone(), queues, interrupt)
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            guest_warn!("virtio-mmio: device activation failed: {e}");
            self.needs_reset = true;
            if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                guest_warn!("virtio-mmio: config interrupt failed: {e}");
            }
        }
    }

    /// The driver wrote 0 to `Status` (§2.4): reset the device and every transport register to
    /// its initial value, including `InterruptStatus` and each `QueueReady` (§4.2.2.2).
    fn reset(&mut self) {
        let result = self.device.lock().recover().reset();
        if let Err(e) = result {
            // The device is still running: keep Status non-zero so the driver does not think it
            // can start over (§2.4.1: it waits for Status to read 0).
            guest_warn!("virtio-mmio: device reset failed: {e}");
            self.needs_reset = true;
            return;
        }
        self.status = 0;
        self.needs_reset = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_invalid = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.ack(u32::MAX);
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "keeps the low 32 bits on purpose"
)]
fn low_u32(v: u64) -> u32 {
    v as u32
}

fn high_u32(v: u64) -> u32 {
    low_u32(v >> 32)
}

fn set_low(v: u64, low: u32) -> u64 {
    (v & !0xffff_ffff) | u64::from(low)
}

fn set_high(v: u64, high: u32) -> u64 {
    (v & 0xffff_ffff) | (u64::from(high) << 32)
}
