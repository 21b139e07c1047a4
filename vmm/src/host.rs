// SPDX-License-Identifier: Apache-2.0
//! What the VMs of one owner share: the KVM handle, the pool of pre-built VM shells, the
//! compiled seccomp filters of the VM threads and the count of VMs that still hold KVM
//! resources. The owner (the daemon, a test, a benchmark) makes one [`Host`] and passes it to
//! every [`crate::Vm::start`]; nothing of it is a process global, so two hosts in one process
//! (two tests running at once) have their own pools and counts.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::sync::Recover;

use crate::kvm::{KvmCell, KvmContext, KvmError};
use crate::pool::{CloneSource, PoolKey, ShellPool};
use crate::seccomp::{Filters, SeccompPolicy, ThreadRole};
use crate::snapshot::VmSnapshot;

/// The shared state of a set of VMs. Cheap to clone (clones share everything).
#[derive(Clone, Debug, Default)]
pub struct Host(Arc<HostInner>);

#[derive(Debug, Default)]
struct HostInner {
    kvm: Arc<KvmCell>,
    pool: Arc<ShellPool>,
    filters: Filters,
    live: Arc<LiveCount>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        // The refill thread holds the pool, not the host: tell it to end.
        self.pool.close();
    }
}

impl Host {
    /// A host with no VMs and an empty pool. `/dev/kvm` is opened by the first VM (or by
    /// [`Host::open_kvm`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens `/dev/kvm` now (if no VM has yet) and checks what the VMM needs of it, so a
    /// daemon can refuse to start on a host without a usable KVM.
    pub fn open_kvm(&self) -> Result<(), KvmError> {
        self.kvm().map(drop)
    }

    pub(crate) fn kvm(&self) -> Result<Arc<KvmContext>, KvmError> {
        self.0.kvm.get()
    }

    pub(crate) fn pool(&self) -> &ShellPool {
        &self.0.pool
    }

    pub(crate) fn filters(&self) -> &Filters {
        &self.0.filters
    }

    /// Keeps `depth` pre-built VM shells of `mem_mib` MiB ready from now on, so a VM of that
    /// size skips KVM's slowest setup steps (0 stops keeping them and frees the idle ones).
    pub fn set_pool_target(&self, mem_mib: u32, depth: usize) -> std::io::Result<()> {
        let key = PoolKey {
            mem_bytes: u64::from(mem_mib) << 20,
            template: None,
        };
        self.0.pool.set_target(&self.0.kvm, key, depth, None)
    }

    /// Shells of `mem_mib` MiB ready now.
    pub fn pool_ready(&self, mem_mib: u32) -> usize {
        self.0.pool.ready(PoolKey {
            mem_bytes: u64::from(mem_mib) << 20,
            template: None,
        })
    }

    /// Keeps `depth` shells ready for clones of `template` (0 stops and frees them): memory
    /// mapped copy-on-write from the template's, the vCPUs created and the VM's threads
    /// started under `seccomp` (the clones' policy), so a clone only writes saved state.
    pub fn set_clone_pool_target(
        &self,
        template: &VmSnapshot,
        depth: usize,
        seccomp: SeccompPolicy,
    ) -> std::io::Result<()> {
        let source = if depth == 0 {
            None
        } else {
            let filter = |role| {
                self.filters()
                    .get(role, seccomp)
                    .map_err(std::io::Error::other)
            };
            Some(CloneSource {
                memory: std::sync::Arc::clone(template.memory_arc()),
                vcpus: u8::try_from(template.vcpus()).map_err(std::io::Error::other)?,
                threads: (seccomp, filter(ThreadRole::Vcpu)?, filter(ThreadRole::Vmm)?),
            })
        };
        self.0
            .pool
            .set_target(&self.0.kvm, template.pool_key(), depth, source)
    }

    /// Shells ready now for clones of `template`.
    pub fn clone_pool_ready(&self, template: &VmSnapshot) -> usize {
        self.0.pool.ready(template.pool_key())
    }

    /// The host thread ids of the threads the pool started ahead for its ready shells (each
    /// becomes a VM's vCPU or VMM thread once a clone takes its shell): for telling the pool's
    /// CPU time from the VMs' by thread.
    pub fn pool_thread_ids(&self) -> Vec<u32> {
        self.0.pool.thread_ids()
    }

    /// Waits until the pool holds every shell its targets ask for, up to `timeout`.
    pub fn wait_pool_full(&self, timeout: Duration) -> bool {
        self.0.pool.wait_full(timeout)
    }

    /// How many VMs of this host still hold KVM resources (running or being torn down).
    pub fn live_vms(&self) -> usize {
        *self.0.live.count.lock().recover()
    }

    /// Waits until every VM of this host is torn down, up to `timeout`.
    pub fn wait_all_torn_down(&self, timeout: Duration) -> bool {
        let live = &self.0.live;
        let deadline = Instant::now() + timeout;
        let mut count = live.count.lock().recover();
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = live.cv.wait_timeout(count, left).recover().0;
        }
        true
    }

    /// Counts a VM as live until the returned guard is dropped (after its teardown).
    pub(crate) fn live_guard(&self) -> LiveGuard {
        *self.0.live.count.lock().recover() += 1;
        LiveGuard {
            host: Arc::clone(&self.0.live),
            vm: Arc::new(TornDown::default()),
        }
    }
}

/// Set once one VM is torn down: its devices (and the host endpoints they hold, such as a
/// hybrid vsock socket) are gone, its memory unmapped, its VM fd closed.
#[derive(Debug, Default)]
pub(crate) struct TornDown {
    done: Mutex<bool>,
    cv: Condvar,
}

impl TornDown {
    /// Waits until the VM is torn down, up to `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().recover();
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self.cv.wait_timeout(done, left).recover().0;
        }
        true
    }
}

#[derive(Debug, Default)]
struct LiveCount {
    count: Mutex<usize>,
    cv: Condvar,
}

/// One live VM of a [`Host`]; dropping it (the last thing a VM's teardown does) uncounts it
/// and marks that VM torn down.
#[derive(Debug)]
pub(crate) struct LiveGuard {
    host: Arc<LiveCount>,
    vm: Arc<TornDown>,
}

impl LiveGuard {
    /// What tells that this VM is torn down.
    pub(crate) fn torn_down(&self) -> Arc<TornDown> {
        Arc::clone(&self.vm)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        *self.vm.done.lock().recover() = true;
        self.vm.cv.notify_all();
        let mut count = self.host.count.lock().recover();
        *count = count.saturating_sub(1);
        self.host.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_vms_are_counted_per_host() {
        let (a, b) = (Host::new(), Host::new());
        let guard = a.live_guard();
        assert_eq!((a.live_vms(), b.live_vms()), (1, 0));
        assert!(b.wait_all_torn_down(Duration::ZERO));
        assert!(!a.wait_all_torn_down(Duration::from_millis(10)));
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.wait_all_torn_down(Duration::from_secs(10)))
        };
        drop(guard);
        assert!(waiter.join().unwrap());
        assert_eq!(a.live_vms(), 0);
    }
}
