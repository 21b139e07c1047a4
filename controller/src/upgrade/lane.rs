// SPDX-License-Identifier: Apache-2.0
//! A second thread that rebuilds handed-over VMs beside the one receiving them.
//!
//! The new process writes each VM's state as its frame arrives, on the receiving thread (a
//! task or thread hop per VM costs more here than the writing). Alone, that thread left the
//! other CPU idle once the old process had frozen every VM (a perf profile of the window: from
//! then on one CPU did all the restores, the other waited): the next VM goes to this lane
//! whenever it has nothing to do.

use std::sync::Arc;

use super::{Rebuilt, UpgradeError, rebuild, wire};
use crate::backend::VmBackend;
use crate::service::SandboxService;
use crate::service::handover::Adoption;

/// One VM to rebuild: its frame and the shell built for it (boxed: it passes by value).
pub(super) type Job = Box<(wire::Frame<super::Msg>, Option<Adoption>)>;

/// The lane: a blocking-pool thread taking jobs in order.
pub(super) struct Lane {
    jobs: std::sync::mpsc::Sender<Job>,
    results: tokio::sync::mpsc::UnboundedReceiver<Result<Rebuilt, UpgradeError>>,
    /// Jobs given and not yet answered.
    pending: usize,
}

impl Lane {
    /// Starts the lane's thread, which first faults in `warm` bytes of its heap
    /// ([`vmm::warm_heap`]); it ends when the lane is dropped.
    pub(super) fn start<B: VmBackend>(service: &Arc<SandboxService<B>>, warm: usize) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (tx, results) = tokio::sync::mpsc::unbounded_channel();
        let service = Arc::clone(service);
        let runtime = tokio::runtime::Handle::current();
        drop(tokio::task::spawn_blocking(move || {
            vmm::warm_heap(warm);
            while let Ok(job) = rx.recv() {
                let (frame, ready) = *job;
                let rebuilt = runtime.block_on(rebuild(&service, frame, ready));
                if tx.send(rebuilt).is_err() {
                    return;
                }
            }
        }));
        Lane {
            jobs,
            results,
            pending: 0,
        }
    }

    /// Gives the lane a VM to rebuild; `Err` gives it back (the lane has ended).
    pub(super) fn give(&mut self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|e| e.0)?;
        self.pending += 1;
        Ok(())
    }

    /// Whether the lane has nothing to do.
    pub(super) fn idle(&self) -> bool {
        self.pending == 0
    }

    /// A VM the lane rebuilt, if one is done.
    pub(super) fn try_done(&mut self) -> Option<Result<Rebuilt, UpgradeError>> {
        let done = self.results.try_recv().ok()?;
        self.pending -= 1;
        Some(done)
    }

    /// The next VM the lane rebuilds; `None` once every job was answered.
    pub(super) async fn done(&mut self) -> Option<Result<Rebuilt, UpgradeError>> {
        if self.pending == 0 {
            return None;
        }
        let done = self.results.recv().await.unwrap_or_else(|| {
            Err(UpgradeError::Io(
                "the rebuilding lane ended".into(),
                std::io::Error::other("its thread is gone"),
            ))
        });
        self.pending -= 1;
        Some(done)
    }
}
