// SPDX-License-Identifier: Apache-2.0
//! A VM's virtio devices: what the caller asks for ([`DeviceConfig`]), building them
//! ([`DeviceManager`]; the wiring of each one to KVM is in [`mmio`]), and what the VM keeps of
//! them after start (`Devices`: the block slots, the vsock handle).
//!
//! Descriptors: a device has one notify EventFd for all its queues and no interrupt
//! descriptor (see [`mmio`]); an empty block slot has no descriptor at all until its first
//! disk. With the vsock device and 8 empty slots of a sandbox that is one EventFd, plus what
//! the vsock muxer holds (`devices::virtio::vsock`).
//!
//! A handed-over VM's disks come back into their slots as they were
//! ([`DeviceManager::restoring_disks`]): each with its notify EventFd, wired as a first disk's
//! (ioeventfd and event loop), and without a configuration change for the guest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::GuestMemoryMmap;
use devices::sync::Recover;
use devices::virtio::VirtioDevice;
use devices::virtio::block::{
    BlockConfig, BlockFile, DiskBackend, DiskInfo, FileDisk, VirtioBlock,
};
use devices::virtio::net::{NetBackend, NetConfig, Tap, VirtioNet};
use devices::virtio::transport::MmioState;
use devices::virtio::vsock::{Vsock, VsockHandle, VsockMuxer};
use event_manager::SubscriberId;
use kvm_ioctls::VmFd;

use crate::arch::layout::{IRQ_BASE, IRQ_MAX};
use crate::bus::{Bus, BusError};

mod mmio;

/// The event manager of a VM's VMM thread (its event loop), where the devices
/// register their descriptors.
pub(crate) type VmmEventManager =
    event_manager::EventManager<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>;

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
        /// The socket already bound at `uds_path` (a live handover passes the old VM's), or
        /// `None` to bind it.
        uds_listener: Option<std::os::unix::net::UnixListener>,
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
    /// A snapshot has no device in this slot.
    #[error("The snapshot has no device in slot {0}")]
    NotInSnapshot(usize),
    /// A device could not be brought back from its saved state.
    #[error("Device in slot {slot} cannot be restored")]
    Restore {
        /// MMIO slot.
        slot: usize,
        /// Cause.
        #[source]
        source: devices::virtio::transport::RestoreError,
    },
    /// No block slot has this index.
    #[error("No block slot {0}")]
    NoSuchSlot(usize),
    /// A handed-over disk could not be put back into its slot.
    #[error("Cannot put the handed-over disk back into block slot {index}")]
    RestoreDisk {
        /// Slot index.
        index: usize,
        /// Cause.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// A rebuilt block slot would show the guest another disk than it saw when its VM was
    /// saved (a disk missing, one too many, or another capacity or read-only flag).
    #[error(
        "Block slot {index} held {} when the VM was saved, rebuilt it would hold {}",
        disk_text(.saved),
        disk_text(.restored)
    )]
    DiskMismatch {
        /// Slot index.
        index: usize,
        /// What the saved VM's slot held.
        saved: Option<DiskInfo>,
        /// What the rebuilt slot would hold.
        restored: Option<DiskInfo>,
    },
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

/// A block slot's disk in words, for [`DeviceError::DiskMismatch`].
fn disk_text(disk: &Option<DiskInfo>) -> String {
    match disk {
        None => "no disk".into(),
        Some(d) if d.read_only => format!("a read-only disk of {} sectors", d.sectors),
        Some(d) => format!("a disk of {} sectors", d.sectors),
    }
}

/// A block slot and what its first disk needs to wire the slot's notify EventFd.
#[derive(Debug)]
pub(crate) struct BlockSlot {
    dev: Arc<Mutex<VirtioBlock>>,
    /// Its `QueueNotify` register.
    notify_addr: u64,
    /// Its half in the VMM thread's event loop.
    subscriber: SubscriberId,
    /// Whether its notify EventFd is registered with KVM (it has one).
    wired: bool,
}

/// The devices of one VM, as the handle and the VMM thread need them after start.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    pub(crate) blocks: Vec<BlockSlot>,
    pub(crate) vsock: Option<VsockHandle>,
    /// The vsock device itself (a snapshot checks it has no open connection).
    pub(crate) vsock_device: Option<Arc<Mutex<Vsock<VsockMuxer>>>>,
    /// The network devices, in the order they were configured (a handover passes on their
    /// backends' files).
    pub(crate) nets: Vec<Arc<Mutex<VirtioNet>>>,
    /// Every device's transport, in MMIO slot order (what a snapshot saves).
    pub(crate) transports: Vec<Arc<mmio::TransportBus>>,
    /// The directory the VMM thread is confined to (`seccomp::jail`): the hybrid vsock
    /// socket's, when [`DeviceManager::jailing`] and the VM has one.
    pub(crate) jail: Option<PathBuf>,
}

/// The host files a handed-over VM's devices use, passed on to the process that rebuilds it.
#[derive(Debug, Default)]
pub struct HandoverFiles {
    /// The hybrid vsock socket's listener.
    pub vsock: Option<std::os::unix::net::UnixListener>,
    /// Each network device's backend file (a TAP queue) and its MAC and MTU, in
    /// configuration order.
    pub nets: Vec<(std::fs::File, NetConfig)>,
    /// Each block slot's disk, in slot order (`None`: an empty slot). The rebuilt VM gets
    /// them back through [`crate::CloneConfig::disks`].
    pub blocks: Vec<Option<BlockFile>>,
}

/// Builds the virtio devices of one VM.
pub(crate) struct DeviceManager<'a> {
    vm: &'a Arc<VmFd>,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    /// The VMM thread's event loop, which gets each device's event-loop half.
    event_manager: &'a mut VmmEventManager,
    /// The next free MMIO slot (and interrupt line, `IRQ_BASE + slot`).
    next_slot: u32,
    /// Saved transports by slot, when the devices are restored from a snapshot.
    restore: Option<&'a [MmioState]>,
    /// A handed-over VM's disks, by block slot: taken as each slot is built.
    disks: Vec<Option<BlockFile>>,
    /// What each block slot of the saved VM held, when the rebuilt slots must match it.
    saved_disks: Option<&'a [Option<DiskInfo>]>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub(crate) cmdline: String,
    pub(crate) devices: Devices,
    /// Whether the VMM thread will be jailed in the hybrid vsock socket's directory.
    jailing: bool,
}

impl<'a> DeviceManager<'a> {
    pub(crate) fn new(
        vm: &'a Arc<VmFd>,
        mem: &'a GuestMemoryMmap,
        mmio: &'a mut Bus,
        event_manager: &'a mut VmmEventManager,
    ) -> Self {
        DeviceManager {
            vm,
            mem,
            mmio,
            event_manager,
            next_slot: 0,
            restore: None,
            disks: Vec::new(),
            saved_disks: None,
            cmdline: String::new(),
            devices: Devices::default(),
            jailing: false,
        }
    }

    /// Jails the VMM thread in the hybrid vsock socket's directory, if the VM gets one: the
    /// muxer resolves the socket's paths from there ([`VsockMuxer::serve_under`]).
    pub(crate) fn jailing(mut self, jailing: bool) -> Self {
        self.jailing = jailing;
        self
    }

    /// Restores every device's transport from `states` (by slot) instead of starting it new.
    pub(crate) fn restoring(mut self, states: &'a [MmioState]) -> Self {
        self.restore = Some(states);
        self
    }

    /// Puts `disks` (a handed-over VM's, by block slot) back into the block slots as they are
    /// built, and, with `saved`, checks every rebuilt slot holds what the saved VM's did.
    pub(crate) fn restoring_disks(
        mut self,
        disks: Vec<Option<BlockFile>>,
        saved: Option<&'a [Option<DiskInfo>]>,
    ) -> Self {
        self.disks = disks;
        self.saved_disks = saved;
        self
    }

    /// Creates block slot `index` from `config`, with the handed-over disk it held, if any.
    fn block_slot(
        &mut self,
        index: usize,
        config: BlockConfig,
    ) -> Result<VirtioBlock, DeviceError> {
        let mut dev =
            VirtioBlock::new(config).map_err(|source| DeviceError::Block { index, source })?;
        if let Some(file) = self.disks.get_mut(index).and_then(Option::take) {
            let restore = |source| DeviceError::RestoreDisk { index, source };
            let disk = DiskInfo {
                read_only: file.read_only,
                sectors: file.sectors,
            };
            let backend = FileDisk::from_file(file.file, file.read_only).map_err(restore)?;
            dev.restore_disk(Box::new(backend), disk).map_err(restore)?;
        }
        if let Some(saved) = self.saved_disks {
            let saved = saved.get(index).copied().flatten();
            let restored = dev.disk_info();
            if saved != restored {
                return Err(DeviceError::DiskMismatch {
                    index,
                    saved,
                    restored,
                });
            }
        }
        Ok(dev)
    }

    /// Creates every configured device.
    pub(crate) fn add_all(&mut self, configs: Vec<DeviceConfig>) -> Result<(), DeviceError> {
        for config in configs {
            match config {
                DeviceConfig::Block(config) => {
                    let index = self.devices.blocks.len();
                    // A restored disk brought its notify EventFd: wired below as any.
                    let dev = self.block_slot(index, config)?;
                    let wired = dev.notify_event().is_some();
                    let slot = self.add(dev)?;
                    self.devices.blocks.push(BlockSlot {
                        dev: slot.dev,
                        notify_addr: slot.notify_addr,
                        subscriber: slot.subscriber,
                        wired,
                    });
                }
                DeviceConfig::Net { config, backend } => {
                    let backend: Box<dyn NetBackend> = match backend {
                        NetBackendConfig::Tap(name) => Box::new(
                            Tap::open(&name).map_err(|source| DeviceError::Tap { name, source })?,
                        ),
                        NetBackendConfig::Custom(backend) => backend,
                    };
                    let dev = VirtioNet::new(config, backend).map_err(DeviceError::Net)?;
                    let dev = self.add(dev)?.dev;
                    self.devices.nets.push(dev);
                }
                DeviceConfig::Vsock {
                    guest_cid,
                    uds_path,
                    uds_listener,
                } => {
                    if self.devices.vsock.is_some() {
                        return Err(DeviceError::DuplicateVsock);
                    }
                    if guest_cid < 3 {
                        return Err(DeviceError::InvalidCid(guest_cid));
                    }
                    let root = uds_path
                        .as_deref()
                        .and_then(Path::parent)
                        .filter(|dir| self.jailing && !dir.as_os_str().is_empty())
                        .map(Path::to_path_buf);
                    let mut muxer = match uds_listener {
                        Some(listener) => VsockMuxer::with_listener(guest_cid, uds_path, listener),
                        None => VsockMuxer::new(guest_cid, uds_path),
                    }
                    .map_err(DeviceError::Vsock)?;
                    if let Some(root) = root {
                        muxer.serve_under(&root).map_err(DeviceError::Vsock)?;
                        self.devices.jail = Some(root);
                    }
                    let handle = muxer.handle();
                    let dev = Vsock::new(guest_cid, muxer).map_err(DeviceError::Vsock)?;
                    let dev = self.add(dev)?.dev;
                    self.devices.vsock = Some(handle);
                    self.devices.vsock_device = Some(dev);
                }
            }
        }
        // A disk for a slot the VM does not have.
        if let Some(index) = self.disks.iter().position(Option::is_some) {
            return Err(DeviceError::NoSuchSlot(index));
        }
        Ok(())
    }
}

impl Devices {
    /// Open vsock connections (a VM saved with one would have a peer no clone has).
    pub(crate) fn vsock_connections(&self) -> usize {
        self.vsock_device
            .as_ref()
            .map_or(0, |d| d.lock().recover().backend().connection_count())
    }

    /// The vsock device's open connections (host port, guest port).
    pub(crate) fn vsock_connection_ports(&self) -> Vec<(u32, u32)> {
        self.vsock_device.as_ref().map_or_else(Vec::new, |d| {
            d.lock().recover().backend().connection_ports()
        })
    }

    /// What each block slot holds, in slot order, as its guest sees it.
    pub(crate) fn disks(&self) -> Vec<Option<DiskInfo>> {
        self.blocks
            .iter()
            .map(|slot| slot.dev.lock().recover().disk_info())
            .collect()
    }

    /// Second descriptors of what the devices' backends hold on the host, for a live
    /// handover: the hybrid vsock listener, each network device's file in configuration
    /// order and each block slot's disk in slot order. Fails if a backend cannot be handed
    /// over.
    pub(crate) fn handover_files(&self) -> std::io::Result<HandoverFiles> {
        let vsock = match &self.vsock_device {
            Some(d) => d
                .lock()
                .recover()
                .backend()
                .try_clone_listener()
                .transpose()?,
            None => None,
        };
        let mut nets = Vec::with_capacity(self.nets.len());
        for (i, net) in self.nets.iter().enumerate() {
            let net = net.lock().recover();
            let file = net.backend().try_clone_file().ok_or_else(|| {
                std::io::Error::other(format!("network device {i} cannot be handed over"))
            })??;
            nets.push((file, net.config()));
        }
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, slot) in self.blocks.iter().enumerate() {
            let disk = slot.dev.lock().recover().handover_file().transpose();
            blocks.push(disk.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("the disk in block slot {i} cannot be handed over: {e}"),
                )
            })?);
        }
        Ok(HandoverFiles {
            vsock,
            nets,
            blocks,
        })
    }

    /// Closes the host ends of the vsock connections ([`VsockMuxer::drop_host_ends`]).
    pub(crate) fn release_vsock_host_ends(&self) {
        if let Some(d) = &self.vsock_device {
            d.lock().recover().backend_mut().drop_host_ends();
        }
    }

    /// Resets, in the guest, the connections a handed-over VM had ([`VsockMuxer::reset_stale`]).
    pub(crate) fn reset_stale_vsock(&self, ports: &[(u32, u32)]) {
        if let Some(d) = &self.vsock_device
            && !ports.is_empty()
        {
            d.lock().recover().backend_mut().reset_stale(ports);
        }
    }

    /// Every device's transport state, in slot order.
    pub(crate) fn states(&self) -> Vec<MmioState> {
        self.transports.iter().map(|t| t.state()).collect()
    }

    /// Puts `disk` into block slot `index` (the guest sees a config-change interrupt with the
    /// new capacity). The slot's first disk gives it its notify EventFd, registered here with
    /// KVM (`vm`); the returned subscriber must then be initialised again on the event loop,
    /// which registers the EventFd there. Until both are done the guest's notifications reach
    /// the device anyway: through the transport on the vCPU thread, then as a pending count
    /// of the EventFd.
    pub(crate) fn attach_disk(
        &mut self,
        vm: &VmFd,
        index: usize,
        disk: Box<dyn DiskBackend>,
        read_only: bool,
    ) -> Result<Option<SubscriberId>, DeviceError> {
        let slot = self.slot(index)?;
        let mut dev = slot.dev.lock().recover();
        dev.attach(disk, read_only)
            .map_err(|source| DeviceError::Block { index, source })?;
        if slot.wired {
            return Ok(None);
        }
        let Some(evt) = dev.notify_event() else {
            return Ok(None);
        };
        mmio::register_notify(vm, evt, slot.notify_addr)?;
        drop(dev);
        slot.wired = true;
        Ok(Some(slot.subscriber))
    }

    /// Empties block slot `index`.
    pub(crate) fn detach_disk(&mut self, index: usize) -> Result<(), DeviceError> {
        self.slot(index)?.dev.lock().recover().detach();
        Ok(())
    }

    fn slot(&mut self, index: usize) -> Result<&mut BlockSlot, DeviceError> {
        self.blocks
            .get_mut(index)
            .ok_or(DeviceError::NoSuchSlot(index))
    }
}
