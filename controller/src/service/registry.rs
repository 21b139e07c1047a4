// SPDX-License-Identifier: Apache-2.0
//! The sandboxes in memory: one [`Entry`] per sandbox (its record, VM, network and Task
//! endpoint, and its lifecycle lock), and [`Locked`], the one way an operation holds a sandbox.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::sync::Recover;
use tokio::sync::{OwnedMutexGuard, watch};

use crate::backend::VmHandle;
use crate::network::{NsId, PodNetwork};
use crate::sandbox::{ExitInfo, SandboxRecord, SandboxState};
use crate::task::TaskServer;

/// One sandbox in the registry.
#[derive(Debug)]
pub(super) struct Entry {
    /// Serializes lifecycle operations of this sandbox (held through [`Locked`]).
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    /// Record and VM; locked only for short, non-async sections.
    pub(super) data: Mutex<EntryData>,
    /// The exit, once the sandbox has ended (Wait watches it).
    pub(super) end: watch::Sender<Option<ExitInfo>>,
    /// The network namespace of its `netns_path`, if it has one that can be read: no other
    /// sandbox may be created in it.
    pub(super) netns: Option<NsId>,
    /// Its VM's memory (fixed at Create), counted against `[limits] max_total_mem_mib`.
    pub(super) mem_mib: u32,
}

#[derive(Debug)]
pub(super) struct EntryData {
    pub(super) record: SandboxRecord,
    pub(super) vm: Option<Arc<dyn VmHandle>>,
    /// The pod network set up at Start (taps + tc in the pod netns), torn down at Shutdown.
    pub(super) net: Option<PodNetwork>,
    /// The Task endpoint (`task.sock`), from Start until Shutdown.
    pub(super) task: Option<TaskServer>,
}

impl Entry {
    /// An entry for `record`, its netns read from its `netns_path` (a reloaded record).
    pub(super) fn new(record: SandboxRecord) -> Arc<Self> {
        let netns = (!record.netns_path.is_empty())
            .then(|| NsId::of(Path::new(&record.netns_path)).ok())
            .flatten();
        Self::with_netns(record, netns)
    }

    /// An entry for `record` in network namespace `netns` (Create has it checked already).
    pub(super) fn with_netns(record: SandboxRecord, netns: Option<NsId>) -> Arc<Self> {
        let (end, _) = watch::channel(record.exit.clone());
        Arc::new(Entry {
            netns,
            mem_mib: record.vm.mem_mib,
            op: Arc::new(tokio::sync::Mutex::new(())),
            data: Mutex::new(EntryData {
                record,
                vm: None,
                net: None,
                task: None,
            }),
            end,
        })
    }

    pub(super) fn with<R>(&self, f: impl FnOnce(&mut EntryData) -> R) -> R {
        f(&mut self.data.lock().recover())
    }

    pub(super) fn snapshot(&self) -> (SandboxRecord, Option<Arc<dyn VmHandle>>) {
        self.with(|d| (d.record.clone(), d.vm.clone()))
    }

    /// Records the end (state and exit), drops the VM handle and returns the record to persist.
    /// A no-op returning `None` when the end is recorded already.
    pub(super) fn finish(&self, state: SandboxState, exit: ExitInfo) -> Option<SandboxRecord> {
        self.with(|d| {
            if d.record.exit.is_some() {
                return None;
            }
            if !d.record.state.can_transition_to(state) {
                return None;
            }
            d.record.state = state;
            crate::metrics::global().observe_exit(&exit);
            d.record.exit = Some(exit);
            d.vm = None;
            Some(d.record.clone())
        })
    }

    /// Wakes every Wait.
    pub(super) fn notify(&self) {
        let exit = self.with(|d| d.record.exit.clone());
        if exit.is_some() {
            self.end.send_replace(exit);
        }
    }
}

/// A lifecycle operation's hold on one sandbox: its lock, taken for as long as this lives.
///
/// An operation that changes the record works on a copy ([`Locked::snapshot`]) and ends with
/// [`SandboxService::commit`](super::SandboxService), so a failed save leaves the record as it
/// was.
#[derive(Debug)]
pub(super) struct Locked {
    entry: Arc<Entry>,
    _op: OwnedMutexGuard<()>,
}

impl Locked {
    /// Waits for the sandbox's lifecycle lock.
    pub(super) async fn new(entry: Arc<Entry>) -> Self {
        let op = Arc::clone(&entry.op).lock_owned().await;
        Locked { entry, _op: op }
    }

    /// The sandbox.
    pub(super) fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// A copy of the record and the VM, as they are now.
    pub(super) fn snapshot(&self) -> (SandboxRecord, Option<Arc<dyn VmHandle>>) {
        self.entry.snapshot()
    }
}
