// SPDX-License-Identifier: Apache-2.0
//! The containers' cgroup v2 directories: resource updates (`Task.Update`) and the OOM watch.
//!
//! `Update` carries OCI `LinuxResources` (JSON, as containerd packs it under the type URL
//! `types.containerd.io/opencontainers/runtime-spec/1/LinuxResources`); [`resource_writes`]
//! turns them into cgroup v2 file writes with the same conversions as runc (CPU shares to
//! `cpu.weight`, quota/period to `cpu.max`, swap as memory+swap). A file that does not exist
//! means the controller is not enabled for the container: that is a failed precondition
//! naming the file, not a silent no-op.
//!
//! [`OomWatcher`] watches each container's `memory.events` with inotify (cgroup v2 signals
//! every change of the file) and publishes [`crate::events::TOPIC_OOM`] when the `oom_kill`
//! count grows.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use oci_spec::runtime::LinuxResources;
use tokio::io::unix::AsyncFd;

use super::error::TaskError;
use super::stats::parse_flat_keyed;
use crate::events::{Events, TOPIC_OOM};

/// Type URL containerd gives `LinuxResources` in `UpdateTaskRequest.resources`.
pub const LINUX_RESOURCES_TYPE: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Decodes `UpdateTaskRequest.resources`: JSON `LinuxResources` under containerd's type URL
/// (or with an empty type URL).
pub fn decode_resources(type_url: &str, value: &[u8]) -> Result<LinuxResources, TaskError> {
    if !type_url.is_empty() && !type_url.ends_with("opencontainers/runtime-spec/1/LinuxResources") {
        return Err(TaskError::invalid(
            "resources",
            format!("type {type_url:?} is not {LINUX_RESOURCES_TYPE}"),
        ));
    }
    serde_json::from_slice(value)
        .map_err(|e| TaskError::invalid("resources", format!("not OCI LinuxResources JSON: {e}")))
}

/// runc's conversion of CPU shares (2..=262144) to `cpu.weight` (1..=10000).
fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let s = shares.clamp(2, 262_144);
    1 + (s - 2) * 9999 / 262_142
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".to_owned()
    } else {
        v.to_string()
    }
}

/// The cgroup v2 files to write for `r`, in order, as (file name, value).
pub fn resource_writes(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares()
            && shares > 0
        {
            w.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = cpu.quota().map_or("max".to_owned(), limit);
            let period = cpu.period().unwrap_or(100_000);
            w.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|c| !c.is_empty()) {
            w.push(("cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|m| !m.is_empty()) {
            w.push(("cpuset.mems", mems.clone()));
        }
    }
    if let Some(mem) = r.memory() {
        if let Some(res) = mem.reservation() {
            w.push(("memory.low", limit(res)));
        }
        if let Some(l) = mem.limit() {
            w.push(("memory.max", limit(l)));
        }
        if let Some(swap) = mem.swap() {
            // OCI swap is memory+swap; cgroup v2 counts swap alone.
            let v = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_owned(),
                (s, Some(l)) if l >= 0 => s.saturating_sub(l).max(0).to_string(),
                (s, _) => s.to_string(),
            };
            w.push(("memory.swap.max", v));
        }
    }
    if let Some(pids) = r.pids() {
        w.push(("pids.max", limit(pids.limit())));
    }
    w
}

/// Writes `r` into the cgroup at `dir`.
pub fn apply_resources(dir: &Path, r: &LinuxResources) -> Result<(), TaskError> {
    for (file, value) in resource_writes(r) {
        let path = dir.join(file);
        if !path.exists() {
            return Err(TaskError::FailedPrecondition {
                what: format!("cgroup file {}", path.display()),
                state: "missing (controller not enabled)",
                call: "Update",
                wanted: "present",
            });
        }
        std::fs::write(&path, &value).map_err(|e| {
            TaskError::invalid(
                "resources",
                format!("writing {value:?} to {}: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// The `oom_kill` count of a `memory.events` file's text.
pub fn oom_kills(memory_events: &str) -> u64 {
    parse_flat_keyed(memory_events)
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

/// Owns the inotify fd for `AsyncFd` (which needs `AsRawFd`).
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[derive(Debug)]
struct Watched {
    id: String,
    file: PathBuf,
    kills: u64,
}

/// Watches `memory.events` of containers and publishes OOM kills. Share it with `Arc`.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Arc<AsyncFd<InotifyFd>>,
    watched: Arc<Mutex<HashMap<WatchDescriptor, Watched>>>,
}

impl OomWatcher {
    /// Starts the watch task (needs a tokio runtime); events go to `events`.
    pub fn start(events: Arc<Events>) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // `AsyncFd::new` is deprecated because a `T` might not own its fd; `InotifyFd` owns
        // it for the `AsyncFd`'s whole life, and the replacement is `unsafe`.
        #[expect(
            deprecated,
            reason = "InotifyFd owns its fd; the replacement is unsafe"
        )]
        let inotify = Arc::new(AsyncFd::new(InotifyFd(inotify))?);
        let watched: Arc<Mutex<HashMap<WatchDescriptor, Watched>>> = Arc::default();
        let (fd, map) = (Arc::clone(&inotify), Arc::clone(&watched));
        tokio::spawn(async move {
            loop {
                let mut guard = match fd.readable().await {
                    Ok(g) => g,
                    Err(e) => {
                        log::error!("OOM watch stopped: {e}");
                        return;
                    }
                };
                let evs = match guard.get_inner().0.read_events() {
                    Ok(evs) => evs,
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) => {
                        log::error!("OOM watch stopped: {e}");
                        return;
                    }
                };
                for ev in evs {
                    let mut map = map.lock().expect("poisoned");
                    if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                        map.remove(&ev.wd);
                        continue;
                    }
                    let Some(w) = map.get_mut(&ev.wd) else {
                        continue;
                    };
                    let Ok(text) = std::fs::read_to_string(&w.file) else {
                        continue;
                    };
                    let kills = oom_kills(&text);
                    if kills > w.kills {
                        log::info!("Container {} had an OOM kill", w.id);
                        events.publish(TOPIC_OOM, &w.id);
                    }
                    w.kills = kills;
                }
            }
        });
        Ok(Self { inotify, watched })
    }

    /// Watches the cgroup at `dir` for container `id`. Without `memory.events` (no memory
    /// controller) there is nothing to watch: returns `false`.
    pub fn watch(&self, id: &str, dir: &Path) -> bool {
        let file = dir.join("memory.events");
        let Ok(text) = std::fs::read_to_string(&file) else {
            log::debug!("Container {id}: no {}, no OOM events", file.display());
            return false;
        };
        match self
            .inotify
            .get_ref()
            .0
            .add_watch(&file, AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => {
                self.watched.lock().expect("poisoned").insert(
                    wd,
                    Watched {
                        id: id.to_owned(),
                        file,
                        kills: oom_kills(&text),
                    },
                );
                true
            }
            Err(e) => {
                log::warn!("Container {id}: cannot watch {}: {e}", file.display());
                false
            }
        }
    }

    /// Stops watching container `id`.
    pub fn unwatch(&self, id: &str) {
        let mut map = self.watched.lock().expect("poisoned");
        let wds: Vec<WatchDescriptor> = map
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            map.remove(&wd);
            let _ = self.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// Containers watched now.
    pub fn watched(&self) -> usize {
        self.watched.lock().expect("poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn resources_to_files() {
        let r = decode_resources(
            LINUX_RESOURCES_TYPE,
            br#"{"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                 "memory":{"limit":67108864,"swap":134217728},"pids":{"limit":-1}}"#,
        )
        .unwrap();
        assert_eq!(
            resource_writes(&r),
            [
                ("cpu.weight", "39".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("cpuset.cpus", "0".to_owned()),
                ("memory.max", "67108864".to_owned()),
                ("memory.swap.max", "67108864".to_owned()),
                ("pids.max", "max".to_owned()),
            ]
        );
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        let e = decode_resources("types.containerd.io/x", b"{}").unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        let e = decode_resources("", b"{bad").unwrap_err();
        assert!(e.to_string().contains("LinuxResources"), "{e}");
    }

    #[test]
    fn apply_writes_and_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "max").unwrap();
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).unwrap();
        apply_resources(dir.path(), &r).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "1048576"
        );
        let r: LinuxResources = serde_json::from_str(r#"{"pids":{"limit":5}}"#).unwrap();
        let e = apply_resources(dir.path(), &r).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("pids.max"), "{e}");
    }

    #[tokio::test]
    async fn oom_kill_increase_publishes_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").unwrap();
        let events = Arc::new(Events::new());
        let w = OomWatcher::start(Arc::clone(&events)).unwrap();
        assert!(w.watch("c1", dir.path()));
        assert!(!w.watch("c2", &dir.path().join("nope")));
        // A change that is no kill publishes nothing.
        std::fs::write(&file, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(events.is_empty());
        std::fs::write(&file, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("OOM event within 5 s");
        assert_eq!(
            (ev.topic.as_str(), ev.container_id.as_str()),
            (TOPIC_OOM, "c1")
        );
        w.unwatch("c1");
        assert_eq!(w.watched(), 0);
        std::fs::write(&file, "oom_kill 2\n").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(events.is_empty());
    }
}
