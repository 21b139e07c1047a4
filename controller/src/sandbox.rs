// SPDX-License-Identifier: Apache-2.0
//! The sandbox record (what is persisted) and its state machine.
//!
//! ```text
//!   Created ──start──> Starting ──booted──> Ready ──stop──> Stopping ──VM ended──> Stopped
//!      │                   │                  │ └──VM ended by itself──> Stopped / Failed
//!      │                   └──boot failed──> Failed
//!      └──stop──> Stopped
//!   Created / Stopped / Failed ──shutdown──> Deleted (then forgotten)
//! ```
//!
//! Only the engine's view matters outside: `Ready` is `SANDBOX_READY`, every other state is
//! `SANDBOX_NOTREADY`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A lifecycle operation the sandbox's state does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Cannot {op} sandbox {id}: it is {state}")]
pub struct TransitionError {
    /// The sandbox.
    pub id: String,
    /// Its state.
    pub state: SandboxState,
    /// The operation, e.g. "start".
    pub op: &'static str,
}

/// Lifecycle state of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Recorded; no VM yet.
    Created,
    /// The VM is being built and booted.
    Starting,
    /// The VM runs.
    Ready,
    /// The VM is being stopped.
    Stopping,
    /// The VM has ended (or never ran); the exit is recorded.
    Stopped,
    /// Start failed or the VM crashed; the exit is recorded.
    Failed,
    /// Shutdown is freeing the sandbox; the record is about to be forgotten.
    Deleted,
}

impl SandboxState {
    /// Whether `self -> next` is an allowed transition.
    pub fn can_transition_to(self, next: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, next),
            (Created, Starting | Stopped | Deleted)
                | (Starting, Ready | Failed)
                | (Ready, Stopping | Stopped | Failed)
                | (Stopping, Stopped | Failed)
                | (Stopped | Failed, Deleted)
        )
    }

    /// Whether the sandbox has ended for good (an exit status is recorded).
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            SandboxState::Stopped | SandboxState::Failed | SandboxState::Deleted
        )
    }

    /// The state name the Sandbox API reports.
    pub fn api_state(self) -> &'static str {
        if self == SandboxState::Ready {
            "SANDBOX_READY"
        } else {
            "SANDBOX_NOTREADY"
        }
    }

    /// Lower-case name, as persisted.
    pub fn name(self) -> &'static str {
        match self {
            SandboxState::Created => "created",
            SandboxState::Starting => "starting",
            SandboxState::Ready => "ready",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
            SandboxState::Deleted => "deleted",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protobuf `Any` kept as it came.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAny {
    /// The type URL.
    pub type_url: String,
    /// The encoded message.
    pub value: Vec<u8>,
}

impl From<prost_types::Any> for StoredAny {
    fn from(a: prost_types::Any) -> Self {
        StoredAny {
            type_url: a.type_url,
            value: a.value,
        }
    }
}

impl From<StoredAny> for prost_types::Any {
    fn from(a: StoredAny) -> Self {
        prost_types::Any {
            type_url: a.type_url,
            value: a.value,
        }
    }
}

/// One mount of a root filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Filesystem type.
    pub kind: String,
    /// Source device, file or directory.
    pub source: String,
    /// Target relative to the mount root.
    pub target: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// The pod's DNS configuration (resolv.conf).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// What the sandboxer uses from the pod configuration (CRI `PodSandboxConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodConfig {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// Hostname for the guest.
    pub hostname: String,
    /// DNS settings for the guest.
    pub dns: DnsConfig,
    /// CFS quota / period of the pod (0: unset), as the engine sent them.
    pub cpu_quota: i64,
    /// CFS period in microseconds (0: unset).
    pub cpu_period: i64,
    /// Memory limit of the pod in bytes (0: unset).
    pub memory_limit_bytes: i64,
    /// CPU shares of the pod (0: unset): the weight of its cgroup.
    #[serde(default)]
    pub cpu_shares: i64,
    /// The pod's CRI `cgroup_parent` (empty: none); its cgroup's parent on cgroup v1.
    #[serde(default)]
    pub cgroup_parent: String,
}

/// The VM size chosen for the sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
}

/// A process added to a container through the seed API's `Prepare`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The process spec as sent.
    pub spec: Option<StoredAny>,
    /// stdin path (FIFO) or empty.
    pub stdin: String,
    /// stdout path or empty.
    pub stdout: String,
    /// stderr path or empty.
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// A container added through the seed API's `Prepare`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The bundle directory returned to the engine.
    pub bundle: String,
    /// Root filesystem mounts (attached to the VM).
    pub rootfs: Vec<MountSpec>,
    /// The container's main process.
    pub process: ProcessRecord,
    /// Exec processes by exec id.
    pub execs: BTreeMap<String, ProcessRecord>,
    /// Resources last applied through `UpdateResources`.
    pub resources: Option<StoredAny>,
    /// Annotations of the last `UpdateResources`.
    pub annotations: BTreeMap<String, String>,
}

/// How a sandbox ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit status reported by Wait: 0 clean, 137 forced after the grace period, 255 crashed.
    pub status: u32,
    /// When it ended.
    pub at: SystemTime,
    /// Why, for people.
    pub reason: String,
}

/// Everything the sandboxer knows about one sandbox; persisted as `<state>/sbs/<id>/sandbox.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id.
    pub id: String,
    /// Lifecycle state.
    pub state: SandboxState,
    /// The `sandboxer` name the engine used at Create.
    pub sandboxer: String,
    /// When Create ran.
    pub created_at: SystemTime,
    /// When the record last changed through Update.
    pub updated_at: SystemTime,
    /// When the VM came up.
    pub started_at: Option<SystemTime>,
    /// How the sandbox ended, once it has.
    pub exit: Option<ExitInfo>,
    /// Network namespace prepared by the engine (empty: none).
    pub netns_path: String,
    /// Sandbox root filesystem mounts.
    pub rootfs: Vec<MountSpec>,
    /// Annotations from Create.
    pub annotations: BTreeMap<String, String>,
    /// Labels (from the pod config and from Create/Update's sandbox record).
    pub labels: BTreeMap<String, String>,
    /// The pod configuration, if Create carried one.
    pub pod: Option<PodConfig>,
    /// The VM size.
    pub vm: VmSize,
    /// Create's `options` as sent.
    pub options: Option<StoredAny>,
    /// The engine's sandbox spec (from Create or Update).
    pub spec: Option<StoredAny>,
    /// The runtime name and options from the engine's sandbox record.
    pub runtime: Option<(String, Option<StoredAny>)>,
    /// Extensions from Create/Update, e.g. iSulad's `tasks`, containerd's `updated-resources`.
    pub extensions: BTreeMap<String, StoredAny>,
    /// iSulad's `extensions["tasks"]` (a JSON `TaskResources`), parsed.
    pub tasks: Option<serde_json::Value>,
    /// containerd's `extensions["updated-resources"]` (JSON `UpdatedResources`), parsed.
    pub updated_resources: Option<serde_json::Value>,
    /// Task API address, once started.
    pub address: String,
    /// PID serving the sandbox (the sandboxer), once started.
    pub pid: u32,
    /// Containers added through the seed API.
    pub containers: BTreeMap<String, ContainerRecord>,
    /// How long each phase of the last Start took, in microseconds (`vm`, `agent_ready`,
    /// `agent_connect`, `setup`, `task_server`, `total`); shown by Status.
    #[serde(default)]
    pub start_us: BTreeMap<String, u64>,
    /// The sandbox's CPU cgroup, relative to the hierarchy's root (`crate::cgroup`); `None`
    /// without cgroups. Kept so that a cgroup a crash left behind is removed after a restart.
    #[serde(default)]
    pub cgroup: Option<std::path::PathBuf>,
    /// The sandbox's memory cgroup (`[cgroup] charge_memory`, `crate::memcg`), relative to the
    /// memory hierarchy's root; `None` when its memory is the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_cgroup: Option<std::path::PathBuf>,
}

impl SandboxRecord {
    /// A new record in state `Created`.
    pub fn new(id: String, now: SystemTime) -> Self {
        SandboxRecord {
            id,
            state: SandboxState::Created,
            sandboxer: String::new(),
            created_at: now,
            updated_at: now,
            started_at: None,
            exit: None,
            netns_path: String::new(),
            rootfs: Vec::new(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            pod: None,
            vm: VmSize::default(),
            options: None,
            spec: None,
            runtime: None,
            extensions: BTreeMap::new(),
            tasks: None,
            updated_resources: None,
            address: String::new(),
            pid: 0,
            containers: BTreeMap::new(),
            start_us: BTreeMap::new(),
            cgroup: None,
            memory_cgroup: None,
        }
    }

    /// Moves to `next`, or fails naming `op` (gRPC `FAILED_PRECONDITION` at the edge).
    pub fn transition(
        &mut self,
        next: SandboxState,
        op: &'static str,
    ) -> Result<(), TransitionError> {
        if self.state.can_transition_to(next) {
            self.state = next;
            Ok(())
        } else {
            Err(TransitionError {
                id: self.id.clone(),
                state: self.state,
                op,
            })
        }
    }
}

/// Exit status of a sandbox whose guest had to be stopped after the grace period.
pub const EXIT_FORCED: u32 = 137;
/// Exit status of a sandbox whose VM crashed, failed to start or was lost.
pub const EXIT_FAILED: u32 = 255;

/// One sandbox, as `sandboxer ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSummary {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: SandboxState,
    /// When it was created.
    pub created_at: SystemTime,
    /// vCPUs of its VM.
    pub vcpus: u8,
    /// Guest memory of its VM.
    pub mem_mib: u32,
    /// Host thread ids of its running VM (vCPUs, then the VMM thread); empty without one.
    pub thread_ids: Vec<u32>,
    /// The phases of its last Start, in microseconds.
    pub start_us: BTreeMap<String, u64>,
}

impl SandboxSummary {
    /// Whether its Start cloned a VM template (see [`from_template`]).
    pub fn from_template(&self) -> bool {
        from_template(&self.start_us)
    }
}

/// The start phases (µs) in a Status reply's `info` (its `start_<phase>_us` entries).
pub fn start_phases<'a>(
    info: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> BTreeMap<String, u64> {
    info.into_iter()
        .filter_map(|(k, v)| {
            let phase = k.strip_prefix("start_")?.strip_suffix("_us")?;
            Some((phase.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Whether a Start with these phases cloned a VM template: a clone has no boot, so no time
/// waiting for the agent's ready line, and a Setup.
pub fn from_template(start_us: &BTreeMap<String, u64>) -> bool {
    start_us.get("agent_ready") == Some(&0) && start_us.get("setup").is_some_and(|&us| us > 0)
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    const ALL: [SandboxState; 7] = [Created, Starting, Ready, Stopping, Stopped, Failed, Deleted];

    #[test]
    fn transition_table_is_exact() {
        let allowed = [
            (Created, Starting),
            (Created, Stopped),
            (Created, Deleted),
            (Starting, Ready),
            (Starting, Failed),
            (Ready, Stopping),
            (Ready, Stopped),
            (Ready, Failed),
            (Stopping, Stopped),
            (Stopping, Failed),
            (Stopped, Deleted),
            (Failed, Deleted),
        ];
        for from in ALL {
            for to in ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn deleted_is_terminal_and_nothing_restarts() {
        assert!(ALL.iter().all(|s| !Deleted.can_transition_to(*s)));
        assert!(!Stopped.can_transition_to(Starting));
        assert!(!Failed.can_transition_to(Starting));
        assert!(!Ready.can_transition_to(Starting));
    }

    #[test]
    fn only_ready_is_sandbox_ready() {
        for s in ALL {
            let expect = if s == Ready {
                "SANDBOX_READY"
            } else {
                "SANDBOX_NOTREADY"
            };
            assert_eq!(s.api_state(), expect);
        }
    }

    #[test]
    fn ended_states() {
        let ended: Vec<_> = ALL.into_iter().filter(|s| s.has_ended()).collect();
        assert_eq!(ended, [Stopped, Failed, Deleted]);
    }

    #[test]
    fn transition_reports_state_and_op() {
        let mut r = SandboxRecord::new("a".into(), SystemTime::UNIX_EPOCH);
        r.transition(Starting, "start").unwrap();
        r.transition(Ready, "start").unwrap();
        let err = r.transition(Starting, "start").unwrap_err();
        assert_eq!((err.state, err.op), (Ready, "start"));
        assert_eq!(err.to_string(), "Cannot start sandbox a: it is ready");
        assert_eq!(r.state, Ready);
    }

    #[test]
    fn state_names_round_trip_through_serde() {
        for s in ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(serde_json::from_str::<SandboxState>(&json).unwrap(), s);
        }
    }
}
