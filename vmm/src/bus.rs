// SPDX-License-Identifier: Apache-2.0
//! Port I/O and MMIO dispatch from vCPU exits to devices.
//!
//! A bus is built once, before the vCPUs start, and is immutable afterwards (a virtio slot swaps
//! its backing inside the device, not on the bus), so lookups take no lock: a binary search over
//! sorted, non-overlapping ranges. Each device synchronises itself.

use std::sync::{Arc, Mutex};

use devices::legacy::{BootTimer, I8042, SerialConsole};
use devices::sync::Recover;

/// A device on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send + Sync {
    /// A guest read; fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range is empty or wraps around.
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<dyn BusDevice>,
}

/// An address space (PIO or MMIO) of devices.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.base, e.len)))
            .finish()
    }
}

impl Bus {
    /// Adds `dev` at `base..base + len`.
    pub fn insert(&mut self, dev: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let at = self.entries.partition_point(|e| e.base < base);
        let prev_overlaps = at
            .checked_sub(1)
            .and_then(|i| self.entries.get(i))
            .is_some_and(|p| p.base + p.len > base);
        let next_overlaps = self.entries.get(at).is_some_and(|n| n.base < end);
        if prev_overlaps || next_overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.insert(at, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&dyn BusDevice, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(at.checked_sub(1)?)?;
        let offset = addr - e.base;
        (offset < e.len).then_some((e.dev.as_ref(), offset))
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

impl BusDevice for Mutex<SerialConsole> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().recover().read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock().recover().write(offset, data);
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        I8042::read(self, offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        I8042::write(self, offset, data);
    }
}

impl BusDevice for BootTimer {
    fn read(&self, offset: u64, data: &mut [u8]) {
        BootTimer::read(self, offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        BootTimer::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[derive(Default)]
    struct Probe {
        last_write: AtomicU64,
    }

    impl BusDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&self, offset: u64, _data: &[u8]) {
            self.last_write.store(offset, Ordering::SeqCst);
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::default();
        let a = Arc::new(Probe::default());
        let b = Arc::new(Probe::default());
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        bus.insert(b.clone(), 0x200, 0x10).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x20f, &[1]));
        assert_eq!(b.last_write.load(Ordering::SeqCst), 0xf);
        assert!(!bus.read(0x110, &mut data));
        assert!(!bus.write(0xff, &[1]));
        assert!(!bus.write(u64::MAX, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Probe::default()), 0x100, 0x10).unwrap();
        for (base, len) in [(0x108, 0x10), (0xf8, 0x10), (0x100, 1), (0x0, 0x1000)] {
            assert!(matches!(
                bus.insert(Arc::new(Probe::default()), base, len),
                Err(BusError::Overlap { .. })
            ));
        }
        assert!(matches!(
            bus.insert(Arc::new(Probe::default()), 0x500, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Probe::default()), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(Arc::new(Probe::default()), 0x110, 0x10).unwrap();
    }
}
