// SPDX-License-Identifier: Apache-2.0
//! Wiring virtio-mmio devices to KVM: one 4 KiB MMIO slot and one interrupt line per device,
//! a KVM ioeventfd per queue on the transport's `QueueNotify` register (a guest notification
//! never exits to user space), a KVM irqfd for the device's interrupt, the device's event-loop
//! half subscribed to the VM's event manager, and the `virtio_mmio.device=` command-line entry
//! that tells the guest kernel where the device is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::virtio::block::{BlockConfig, FileDisk, VirtioBlock};
use devices::virtio::net::{NetBackend, NetConfig, Tap, VirtioNet};
use devices::virtio::transport::{MMIO_REGION_SIZE, MmioTransport, NOTIFY_REG_OFFSET};
use devices::virtio::vsock::{Vsock, VsockHandle, VsockMuxer};
use devices::virtio::{Interrupt, IrqTrigger, VirtioDevice};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};
use crate::bus::{Bus, BusDevice, BusError};

/// A device to give the VM.
#[derive(Debug)]
pub enum DeviceConfig {
    /// A virtio-blk slot: a raw image or block device, or empty (filled later with
    /// [`crate::Vm::attach_disk`]).
    Block(BlockConfig),
    /// A virtio-net device.
    Net {
        /// MAC address and MTU.
        config: NetConfig,
        /// Where frames go.
        backend: NetBackendConfig,
    },
    /// The virtio-vsock device (at most one).
    Vsock {
        /// The guest's context id (3 or more).
        guest_cid: u64,
        /// Hybrid-vsock unix socket (`CONNECT <port>` for host->guest, `<path>_<port>`
        /// listeners for guest->host); `None` for the in-process API only.
        uds_path: Option<PathBuf>,
    },
}

/// A network device's backend.
#[derive(Debug)]
pub enum NetBackendConfig {
    /// An existing or new TAP interface of this name (in the current network namespace).
    Tap(String),
    /// A backend object supplied by the caller (e.g. a loopback for tests).
    Custom(Box<dyn NetBackend>),
}

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No interrupt lines are left for another device.
    #[error("Too many devices: at most {} virtio devices fit", IRQ_MAX - IRQ_BASE + 1)]
    TooManyDevices,
    /// More than one vsock device was requested.
    #[error("Only one vsock device is supported")]
    DuplicateVsock,
    /// The guest CID is reserved.
    #[error("Invalid vsock guest CID {0} (must be at least 3)")]
    InvalidCid(u64),
    /// A block device could not be created.
    #[error("Failed to create block device {index}")]
    Block {
        /// Slot index.
        index: usize,
        /// Cause.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// A disk image could not be opened.
    #[error("Cannot open disk image {path:?}")]
    OpenDisk {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// No block slot has this index.
    #[error("No block slot {0}")]
    NoSuchSlot(usize),
    /// A TAP device could not be opened.
    #[error("Cannot open TAP device {name:?}")]
    Tap {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: devices::virtio::net::TapError,
    },
    /// A net device could not be created.
    #[error("Failed to create network device")]
    Net(#[source] devices::virtio::net::NetError),
    /// The vsock device could not be created.
    #[error("Failed to create the vsock device")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    /// An EventFd or irqfd/ioeventfd registration failed.
    #[error("Failed to set up {0}")]
    Setup(&'static str, #[source] std::io::Error),
    /// The device's MMIO window could not be placed.
    #[error("Failed to map the device")]
    Bus(#[from] BusError),
}

/// The event-loop halves of the devices, for the VMM thread's event manager.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The devices of one VM, as the handle needs them after start.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    pub(crate) blocks: Vec<Arc<Mutex<VirtioBlock>>>,
    pub(crate) vsock: Option<VsockHandle>,
}

/// Builds the virtio devices of one VM.
pub(crate) struct DeviceManager<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    next_slot: u32,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub(crate) cmdline: String,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) devices: Devices,
}

struct TransportBus(Mutex<MmioTransport>);

impl BusDevice for TransportBus {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.lock().expect("poisoned").read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.lock().expect("poisoned").write(offset, data);
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl<'a> DeviceManager<'a> {
    pub(crate) fn new(vm: &'a VmFd, mem: &'a GuestMemoryMmap, mmio: &'a mut Bus) -> Self {
        DeviceManager {
            vm,
            mem,
            mmio,
            next_slot: 0,
            cmdline: String::new(),
            subscribers: Vec::new(),
            devices: Devices::default(),
        }
    }

    /// Creates every configured device.
    pub(crate) fn add_all(&mut self, configs: Vec<DeviceConfig>) -> Result<(), DeviceError> {
        for config in configs {
            match config {
                DeviceConfig::Block(config) => {
                    let index = self.devices.blocks.len();
                    let dev = VirtioBlock::new(config)
                        .map_err(|source| DeviceError::Block { index, source })?;
                    let dev = self.add(dev)?;
                    self.devices.blocks.push(dev);
                }
                DeviceConfig::Net { config, backend } => {
                    let backend: Box<dyn NetBackend> = match backend {
                        NetBackendConfig::Tap(name) => Box::new(
                            Tap::open(&name).map_err(|source| DeviceError::Tap { name, source })?,
                        ),
                        NetBackendConfig::Custom(backend) => backend,
                    };
                    let dev = VirtioNet::new(config, backend).map_err(DeviceError::Net)?;
                    self.add(dev)?;
                }
                DeviceConfig::Vsock {
                    guest_cid,
                    uds_path,
                } => {
                    if self.devices.vsock.is_some() {
                        return Err(DeviceError::DuplicateVsock);
                    }
                    if guest_cid < 3 {
                        return Err(DeviceError::InvalidCid(guest_cid));
                    }
                    let muxer = VsockMuxer::new(guest_cid, uds_path).map_err(DeviceError::Vsock)?;
                    let handle = muxer.handle();
                    let dev = Vsock::new(guest_cid, muxer).map_err(DeviceError::Vsock)?;
                    self.add(dev)?;
                    self.devices.vsock = Some(handle);
                }
            }
        }
        Ok(())
    }

    /// Wires one device: MMIO slot, irqfd, ioeventfds, event-loop subscription, cmdline entry.
    fn add<T>(&mut self, dev: T) -> Result<Arc<Mutex<T>>, DeviceError>
    where
        T: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let irq = IRQ_BASE + self.next_slot;
        if irq > IRQ_MAX {
            return Err(DeviceError::TooManyDevices);
        }
        let base = VIRTIO_MMIO_START + u64::from(self.next_slot) * VIRTIO_MMIO_SLOT_SIZE;

        let trigger =
            Arc::new(IrqTrigger::new().map_err(|e| DeviceError::Setup("irq eventfd", e))?);
        self.vm
            .register_irqfd(trigger.event(), irq)
            .map_err(|e| DeviceError::Setup("irqfd", kvm_err(e)))?;
        for (index, evt) in dev.queue_events().iter().enumerate() {
            let queue = u32::try_from(index).map_err(|_| DeviceError::TooManyDevices)?;
            self.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), queue)
                .map_err(|e| DeviceError::Setup("ioeventfd", kvm_err(e)))?;
        }
        let dev = Arc::new(Mutex::new(dev));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let interrupt: Arc<dyn Interrupt> = trigger;
        let transport = MmioTransport::new(self.mem.clone(), as_virtio, interrupt);
        self.mmio.insert(
            Arc::new(TransportBus(Mutex::new(transport))),
            base,
            MMIO_REGION_SIZE,
        )?;
        self.subscribers.push(dev.clone());
        // The slot and irq stay taken only once everything above worked.
        self.next_slot += 1;
        let _ = write!(self.cmdline, " virtio_mmio.device=4K@{base:#x}:{irq}");
        Ok(dev)
    }
}

impl Devices {
    /// Puts a disk image into block slot `index` (the guest sees a config-change interrupt with
    /// the new capacity).
    pub(crate) fn attach_disk(
        &self,
        index: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<(), DeviceError> {
        let slot = self
            .blocks
            .get(index)
            .ok_or(DeviceError::NoSuchSlot(index))?;
        let disk = FileDisk::open(path, read_only).map_err(|source| DeviceError::OpenDisk {
            path: path.to_path_buf(),
            source,
        })?;
        slot.lock()
            .expect("poisoned")
            .attach(Box::new(disk), read_only)
            .map_err(|source| DeviceError::Block { index, source })
    }

    /// Empties block slot `index`.
    pub(crate) fn detach_disk(&self, index: usize) -> Result<(), DeviceError> {
        let slot = self
            .blocks
            .get(index)
            .ok_or(DeviceError::NoSuchSlot(index))?;
        slot.lock().expect("poisoned").detach();
        Ok(())
    }
}
