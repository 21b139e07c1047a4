// SPDX-License-Identifier: Apache-2.0
//! The real backend: KVM microVMs inside this process ([`vmm::Vm`]).
//!
//! A [`KvmBackend`] VM gets one vsock device (guest CID [`GUEST_CID`], hybrid socket
//! `<state>/sbs/<id>/vsock.sock`) and `blk_slots` empty virtio-blk slots (serials
//! `sbx-slot-<n>`). Start returns only once the guest agent is ready and set up (the protocol is
//! in [`super::agent`]); a VM whose agent never comes up is stopped before Start fails.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use devices::sync::Recover;
use tokio::sync::watch;
use tracing::warn;

use super::agent::{self, READY_PORT, ReadyFallback};
use super::layout::{GUEST_CID, empty_slot, slot_serial, vm_config, vm_config_files};
use super::template::{Template, Templates};
use super::{
    AttachedDisk, BackendError, ShutdownRequest, StartPhases, TaskTarget, VmBackend, VmEnd,
    VmExitKind, VmHandle, VmMetrics, VmSpec, wait_end,
};
use crate::memcg::ChargeError;
use crate::sandbox::StoredAny;

impl From<vmm::VmEnd> for VmEnd {
    fn from(e: vmm::VmEnd) -> Self {
        let kind = match e.exit {
            vmm::VmExit::Reset(_) | vmm::VmExit::PowerOff => VmExitKind::GuestShutdown,
            vmm::VmExit::Stopped => VmExitKind::HostStopped,
            vmm::VmExit::Crashed(why) => VmExitKind::Crashed(why),
        };
        VmEnd { kind, at: e.at }
    }
}

/// The real backend: KVM microVMs inside this process ([`vmm::Vm`]), each with a vsock device
/// for its guest agent and empty block slots for container root filesystems.
#[derive(Clone, Debug, Default)]
pub struct KvmBackend {
    host: vmm::Host,
    templates: Option<Arc<Templates>>,
}

impl KvmBackend {
    /// A backend whose VMs share `host` (its KVM handle, shell pool and live count), booting
    /// every VM.
    pub fn new(host: vmm::Host) -> Self {
        KvmBackend {
            host,
            templates: None,
        }
    }

    /// The backend `sandboxer serve` runs with `config`: VM templates per `[template]`, their
    /// shapes recorded in `<state_dir>/templates.json`.
    pub fn from_config(host: vmm::Host, config: &crate::config::Config) -> Self {
        let backend = Self::new(host.clone());
        if !config.template.enabled {
            return backend;
        }
        let t = &config.template;
        backend.with_templates(Templates::new(
            host,
            usize::try_from(t.max_templates).unwrap_or(usize::MAX),
            usize::try_from(t.pool_depth).unwrap_or(usize::MAX),
            std::time::Duration::from_millis(t.build_timeout_ms),
            Some(config.state_dir.join("templates.json")),
        ))
    }

    /// The same, starting sandboxes that allow it from VM templates.
    pub fn with_templates(mut self, templates: Arc<Templates>) -> Self {
        self.templates = Some(templates);
        self
    }

    /// The templates, if on.
    pub fn templates(&self) -> Option<&Arc<Templates>> {
        self.templates.as_ref()
    }

    /// The host its VMs run on.
    pub fn host(&self) -> &vmm::Host {
        &self.host
    }
}

/// A VM of the [`KvmBackend`] whose agent is ready.
pub struct KvmHandle {
    pub(super) vm: Arc<vmm::Vm>,
    pub(super) spec: VmSpec,
    pub(super) end: watch::Receiver<Option<VmEnd>>,
    /// One ttrpc connection to the agent, shared by every caller.
    pub(super) agent: ttrpc::asynchronous::Client,
    /// The agent's ttrpc port in the guest.
    pub(super) agent_port: u32,
    /// Which block slots hold a disk.
    pub(super) slots: Mutex<Vec<bool>>,
    /// How long the start took, by phase.
    pub(super) phases: StartPhases,
}

impl fmt::Debug for KvmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmHandle")
            .field("sandbox_id", &self.spec.sandbox_id)
            .field("ended", &self.end.borrow().is_some())
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl VmBackend for KvmBackend {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        if spec.template
            && let Some(templates) = &self.templates
        {
            // Checked here so a missing file is a configuration error, not a template miss.
            vm_config_files(&spec)?;
            if let Some(template) = templates
                .lookup_or_wait(&spec, spec.agent_ready_timeout)
                .await
            {
                let nics = spec.nics.len();
                match self.start_clone(&spec, &template).await {
                    Ok(handle) => return Ok(handle),
                    // The pod's TAPs went with the failed clone: no VM may boot without them.
                    Err(e) if spec.nics.len() != nics => return Err(e),
                    // A clone that fails before that leaves its sandbox to a cold boot.
                    Err(e) => warn!(
                        sandbox_id = %spec.sandbox_id,
                        error = %crate::error_chain(&e),
                        "cannot clone the VM template; booting"
                    ),
                }
            }
        }
        self.boot(spec).await
    }

    fn template_stats(&self) -> Option<super::template::TemplateStats> {
        self.templates.as_ref().map(|t| t.stats())
    }

    async fn prepare(&self, spec: &VmSpec) {
        if let Some(templates) = &self.templates
            && vm_config_files(spec).is_ok()
        {
            templates.prepare(spec);
        }
    }

    async fn adopt(
        &self,
        spec: VmSpec,
        handover: super::Handover,
    ) -> Result<Box<dyn super::AdoptedVm>, BackendError> {
        self.adopt_vm(spec, handover).await
    }

    async fn prepare_adoption(
        &self,
        layout: super::MemoryLayout,
        spec: &VmSpec,
    ) -> Result<vmm::PreparedShell, BackendError> {
        self.prepare_shell(layout, spec).await
    }
}

impl KvmBackend {
    /// Boots a VM for `spec` and waits for its agent.
    async fn boot(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        let mut config = vm_config(&spec)?;
        if let Some(charged) = spec.memory.clone() {
            // The guest memory first, every page allocated in the sandbox's memory cgroup.
            let bytes = u64::from(spec.mem_mib) << 20;
            let memory = tokio::task::spawn_blocking(move || {
                let file = vmm::guest_memfd(bytes).map_err(ChargeError::Memfd)?;
                charged.cgroups.charge(&charged.group, &file, bytes)?;
                Ok(file)
            })
            .await
            .map_err(BackendError::Join)?
            .map_err(BackendError::Memory)?;
            config.memory = Some(Arc::new(memory));
        }
        let fallback = spec.vsock_uds.as_deref().and_then(ReadyFallback::bind);
        let mut phases = StartPhases::default();
        let host = self.host.clone();
        let (placement, vcpus) = (spec.cgroup.clone(), spec.vcpus);
        let (vm, listener, placed) = tokio::task::spawn_blocking(move || {
            let vm = vmm::Vm::start(&host, config)?;
            // Right after the vCPUs started: the guest has not reached its driver yet (and if
            // it had, the hybrid fallback listener takes the connection).
            let listener = vm
                .vsock()
                .map(|v| v.listen(READY_PORT))
                .unwrap_or_else(|| Err(io::Error::other("the VM has no vsock device")));
            // Its threads into the sandbox's CPU cgroup before the guest boots far.
            let placed = placement.map_or(Ok(()), |p| {
                p.attach(vcpus, || vm.ended().is_some(), || vm.thread_ids())
            });
            Ok::<_, vmm::VmError>((vm, listener, placed))
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| match e {
            vmm::VmError::Config(c) => BackendError::Config(Box::new(c)),
            other => BackendError::Start(Box::new(other)),
        })?;
        // The VMM's own measure: Vm::start until the vCPUs run (no thread hand-offs).
        phases.vm = vm.timings().total;
        let (vm, rx) = watched(vm);
        if let Err(e) = placed {
            stop_and_release(&vm).await;
            return Err(e);
        }
        let agent = agent::connect_agent(
            &vm,
            &spec,
            listener,
            fallback.as_ref(),
            rx.clone(),
            &mut phases,
        )
        .await;
        drop(fallback);
        let (agent, port) = match agent {
            Ok((client, port)) => (Ok(client), port),
            Err(e) => (Err(e), 0),
        };
        handle(vm, spec, rx, agent, port, phases, &[]).await
    }

    /// Starts `spec`'s VM as a clone of `template` and sets its agent up: the agent was ready
    /// in the template, so the host connects at once; each NIC gets the pod's MAC.
    async fn start_clone(
        &self,
        spec: &VmSpec,
        template: &Arc<Template>,
    ) -> Result<Box<dyn VmHandle>, BackendError> {
        let mut phases = StartPhases::default();
        let mut devices = vec![vmm::DeviceConfig::Vsock {
            guest_cid: GUEST_CID,
            uds_path: spec.vsock_uds.clone(),
            uds_listener: None,
        }];
        devices.extend((0..spec.blk_slots).map(empty_slot));
        let nics = spec.nics.take();
        if nics.len() != template.nic_macs.len() {
            return Err(BackendError::Start(
                format!(
                    "the template has {} NICs, the pod {}",
                    template.nic_macs.len(),
                    nics.len()
                )
                .into(),
            ));
        }
        devices.extend(nics);
        let config = clone_config(spec, devices, None);
        let (host, tpl) = (self.host.clone(), Arc::clone(template));
        let vm =
            tokio::task::spawn_blocking(move || vmm::Vm::clone_from(&host, &tpl.snapshot, config))
                .await
                .map_err(BackendError::Join)?
                .map_err(|e| BackendError::Start(Box::new(e)))?;
        // The VMM's own measure: Vm::clone_from until the vCPUs run.
        phases.vm = vm.timings().total;
        let (vm, rx) = watched(vm);
        // Its threads into the sandbox's CPU cgroup beside the agent's setup, not before it:
        // moving a thread between cgroups can wait out an RCU grace period (~5-10 ms here),
        // which would double a clone's Start. The pod's limit applies from then on; a VM whose
        // threads cannot be placed is stopped (its sandbox ends, and says why in the log).
        if let Some(placement) = spec.cgroup.clone() {
            let (vm, vcpus) = (Arc::clone(&vm), spec.vcpus);
            tokio::task::spawn_blocking(move || {
                let placed = placement.attach(vcpus, || vm.ended().is_some(), || vm.thread_ids());
                if let Err(e) = placed {
                    tracing::error!(
                        error = %crate::error_chain(&e),
                        "a clone's threads could not be placed in its CPU cgroup: stopping it"
                    );
                    vm.stop();
                }
            });
        }
        let mut setup = spec.setup.clone();
        for (iface, mac) in setup.interfaces.iter_mut().zip(&template.nic_macs) {
            iface.new_mac = std::mem::take(&mut iface.mac);
            iface.mac = format_mac(mac);
        }
        let agent = agent::connect_and_setup(&vm, template.agent_port, &setup, &mut phases).await;
        let port = template.agent_port;
        handle(vm, spec.clone(), rx, agent, port, phases, &[]).await
    }
}

/// The handle of a VM whose agent setup ended with `agent`; a VM whose agent failed is
/// stopped (nothing of it may stay behind). `attached` says which block slots hold a disk
/// already (a VM taken over in a live upgrade); the others are free.
pub(super) async fn handle(
    vm: Arc<vmm::Vm>,
    spec: VmSpec,
    end: watch::Receiver<Option<VmEnd>>,
    agent: Result<ttrpc::asynchronous::Client, BackendError>,
    agent_port: u32,
    phases: StartPhases,
    attached: &[bool],
) -> Result<Box<dyn VmHandle>, BackendError> {
    let agent = match agent {
        Ok(agent) => agent,
        Err(e) => {
            stop_and_release(&vm).await;
            return Err(e);
        }
    };
    let slots = usize::try_from(spec.blk_slots).unwrap_or(usize::MAX);
    let slots = (0..slots)
        .map(|i| attached.get(i).copied().unwrap_or(false))
        .collect();
    Ok(Box::new(KvmHandle {
        vm,
        spec,
        end,
        agent,
        agent_port,
        slots: Mutex::new(slots),
        phases,
    }))
}

/// How a VM for `spec` is cloned or rebuilt with `devices`: its console and seccomp policy;
/// frozen on `shell` (a handover's VM built ahead), or running at once without one.
pub(super) fn clone_config(
    spec: &VmSpec,
    devices: Vec<vmm::DeviceConfig>,
    shell: Option<vmm::PreparedShell>,
) -> vmm::CloneConfig {
    vmm::CloneConfig {
        console: vmm::ConsoleConfig {
            log_path: spec.console_log.clone(),
            log_max_bytes: spec.console_log_max_bytes,
            stdout: false,
        },
        seccomp: spec.seccomp,
        devices,
        paused: shell.is_some(),
        shell,
        disks: Vec::new(),
    }
}

/// Watches `vm`'s end: its VMM thread publishes it on the returned channel as it records it
/// ([`vmm::Vm::on_end`]), so no thread of the daemon waits for it.
pub(super) fn watched(vm: vmm::Vm) -> (Arc<vmm::Vm>, watch::Receiver<Option<VmEnd>>) {
    let (tx, rx) = watch::channel(None);
    // `send_replace` only takes the channel's lock and wakes the receivers' tasks: fit for
    // the VMM thread.
    vm.on_end(move |end| {
        tx.send_replace(Some(VmEnd::from(end.clone())));
    });
    (Arc::new(vm), rx)
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Stops `vm` and waits for its end (off the async workers).
pub(super) async fn stop_now(vm: &Arc<vmm::Vm>) -> vmm::VmEnd {
    let stopping = Arc::clone(vm);
    match tokio::task::spawn_blocking(move || stopping.stop()).await {
        Ok(end) => end,
        // The blocking pool is gone (runtime shutting down): stop on this thread.
        Err(_) => vm.stop(),
    }
}

/// How long a failed start waits for its VM's teardown.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Stops a VM whose start failed and waits until it is torn down, so that what it held on the
/// host (its hybrid vsock socket path above all) is free for the VM that may follow: a
/// sandbox whose clone failed boots at once, on the same paths.
async fn stop_and_release(vm: &Arc<vmm::Vm>) {
    stop_now(vm).await;
    let releasing = Arc::clone(vm);
    let released = tokio::task::spawn_blocking(move || releasing.wait_torn_down(RELEASE_WAIT))
        .await
        .unwrap_or(false);
    if !released {
        warn!("a VM whose start failed was not torn down within {RELEASE_WAIT:?}");
    }
}

impl KvmHandle {
    /// Fails once the VM has ended (read from the VM itself: the waiter thread's watch may
    /// lag behind a `kill`).
    fn running(&self) -> Result<(), BackendError> {
        match self.vm.ended() {
            Some(_) => Err(BackendError::NotRunning),
            None => Ok(()),
        }
    }

    fn release(&self, index: usize) {
        if let Some(used) = self.slots.lock().recover().get_mut(index) {
            *used = false;
        }
    }
}

#[async_trait]
impl TaskTarget for KvmHandle {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        self.running()?;
        Ok(self.agent.clone())
    }

    async fn attach_disk(
        &self,
        path: &Path,
        read_only: bool,
    ) -> Result<AttachedDisk, BackendError> {
        self.running()?;
        let index = {
            let mut slots = self.slots.lock().recover();
            let total = slots.len();
            let (index, used) = slots
                .iter_mut()
                .enumerate()
                .find(|(_, used)| !**used)
                .ok_or(BackendError::NoFreeSlot(total))?;
            *used = true;
            index
        };
        let slot = u32::try_from(index).expect("slot indexes come from a u32 count");
        let (vm, path) = (Arc::clone(&self.vm), path.to_path_buf());
        let attached = tokio::task::spawn_blocking(move || vm.attach_disk(index, &path, read_only))
            .await
            .map_err(BackendError::Join)
            .and_then(|r| r.map_err(|e| BackendError::Slot(slot, e)));
        if let Err(e) = attached {
            self.release(index);
            return Err(e);
        }
        Ok(AttachedDisk {
            slot,
            source: format!("blk:{}", slot_serial(slot)),
        })
    }

    async fn detach_disk(&self, slot: u32) -> Result<(), BackendError> {
        let index = usize::try_from(slot).map_err(|_| BackendError::SlotNotAttached(slot))?;
        let used = self
            .slots
            .lock()
            .recover()
            .get(index)
            .copied()
            .unwrap_or(false);
        if !used {
            return Err(BackendError::SlotNotAttached(slot));
        }
        let vm = Arc::clone(&self.vm);
        tokio::task::spawn_blocking(move || vm.detach_disk(index))
            .await
            .map_err(BackendError::Join)?
            .map_err(|e| BackendError::Slot(slot, e))?;
        self.release(index);
        Ok(())
    }
}

#[async_trait]
impl VmHandle for KvmHandle {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn start_phases(&self) -> StartPhases {
        self.phases
    }

    fn thread_ids(&self) -> Vec<u32> {
        self.vm.thread_ids()
    }

    fn ended(&self) -> Option<VmEnd> {
        self.vm.ended().map(VmEnd::from)
    }

    async fn wait(&self) -> VmEnd {
        wait_end(self.end.clone()).await
    }

    async fn request_shutdown(&self, grace: Duration) -> Result<ShutdownRequest, BackendError> {
        self.running()?;
        agent::request_shutdown(&self.agent, grace).await?;
        Ok(ShutdownRequest::Requested)
    }

    async fn kill(&self) -> VmEnd {
        stop_now(&self.vm).await.into()
    }

    async fn metrics(&self) -> Result<VmMetrics, BackendError> {
        self.running()?;
        let pod = agent::pod_stats(&self.agent, &self.spec.sandbox_id).await;
        Ok(VmMetrics {
            vcpus: self.spec.vcpus,
            mem_mib: self.spec.mem_mib,
            guest_resident_bytes: self
                .vm
                .guest_resident_bytes()
                .map_err(BackendError::Metrics)?,
            console_bytes: self.vm.console_bytes(),
            boot_time_ns: self
                .vm
                .boot_time()
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            host_cpu_usage_us: None,
            pod,
        })
    }

    async fn update_resources(
        &self,
        container_id: &str,
        resources: &StoredAny,
    ) -> Result<(), BackendError> {
        self.running()?;
        agent::update_resources(&self.agent, container_id, resources).await
    }

    fn memory_layout(&self) -> Option<super::MemoryLayout> {
        Some(self.layout())
    }

    async fn precopy(&self) -> Result<Option<(Arc<std::fs::File>, u64)>, BackendError> {
        self.copy_ahead().await
    }

    async fn handover(&self) -> Result<super::Handover, BackendError> {
        self.hand_over().await
    }

    fn begin_handover(
        self: Arc<Self>,
        done: super::HandoverDone,
    ) -> Result<(), super::HandoverDone> {
        self.begin_hand_over(done);
        Ok(())
    }

    async fn resume_after_handover(&self) -> Result<(), BackendError> {
        self.resume_here().await
    }

    async fn release_after_handover(&self) {
        let vm = Arc::clone(&self.vm);
        let _ = tokio::task::spawn_blocking(move || vm.release_host_ends()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::error::error_chain;

    #[test]
    fn vm_exit_mapping() {
        let at = SystemTime::UNIX_EPOCH;
        let map = |exit| VmEnd::from(vmm::VmEnd { exit, at }).kind;
        assert_eq!(map(vmm::VmExit::PowerOff), VmExitKind::GuestShutdown);
        assert_eq!(
            map(vmm::VmExit::Reset(vmm::ResetKind::TripleFault)),
            VmExitKind::GuestShutdown
        );
        assert_eq!(map(vmm::VmExit::Stopped), VmExitKind::HostStopped);
        assert_eq!(
            map(vmm::VmExit::Crashed("boom".into())),
            VmExitKind::Crashed("boom".into())
        );
    }

    #[tokio::test]
    async fn kvm_backend_reports_a_missing_kernel_as_config_error() {
        let spec = VmSpec::for_test("x", "/nonexistent/vmlinux".into());
        match KvmBackend::default().start(spec).await {
            Err(BackendError::Config(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn kvm_backend_requires_an_initramfs() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec::for_test("x", kernel);
        match KvmBackend::default().start(spec.clone()).await {
            Err(e @ BackendError::Config(_)) => {
                assert!(error_chain(&e).contains("no agent initramfs"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        spec.initramfs = Some(tmp.path().join("missing.cpio"));
        match KvmBackend::default().start(spec).await {
            Err(e @ BackendError::Config(_)) => {
                assert!(error_chain(&e).contains("missing.cpio"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn slot_serials_fit_get_id() {
        assert_eq!(slot_serial(0), "sbx-slot-0");
        // virtio-blk GET_ID carries at most 20 bytes.
        assert!(slot_serial(u32::MAX).len() <= 20);
    }
}
