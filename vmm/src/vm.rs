// SPDX-License-Identifier: Apache-2.0
//! The handle the caller keeps of a running VM ([`Vm`], built by [`crate::builder`]): requests
//! to its VMM thread, waiting for its end, and what it reports (console, boot time, memory).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use devices::legacy::{BootSignal, ConsoleTail};
use devices::virtio::block::FileDisk;
use devices::virtio::vsock::VsockHandle;
use vmm_sys_util::eventfd::EventFd;

use crate::VmExit;
use crate::api::{ApiRequest, REQUEST_TIMEOUT, VmmAction, VmmActionError, VmmData};
use crate::device_manager::DeviceError;
use crate::timings::StartupTimings;

/// How and when a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEnd {
    /// Why it ended.
    pub exit: VmExit,
    /// When it ended.
    pub at: SystemTime,
}

/// A VM's end, once it is known, and the waiters for it.
#[derive(Debug, Default)]
pub(crate) struct EndState {
    end: Mutex<Option<VmEnd>>,
    cv: Condvar,
}

impl EndState {
    /// Records the end and wakes every waiter.
    pub(crate) fn set(&self, end: VmEnd) {
        *self.end.lock().expect("poisoned") = Some(end);
        self.cv.notify_all();
    }
}

/// A running (or ended) VM.
#[derive(Debug)]
pub struct Vm {
    pub(crate) api_tx: Sender<ApiRequest>,
    /// The VMM thread's wake-up EventFd.
    pub(crate) wake: Arc<EventFd>,
    pub(crate) end: Arc<EndState>,
    pub(crate) boot: Arc<BootSignal>,
    pub(crate) console: Arc<ConsoleTail>,
    pub(crate) ram_file: Arc<File>,
    pub(crate) timings: StartupTimings,
    pub(crate) blk_slots: usize,
    pub(crate) vsock: Option<VsockHandle>,
}

impl Vm {
    /// Sends `action` to the VMM thread and waits for its answer (at most [`REQUEST_TIMEOUT`]).
    pub fn request(&self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        let name = action.name();
        let (tx, rx) = channel();
        self.api_tx
            .send((action, tx))
            .map_err(|_| VmmActionError::NotRunning)?;
        self.wake.write(1).map_err(|_| VmmActionError::NotRunning)?;
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(VmmActionError::TimedOut(name)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(VmmActionError::NotRunning),
        }
    }

    /// Stops every vCPU outside the guest until [`Vm::resume`].
    pub fn pause(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::Pause).map(drop)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::Resume).map(drop)
    }

    /// Stops the VM (if it still runs) and returns how it ended. Never hangs on the guest.
    pub fn stop(&self) -> VmEnd {
        // NotRunning means the VMM thread already finished: the end is recorded.
        let _ = self.request(VmmAction::Stop);
        self.wait()
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> VmEnd {
        let guard = self.end.end.lock().expect("poisoned");
        let guard = self
            .end
            .cv
            .wait_while(guard, |e| e.is_none())
            .expect("poisoned");
        guard.clone().expect("waited for Some")
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmEnd> {
        let guard = self.end.end.lock().expect("poisoned");
        let (guard, _) = self
            .end
            .cv
            .wait_timeout_while(guard, timeout, |e| e.is_none())
            .expect("poisoned");
        guard.clone()
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.end.end.lock().expect("poisoned").clone()
    }

    /// Time from `Vm::start` to the guest's boot-timer write, if it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot.get()
    }

    /// Waits up to `timeout` for the guest's boot-timer write (returns early if the VM ends).
    pub fn wait_boot(&self, timeout: Duration) -> Option<Duration> {
        self.boot.wait(timeout)
    }

    /// The last bytes of console output.
    pub fn console(&self) -> String {
        self.console.text()
    }

    /// Total console bytes printed so far.
    pub fn console_bytes(&self) -> u64 {
        self.console.total_bytes()
    }

    /// Puts the disk image at `path` into block slot `index` while the guest runs; the guest
    /// gets a config-change interrupt and sees the new capacity. The file is opened here, on
    /// the caller's thread; the VMM thread swaps it in ([`VmmAction::AttachDisk`]).
    pub fn attach_disk(
        &self,
        index: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<(), VmmActionError> {
        if index >= self.blk_slots {
            return Err(DeviceError::NoSuchSlot(index).into());
        }
        let disk = FileDisk::open(path, read_only).map_err(|source| DeviceError::OpenDisk {
            path: path.to_path_buf(),
            source,
        })?;
        self.request(VmmAction::AttachDisk {
            index,
            disk: Box::new(disk),
            read_only,
        })
        .map(drop)
    }

    /// Empties block slot `index` (capacity 0; I/O fails until the next attach).
    pub fn detach_disk(&self, index: usize) -> Result<(), VmmActionError> {
        self.request(VmmAction::DetachDisk { index }).map(drop)
    }

    /// Number of block slots.
    pub fn block_slots(&self) -> usize {
        self.blk_slots
    }

    /// The host side of the vsock device: connect to guest ports, listen for guest connections.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// Per-phase start-up times.
    pub fn timings(&self) -> &StartupTimings {
        &self.timings
    }

    /// Bytes of guest memory that hold data (touched by the guest or the VMM).
    pub fn guest_resident_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.ram_file.metadata()?.blocks() * 512)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.ended().is_none() {
            let _ = self.request(VmmAction::Stop);
        }
    }
}
