// SPDX-License-Identifier: Apache-2.0
//! A VM backend for tests (feature `test-utils`): no KVM, fully scriptable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use devices::sync::Recover;
use tokio::sync::watch;

use super::{
    AttachedDisk, BackendError, ShutdownRequest, TaskTarget, VmBackend, VmEnd, VmExitKind,
    VmHandle, VmMetrics, VmSpec, wait_end,
};
use crate::sandbox::StoredAny;

/// How a fake guest answers a shutdown request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeGuest {
    /// No graceful path (like a VM whose agent never came up).
    NoAgent,
    /// Shuts down cleanly this long after being asked.
    ShutsDownAfter(Duration),
    /// Ignores the request (the caller must force it).
    Ignores,
}

#[derive(Debug)]
struct Settings {
    start_delay: Duration,
    fail_starts: u32,
    guest: FakeGuest,
    gate: Option<Arc<tokio::sync::Barrier>>,
}

#[derive(Debug, Default)]
struct State {
    handles: BTreeMap<String, Arc<FakeVmHandle>>,
    starts: u64,
    specs: Vec<VmSpec>,
}

/// A fake VM backend. Clones share state, so a test keeps one and gives one to the service.
#[derive(Clone, Debug)]
pub struct FakeVmBackend {
    settings: Arc<Mutex<Settings>>,
    state: Arc<Mutex<State>>,
}

impl Default for FakeVmBackend {
    fn default() -> Self {
        FakeVmBackend {
            settings: Arc::new(Mutex::new(Settings {
                start_delay: Duration::ZERO,
                fail_starts: 0,
                guest: FakeGuest::NoAgent,
                gate: None,
            })),
            state: Arc::default(),
        }
    }
}

impl FakeVmBackend {
    /// A backend whose VMs start at once and have no agent.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every start take `d`.
    pub fn set_start_delay(&self, d: Duration) {
        self.settings.lock().recover().start_delay = d;
    }

    /// Makes every start wait until `n` starts are in flight at once: a test of concurrency
    /// that hangs (and so times out) if starts are serialized.
    pub fn set_start_gate(&self, n: usize) {
        self.settings.lock().recover().gate = Some(Arc::new(tokio::sync::Barrier::new(n)));
    }

    /// Makes the next `n` starts fail.
    pub fn fail_next_starts(&self, n: u32) {
        self.settings.lock().recover().fail_starts = n;
    }

    /// How guests of VMs started from now on answer shutdown requests.
    pub fn set_guest(&self, g: FakeGuest) {
        self.settings.lock().recover().guest = g;
    }

    /// The latest VM started for `sandbox_id`.
    pub fn handle(&self, sandbox_id: &str) -> Option<Arc<FakeVmHandle>> {
        self.state.lock().recover().handles.get(sandbox_id).cloned()
    }

    /// Number of successful starts so far.
    pub fn starts(&self) -> u64 {
        self.state.lock().recover().starts
    }

    /// Specs of every successful start, in order.
    pub fn specs(&self) -> Vec<VmSpec> {
        self.state.lock().recover().specs.clone()
    }

    /// Number of VMs that have not ended.
    pub fn running(&self) -> usize {
        self.state
            .lock()
            .recover()
            .handles
            .values()
            .filter(|h| h.ended().is_none())
            .count()
    }
}

#[async_trait]
impl VmBackend for FakeVmBackend {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        let (delay, fail, guest, gate) = {
            let mut s = self.settings.lock().recover();
            let fail = s.fail_starts > 0;
            s.fail_starts = s.fail_starts.saturating_sub(1);
            (s.start_delay, fail, s.guest, s.gate.clone())
        };
        if let Some(gate) = gate {
            gate.wait().await;
        }
        tokio::time::sleep(delay).await;
        if fail {
            return Err(BackendError::Start("fake VM refused to start".into()));
        }
        if !spec.kernel.exists() {
            return Err(BackendError::Config(
                format!("kernel {} does not exist", spec.kernel.display()).into(),
            ));
        }
        let (tx, _) = watch::channel(None);
        let handle = Arc::new(FakeVmHandle {
            spec: spec.clone(),
            guest,
            end: tx,
            resources: Mutex::default(),
            shutdown_requests: Mutex::new(0),
        });
        let mut st = self.state.lock().recover();
        st.starts += 1;
        st.specs.push(spec.clone());
        st.handles
            .insert(spec.sandbox_id.clone(), Arc::clone(&handle));
        Ok(Box::new(SharedFake(handle)))
    }
}

/// A fake VM. It "runs" until a test ends it or the service stops it.
#[derive(Debug)]
pub struct FakeVmHandle {
    spec: VmSpec,
    guest: FakeGuest,
    end: watch::Sender<Option<VmEnd>>,
    resources: Mutex<BTreeMap<String, StoredAny>>,
    shutdown_requests: Mutex<u32>,
}

impl FakeVmHandle {
    /// Ends the VM as if it had `kind` (no-op if it has ended already).
    pub fn end_with(&self, kind: VmExitKind) {
        self.end.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(VmEnd {
                kind,
                at: SystemTime::now(),
            });
            true
        });
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.end.borrow().clone()
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Resources applied, by container id.
    pub fn resources(&self) -> BTreeMap<String, StoredAny> {
        self.resources.lock().recover().clone()
    }

    /// How often the guest was asked to shut down.
    pub fn shutdown_requests(&self) -> u32 {
        *self.shutdown_requests.lock().recover()
    }
}

/// The boxed handle given to the service; shares the [`FakeVmHandle`] with the test.
#[derive(Debug)]
struct SharedFake(Arc<FakeVmHandle>);

#[async_trait]
impl TaskTarget for SharedFake {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        Err(BackendError::Unsupported("a fake VM has no agent"))
    }

    async fn attach_disk(
        &self,
        _: &std::path::Path,
        _: bool,
    ) -> Result<AttachedDisk, BackendError> {
        Err(BackendError::Unsupported("a fake VM has no block slots"))
    }

    async fn detach_disk(&self, _: u32) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("a fake VM has no block slots"))
    }
}

#[async_trait]
impl VmHandle for SharedFake {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// A fake VM cannot be handed over, and says so at once, on the caller's thread (as a
    /// KVM VM that has ended does).
    fn begin_handover(
        self: Arc<Self>,
        done: super::HandoverDone,
    ) -> Result<(), super::HandoverDone> {
        let refused = Err(BackendError::Unsupported("live handover"));
        done(super::Begun::Done(Box::new(refused)));
        Ok(())
    }

    fn ended(&self) -> Option<VmEnd> {
        self.0.ended()
    }

    async fn wait(&self) -> VmEnd {
        wait_end(self.0.end.subscribe()).await
    }

    async fn request_shutdown(&self, _: Duration) -> Result<ShutdownRequest, BackendError> {
        if self.0.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
        *self.0.shutdown_requests.lock().recover() += 1;
        match self.0.guest {
            FakeGuest::NoAgent => Ok(ShutdownRequest::Unsupported),
            FakeGuest::Ignores => Ok(ShutdownRequest::Requested),
            FakeGuest::ShutsDownAfter(d) => {
                let h = Arc::clone(&self.0);
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    h.end_with(VmExitKind::GuestShutdown);
                });
                Ok(ShutdownRequest::Requested)
            }
        }
    }

    async fn kill(&self) -> VmEnd {
        self.0.end_with(VmExitKind::HostStopped);
        self.wait().await
    }

    async fn metrics(&self) -> Result<VmMetrics, BackendError> {
        if self.0.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
        Ok(VmMetrics {
            vcpus: self.0.spec.vcpus,
            mem_mib: self.0.spec.mem_mib,
            guest_resident_bytes: 4096,
            console_bytes: 0,
            boot_time_ns: 1,
            host_cpu_usage_us: None,
            pod: None,
        })
    }

    async fn update_resources(
        &self,
        container_id: &str,
        resources: &StoredAny,
    ) -> Result<(), BackendError> {
        if self.0.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
        self.0
            .resources
            .lock()
            .recover()
            .insert(container_id.to_string(), resources.clone());
        Ok(())
    }
}
