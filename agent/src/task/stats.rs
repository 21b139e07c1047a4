// SPDX-License-Identifier: Apache-2.0
//! Container statistics from cgroup v2 files (`cpu.stat`, `memory.current`, `memory.max`,
//! `memory.stat`, `memory.events`, `pids.current`, `pids.max`) as containerd's
//! `io.containerd.cgroups.v2.Metrics`.
//!
//! A controller that is not enabled for the cgroup has no files; its part of the metrics is then
//! left empty rather than failing the whole call. `cpu.stat` always exists in cgroup v2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::MessageField;

/// The type URL containerd registers for [`Metrics`].
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors reading statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// `/proc/<pid>/cgroup` could not be read.
    #[error("Failed to read the cgroup of pid {0}")]
    ReadProcCgroup(u32, #[source] std::io::Error),
    /// `/proc/<pid>/cgroup` has no cgroup v2 (`0::`) line.
    #[error("Pid {0} is in no cgroup v2 hierarchy")]
    NoUnifiedCgroup(u32),
    /// A cgroup file exists but could not be read.
    #[error("Failed to read {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
}

/// The cgroup v2 directory of `pid` under `root`, from `/proc/<pid>/cgroup`.
pub fn cgroup_dir_of(pid: u32, root: &Path) -> Result<PathBuf, StatsError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| StatsError::ReadProcCgroup(pid, e))?;
    let rel = unified_path(&text).ok_or(StatsError::NoUnifiedCgroup(pid))?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// The path of the `0::<path>` line of a `/proc/<pid>/cgroup` file.
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Reads a file that may be missing (controller not enabled): `Ok(None)` then.
fn read_optional(path: &Path) -> Result<Option<String>, StatsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StatsError::ReadFile(path.to_owned(), e)),
    }
}

/// Parses flat-keyed files (`key value` per line); bad lines are skipped.
pub fn parse_flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// Parses a single-value file; `max` is reported as 0 (no limit), as containerd does.
pub fn parse_single(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(0),
        v => v.parse().ok(),
    }
}

/// Reads the metrics of the cgroup at `dir`.
pub fn read_metrics(dir: &Path) -> Result<Metrics, StatsError> {
    let mut metrics = Metrics::new();
    let read = |name: &str| read_optional(&dir.join(name));

    if let Some(text) = read("cpu.stat")? {
        let kv = parse_flat_keyed(&text);
        let get = |k: &str| kv.get(k).copied().unwrap_or(0);
        let mut cpu = CPUStat::new();
        cpu.usage_usec = get("usage_usec");
        cpu.user_usec = get("user_usec");
        cpu.system_usec = get("system_usec");
        cpu.nr_periods = get("nr_periods");
        cpu.nr_throttled = get("nr_throttled");
        cpu.throttled_usec = get("throttled_usec");
        cpu.nr_bursts = get("nr_bursts");
        cpu.burst_usec = get("burst_usec");
        metrics.cpu = MessageField::some(cpu);
    }

    if let Some(current) = read("memory.current")? {
        let mut mem = MemoryStat::new();
        mem.usage = parse_single(&current).unwrap_or(0);
        if let Some(max) = read("memory.max")? {
            mem.usage_limit = parse_single(&max).unwrap_or(0);
        }
        if let Some(peak) = read("memory.peak")? {
            mem.max_usage = parse_single(&peak).unwrap_or(0);
        }
        if let Some(swap) = read("memory.swap.current")? {
            mem.swap_usage = parse_single(&swap).unwrap_or(0);
        }
        if let Some(swap) = read("memory.swap.max")? {
            mem.swap_limit = parse_single(&swap).unwrap_or(0);
        }
        if let Some(text) = read("memory.stat")? {
            let kv = parse_flat_keyed(&text);
            let get = |k: &str| kv.get(k).copied().unwrap_or(0);
            mem.anon = get("anon");
            mem.file = get("file");
            mem.kernel_stack = get("kernel_stack");
            mem.slab = get("slab");
            mem.sock = get("sock");
            mem.shmem = get("shmem");
            mem.file_mapped = get("file_mapped");
            mem.file_dirty = get("file_dirty");
            mem.file_writeback = get("file_writeback");
            mem.anon_thp = get("anon_thp");
            mem.inactive_anon = get("inactive_anon");
            mem.active_anon = get("active_anon");
            mem.inactive_file = get("inactive_file");
            mem.active_file = get("active_file");
            mem.unevictable = get("unevictable");
            mem.slab_reclaimable = get("slab_reclaimable");
            mem.slab_unreclaimable = get("slab_unreclaimable");
            mem.pgfault = get("pgfault");
            mem.pgmajfault = get("pgmajfault");
            mem.workingset_refault = get("workingset_refault");
            mem.workingset_activate = get("workingset_activate");
            mem.workingset_nodereclaim = get("workingset_nodereclaim");
            mem.pgrefill = get("pgrefill");
            mem.pgscan = get("pgscan");
            mem.pgsteal = get("pgsteal");
            mem.pgactivate = get("pgactivate");
            mem.pgdeactivate = get("pgdeactivate");
            mem.pglazyfree = get("pglazyfree");
            mem.pglazyfreed = get("pglazyfreed");
            mem.thp_fault_alloc = get("thp_fault_alloc");
            mem.thp_collapse_alloc = get("thp_collapse_alloc");
        }
        metrics.memory = MessageField::some(mem);
    }

    if let Some(text) = read("memory.events")? {
        let kv = parse_flat_keyed(&text);
        let get = |k: &str| kv.get(k).copied().unwrap_or(0);
        let mut ev = MemoryEvents::new();
        ev.low = get("low");
        ev.high = get("high");
        ev.max = get("max");
        ev.oom = get("oom");
        ev.oom_kill = get("oom_kill");
        ev.oom_group_kill = get("oom_group_kill");
        metrics.memory_events = MessageField::some(ev);
    }

    if let Some(current) = read("pids.current")? {
        let mut pids = PidsStat::new();
        pids.current = parse_single(&current).unwrap_or(0);
        if let Some(max) = read("pids.max")? {
            pids.limit = parse_single(&max).unwrap_or(0);
        }
        metrics.pids = MessageField::some(pids);
    }
    Ok(metrics)
}

/// The pids in the cgroup at `dir` (`cgroup.procs`).
pub fn cgroup_pids(dir: &Path) -> Result<Vec<u32>, StatsError> {
    let path = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&path).map_err(|e| StatsError::ReadFile(path, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let kv = parse_flat_keyed("usage_usec 10\nuser_usec 7\nbad\nx y\nsystem_usec 3\n");
        assert_eq!(kv.get("usage_usec"), Some(&10));
        assert_eq!(kv.get("system_usec"), Some(&3));
        assert_eq!(kv.len(), 3);
        assert_eq!(parse_single("max\n"), Some(0));
        assert_eq!(parse_single("4096\n"), Some(4096));
        assert_eq!(parse_single("junk"), None);
        assert_eq!(
            unified_path("12:pids:/a\n0::/sandboxer/c1\n"),
            Some("/sandboxer/c1")
        );
        assert_eq!(unified_path("1:cpu:/\n"), None);
    }

    #[test]
    fn reads_full_and_partial_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 2\nnr_throttled 1\nthrottled_usec 9\n").unwrap();
        // Only cpu.stat: the other parts stay empty.
        let m = read_metrics(d).unwrap();
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.throttled_usec, 9);
        assert!(m.memory.is_none() && m.pids.is_none() && m.memory_events.is_none());

        std::fs::write(d.join("memory.current"), "8192\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 4096\nfile 2048\npgfault 77\n").unwrap();
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(d.join("pids.current"), "2\n").unwrap();
        std::fs::write(d.join("pids.max"), "100\n").unwrap();
        let m = read_metrics(d).unwrap();
        assert_eq!(m.memory.usage, 8192);
        assert_eq!(m.memory.usage_limit, 0);
        assert_eq!(m.memory.anon, 4096);
        assert_eq!(m.memory.file, 2048);
        assert_eq!(m.memory.pgfault, 77);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.memory_events.max, 3);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.pids.limit, 100);

        std::fs::write(d.join("cgroup.procs"), "12\n34\n").unwrap();
        assert_eq!(cgroup_pids(d).unwrap(), [12, 34]);
        cgroup_pids(&d.join("missing")).unwrap_err();
    }

    #[test]
    fn own_cgroup_is_found() {
        // Every process is in some cgroup v2 path when cgroup2 is in use at all; on
        // v1-only hosts there is no `0::` line.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        match cgroup_dir_of(std::process::id(), Path::new("/sys/fs/cgroup")) {
            Ok(dir) => assert!(dir.starts_with("/sys/fs/cgroup")),
            Err(StatsError::NoUnifiedCgroup(_)) => assert!(unified_path(&text).is_none()),
            Err(e) => panic!("{e}"),
        }
    }
}
