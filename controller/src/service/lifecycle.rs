// SPDX-License-Identifier: Apache-2.0
//! Create, Start, Stop, Shutdown, and the end of a VM that ends by itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use devices::sync::Recover;
use tracing::{info, warn};

use super::registry::{Entry, Locked};
use super::update::set_extension;
use super::{
    CreateRequest, EXIT_FAILED, EXIT_FORCED, SandboxService, Started, TASK_API_VERSION, validate_id,
};
use crate::backend::{
    CgroupPlacement, MemoryPlacement, NetDevices, ShutdownRequest, TaskTarget, VmBackend, VmEnd,
    VmExitKind, VmHandle, VmSpec,
};
use crate::cgroup::{CpuLimit, REMOVE_WAIT};
use crate::error::{SandboxError, error_chain};
use crate::network::{self, PodNetwork};
use crate::nofile::FdBudget;
use crate::pod::{self, GuestSetup};
use crate::sandbox::{ExitInfo, SandboxRecord, SandboxState};
use crate::store::StoreError;
use crate::task::{HostPaths, ImageCache, TaskCut, TaskOptions, TaskServer};

/// The sandbox's hybrid vsock socket, in its directory (the longest socket path there).
const VSOCK_SOCKET: &str = "vsock.sock";
/// The sandbox's Task API socket, in its directory.
const TASK_SOCKET: &str = "task.sock";
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Removes a pod network's taps and tc redirects; failures are logged (nothing to return them to).
async fn teardown_network(id: &str, net: Option<PodNetwork>) {
    if let Some(net) = net
        && let Err(e) = net.teardown().await
    {
        warn!(sandbox_id = %id, error = %error_chain(&e), "cannot tear down the pod network");
    }
}

/// Whole microseconds of `d` (saturating).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How a VM's end came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Stop or Shutdown asked for it.
    Asked,
    /// Stop asked, and had to cut the grace period short.
    Forced,
    /// Nobody asked: the guest ended by itself.
    Unasked,
}

/// The state and exit a VM end means.
fn exit_of(end: &VmEnd, ending: Ending) -> (SandboxState, ExitInfo) {
    let forced = ending == Ending::Forced;
    let (state, status, reason) = match &end.kind {
        // A pod's guest only powers off or resets when the host asks it to (the agent's
        // Shutdown). One that does on its own has failed: a kernel panic reboots it, and the
        // containers are gone either way.
        VmExitKind::GuestShutdown if ending == Ending::Unasked => (
            SandboxState::Failed,
            EXIT_FAILED,
            crate::metrics::GUEST_ENDED_UNASKED_REASON.to_string(),
        ),
        VmExitKind::GuestShutdown => (
            SandboxState::Stopped,
            0,
            crate::metrics::GUEST_SHUTDOWN_REASON.to_string(),
        ),
        VmExitKind::HostStopped if forced => (
            SandboxState::Stopped,
            EXIT_FORCED,
            "stopped by force after the grace period".to_string(),
        ),
        VmExitKind::HostStopped => (SandboxState::Stopped, 0, "stopped".to_string()),
        VmExitKind::Crashed(why) => (SandboxState::Failed, EXIT_FAILED, why.clone()),
    };
    (
        state,
        ExitInfo {
            status,
            at: end.at,
            reason,
        },
    )
}

/// Stops `vm`: asks the guest, waits up to `grace`, then forces it. Returns the end and whether
/// it had to be forced.
async fn stop_vm(vm: &dyn VmHandle, grace: Duration) -> (VmEnd, bool) {
    if let Some(end) = vm.ended() {
        return (end, false);
    }
    match vm.request_shutdown(grace).await {
        Ok(ShutdownRequest::Requested) => match tokio::time::timeout(grace, vm.wait()).await {
            Ok(end) => (end, false),
            Err(_) => (vm.kill().await, true),
        },
        Ok(ShutdownRequest::Unsupported) => (vm.kill().await, false),
        Err(e) => {
            warn!(error = %error_chain(&e), "shutdown request failed; stopping the VM");
            (vm.kill().await, false)
        }
    }
}

impl<B: VmBackend> SandboxService<B> {
    /// Creates a sandbox: validates, reads the pod config, persists the record. Nothing boots.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let id = req.id.clone();
        self.detached(&id, async move { this.do_create(req).await })
            .await
    }

    async fn do_create(self: Arc<Self>, req: CreateRequest) -> Result<(), SandboxError> {
        validate_id("sandbox_id", &req.id)?;
        let pod = match &req.options {
            Some(options) => pod::parse(options)?,
            None => None,
        };
        let mut netns = None;
        if !req.netns_path.is_empty() {
            let p = Path::new(&req.netns_path);
            if !p.is_absolute() {
                return Err(SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason: format!("{} is not an absolute path", req.netns_path),
                });
            }
            if !p.exists() {
                return Err(SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason: format!("{} does not exist", req.netns_path),
                });
            }
            netns = Some(network::check_pod_netns(p).map_err(|reason| {
                SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason,
                }
            })?);
        }
        // The sandbox's sockets must fit a unix socket address (`sun_path`: 107 bytes and a NUL).
        let longest = self.store.sandbox_dir(&req.id).join(VSOCK_SOCKET);
        if longest.as_os_str().len() > SOCKET_PATH_MAX {
            return Err(SandboxError::InvalidArgument {
                field: "sandbox_id",
                reason: format!(
                    "{:?} makes the sandbox's socket path {} bytes long, more than a unix socket \
                     may have ({SOCKET_PATH_MAX}); a shorter id or state_dir leaves room",
                    req.id,
                    longest.as_os_str().len()
                ),
            });
        }
        let vm = pod::vm_size(&self.config.vm, pod.as_ref().map(|p| &p.config))?;
        let most = self.config.limits.max_sandbox_mem_mib;
        if most > 0 && vm.mem_mib > most {
            return Err(SandboxError::InvalidArgument {
                field: if pod.is_some() {
                    "options.linux.resources.memory_limit_in_bytes"
                } else {
                    "vm.mem_mib"
                },
                reason: format!(
                    "the VM would have {} MiB, more than limits.max_sandbox_mem_mib ({most} MiB)",
                    vm.mem_mib
                ),
            });
        }
        let cpu = pod::cpu_limit(pod.as_ref().map(|p| &p.config))?;
        self.admit_cpus(vm.vcpus, &cpu)?;
        // The pod's cgroup parent is checked now: Start must not fail on it.
        let parent = pod.as_ref().map_or("", |p| p.config.cgroup_parent.as_str());
        let in_parent = |group: Result<std::path::PathBuf, crate::cgroup::CgroupError>| {
            group.map_err(|e| SandboxError::InvalidArgument {
                field: "options.linux.cgroup_parent",
                reason: error_chain(&e),
            })
        };
        let cgroup = match &self.config.cgroups {
            Some(cgroups) => Some(in_parent(cgroups.group_of(&req.id, parent))?),
            None => None,
        };
        let memory_cgroup = match &self.config.memory_cgroups {
            Some(memcgs) => Some(in_parent(memcgs.group_of(&req.id, parent))?),
            None => None,
        };

        let mut record = SandboxRecord::new(req.id.clone(), SystemTime::now());
        record.sandboxer = req.sandboxer;
        record.rootfs = req.rootfs;
        record.netns_path = req.netns_path;
        record.annotations = req.annotations;
        record.options = req.options;
        record.vm = vm;
        record.cgroup = cgroup;
        record.memory_cgroup = memory_cgroup;
        if let Some(pod) = pod {
            record.labels.extend(pod.labels);
            // The engine's own annotations win over the pod config's.
            for (key, value) in pod.annotations {
                record.annotations.entry(key).or_insert(value);
            }
            record.pod = Some(pod.config);
        }
        if let Some(info) = req.sandbox {
            record.labels.extend(info.labels);
            record.spec = info.spec;
            record.runtime = info.runtime;
            for (key, value) in info.extensions {
                set_extension(&mut record, &key, Some(value))?;
            }
        }

        let entry = Entry::with_netns(record.clone(), netns);
        // Hold the sandbox's lock until it is on disk: nobody can Start it before that.
        let _op = Locked::new(Arc::clone(&entry)).await;
        {
            let mut map = self.sandboxes.lock().recover();
            if map.contains_key(&record.id) {
                return Err(SandboxError::AlreadyExists {
                    what: "Sandbox",
                    id: record.id,
                });
            }
            // One pod per network namespace: a second would take over the first one's taps
            // and tc redirects at Start.
            if let Some(ns) = entry.netns
                && let Some(owner) = map.iter().find(|(_, e)| e.netns == Some(ns))
            {
                return Err(SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason: format!(
                        "{} is the network namespace of sandbox {}",
                        record.netns_path, owner.0
                    ),
                });
            }
            self.admit_budget(&record.id, &map, entry.mem_mib)?;
            self.admit_fds(&record.id, map.len())?;
            map.insert(record.id.clone(), Arc::clone(&entry));
        }
        // What a daemon that crashed may have left of an earlier sandbox of this id.
        self.remove_cgroup_now(&record);
        let id = record.id.clone();
        let store = self.store.clone();
        let persisted = tokio::task::spawn_blocking(move || {
            store.create_dir(&record.id)?;
            store.save(&record)
        })
        .await
        .map_err(|e| SandboxError::Task(id.clone(), e))
        .and_then(|r| r.map_err(|e| SandboxError::Store(id.clone(), e)));
        if let Err(e) = persisted {
            self.sandboxes.lock().recover().remove(&id);
            let _ = self.store.remove(&id);
            return Err(e);
        }
        info!(sandbox_id = %id, vcpus = vm.vcpus, mem_mib = vm.mem_mib, "sandbox created");
        Ok(())
    }

    /// Refuses a sandbox whose VM has more than `[limits] max_sandbox_vcpus` vCPUs, or whose
    /// CPU limit asks for more CPUs than that (`INVALID_ARGUMENT` naming the field).
    pub(super) fn admit_cpus(&self, vcpus: u8, cpu: &CpuLimit) -> Result<(), SandboxError> {
        let most = u64::from(self.config.limits.max_sandbox_vcpus);
        if most == 0 {
            return Ok(());
        }
        let (field, want) = match cpu.cpus() {
            Some(cpus) if cpus > most => ("options.linux.resources.cpu_quota", cpus),
            _ => ("vm.vcpus", u64::from(vcpus)),
        };
        if want > most {
            return Err(SandboxError::InvalidArgument {
                field,
                reason: format!(
                    "the sandbox would have {want} CPUs, more than limits.max_sandbox_vcpus \
                     ({most})"
                ),
            });
        }
        Ok(())
    }

    /// Refuses a new sandbox beyond the node's `[limits]`: the number of sandboxes known
    /// (`sandboxes`, until their Shutdown) and their guest memory together.
    fn admit_budget(
        &self,
        id: &str,
        sandboxes: &std::collections::HashMap<String, Arc<Entry>>,
        mem_mib: u32,
    ) -> Result<(), SandboxError> {
        let limits = &self.config.limits;
        let most = usize::try_from(limits.max_sandboxes).unwrap_or(usize::MAX);
        if most > 0 && sandboxes.len() >= most {
            return Err(SandboxError::OverBudget {
                id: id.to_owned(),
                limit: "max_sandboxes",
                reason: format!("the node has {} sandboxes, its most", sandboxes.len()),
            });
        }
        if limits.max_total_mem_mib > 0 {
            let used: u64 = sandboxes.values().map(|e| u64::from(e.mem_mib)).sum();
            let total = used + u64::from(mem_mib);
            if total > limits.max_total_mem_mib {
                return Err(SandboxError::OverBudget {
                    id: id.to_owned(),
                    limit: "max_total_mem_mib",
                    reason: format!(
                        "its {mem_mib} MiB of guest memory would bring the node's sandboxes to \
                         {total} MiB, over {} MiB",
                        limits.max_total_mem_mib
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a new sandbox that would run the daemon out of descriptors: every sandbox it
    /// knows (`sandboxes`, until its Shutdown) is budgeted [`crate::nofile::FDS_PER_SANDBOX`]
    /// against the soft `RLIMIT_NOFILE` ([`FdBudget::admit`]). An estimate, so that Create
    /// fails cleanly instead of Start failing with `EMFILE` half-way.
    fn admit_fds(&self, id: &str, sandboxes: usize) -> Result<(), SandboxError> {
        let limit = match crate::nofile::nofile_soft_limit() {
            Ok(limit) => limit,
            Err(e) => {
                warn!(error = %e, "cannot read RLIMIT_NOFILE; admitting the sandbox");
                return Ok(());
            }
        };
        self.fd_budget
            .get_or_init(FdBudget::measure)
            .admit(limit, sandboxes)
            .map_err(|e| SandboxError::FdLimit(id.to_string(), e))
    }

    /// Starts a created sandbox's VM and returns the Task API address.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Started, SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_start(owned).await })
            .await
    }

    async fn do_start(self: Arc<Self>, id: String) -> Result<Started, SandboxError> {
        let t_start = Instant::now();
        let op = self.lock(&id).await?;
        let entry = op.entry();
        // The limit may have been lowered (a restart with a new config) since Create.
        let vcpus = entry.with(|d| d.record.vm.vcpus);
        let most = self.config.limits.max_sandbox_vcpus;
        if most > 0 && u32::from(vcpus) > most {
            return Err(SandboxError::OverBudget {
                id,
                limit: "max_sandbox_vcpus",
                reason: format!("its VM has {vcpus} vCPUs, more than {most}"),
            });
        }
        let record = entry.with(|d| {
            d.record.transition(SandboxState::Starting, "start")?;
            Ok::<_, SandboxError>(d.record.clone())
        })?;
        if let Err(e) = self.save(record.clone()).await {
            entry.with(|d| d.record.state = SandboxState::Created);
            return Err(e);
        }

        let dir = self.store.sandbox_dir(&id);
        let mut net = match self.attach_network(&record).await {
            Ok(net) => net,
            Err(e) => {
                warn!(sandbox_id = %id, error = %error_chain(&e), "sandbox network failed");
                self.fail_start(entry, &e, None).await;
                return Err(e);
            }
        };
        let spec = self.vm_spec(&record, &dir, net.as_mut());
        let vm: Arc<dyn VmHandle> = match self.backend.start(spec).await {
            Ok(vm) => Arc::from(vm),
            Err(e) => {
                let e = SandboxError::Backend(id.clone(), e);
                warn!(sandbox_id = %id, error = %error_chain(&e), "sandbox failed to start");
                teardown_network(&id, net).await;
                self.fail_start(entry, &e, None).await;
                return Err(e);
            }
        };

        let t_task = Instant::now();
        let task = match self.start_task_server(&dir, &vm, None).await {
            Ok(task) => task,
            Err(e) => {
                let end = vm.kill().await;
                teardown_network(&id, net).await;
                self.fail_start(entry, &e, Some(end)).await;
                return Err(e);
            }
        };
        let mut start_us: BTreeMap<String, u64> = vm
            .start_phases()
            .named()
            .iter()
            .map(|(name, d)| ((*name).to_string(), micros(*d)))
            .collect();
        start_us.insert("task_server".into(), micros(t_task.elapsed()));
        start_us.insert("total".into(), micros(t_start.elapsed()));
        crate::metrics::global().observe_start(&start_us, super::admin::from_template(&start_us));
        let started_at = SystemTime::now();
        let address = task.address();
        let record = entry.with(|d| {
            d.record.state = SandboxState::Ready;
            d.record.start_us = start_us;
            d.record.started_at = Some(started_at);
            d.record.pid = vm.pid();
            d.record.address.clone_from(&address);
            d.vm = Some(Arc::clone(&vm));
            d.net = net;
            d.task = Some(task);
            d.record.clone()
        });
        if let Err(e) = self.save(record.clone()).await {
            // Nobody could find this VM after a restart: do not keep it.
            let end = vm.kill().await;
            self.fail_start(entry, &e, Some(end)).await;
            return Err(e);
        }
        tokio::spawn(Arc::clone(&self).monitor(Arc::clone(entry), Arc::clone(&vm)));
        info!(sandbox_id = %id, %address, "sandbox started");
        Ok(Started {
            id,
            pid: record.pid,
            created_at: record.created_at,
            labels: record.labels,
            address,
            version: TASK_API_VERSION,
        })
    }

    /// What to boot for `record`: the configured VM with the record's size, its console and
    /// vsock socket in `dir`, the pod's NICs (taken from `net`) and what the agent sets up.
    pub(super) fn vm_spec(
        &self,
        record: &SandboxRecord,
        dir: &Path,
        net: Option<&mut PodNetwork>,
    ) -> VmSpec {
        let (interfaces, routes) = net
            .as_ref()
            .map(|n| (n.guest_interfaces(), n.guest_routes()))
            .unwrap_or_default();
        let nics = NetDevices::new(net.map(PodNetwork::take_device_configs).unwrap_or_default());
        let pod = record.pod.as_ref();
        let vm = &self.config.vm;
        VmSpec {
            sandbox_id: record.id.clone(),
            vcpus: record.vm.vcpus,
            mem_mib: record.vm.mem_mib,
            kernel: vm.kernel.clone(),
            initramfs: Some(vm.initramfs.clone()).filter(|p| !p.as_os_str().is_empty()),
            cmdline: vm.cmdline.clone(),
            blk_slots: vm.blk_slots,
            seccomp: vm.seccomp.into(),
            console_log: Some(dir.join(super::admin::CONSOLE_LOG)),
            console_log_max_bytes: Some(vm.console_log_max_kib.saturating_mul(1024)),
            vsock_uds: Some(dir.join(VSOCK_SOCKET)),
            setup: GuestSetup {
                hostname: pod.map(|p| p.hostname.clone()).unwrap_or_default(),
                dns: pod.map(|p| p.dns.clone()).unwrap_or_default(),
                interfaces,
                routes,
            },
            agent_ready_timeout: Duration::from_millis(vm.agent_ready_timeout_ms),
            nics,
            // A clone's pages are the daemon's own: a sandbox whose memory is charged to it
            // boots.
            template: self.config.templates
                && pod::template_allowed(&record.annotations)
                && record.memory_cgroup.is_none(),
            memory: match (&self.config.memory_cgroups, &record.memory_cgroup) {
                (Some(memcgs), Some(group)) => Some(MemoryPlacement {
                    cgroups: memcgs.clone(),
                    group: group.clone(),
                }),
                _ => None,
            },
            cgroup: match (&self.config.cgroups, &record.cgroup) {
                (Some(cgroups), Some(group)) => Some(CgroupPlacement {
                    cgroups: cgroups.clone(),
                    group: group.clone(),
                    // Checked at Create and Update.
                    limit: pod::cpu_limit(pod).unwrap_or_default(),
                }),
                _ => None,
            },
        }
    }

    /// Ends a sandbox whose Start failed with `error` (after `end`, if its VM had run): it is
    /// `Failed` with [`EXIT_FAILED`], and every Wait returns.
    async fn fail_start(&self, entry: &Entry, error: &SandboxError, end: Option<VmEnd>) {
        let exit = ExitInfo {
            status: EXIT_FAILED,
            at: end.map_or_else(SystemTime::now, |e| e.at),
            reason: format!(
                "{}{}",
                crate::metrics::START_FAILED_PREFIX,
                error_chain(error)
            ),
        };
        // The error being returned matters more than a failed save of it.
        let _ = self.end(entry, SandboxState::Failed, exit).await;
    }

    /// Records the sandbox's end (unless it is recorded already: `Ok(false)`), persists it and
    /// wakes every Wait, also when the save fails.
    pub(super) async fn end(
        &self,
        entry: &Entry,
        state: SandboxState,
        exit: ExitInfo,
    ) -> Result<bool, SandboxError> {
        let saved = match entry.finish(state, exit) {
            Some(record) => self.save(record).await.map(|()| true),
            None => Ok(false),
        };
        entry.notify();
        self.remove_cgroup(entry).await;
        saved
    }

    /// Removes the sandbox's CPU cgroup once the threads of its ended VM have left it (up to
    /// [`REMOVE_WAIT`]). A failure is logged, never returned: the sandbox has ended either way,
    /// and the next Create of its id or the next daemon start removes what is left.
    async fn remove_cgroup(&self, entry: &Entry) {
        let (id, group, memory) = entry.with(|d| {
            let r = &d.record;
            (r.id.clone(), r.cgroup.clone(), r.memory_cgroup.clone())
        });
        if let (Some(memcgs), Some(memory)) = (&self.config.memory_cgroups, memory)
            && let Err(e) = memcgs.remove(&memory)
        {
            warn!(sandbox_id = %id, error = %error_chain(&e), "cannot remove the sandbox's memory cgroup");
        }
        let (Some(cgroups), Some(group)) = (self.config.cgroups.clone(), group) else {
            return;
        };
        let removed =
            tokio::task::spawn_blocking(move || cgroups.remove(&group, REMOVE_WAIT)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(
                sandbox_id = %id,
                error = %error_chain(&e),
                "cannot remove the sandbox's CPU cgroup"
            ),
            Err(e) => warn!(sandbox_id = %id, error = %e, "cgroup removal task failed"),
        }
    }

    /// Records a VM's end when it ends by itself (guest shutdown, crash).
    pub(super) async fn monitor(self: Arc<Self>, entry: Arc<Entry>, vm: Arc<dyn VmHandle>) {
        let end = vm.wait().await;
        drop(vm);
        let _op = Locked::new(Arc::clone(&entry)).await;
        let (state, exit) = exit_of(&end, Ending::Unasked);
        match self.end(&entry, state, exit).await {
            Ok(false) => {}
            Ok(true) => {
                let id = entry.with(|d| d.record.id.clone());
                info!(sandbox_id = %id, %state, "sandbox VM ended");
            }
            Err(e) => warn!(error = %error_chain(&e), "cannot persist a sandbox's end"),
        }
    }

    /// Stops a sandbox: asks the guest, waits up to `timeout` (0: the configured default), then
    /// forces it. Stopping an ended sandbox succeeds.
    pub async fn stop(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_stop(owned, timeout).await })
            .await
    }

    async fn do_stop(self: Arc<Self>, id: String, timeout: Duration) -> Result<(), SandboxError> {
        let op = self.lock(&id).await?;
        let entry = op.entry();
        let (record, vm) = op.snapshot();
        match record.state {
            SandboxState::Created => {
                let exit = ExitInfo {
                    status: 0,
                    at: SystemTime::now(),
                    reason: "stopped before it started".into(),
                };
                self.end(entry, SandboxState::Stopped, exit).await?;
                Ok(())
            }
            SandboxState::Stopped | SandboxState::Failed => Ok(()),
            SandboxState::Deleted => Err(SandboxError::NotFound(id)),
            SandboxState::Ready => {
                let r = entry.with(|d| {
                    d.record.transition(SandboxState::Stopping, "stop")?;
                    Ok::<_, SandboxError>(d.record.clone())
                })?;
                if let Err(e) = self.save(r).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "cannot persist Stopping");
                }
                let grace = if timeout.is_zero() {
                    self.config.default_stop_timeout
                } else {
                    timeout
                };
                let (end, forced) = match vm {
                    Some(vm) => stop_vm(vm.as_ref(), grace).await,
                    None => (
                        VmEnd {
                            kind: VmExitKind::HostStopped,
                            at: SystemTime::now(),
                        },
                        false,
                    ),
                };
                let ending = if forced {
                    Ending::Forced
                } else {
                    Ending::Asked
                };
                let (state, exit) = exit_of(&end, ending);
                self.end(entry, state, exit).await?;
                info!(sandbox_id = %id, forced, "sandbox stopped");
                Ok(())
            }
            // Start and Stop hold the lifecycle lock for their whole run: not observable here.
            SandboxState::Starting | SandboxState::Stopping => {
                Err(SandboxError::FailedPrecondition {
                    id,
                    state: record.state,
                    op: "stop",
                })
            }
        }
    }

    /// Frees everything the sandbox holds (its VM, directory, sockets, files) and forgets it.
    pub async fn shutdown(self: &Arc<Self>, id: &str) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_shutdown(owned).await })
            .await
    }

    async fn do_shutdown(self: Arc<Self>, id: String) -> Result<(), SandboxError> {
        let op = self.lock(&id).await?;
        let entry = op.entry();
        let (record, vm) = op.snapshot();
        match (record.state, vm) {
            (SandboxState::Ready | SandboxState::Starting | SandboxState::Stopping, vm) => {
                let end = match vm {
                    Some(vm) => vm.kill().await,
                    None => VmEnd {
                        kind: VmExitKind::HostStopped,
                        at: SystemTime::now(),
                    },
                };
                let (state, exit) = exit_of(&end, Ending::Asked);
                entry.finish(state, exit);
            }
            (SandboxState::Created, _) => {
                let exit = ExitInfo {
                    status: 0,
                    at: SystemTime::now(),
                    reason: "shut down before it started".into(),
                };
                entry.finish(SandboxState::Stopped, exit);
            }
            (SandboxState::Stopped | SandboxState::Failed | SandboxState::Deleted, _) => {}
        }
        entry.notify();
        // The VM has ended: its threads leave its CPU cgroup.
        self.remove_cgroup(entry).await;
        // The Task endpoint goes first: it detaches its slots and drops its images.
        let task = entry.with(|d| d.task.take());
        if let Some(task) = task {
            task.shutdown().await;
        }
        // The VM (which held the taps) is gone: remove the tc redirects. A record from before a
        // restart has no PodNetwork: clean whatever the lost process left in its netns.
        let net = entry.with(|d| d.net.take());
        if net.is_some() {
            teardown_network(&id, net).await;
        } else if !record.netns_path.is_empty()
            && let Err(e) = network::cleanup_leftovers(Path::new(&record.netns_path), &id).await
        {
            warn!(sandbox_id = %id, error = %error_chain(&e), "cannot clean the pod network");
        }
        let record = entry.with(|d| {
            if d.record.state != SandboxState::Deleted {
                d.record.state = SandboxState::Deleted;
            }
            d.record.clone()
        });
        // Persist Deleted first: a crash during the cleanup is finished by the next recover().
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            match store.save(&record) {
                // The directory may be gone already (an earlier, interrupted Shutdown).
                Ok(()) | Err(StoreError::Write(..)) => {}
                Err(e) => return Err(e),
            }
            store.remove(&record.id)
        })
        .await
        .map_err(|e| SandboxError::Task(id.clone(), e))?
        .map_err(|e| SandboxError::Store(id.clone(), e))?;
        let mut map = self.sandboxes.lock().recover();
        if map.get(&id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(&id);
        }
        drop(map);
        info!(sandbox_id = %id, "sandbox shut down");
        Ok(())
    }

    /// The daemon's image cache, made with the first Task endpoint (which removes the images
    /// an earlier process left, but those in `keep`: [`ImageCache::keeping`]).
    pub(super) fn image_cache(
        &self,
        keep: &[std::path::PathBuf],
    ) -> Result<Arc<ImageCache>, crate::task::TaskError> {
        let mut slot = self.images.lock().recover();
        if let Some(images) = &*slot {
            return Ok(Arc::clone(images));
        }
        let images = Arc::new(ImageCache::keeping(&self.config.image_dir, keep)?);
        *slot = Some(Arc::clone(&images));
        Ok(images)
    }

    /// Serves the sandbox's Task endpoint on `<dir>/task.sock`, forwarding to `vm`'s agent;
    /// on what the previous process cut when `adopt` is given (a live upgrade).
    pub(super) async fn start_task_server(
        &self,
        dir: &Path,
        vm: &Arc<dyn VmHandle>,
        adopt: Option<TaskCut>,
    ) -> Result<TaskServer, SandboxError> {
        let id = || {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let images = self
            .image_cache(&[])
            .map_err(|e| SandboxError::Endpoint(id(), Box::new(e)))?;
        let mut opts = TaskOptions::new(images, dir.join("containers"));
        opts.containerd_address
            .clone_from(&self.config.containerd_address);
        opts.host_paths = HostPaths::new(self.config.task_host_paths.iter().cloned())
            .with([self.config.state_dir.clone(), self.config.image_dir.clone()]);
        let target: Arc<dyn TaskTarget> = Arc::clone(vm) as _;
        let socket = dir.join(TASK_SOCKET);
        match adopt {
            None => TaskServer::start(&socket, target, opts).await,
            Some(cut) => TaskServer::adopt(&socket, target, opts, cut).await,
        }
        .map_err(|e| SandboxError::Endpoint(id(), Box::new(e)))
    }

    /// Connects the pod netns's veths to taps for the VM (none without a netns). A netns that
    /// an earlier sandboxer process used is cleaned first.
    async fn attach_network(
        &self,
        record: &SandboxRecord,
    ) -> Result<Option<PodNetwork>, SandboxError> {
        if record.netns_path.is_empty() {
            return Ok(None);
        }
        let path = Path::new(&record.netns_path);
        let err = |e| SandboxError::Network(record.id.clone(), e);
        network::cleanup_leftovers(path, &record.id)
            .await
            .map_err(err)?;
        network::attach(path, &record.id)
            .await
            .map(Some)
            .map_err(err)
    }

    /// Stops every running sandbox (each with `grace`), e.g. when the daemon exits.
    pub async fn stop_all(self: &Arc<Self>, grace: Duration) {
        let mut set = tokio::task::JoinSet::new();
        for id in self.ids() {
            let this = Arc::clone(self);
            set.spawn(async move {
                if let Err(e) = this.stop(&id, grace).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "cannot stop sandbox");
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}
