// SPDX-License-Identifier: Apache-2.0
//! Wiring one virtio-mmio device to KVM: its 4 KiB MMIO slot on the bus, its interrupt line (a
//! [`crate::kvm::IrqLine`]: `KVM_IRQ_LINE`, no descriptor), its notify EventFd as one KVM
//! ioeventfd on the transport's `QueueNotify` register for any value (every queue; a guest
//! notification never exits to user space), its event-loop half on the VMM thread's event
//! manager, and the `virtio_mmio.device=` command-line entry that tells the guest kernel where it
//! is. A device without a notify EventFd yet (an empty block slot) gets its ioeventfd when it
//! gets the EventFd ([`super::Devices::attach_disk`]).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use devices::sync::Recover;
use devices::virtio::transport::{MMIO_REGION_SIZE, MmioState, MmioTransport, NOTIFY_REG_OFFSET};
use devices::virtio::{Interrupt, IrqTrigger, VirtioDevice};
use event_manager::{MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, DeviceManager};
use crate::arch::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
use crate::bus::BusDevice;
use crate::kvm::IrqLine;

/// A device's transport on the MMIO bus.
#[derive(Debug)]
pub(crate) struct TransportBus(Mutex<MmioTransport>);

impl TransportBus {
    /// The transport's state, for a snapshot.
    pub(crate) fn state(&self) -> MmioState {
        self.0.lock().recover().state()
    }
}

impl BusDevice for TransportBus {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.lock().recover().read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.lock().recover().write(offset, data);
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// Registers `evt` as the ioeventfd of every `QueueNotify` write at `notify_addr`, whatever
/// the value (the queue index): one registration per device.
pub(super) fn register_notify(
    vm: &VmFd,
    evt: &EventFd,
    notify_addr: u64,
) -> Result<(), DeviceError> {
    vm.register_ioevent(evt, &IoEventAddress::Mmio(notify_addr), NoDatamatch)
        .map_err(|e| DeviceError::Setup("ioeventfd", kvm_err(e)))
}

/// Where a device ended up.
pub(super) struct Wired<T> {
    pub(super) dev: Arc<Mutex<T>>,
    /// Its `QueueNotify` register.
    pub(super) notify_addr: u64,
    /// Its event-loop half.
    pub(super) subscriber: SubscriberId,
}

impl DeviceManager<'_> {
    /// Wires one device: MMIO slot, interrupt line, ioeventfd, event-loop subscription, cmdline
    /// entry. With saved states (a VM restored from a snapshot), the device's transport comes
    /// back in the state of the same slot.
    pub(super) fn add<T>(&mut self, dev: T) -> Result<Wired<T>, DeviceError>
    where
        T: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let irq = IRQ_BASE + self.next_slot;
        if irq > IRQ_MAX {
            return Err(DeviceError::TooManyDevices);
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next_slot) * VIRTIO_MMIO_SLOT_SIZE;
        let notify_addr = base + NOTIFY_REG_OFFSET;
        if let Some(evt) = dev.notify_event() {
            register_notify(self.vm, evt, notify_addr)?;
        }
        let line = Arc::new(IrqLine::new(Arc::clone(self.vm), irq));
        let interrupt: Arc<dyn Interrupt> = Arc::new(IrqTrigger::new(line));
        let dev = Arc::new(Mutex::new(dev));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let slot = usize::try_from(self.next_slot).map_err(|_| DeviceError::TooManyDevices)?;
        let transport = match self.restore.map(|states| states.get(slot)) {
            None => MmioTransport::new(self.mem.clone(), as_virtio, interrupt),
            Some(None) => return Err(DeviceError::NotInSnapshot(slot)),
            Some(Some(state)) => {
                MmioTransport::restore(self.mem.clone(), as_virtio, interrupt, state)
                    .map_err(|source| DeviceError::Restore { slot, source })?
            }
        };
        let transport = Arc::new(TransportBus(Mutex::new(transport)));
        self.mmio
            .insert(transport.clone(), base, MMIO_REGION_SIZE)?;
        self.devices.transports.push(transport);
        let subscriber = self.event_manager.add_subscriber(dev.clone());
        // The slot and irq stay taken only once everything above worked.
        self.next_slot += 1;
        let _ = write!(self.cmdline, " virtio_mmio.device=4K@{base:#x}:{irq}");
        Ok(Wired {
            dev,
            notify_addr,
            subscriber,
        })
    }
}
