// SPDX-License-Identifier: Apache-2.0
//! A [`KvmHandle`]'s VM handed over to another process (a live upgrade, docs/restarts.md):
//! [`VmHandle::handover`] freezes the VM and saves it ([`vmm::Vm::handover`]); the new
//! process rebuilds it frozen on the same guest memory with the same host files
//! ([`VmBackend::adopt`](super::VmBackend::adopt)), and once the old process has let go, [`AdoptedVm::resume`] lets it
//! run, connects to its agent again and sets the guest's clock.
//!
//! What a handover carries besides the VM's state: the agent's ttrpc port, and the host files
//! of its devices (the vsock socket, the TAP queues, the disks in its block slots). The vsock
//! connections the old process had (its agent client) are reset in the guest; the agent
//! keeps listening and its containers run on. Each container disk goes back into its slot
//! unseen by the guest, and the adopted handle knows those slots are taken, so a later
//! detach frees them and an attach picks another.

use std::sync::Arc;

use async_trait::async_trait;
use devices::virtio::net::Tap;
use tokio::sync::watch;

use super::kvm::{KvmBackend, KvmHandle, clone_config, handle, stop_now, watched};
use super::layout::{GUEST_CID, empty_slot};
use super::{BackendError, StartPhases, VmEnd, VmHandle, VmSpec, agent};

/// Pause between two dials of a taken-over guest's agent.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// How long a taken-over guest's agent is dialled at least.
const RECONNECT_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

/// A VM frozen and saved for a live handover, with what its rebuild needs besides its state.
#[derive(Debug)]
pub struct Handover {
    /// The VM's state, memory and device files ([`vmm::VmSnapshot`]).
    pub snapshot: vmm::VmSnapshot,
    /// The guest agent's ttrpc port.
    pub agent_port: u32,
    /// The new process's VM built ahead on the same memory
    /// ([`VmBackend::prepare_adoption`](super::VmBackend::prepare_adoption)).
    pub shell: Option<vmm::PreparedShell>,
}

/// What the new process needs to build a running VM's shell before it is frozen.
#[derive(Debug, Clone)]
pub struct MemoryLayout {
    /// The guest memory's memfd (for a clone: its template's).
    pub memory: Arc<std::fs::File>,
    /// Whether the VM maps it copy-on-write (a clone).
    pub private: bool,
    /// Its size.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// A clone's pages copied while it ran ([`VmHandle::precopy`]) and the copy's id: the
    /// new process writes them into the VM it builds ahead, and the handover then carries
    /// only what differs from them.
    pub base: Option<(Arc<std::fs::File>, u64)>,
}

/// A VM rebuilt from a [`Handover`], frozen until the old process has let it go.
#[async_trait]
pub trait AdoptedVm: Send + std::fmt::Debug {
    /// Lets the guest run (its vCPUs and devices), at once: the end of its pause.
    fn run(&self) -> Result<(), BackendError>;
    /// Connects to its agent again and sets the guest's clock (after [`AdoptedVm::run`]); the
    /// VM is then the sandbox's VM of this process.
    async fn resume(self: Box<Self>) -> Result<Box<dyn VmHandle>, BackendError>;
}

impl KvmHandle {
    /// [`VmHandle::memory_layout`] of a KVM VM.
    pub(super) fn layout(&self) -> MemoryLayout {
        let (memory, private, mem_bytes, vcpus) = self.vm.memory_layout();
        MemoryLayout {
            memory: Arc::clone(memory),
            private,
            mem_bytes,
            vcpus,
            base: None,
        }
    }

    /// [`VmHandle::precopy`] of a KVM VM.
    pub(super) async fn copy_ahead(
        &self,
    ) -> Result<Option<(Arc<std::fs::File>, u64)>, BackendError> {
        let vm = Arc::clone(&self.vm);
        let copy = tokio::task::spawn_blocking(move || {
            vm.ready_for_handover();
            vm.precopy()
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::Handover(crate::error_chain(&e)))?;
        Ok(copy.map(|c| (c.pages, c.id)))
    }

    /// [`VmHandle::handover`] of a KVM VM.
    pub(super) async fn hand_over(&self) -> Result<Handover, BackendError> {
        if self.vm.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
        let vm = Arc::clone(&self.vm);
        let snapshot = tokio::task::spawn_blocking(move || vm.handover())
            .await
            .map_err(BackendError::Join)?
            .map_err(|e| BackendError::Handover(crate::error_chain(&e)))?;
        Ok(Handover {
            snapshot,
            agent_port: self.agent_port,
            shell: None,
        })
    }

    /// [`VmHandle::begin_handover`] of a KVM VM: `done` runs on its VMM thread, with the
    /// saved VM (a VM with its own memory) or the copy of a clone's pages still to make.
    pub(super) fn begin_hand_over(&self, done: super::HandoverDone) {
        let agent_port = self.agent_port;
        // Weak: the closure must never be what drops the VM, on the VM's own thread.
        let vm = Arc::downgrade(&self.vm);
        self.vm.handover_then(move |frozen| {
            let finish = move |vm: std::sync::Weak<vmm::Vm>, frozen| {
                let vm = vm.upgrade().ok_or(BackendError::NotRunning)?;
                let snapshot = vm
                    .finish_handover(frozen)
                    .map_err(|e| BackendError::Handover(crate::error_chain(&e)))?;
                Ok(Handover {
                    snapshot,
                    agent_port,
                    shell: None,
                })
            };
            if frozen.copies_pages() {
                done(super::Begun::Finish(Box::new(move || finish(vm, frozen))));
            } else {
                done(super::Begun::Done(Box::new(finish(vm, frozen))));
            }
        });
    }

    /// [`VmHandle::resume_after_handover`] of a KVM VM.
    pub(super) async fn resume_here(&self) -> Result<(), BackendError> {
        let vm = Arc::clone(&self.vm);
        tokio::task::spawn_blocking(move || vm.resume())
            .await
            .map_err(BackendError::Join)?
            .map_err(|e| BackendError::Handover(crate::error_chain(&e)))
    }
}

impl KvmBackend {
    /// [`VmBackend::prepare_adoption`](super::VmBackend::prepare_adoption) for KVM VMs.
    pub(super) async fn prepare_shell(
        &self,
        layout: MemoryLayout,
        spec: &VmSpec,
    ) -> Result<vmm::PreparedShell, BackendError> {
        let host = self.host().clone();
        let seccomp = spec.seccomp;
        // The VMM thread's jail: the hybrid vsock socket's directory, as the VM's devices
        // will have it (`adopt_vm`).
        let jail = spec
            .vsock_uds
            .as_deref()
            .and_then(std::path::Path::parent)
            .map(std::path::Path::to_path_buf);
        tokio::task::spawn_blocking(move || {
            let shell = vmm::PreparedShell::build(
                &host,
                &layout.memory,
                layout.private,
                layout.mem_bytes,
                layout.vcpus,
                seccomp,
                jail.as_deref(),
            )?;
            // A clone's pages copied ahead go in now, while the old VM still runs.
            match &layout.base {
                Some((pages, id)) => shell.with_base(pages, *id),
                None => Ok(shell),
            }
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::Start(Box::new(e)))
    }

    /// [`VmBackend::adopt`](super::VmBackend::adopt) for KVM VMs: the devices are the ones
    /// [`KvmBackend`] gives every VM, on the old VM's host files (its vsock socket, its TAP
    /// queues, the disks in its block slots).
    pub(super) async fn adopt_vm(
        &self,
        spec: VmSpec,
        mut handover: Handover,
    ) -> Result<Box<dyn AdoptedVm>, BackendError> {
        let files = handover.snapshot.take_files();
        let mut devices = vec![vmm::DeviceConfig::Vsock {
            guest_cid: GUEST_CID,
            uds_path: spec.vsock_uds.clone(),
            uds_listener: files.vsock,
        }];
        devices.extend((0..spec.blk_slots).map(empty_slot));
        for (n, (file, config)) in files.nets.into_iter().enumerate() {
            let tap = Tap::from_file(file, &crate::network::tap_name(n, &spec.sandbox_id));
            devices.push(vmm::DeviceConfig::Net {
                config,
                backend: vmm::NetBackendConfig::Custom(Box::new(tap)),
            });
        }
        // The slots that held disks hold them again, and stay taken.
        let attached = files.blocks.iter().map(Option::is_some).collect();
        // Frozen until the old process lets go: on the VM built ahead, or on a new one.
        let mut config = clone_config(&spec, devices, handover.shell.take());
        config.paused = true;
        config.disks = files.blocks;
        let host = self.host().clone();
        let snapshot = handover.snapshot;
        // On the caller's thread where the runtime lets it block (the new process takes VMs
        // over from its main thread, one after another): a hop to the blocking pool and back
        // costs each VM more than writing its state here.
        let restore = move || vmm::Vm::restore(&host, &snapshot, config);
        let restored = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => tokio::task::spawn_blocking(restore)
                .await
                .map_err(BackendError::Join)?,
            _ => tokio::task::block_in_place(restore),
        };
        let vm = restored.map_err(|e| BackendError::Start(Box::new(e)))?;
        let (vm, end) = watched(vm);
        Ok(Box::new(KvmAdopted {
            vm,
            spec,
            end,
            agent_port: handover.agent_port,
            attached,
        }))
    }
}

/// A KVM VM rebuilt from a handover, frozen.
#[derive(Debug)]
struct KvmAdopted {
    vm: Arc<vmm::Vm>,
    spec: VmSpec,
    end: watch::Receiver<Option<VmEnd>>,
    agent_port: u32,
    /// Which block slots hold a handed-over disk.
    attached: Vec<bool>,
}

#[async_trait]
impl AdoptedVm for KvmAdopted {
    fn run(&self) -> Result<(), BackendError> {
        self.vm
            .resume_now()
            .map_err(|e| BackendError::Handover(crate::error_chain(&e)))
    }

    async fn resume(self: Box<Self>) -> Result<Box<dyn VmHandle>, BackendError> {
        let KvmAdopted {
            vm,
            spec,
            end,
            agent_port,
            attached,
        } = *self;
        if vm.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
        // The new threads go where the old ones were.
        if let Some(placement) = spec.cgroup.clone() {
            let (v, vcpus) = (Arc::clone(&vm), spec.vcpus);
            let placed = tokio::task::spawn_blocking(move || {
                placement.attach(vcpus, || v.ended().is_some(), || v.thread_ids())
            })
            .await
            .map_err(BackendError::Join)?;
            if let Err(e) = placed {
                stop_now(&vm).await;
                return Err(e);
            }
        }
        // A busy host may keep the guest from answering within one connect's bound: the guest
        // runs and its agent listens, so keep dialling, for longer than a boot gets.
        let bound = spec.agent_ready_timeout.max(RECONNECT_BOUND);
        let dialling = tokio::time::Instant::now();
        let deadline = dialling + bound;
        let mut dials = 0u32;
        let agent = loop {
            dials = dials.saturating_add(1);
            match agent::connect(&vm, agent_port).await {
                Ok(client) => break Ok(client),
                Err(_) if tokio::time::Instant::now() < deadline && vm.ended().is_none() => {
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
                Err(e) => break Err(e),
            }
        };
        if agent.is_ok() {
            tracing::info!(
                sandbox_id = %spec.sandbox_id,
                dials,
                connect_ms = dialling.elapsed().as_millis(),
                "taken-over guest's agent answered"
            );
        }
        // The clock is set again only to correct the pause, beside the rest: the Task endpoint
        // (and the container output it resumes) does not wait for it, and a guest too slow to
        // answer it is no reason to lose the pod.
        if let Ok(client) = &agent {
            let (client, id) = (client.clone(), spec.sandbox_id.clone());
            tokio::spawn(async move {
                if let Err(e) = agent::sync_clock(&client).await {
                    tracing::warn!(
                        sandbox_id = %id,
                        error = %crate::error_chain(&e),
                        "cannot set a taken-over guest's clock"
                    );
                }
            });
        }
        let phases = StartPhases::default();
        handle(vm, spec, end, agent, agent_port, phases, &attached).await
    }
}
