// SPDX-License-Identifier: Apache-2.0
//! The sandboxer's own service between host and agent: `sandboxer.agent.v1.Control`
//! (proto/proto/agent/sandboxer/agent/v1/control.proto; its comments are the contract).
//!
//! It is served on the same ttrpc server as the Task services. Setup applies the pod's
//! hostname, DNS, interfaces, routes and sysctls ([`system`], [`net`]) and sets the clock as
//! SyncClock does; Health, SyncClock and Stats answer about the guest;
//! PrepareBundle/RemoveBundle manage the bundles the agent owns
//! ([`bundle`]); WaitEvent hands out the [`Events`] queue; Shutdown answers at once and asks the
//! agent's main loop (through the channel given to [`ControlService::new`]) to end the pod:
//! in the VM the main loop runs [`crate::shutdown::shutdown`] with the requested grace time,
//! on a host it uses [`ControlService::terminate_pod`] and exits.
//!
//! On a host (tests) the service writes resolv.conf under the state dir instead of `/etc` and
//! never sets the clock, so a test touches only the namespaces it made.

pub mod bundle;
pub mod entropy;
pub mod error;
pub mod net;
pub mod system;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::agent::control::{
    Event, HealthRequest, HealthResponse, PrepareBundleRequest, PrepareBundleResponse,
    RemoveBundleRequest, SetupRequest, ShutdownRequest, StatsRequest, StatsResponse,
    SyncClockRequest, WaitEventRequest,
};
use proto::agent::control_ttrpc::{Control, create_control};
use tokio::sync::mpsc;
use ttrpc::asynchronous::{Service, TtrpcContext};

pub use self::error::ControlError;
use self::net::NetPlan;
use crate::events::Events;
use crate::task::TaskService;
use crate::task::stats;

/// How often [`ControlService::terminate_pod`] looks whether the pod's processes are gone.
const TERMINATE_POLL: Duration = Duration::from_millis(20);

/// Where the service applies settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The agent's state directory (bundles live under `bundles/`).
    pub state_dir: PathBuf,
    /// Where Setup writes the DNS settings.
    pub resolv_conf: PathBuf,
    /// Root of the sysctl tree.
    pub sysctl_root: PathBuf,
    /// Whether Setup and SyncClock may set the realtime clock.
    pub set_clock: bool,
    /// The kernel RNG device that takes Setup's entropy (`/dev/random`).
    pub random_device: PathBuf,
}

impl ControlConfig {
    /// Settings of the agent in the VM: `/etc/resolv.conf`, `/proc/sys`, clock set.
    pub fn vm(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            sysctl_root: PathBuf::from("/proc/sys"),
            set_clock: true,
            random_device: PathBuf::from("/dev/random"),
        }
    }

    /// Settings of the agent on a host (tests): resolv.conf at `<state_dir>/etc/resolv.conf`,
    /// the clock is never set (CLOCK_REALTIME is not namespaced), and entropy goes to a plain
    /// file (`<state_dir>/random`), never into the host's RNG: Setup with entropy fails there.
    pub fn host(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            resolv_conf: state_dir.join("etc/resolv.conf"),
            sysctl_root: PathBuf::from("/proc/sys"),
            set_clock: false,
            random_device: state_dir.join("random"),
        }
    }
}

/// A shutdown the host asked for: the grace time between SIGTERM and SIGKILL.
pub type ShutdownOrder = Duration;

/// The Control service.
#[derive(Debug)]
pub struct ControlService {
    config: ControlConfig,
    task: Arc<TaskService>,
    events: Arc<Events>,
    started: Instant,
    shutdown: mpsc::Sender<ShutdownOrder>,
    /// Setup calls run one at a time: two at once would race on the same links.
    setup_lock: tokio::sync::Mutex<()>,
}

/// Registers `service` as `sandboxer.agent.v1.Control`.
pub fn services(service: Arc<ControlService>) -> HashMap<String, Service> {
    create_control(service)
}

/// The bundle directory of container `id` under `state_dir`.
pub fn bundle_dir(state_dir: &Path, id: &str) -> PathBuf {
    crate::task::bundle_dir(state_dir, id)
}

/// All pids in the cgroup at `dir` and its descendants.
pub fn cgroup_tree_pids(dir: &Path) -> Vec<u32> {
    let mut pids = stats::cgroup_pids(dir).unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_tree_pids(&entry.path()));
            }
        }
    }
    pids
}

/// The wire form of a queued event.
pub fn event_to_proto(e: crate::events::Event) -> Event {
    let mut out = Event::new();
    out.topic = e.topic;
    out.container_id = e.container_id;
    out.unix_nanos = e.unix_nanos;
    out
}

fn to_ttrpc<T>(r: Result<T, ControlError>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        log::warn!("Control call failed: {e}");
        e.into()
    })
}

impl ControlService {
    /// A service applying settings as `config` says, counting `task`'s containers, handing out
    /// `events`; `started` is when the agent started, and Shutdown sends its order on
    /// `shutdown`.
    pub fn new(
        config: ControlConfig,
        task: Arc<TaskService>,
        events: Arc<Events>,
        started: Instant,
        shutdown: mpsc::Sender<ShutdownOrder>,
    ) -> Self {
        Self {
            config,
            task,
            events,
            started,
            shutdown,
            setup_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Checks the whole request, then applies it in order: hostname, DNS, network, sysctls.
    pub async fn do_setup(&self, req: &SetupRequest) -> Result<(), ControlError> {
        if !req.hostname.is_empty() {
            system::check_hostname(&req.hostname)?;
        }
        let resolv = match req.dns.as_ref() {
            Some(dns) => system::resolv_conf(dns)?,
            None => None,
        };
        let plan = NetPlan::new(&req.interfaces, &req.routes)?;
        let mut sysctls = Vec::with_capacity(req.sysctls.len());
        for (key, value) in &req.sysctls {
            let path = system::check_sysctl(&self.config.sysctl_root, key, value)?;
            sysctls.push((key.as_str(), path, value.as_str()));
        }
        sysctls.sort_unstable_by_key(|(key, _, _)| *key);
        let clock = match req.unix_nanos {
            0 => None,
            nanos => system::clock_target(nanos, SystemTime::now())?,
        };

        let _serial = self.setup_lock.lock().await;
        // First: nothing of the pod may draw from an RNG a clone shares with others.
        if !req.entropy.is_empty() {
            entropy::add_and_reseed(&self.config.random_device, &req.entropy)
                .map_err(|e| ControlError::internal("add the host's entropy and reseed", &e))?;
        }
        if let Some(t) = clock {
            self.set_clock(t)?;
        }
        if !req.hostname.is_empty() {
            system::set_hostname(&req.hostname)?;
        }
        if let Some(text) = resolv {
            system::write_resolv_conf(&self.config.resolv_conf, &text)?;
        }
        // Even an empty plan brings `lo` up.
        net::apply(&plan).await?;
        for (key, path, value) in sysctls {
            system::write_sysctl(key, &path, value)?;
        }
        log::info!(
            "Setup done: hostname {:?}, {} entropy bytes, {} interfaces, {} routes, {} sysctls",
            req.hostname,
            req.entropy.len(),
            plan.interfaces.len(),
            plan.routes.len(),
            req.sysctls.len()
        );
        Ok(())
    }

    fn do_sync_clock(&self, req: &SyncClockRequest) -> Result<(), ControlError> {
        match system::clock_target(req.unix_nanos, SystemTime::now())? {
            Some(t) => self.set_clock(t),
            None => Ok(()),
        }
    }

    /// Sets the guest's clock to `t` (not in host mode).
    fn set_clock(&self, t: nix::sys::time::TimeSpec) -> Result<(), ControlError> {
        if self.config.set_clock {
            system::set_clock(t)
        } else {
            log::info!("Host mode: not setting the clock");
            Ok(())
        }
    }

    fn do_stats(&self) -> Result<StatsResponse, ControlError> {
        let dir = self.task.pod_cgroup();
        let metrics = stats::read_metrics(&dir)
            .map_err(|e| ControlError::internal("Failed to read the pod's cgroup", &e))?;
        let mut any = Any::new();
        any.type_url = stats::METRICS_TYPE_URL.to_owned();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| ControlError::internal("Failed to encode the metrics", &e))?;
        let mut resp = StatsResponse::new();
        resp.metrics = Some(any).into();
        Ok(resp)
    }

    fn do_prepare_bundle(
        &self,
        req: &PrepareBundleRequest,
    ) -> Result<PrepareBundleResponse, ControlError> {
        bundle::check_container_id(&req.container_id)?;
        let dir = bundle_dir(&self.config.state_dir, &req.container_id);
        let dir = bundle::prepare(&dir, req)?;
        let mut resp = PrepareBundleResponse::new();
        resp.bundle = dir.to_string_lossy().into_owned();
        log::info!("Prepared bundle {}", resp.bundle);
        Ok(resp)
    }

    fn do_remove_bundle(&self, req: &RemoveBundleRequest) -> Result<(), ControlError> {
        bundle::check_container_id(&req.container_id)?;
        if self.task.container_ids().contains(&req.container_id) {
            return Err(ControlError::FailedPrecondition {
                field: "container_id".into(),
                reason: format!(
                    "container {:?} exists: Task.Delete removes its bundle",
                    req.container_id
                ),
            });
        }
        bundle::remove(&bundle_dir(&self.config.state_dir, &req.container_id))
    }

    /// Host mode end of the pod: SIGTERM to every process in the pod cgroup, up to `grace` for
    /// them to go, then SIGKILL to the rest. Returns whether they went within `grace`.
    pub async fn terminate_pod(&self, grace: Duration) -> bool {
        let dir = self.task.pod_cgroup();
        let signal_all = |signal| {
            for pid in cgroup_tree_pids(&dir) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
        };
        let deadline = Instant::now() + grace;
        signal_all(Signal::SIGTERM);
        loop {
            if cgroup_tree_pids(&dir).is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                signal_all(Signal::SIGKILL);
                return false;
            }
            tokio::time::sleep(TERMINATE_POLL).await;
        }
    }
}

#[async_trait]
impl Control for ControlService {
    async fn setup(&self, _ctx: &TtrpcContext, req: SetupRequest) -> ttrpc::Result<Empty> {
        to_ttrpc(self.do_setup(&req).await.map(|()| Empty::new()))
    }

    async fn health(&self, _ctx: &TtrpcContext, _: HealthRequest) -> ttrpc::Result<HealthResponse> {
        let mut resp = HealthResponse::new();
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        resp.uptime_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        resp.containers = u32::try_from(self.task.container_ids().len()).unwrap_or(u32::MAX);
        Ok(resp)
    }

    async fn sync_clock(&self, _ctx: &TtrpcContext, req: SyncClockRequest) -> ttrpc::Result<Empty> {
        to_ttrpc(self.do_sync_clock(&req).map(|()| Empty::new()))
    }

    async fn stats(&self, _ctx: &TtrpcContext, _: StatsRequest) -> ttrpc::Result<StatsResponse> {
        to_ttrpc(self.do_stats())
    }

    async fn prepare_bundle(
        &self,
        _ctx: &TtrpcContext,
        req: PrepareBundleRequest,
    ) -> ttrpc::Result<PrepareBundleResponse> {
        to_ttrpc(self.do_prepare_bundle(&req))
    }

    async fn remove_bundle(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveBundleRequest,
    ) -> ttrpc::Result<Empty> {
        to_ttrpc(self.do_remove_bundle(&req).map(|()| Empty::new()))
    }

    async fn wait_event(&self, _ctx: &TtrpcContext, _: WaitEventRequest) -> ttrpc::Result<Event> {
        Ok(event_to_proto(self.events.next().await))
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let grace = Duration::from_secs(u64::from(req.timeout_secs));
        log::info!("Shutdown requested (grace {} s)", req.timeout_secs);
        // A full channel means a shutdown is under way already.
        match self.shutdown.try_send(grace) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(Empty::new()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ControlError::FailedPrecondition {
                field: "timeout_secs".into(),
                reason: "the agent is shutting down already".into(),
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TOPIC_OOM;

    #[test]
    fn events_keep_their_fields() {
        let events = Events::new();
        events.publish(TOPIC_OOM, "c1");
        let e = event_to_proto(events.try_next().unwrap());
        assert_eq!(e.topic, "/tasks/oom");
        assert_eq!(e.container_id, "c1");
        assert!(e.unix_nanos > 1_577_836_800_000_000_000, "{e:?}");
    }

    #[test]
    fn cgroup_tree_pids_walks_children() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "1\n2\n").unwrap();
        std::fs::create_dir_all(dir.path().join("c1/inner")).unwrap();
        std::fs::write(dir.path().join("c1/cgroup.procs"), "").unwrap();
        std::fs::write(dir.path().join("c1/inner/cgroup.procs"), "3\n").unwrap();
        std::fs::create_dir(dir.path().join("c2")).unwrap();
        std::fs::write(dir.path().join("c2/cgroup.procs"), "4\n").unwrap();
        let mut pids = cgroup_tree_pids(dir.path());
        pids.sort_unstable();
        assert_eq!(pids, [1, 2, 3, 4]);
        assert!(cgroup_tree_pids(&dir.path().join("missing")).is_empty());
    }
}
