// SPDX-License-Identifier: Apache-2.0
//! Per-sandbox CPU cgroups: every VM runs on threads of this one process, so without them all
//! vCPU time is charged to the daemon's cgroup and a pod's CPU limit binds nothing on the host.
//! Right after a VM starts, its vCPU and VMM threads move into a cgroup of their own whose
//! bandwidth (quota / period) and weight come from the pod's `LinuxContainerResources`; the
//! cgroup is removed once the VM's threads have ended.
//!
//! Layout, by cgroup version:
//!
//! - **v1** (a hierarchy with the `cpu` controller): threads may go to any cgroup of it, so a
//!   sandbox's cgroup is `<cpu mount>/<parent>/<id>` (`tasks`, `cpu.cfs_quota_us`,
//!   `cpu.cfs_period_us`, `cpu.shares`). `<parent>` is `[cgroup] parent`, or the pod's CRI
//!   `cgroup_parent` when it names one (a systemd slice name is expanded to its path). When
//!   `cpuacct` is a hierarchy of its own, the threads also go to `<cpuacct mount>/<parent>/<id>`,
//!   for the usage figure; where `blkio` is mounted, to `<blkio mount>/<parent>/<id>`, so the
//!   block I/O they issue (the disks' reads and direct writes; buffered writes are written back
//!   by the kernel's flusher threads, outside any sandbox) is the sandbox's.
//! - **v2** (unified, `cpu` in the daemon's `cgroup.controllers`): the threads of one process
//!   can only be split inside a *threaded* subtree of that process's own cgroup. The daemon's
//!   cgroup (from `/proc/self/cgroup`) stays where it is and becomes the threaded root (`domain
//!   threaded`: the process and its other threads stay in it); its child
//!   [`V2_SANDBOXES_DIR`] is made `threaded`, `+cpu` is enabled in the `cgroup.subtree_control`
//!   of both, and each sandbox gets a `threaded` child `<own>/sandboxer-sandboxes/<id>` with
//!   `cpu.max` and `cpu.weight`; the threads are written to its `cgroup.threads`. The daemon's
//!   cgroup must have no populated non-threaded children and no domain controller (memory, io)
//!   enabled for its children: under systemd, give the unit `Delegate=cpu`. Block I/O stays the
//!   daemon's on v2: `io`, like `memory`, is not a threaded controller.
//!
//! Memory cannot be charged per sandbox by placing threads: the kernel charges guest pages to
//! the memory cgroup of the process that owns the mm (the daemon), and the memory controller is
//! not threaded. `[cgroup] charge_memory` charges it another way ([`crate::memcg`]); without
//! it, the node-wide `[limits]` budget stands in (docs/security.md).
//!
//! Everything here is plain file I/O below a root directory, so the layout logic is tested on a
//! fake tree of ordinary files.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::CgroupConfig;

/// The child of the daemon's own cgroup (v2) that holds the sandboxes' cgroups.
pub const V2_SANDBOXES_DIR: &str = "sandboxer-sandboxes";
/// The CFS period when the pod names none, in microseconds (the kernel's default).
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// Shortest CFS period and quota the kernel accepts, in microseconds.
pub const MIN_PERIOD_US: u64 = 1_000;
/// Longest CFS period the kernel accepts, in microseconds.
pub const MAX_PERIOD_US: u64 = 1_000_000;
/// `cpu.shares` (v1) of a cgroup the pod gave no shares.
pub const DEFAULT_SHARES: u64 = 1024;
/// `cpu.weight` (v2) of a cgroup the pod gave no shares.
pub const DEFAULT_WEIGHT: u64 = 100;
/// How long removing a cgroup waits for the threads of an ended VM to leave it.
pub const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup with the cpu controller can be used here.
    #[error("No usable cgroup cpu controller: {0}")]
    Unusable(String),
    /// Creating a cgroup failed.
    #[error("Failed to create cgroup {0}")]
    Create(PathBuf, #[source] io::Error),
    /// Writing a cgroup file failed.
    #[error("Failed to write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Reading a cgroup file failed.
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// Removing a cgroup failed.
    #[error("Failed to remove cgroup {0}")]
    Remove(PathBuf, #[source] io::Error),
    /// A cgroup parent is not a path this daemon may use.
    #[error("Invalid cgroup parent {0:?}: {1}")]
    Parent(String, String),
}

/// A sandbox's CPU limit, as the host applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuLimit {
    /// CPU time per period in microseconds; `None`: unlimited.
    pub quota_us: Option<u64>,
    /// The period in microseconds.
    pub period_us: u64,
    /// Relative weight in cgroup v1 `cpu.shares` units; `None`: the default.
    pub shares: Option<u64>,
}

impl Default for CpuLimit {
    fn default() -> Self {
        CpuLimit {
            quota_us: None,
            period_us: DEFAULT_PERIOD_US,
            shares: None,
        }
    }
}

impl CpuLimit {
    /// The limit of a CRI `LinuxContainerResources` (`cpu_quota`, `cpu_period`, `cpu_shares`):
    /// 0 or negative is unset (no quota, the default period or weight). Fails with what is
    /// wrong for values the kernel would refuse.
    pub fn from_cri(quota: i64, period: i64, shares: i64) -> Result<Self, String> {
        let quota_us = u64::try_from(quota).ok().filter(|&q| q > 0);
        let period_us = u64::try_from(period)
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(DEFAULT_PERIOD_US);
        if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&period_us) {
            return Err(format!(
                "cpu_period {period_us} is outside {MIN_PERIOD_US}..={MAX_PERIOD_US} us"
            ));
        }
        if let Some(q) = quota_us
            && q < MIN_PERIOD_US
        {
            return Err(format!("cpu_quota {q} is below {MIN_PERIOD_US} us"));
        }
        let shares = u64::try_from(shares).ok().filter(|&s| s > 0);
        Ok(CpuLimit {
            quota_us,
            period_us,
            shares,
        })
    }

    /// Whole CPUs the quota allows (rounded up); `None` without a quota.
    pub fn cpus(&self) -> Option<u64> {
        self.quota_us.map(|q| q.div_ceil(self.period_us.max(1)))
    }

    /// The v2 `cpu.max` line: `"<quota> <period>"` or `"max <period>"`.
    pub fn cpu_max(&self) -> String {
        match self.quota_us {
            Some(q) => format!("{q} {}", self.period_us),
            None => format!("max {}", self.period_us),
        }
    }

    /// The v2 `cpu.weight`.
    pub fn weight(&self) -> u64 {
        self.shares.map_or(DEFAULT_WEIGHT, shares_to_weight)
    }
}

/// cgroup v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000), as runc (>= 1.3.2) and
/// crun (>= 1.23) convert them: `ceil(10^((l² + 125 l) / 612 - 7 / 34))` with `l = log2(shares)`,
/// which maps 2 to 1, the default 1024 to the default 100 and 262144 to 10000 (the older
/// linear formula mapped 1024 to 39). Written as `(l² + 125 l - 126) / 612` so that the
/// exact points come out exact in floating point.
pub fn shares_to_weight(shares: u64) -> u64 {
    const MIN_SHARES: u64 = 2;
    const MAX_SHARES: u64 = 262_144;
    let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
    // Exact: 2..=262144 fits f64's mantissa.
    #[expect(clippy::cast_precision_loss, reason = "shares are at most 2^18")]
    let l = (shares as f64).log2();
    let exponent = (l * l + 125.0 * l - 126.0) / 612.0;
    let weight = 10f64.powf(exponent).ceil();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "weight is between 1 and 10000 for the clamped shares"
    )]
    let weight = weight as u64;
    weight.clamp(1, 10_000)
}

/// The cgroup version in use and its roots.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// v1: the cpu hierarchy's mount, the cpuacct hierarchy's if it is mounted apart, and the
    /// blkio one's if there is one (apart from cpu).
    V1 {
        cpu: PathBuf,
        acct: Option<PathBuf>,
        blkio: Option<PathBuf>,
    },
    /// v2: the daemon's own cgroup (the threaded root).
    V2 { root: PathBuf },
}

/// The sandboxes' CPU cgroups of this daemon. A sandbox's cgroup is named by its path
/// relative to the hierarchy root(s) (what the sandbox record keeps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuCgroups {
    kind: Kind,
    /// Where the sandboxes' cgroups go, relative to the root(s).
    base: PathBuf,
}

/// Where the cpu controller was found ([`detect`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A v1 hierarchy with `cpu`, and the `cpuacct` one if it is mounted apart.
    V1 {
        /// Mount point of the cpu hierarchy.
        cpu: PathBuf,
        /// Mount point of a separate cpuacct hierarchy.
        acct: Option<PathBuf>,
        /// Mount point of the blkio hierarchy, if apart from cpu's.
        blkio: Option<PathBuf>,
    },
    /// The unified hierarchy: the daemon's own cgroup directory.
    V2 {
        /// `<cgroup2 mount>/<own path>`.
        own: PathBuf,
    },
}

/// Finds the cpu controller from `/proc/self/cgroup` and `/proc/self/mountinfo`: a v1
/// hierarchy with `cpu` wins (hybrid hosts), else the unified hierarchy.
pub fn detect(proc_cgroup: &str, mountinfo: &str) -> Option<Found> {
    // mountinfo: id parent dev root mountpoint options [optional...] - fstype source superopts
    let mounts: Vec<(&str, &str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let superopts = post.nth(1).unwrap_or_default();
            Some((
                fstype,
                *pre.get(3)?,
                *pre.get(4)?,
                superopts.split(',').collect(),
            ))
        })
        .collect();
    let v1 = |controller: &str| {
        mounts
            .iter()
            .find(|(fs, _, _, opts)| *fs == "cgroup" && opts.contains(&controller))
            .map(|(_, _, mp, opts)| (PathBuf::from(mp), opts.contains(&"cpu")))
    };
    if let Some((cpu, _)) = v1("cpu") {
        let acct = v1("cpuacct")
            .filter(|(_, with_cpu)| !with_cpu)
            .map(|(p, _)| p);
        let blkio = v1("blkio")
            .filter(|(_, with_cpu)| !with_cpu)
            .map(|(p, _)| p);
        return Some(Found::V1 { cpu, acct, blkio });
    }
    let own = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    let (_, root, mp, _) = mounts.iter().find(|(fs, ..)| *fs == "cgroup2")?;
    let rel = own
        .strip_prefix(root)
        .unwrap_or(own)
        .trim_start_matches('/');
    let mut dir = PathBuf::from(mp);
    if !rel.is_empty() {
        dir.push(rel);
    }
    Some(Found::V2 { own: dir })
}

/// Checks that `p` is a relative path of plain names (no `..`, `.`, or root).
fn plain_relative(p: &Path) -> bool {
    p.components().count() > 0 && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The path of a pod's CRI `cgroup_parent` below a hierarchy's root: a leading `/` is the
/// root itself (cgroupfs-style parents are absolute), a systemd slice name
/// (`kubepods-burstable-pod1.slice`) is expanded to its nesting
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice`). Fails on `..`,
/// `.` or an empty path.
pub fn pod_parent_path(parent: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError::Parent(parent.to_owned(), why.to_owned());
    let trimmed = parent.trim_start_matches('/');
    let path = match trimmed.strip_suffix(".slice") {
        Some(stem) if !trimmed.contains('/') && !stem.is_empty() => {
            let mut path = PathBuf::new();
            let mut prefix = String::new();
            for part in stem.split('-') {
                if part.is_empty() {
                    return Err(bad("a slice name with an empty part"));
                }
                if !prefix.is_empty() {
                    prefix.push('-');
                }
                prefix.push_str(part);
                path.push(format!("{prefix}.slice"));
            }
            path
        }
        _ => PathBuf::from(trimmed),
    };
    if !plain_relative(&path) {
        return Err(bad("not a path of plain names below the hierarchy's root"));
    }
    Ok(path)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| CgroupError::Read(path.to_owned(), e))
}

/// The path of the pod's CRI `cgroup_parent` ([`pod_parent_path`]) below the hierarchy
/// `root`, which must hold it.
pub(crate) fn existing_pod_parent(root: &Path, pod_parent: &str) -> Result<PathBuf, CgroupError> {
    let parent = pod_parent_path(pod_parent)?;
    let dir = root.join(&parent);
    if !dir.is_dir() {
        return Err(CgroupError::Parent(
            pod_parent.to_owned(),
            format!("{} does not exist", dir.display()),
        ));
    }
    Ok(parent)
}

/// Creates the cgroup `path` and any parent it lacks.
pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(CgroupError::Create(path.to_owned(), e)),
    }
}

/// Whether the whitespace-separated `list` names `word`.
fn lists(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

/// Removes the (empty) cgroup `dir`, retrying while threads are still leaving it (`EBUSY`)
/// until `deadline`. A cgroup already gone is fine.
fn remove_dir(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(CgroupError::Remove(dir.to_owned(), e)),
        }
    }
}

impl CpuCgroups {
    /// The sandboxes' cgroups `config` asks for: `Ok(None)` when turned off, or when the
    /// setting is left unset and no usable cpu controller exists (the caller logs that);
    /// an error when `enabled = true` and none is usable.
    pub fn from_config(config: &CgroupConfig) -> Result<Option<Self>, CgroupError> {
        if config.enabled == Some(false) {
            return Ok(None);
        }
        match Self::probe(&config.parent) {
            Ok(cgroups) => Ok(Some(cgroups)),
            Err(e) if config.enabled.is_none() => {
                tracing::warn!(
                    error = %crate::error_chain(&e),
                    "no per-sandbox CPU cgroups: every VM's threads stay in the daemon's cgroup"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Finds this process's cpu controller and prepares the sandboxes' parent cgroup
    /// (`parent` is the v1 one).
    pub fn probe(parent: &Path) -> Result<Self, CgroupError> {
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        match detect(&proc_cgroup, &mountinfo) {
            Some(Found::V1 { cpu, acct, blkio }) => Self::v1(cpu, acct, parent)?.with_blkio(blkio),
            Some(Found::V2 { own }) => Self::v2(own),
            None => Err(CgroupError::Unusable(
                "no cgroup hierarchy with the cpu controller is mounted".into(),
            )),
        }
    }

    /// cgroup v1: the sandboxes' cgroups go to `<cpu>/<parent>/<id>` (and the same path
    /// below `acct`, a separate cpuacct hierarchy). Creates the parent.
    pub fn v1(cpu: PathBuf, acct: Option<PathBuf>, parent: &Path) -> Result<Self, CgroupError> {
        if !plain_relative(parent) {
            return Err(CgroupError::Parent(
                parent.display().to_string(),
                "cgroup.parent must be a relative path of plain names".into(),
            ));
        }
        let cgroups = CpuCgroups {
            kind: Kind::V1 {
                cpu,
                acct,
                blkio: None,
            },
            base: parent.to_owned(),
        };
        for root in cgroups.roots() {
            mkdir(&root.join(parent))?;
        }
        // A cgroup made and removed here, so that a hierarchy this process may not change
        // (read-only, not root) fails at start rather than at the first Start.
        let probe = cgroups.dir(&cgroups.base.join(format!(".probe-{}", std::process::id())));
        mkdir(&probe)?;
        remove_dir(&probe, Instant::now())?;
        Ok(cgroups)
    }

    /// cgroup v1: the sandboxes' cgroups also go to `<blkio>/<parent>/<id>` (the blkio
    /// hierarchy's mount), so the block I/O their threads issue is the sandbox's. Creates the
    /// parent there. No change for `None` or on v2.
    pub fn with_blkio(mut self, blkio: Option<PathBuf>) -> Result<Self, CgroupError> {
        if let (Kind::V1 { blkio: slot, .. }, Some(dir)) = (&mut self.kind, blkio) {
            mkdir(&dir.join(&self.base))?;
            *slot = Some(dir);
        }
        Ok(self)
    }

    /// cgroup v2: makes `own` (the daemon's cgroup) the threaded root of
    /// `<own>/sandboxer-sandboxes` with the cpu controller enabled for its children.
    pub fn v2(own: PathBuf) -> Result<Self, CgroupError> {
        let controllers = read(&own.join("cgroup.controllers"))?;
        if !lists(&controllers, "cpu") {
            return Err(CgroupError::Unusable(format!(
                "the cpu controller is not enabled for {} (its parent's cgroup.subtree_control)",
                own.display()
            )));
        }
        let base = own.join(V2_SANDBOXES_DIR);
        mkdir(&base)?;
        make_threaded(&base)?;
        enable(&own, "cpu")?;
        enable(&base, "cpu")?;
        Ok(CpuCgroups {
            kind: Kind::V2 { root: own },
            base: PathBuf::from(V2_SANDBOXES_DIR),
        })
    }

    /// Whether this is cgroup v2.
    pub fn is_v2(&self) -> bool {
        matches!(self.kind, Kind::V2 { .. })
    }

    /// The hierarchy roots a sandbox's cgroup exists under (the cpu one first).
    fn roots(&self) -> Vec<&Path> {
        match &self.kind {
            Kind::V1 { cpu, acct, blkio } => std::iter::once(cpu.as_path())
                .chain(acct.as_deref())
                .chain(blkio.as_deref())
                .collect(),
            Kind::V2 { root } => vec![root.as_path()],
        }
    }

    /// The cpu controller's directory the sandboxes' cgroups go to by default.
    pub fn base_dir(&self) -> PathBuf {
        self.dir(&self.base)
    }

    /// The cpu controller's directory of the cgroup `group`.
    pub fn dir(&self, group: &Path) -> PathBuf {
        self.roots()[0].join(group)
    }

    /// The cgroup (relative to the roots) of sandbox `id`: under the pod's CRI
    /// `cgroup_parent` when it names one and this is v1 (it must exist), else under the
    /// daemon's parent. v2 keeps every sandbox inside the daemon's own cgroup: the pod's
    /// parent cannot hold a thread of this process there.
    pub fn group_of(&self, id: &str, pod_parent: &str) -> Result<PathBuf, CgroupError> {
        if pod_parent.is_empty() || self.is_v2() {
            return Ok(self.base.join(id));
        }
        Ok(existing_pod_parent(self.roots()[0], pod_parent)?.join(id))
    }

    /// Creates `group`, applies `limit` and moves the threads `tids` into it (those that have
    /// ended are skipped).
    pub fn attach(&self, group: &Path, limit: &CpuLimit, tids: &[u32]) -> Result<(), CgroupError> {
        for root in self.roots() {
            mkdir(&root.join(group))?;
        }
        let dir = self.dir(group);
        if self.is_v2() {
            make_threaded(&dir)?;
        }
        self.set_limit(group, limit)?;
        let threads = if self.is_v2() {
            "cgroup.threads"
        } else {
            "tasks"
        };
        for root in self.roots() {
            let file = root.join(group).join(threads);
            for tid in tids {
                match write(&file, &tid.to_string()) {
                    // The thread ended meanwhile (a guest that ended at once takes its VM's
                    // threads with it): nothing is left to move.
                    Err(CgroupError::Write { source, .. })
                        if source.raw_os_error() == Some(nix::libc::ESRCH) => {}
                    other => other?,
                }
            }
        }
        Ok(())
    }

    /// Applies `limit` to the cgroup `group`.
    pub fn set_limit(&self, group: &Path, limit: &CpuLimit) -> Result<(), CgroupError> {
        let dir = self.dir(group);
        if self.is_v2() {
            write(&dir.join("cpu.max"), &limit.cpu_max())?;
            return write(&dir.join("cpu.weight"), &limit.weight().to_string());
        }
        // Unlimited first: the kernel checks each write against the values in place.
        let quota = dir.join("cpu.cfs_quota_us");
        write(&quota, "-1")?;
        write(&dir.join("cpu.cfs_period_us"), &limit.period_us.to_string())?;
        if let Some(q) = limit.quota_us {
            write(&quota, &q.to_string())?;
        }
        write(
            &dir.join("cpu.shares"),
            &limit.shares.unwrap_or(DEFAULT_SHARES).to_string(),
        )
    }

    /// The quota and period in place for `group`, as `cpu.max` has them
    /// (`"<quota>|max <period>"`).
    pub fn cpu_max(&self, group: &Path) -> Result<String, CgroupError> {
        let dir = self.dir(group);
        if self.is_v2() {
            return Ok(read(&dir.join("cpu.max"))?.trim().to_owned());
        }
        let quota = read(&dir.join("cpu.cfs_quota_us"))?;
        let period = read(&dir.join("cpu.cfs_period_us"))?;
        let quota = match quota.trim() {
            "-1" => "max",
            q => q,
        };
        Ok(format!("{quota} {}", period.trim()))
    }

    /// The threads in `group` (its cpu controller's directory).
    pub fn threads(&self, group: &Path) -> Result<Vec<u32>, CgroupError> {
        let file = self.dir(group).join(if self.is_v2() {
            "cgroup.threads"
        } else {
            "tasks"
        });
        Ok(read(&file)?
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect())
    }

    /// CPU time the threads of `group` have used, if the hierarchy counts it (v2 `cpu.stat`
    /// `usage_usec`; v1 `cpuacct.usage`).
    pub fn usage(&self, group: &Path) -> Option<Duration> {
        match &self.kind {
            Kind::V2 { root } => {
                let stat = fs::read_to_string(root.join(group).join("cpu.stat")).ok()?;
                let us = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                Some(Duration::from_micros(us))
            }
            Kind::V1 { cpu, acct, .. } => {
                let dir = acct.as_deref().unwrap_or(cpu).join(group);
                let ns = fs::read_to_string(dir.join("cpuacct.usage")).ok()?;
                Some(Duration::from_nanos(ns.trim().parse().ok()?))
            }
        }
    }

    /// Removes `group` once its threads have left it, waiting up to `wait` for them (the
    /// threads of a VM end shortly after its end is recorded). A group already gone is fine.
    pub fn remove(&self, group: &Path, wait: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + wait;
        // Children first: nothing here makes any, but a leftover must not block the rest.
        let mut result = Ok(());
        for root in self.roots() {
            if let Err(e) = remove_dir(&root.join(group), deadline) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Removes every sandbox cgroup under the daemon's parent that no thread uses: what a
    /// daemon that ended without cleaning up left (at start no VM of this process runs yet).
    /// Returns what could not be removed (a cgroup with threads: another daemon's).
    pub fn remove_leftovers(&self) -> Vec<CgroupError> {
        let mut kept = Vec::new();
        for root in self.roots() {
            let Ok(entries) = fs::read_dir(root.join(&self.base)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && let Err(e) = remove_dir(&entry.path(), Instant::now())
                {
                    kept.push(e);
                }
            }
        }
        kept
    }
}

/// Makes the v2 cgroup `dir` threaded (a no-op if it is).
fn make_threaded(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.type");
    match fs::read_to_string(&file) {
        Ok(t) if t.trim() == "threaded" => Ok(()),
        _ => write(&file, "threaded"),
    }
}

/// Enables `controller` for the children of the v2 cgroup `dir` (a no-op if it is).
pub(crate) fn enable(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    match fs::read_to_string(&file) {
        Ok(c) if lists(&c, controller) => Ok(()),
        _ => write(&file, &format!("+{controller}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_to_weight_keeps_the_defaults_and_the_ends() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Out of range clamps.
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
        // runc's and crun's published figure: 2000 shares are weight 170.
        assert_eq!(shares_to_weight(2000), 170);
        let mut last = 0;
        for s in (2..=262_144).step_by(97) {
            let w = shares_to_weight(s);
            assert!(w >= last, "{s}: {w} < {last}");
            last = w;
        }
    }

    #[test]
    fn cri_limits() {
        let l = CpuLimit::from_cri(20_000, 100_000, 512).unwrap();
        assert_eq!(l.cpu_max(), "20000 100000");
        assert_eq!(l.cpus(), Some(1));
        assert_eq!(l.weight(), shares_to_weight(512));
        let unset = CpuLimit::from_cri(-1, 0, 0).unwrap();
        assert_eq!(unset, CpuLimit::default());
        assert_eq!(unset.cpu_max(), "max 100000");
        assert_eq!(unset.weight(), DEFAULT_WEIGHT);
        assert_eq!(
            CpuLimit::from_cri(250_000, 100_000, 0).unwrap().cpus(),
            Some(3)
        );
        assert!(
            CpuLimit::from_cri(500, 100_000, 0)
                .unwrap_err()
                .contains("cpu_quota")
        );
        assert!(
            CpuLimit::from_cri(0, 10, 0)
                .unwrap_err()
                .contains("cpu_period")
        );
        CpuLimit::from_cri(0, 2_000_000, 0).unwrap_err();
    }

    #[test]
    fn detect_prefers_a_v1_cpu_hierarchy_and_finds_the_own_v2_cgroup() {
        let hybrid_cgroup = "4:memory:/x\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        let hybrid_mounts = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
33 25 0:29 / /sys/fs/cgroup/blkio rw,relatime shared:12 - cgroup cgroup rw,blkio
32 25 0:28 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw
";
        assert_eq!(
            detect(hybrid_cgroup, hybrid_mounts),
            Some(Found::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                acct: Some("/sys/fs/cgroup/cpuacct".into()),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
            })
        );
        let comounted =
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            detect("1:cpu,cpuacct:/\n", comounted),
            Some(Found::V1 {
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                acct: None,
                blkio: None,
            })
        );
        let unified =
            "25 20 0:23 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            detect("0::/system.slice/sandboxer.service\n", unified),
            Some(Found::V2 {
                own: "/sys/fs/cgroup/system.slice/sandboxer.service".into()
            })
        );
        // A namespaced mount whose root is the daemon's cgroup.
        let ns = "25 20 0:23 /system.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            detect("0::/system.slice/a\n", ns),
            Some(Found::V2 {
                own: "/sys/fs/cgroup/a".into()
            })
        );
        assert_eq!(
            detect("0::/\n", unified),
            Some(Found::V2 {
                own: "/sys/fs/cgroup".into()
            })
        );
        assert_eq!(detect("0::/\n", ""), None);
    }

    #[test]
    fn pod_parents() {
        assert_eq!(
            pod_parent_path("/kubepods/burstable/pod1").unwrap(),
            Path::new("kubepods/burstable/pod1")
        );
        assert_eq!(
            pod_parent_path("kubepods-burstable-pod1.slice").unwrap(),
            Path::new("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice")
        );
        for bad in ["", "/", "a/../b", "./a", "kubepods--x.slice", "-.slice"] {
            assert!(
                matches!(pod_parent_path(bad), Err(CgroupError::Parent(..))),
                "{bad:?}"
            );
        }
    }

    /// A fake v2 tree: the daemon's cgroup with the cpu controller available.
    fn fake_v2() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path().join("system.slice/sandboxer.service");
        fs::create_dir_all(&own).unwrap();
        fs::write(
            own.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        (tmp, own)
    }

    #[test]
    fn v2_makes_the_daemons_cgroup_a_threaded_root() {
        let (_tmp, own) = fake_v2();
        let cg = CpuCgroups::v2(own.clone()).unwrap();
        assert!(cg.is_v2());
        let base = own.join(V2_SANDBOXES_DIR);
        assert_eq!(
            fs::read_to_string(base.join("cgroup.type")).unwrap(),
            "threaded"
        );
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );

        // The pod's parent is not used on v2.
        let group = cg.group_of("pod-1", "/kubepods/pod1").unwrap();
        assert_eq!(group, Path::new("sandboxer-sandboxes/pod-1"));
        let limit = CpuLimit::from_cri(20_000, 100_000, 2000).unwrap();
        cg.attach(&group, &limit, &[11, 12]).unwrap();
        let dir = own.join(&group);
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.type")).unwrap(),
            "threaded"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "20000 100000"
        );
        assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "170");
        // The fake file keeps only the last write; the kernel takes one tid per write.
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.threads")).unwrap(),
            "12"
        );
        assert_eq!(cg.cpu_max(&group).unwrap(), "20000 100000");

        cg.set_limit(&group, &CpuLimit::default()).unwrap();
        assert_eq!(cg.cpu_max(&group).unwrap(), "max 100000");
        assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "100");

        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        assert_eq!(cg.usage(&group), Some(Duration::from_micros(1500)));

        // Set up again (a restart): nothing written twice breaks.
        CpuCgroups::v2(own.clone()).unwrap();
    }

    #[test]
    fn v2_without_the_cpu_controller_is_unusable() {
        let (_tmp, own) = fake_v2();
        fs::write(own.join("cgroup.controllers"), "memory pids\n").unwrap();
        assert!(matches!(CpuCgroups::v2(own), Err(CgroupError::Unusable(_))));
    }

    #[test]
    fn v1_writes_quota_period_and_shares() {
        let tmp = tempfile::tempdir().unwrap();
        let (cpu, acct) = (tmp.path().join("cpu"), tmp.path().join("cpuacct"));
        let blkio = tmp.path().join("blkio");
        let cg = CpuCgroups::v1(cpu.clone(), Some(acct.clone()), Path::new("sandboxer"))
            .unwrap()
            .with_blkio(Some(blkio.clone()))
            .unwrap();
        assert!(!cg.is_v2());
        CpuCgroups::v1(cpu.clone(), None, Path::new("../x")).unwrap_err();
        let group = cg.group_of("pod", "").unwrap();
        assert_eq!(group, Path::new("sandboxer/pod"));
        let limit = CpuLimit::from_cri(50_000, 200_000, 0).unwrap();
        cg.attach(&group, &limit, &[7]).unwrap();
        let dir = cpu.join(&group);
        assert_eq!(
            fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap(),
            "200000"
        );
        assert_eq!(fs::read_to_string(dir.join("cpu.shares")).unwrap(), "1024");
        assert_eq!(cg.threads(&group).unwrap(), [7]);
        for other in [&acct, &blkio] {
            assert_eq!(
                fs::read_to_string(other.join(&group).join("tasks")).unwrap(),
                "7",
                "{}",
                other.display()
            );
        }
        assert!(!blkio.join(&group).join("cpu.shares").exists());
        assert_eq!(cg.cpu_max(&group).unwrap(), "50000 200000");
        cg.set_limit(&group, &CpuLimit::default()).unwrap();
        assert_eq!(cg.cpu_max(&group).unwrap(), "max 100000");
        fs::write(acct.join(&group).join("cpuacct.usage"), "2000000\n").unwrap();
        assert_eq!(cg.usage(&group), Some(Duration::from_millis(2)));

        // A pod parent is used when it exists, refused when it does not.
        fs::create_dir_all(cpu.join("kubepods/pod1")).unwrap();
        assert_eq!(
            cg.group_of("pod", "/kubepods/pod1").unwrap(),
            Path::new("kubepods/pod1/pod")
        );
        assert!(matches!(
            cg.group_of("pod", "/kubepods/pod2"),
            Err(CgroupError::Parent(..))
        ));
    }

    #[test]
    fn removal_and_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let cpu = tmp.path().join("cpu");
        let cg = CpuCgroups::v1(cpu.clone(), None, Path::new("sandboxer")).unwrap();
        // Real cgroup directories are empty to rmdir; fake ones are made empty.
        fs::create_dir_all(cpu.join("sandboxer/old-1")).unwrap();
        fs::create_dir_all(cpu.join("sandboxer/old-2")).unwrap();
        fs::write(cpu.join("sandboxer/old-2/tasks"), "").unwrap();
        let kept = cg.remove_leftovers();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(!cpu.join("sandboxer/old-1").exists());
        assert!(cpu.join("sandboxer/old-2").exists());
        // Gone already is fine.
        cg.remove(Path::new("sandboxer/old-1"), Duration::ZERO)
            .unwrap();
    }
}
