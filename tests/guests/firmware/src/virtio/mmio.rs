// SPDX-License-Identifier: Apache-2.0
//! The driver side of the virtio-mmio version 2 register file (virtio 1.2 §4.2.2): probing,
//! the initialisation sequence (§3.1.1), 64-bit feature negotiation through the 32-bit
//! selectors, queue registers (§4.2.3.2), configuration space reads made consistent with
//! `ConfigGeneration` (§2.5.1, §4.2.2.2) and the interrupt registers.

use crate::irq::{self, SourceId};
use crate::phys;
use crate::virtio::{MmioDevice, VIRTIO_F_VERSION_1, VirtioError};

/// Register offsets (§4.2.2, "MMIO Device Register Layout").
pub mod reg {
    /// "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 2 for the modern interface.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Feature bits offered by the device, page chosen by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the 32-bit page of `DEVICE_FEATURES`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Feature bits accepted by the driver, page chosen by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the 32-bit page of `DRIVER_FEATURES`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue index written here: the queue has new buffers.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Bit 0: used buffer notification; bit 1: configuration change.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges the written `INTERRUPT_STATUS` bits.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (§2.1).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low half.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low half.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high half.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low half.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high half.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Changes whenever the configuration space may have changed.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it needs a reset for.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// `MagicValue`: "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `InterruptStatus` bit: used buffer notification.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: configuration change notification.
pub const INT_CONFIG: u32 = 2;
/// Attempts at a consistent configuration read before giving up on consistency.
const GENERATION_RETRIES: u32 = 8;

/// One virtio-mmio device.
#[derive(Debug)]
pub struct Transport {
    base: u64,
    irq: u32,
    device_id: u32,
    source: Option<SourceId>,
}

impl Transport {
    /// Checks the magic value and version, reads the device id.
    pub fn probe(dev: &MmioDevice) -> Result<Self, VirtioError> {
        let mut t = Self {
            base: dev.base,
            irq: dev.irq,
            device_id: 0,
            source: None,
        };
        let magic = t.read(reg::MAGIC_VALUE);
        if magic != MAGIC {
            return Err(VirtioError::NotVirtio(magic));
        }
        let version = t.read(reg::VERSION);
        if version != 2 {
            return Err(VirtioError::Version(version));
        }
        t.device_id = t.read(reg::DEVICE_ID);
        Ok(t)
    }

    /// Base address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Device type (0: placeholder slot without a device).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Reads a register.
    pub fn read(&self, offset: u64) -> u32 {
        self.base
            .checked_add(offset)
            .and_then(phys::mmio_read_u32)
            .unwrap_or(0)
    }

    /// Writes a register.
    pub fn write(&self, offset: u64, value: u32) {
        if let Some(addr) = self.base.checked_add(offset) {
            phys::mmio_write_u32(addr, value);
        }
    }

    fn write_addr(&self, low: u64, high: u64, addr: u64) {
        let [l0, l1, l2, l3, h0, h1, h2, h3] = addr.to_le_bytes();
        self.write(low, u32::from_le_bytes([l0, l1, l2, l3]));
        self.write(high, u32::from_le_bytes([h0, h1, h2, h3]));
    }

    /// Resets the device and negotiates `wanted & offered` (§3.1.1 steps 1-6). `VERSION_1`
    /// must be offered; returns the accepted features.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, VirtioError> {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        let offered = u64::from(low) | u64::from(high) << 32;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.fail();
            return Err(VirtioError::MissingFeature("VERSION_1"));
        }
        let accepted = offered & (wanted | VIRTIO_F_VERSION_1);
        let [a0, a1, a2, a3, a4, a5, a6, a7] = accepted.to_le_bytes();
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, u32::from_le_bytes([a0, a1, a2, a3]));
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, u32::from_le_bytes([a4, a5, a6, a7]));
        let want = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, want);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Selects queue `index` and returns its maximum size (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.write(reg::QUEUE_SEL, u32::from(index));
        u16::try_from(self.read(reg::QUEUE_NUM_MAX)).unwrap_or(u16::MAX)
    }

    /// Programs and enables queue `index` (§4.2.3.2).
    pub fn setup_queue(&self, index: u16, size: u16, desc: u64, driver: u64, device: u64) {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_NUM, u32::from(size));
        self.write_addr(reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc);
        self.write_addr(reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver);
        self.write_addr(reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device);
        self.write(reg::QUEUE_READY, 1);
    }

    /// Address of the `QueueNotify` register.
    pub fn notify_addr(&self) -> u64 {
        self.base.saturating_add(reg::QUEUE_NOTIFY)
    }

    /// Routes the device's interrupt line and registers it with [`irq`]: from here on every
    /// interrupt is acknowledged and recorded.
    pub fn enable_interrupts(&mut self) -> Result<(), VirtioError> {
        let line = u8::try_from(self.irq).map_err(|_| VirtioError::BadIrq(self.irq))?;
        let status = self.base.saturating_add(reg::INTERRUPT_STATUS);
        let ack = self.base.saturating_add(reg::INTERRUPT_ACK);
        self.source =
            Some(irq::register_source(line, status, ack).ok_or(VirtioError::BadIrq(self.irq))?);
        Ok(())
    }

    /// `InterruptStatus` bits recorded by the handler since the last call.
    pub fn take_interrupts(&self) -> u32 {
        self.source.map_or(0, SourceId::take_bits)
    }

    /// Interrupts taken on the device's line so far.
    pub fn interrupt_count(&self) -> u32 {
        self.source.map_or(0, SourceId::count)
    }

    /// Sets `DRIVER_OK` (§3.1.1 step 8): the device is live.
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        self.check()
    }

    /// Fails if the device asks for a reset.
    pub fn check(&self) -> Result<(), VirtioError> {
        if self.read(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset);
        }
        Ok(())
    }

    /// Sets `FAILED`.
    pub fn fail(&self) {
        let now = self.read(reg::STATUS);
        self.write(reg::STATUS, now | status::FAILED);
    }

    /// Reads `read` from the configuration space until `ConfigGeneration` is the same before
    /// and after (§2.5.1), a few times at most.
    fn consistent<T>(&self, read: impl Fn(u64) -> T) -> T {
        let config = self.base.saturating_add(reg::CONFIG);
        let mut tries = 0;
        loop {
            let before = self.read(reg::CONFIG_GENERATION);
            let value = read(config);
            if self.read(reg::CONFIG_GENERATION) == before || tries >= GENERATION_RETRIES {
                return value;
            }
            tries += 1;
        }
    }

    /// A byte of the configuration space.
    pub fn config_u8(&self, offset: u64) -> u8 {
        self.consistent(|c| {
            c.checked_add(offset)
                .and_then(phys::read_volatile::<u8>)
                .unwrap_or(0)
        })
    }

    /// A little-endian 16-bit configuration field.
    pub fn config_u16(&self, offset: u64) -> u16 {
        self.consistent(|c| {
            c.checked_add(offset)
                .and_then(phys::read_volatile::<u16>)
                .unwrap_or(0)
        })
    }

    /// A little-endian 32-bit configuration field.
    pub fn config_u32(&self, offset: u64) -> u32 {
        self.consistent(|c| {
            c.checked_add(offset)
                .and_then(phys::read_volatile::<u32>)
                .unwrap_or(0)
        })
    }

    /// A little-endian 64-bit configuration field, read as two 32-bit halves (§4.2.2.2).
    pub fn config_u64(&self, offset: u64) -> u64 {
        self.consistent(|c| {
            let half = |o: u64| {
                c.checked_add(o)
                    .and_then(phys::read_volatile::<u32>)
                    .unwrap_or(0)
            };
            u64::from(half(offset)) | u64::from(half(offset.saturating_add(4))) << 32
        })
    }
}
