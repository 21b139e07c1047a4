// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the integration tests and the `sandboxer-bench` benchmarks.
#![forbid(unsafe_code)]

use std::time::Duration;

/// The names in a directory (none when it does not exist).
pub fn dir_entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Process resource counts used by leak checks and memory benchmarks.
pub mod procstat {
    use std::collections::BTreeMap;
    use std::fs;

    /// Open file descriptors of this process.
    pub fn fd_count() -> usize {
        fd_count_of("self")
    }

    /// Open file descriptors of process `pid` (a number, or `self`).
    pub fn fd_count_of(pid: &str) -> usize {
        fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
    }

    /// Open file descriptors of this process by kind: what each links to, with what differs
    /// between instances of a kind taken out (`socket:[123]` -> `socket`, `anon_inode:kvm-vcpu:0`
    /// -> `anon_inode:kvm-vcpu`, a file -> `file:<its name>`).
    pub fn fd_kinds() -> BTreeMap<String, usize> {
        fd_kinds_of("self")
    }

    /// [`fd_kinds`] of process `pid` (a number, or `self`).
    pub fn fd_kinds_of(pid: &str) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return kinds;
        };
        for entry in dir.flatten() {
            // The directory's own fd is gone by the time it is read: skip what cannot be read.
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            // The directory being listed is open too: not one of the process's own.
            if target.starts_with("/proc") && target.ends_with("fd") {
                continue;
            }
            *kinds.entry(fd_kind(&target.to_string_lossy())).or_insert(0) += 1;
        }
        kinds
    }

    /// The kind of an fd whose link reads `target` (see [`fd_kinds`]).
    pub fn fd_kind(target: &str) -> String {
        let target = target.trim_end_matches(" (deleted)");
        if let Some(memfd) = target.strip_prefix("/memfd:") {
            return format!("memfd:{memfd}");
        }
        if target.starts_with('/') {
            let name = target.rsplit('/').next().unwrap_or(target);
            return format!("file:{name}");
        }
        if let Some(inode) = target.strip_prefix("anon_inode:") {
            // `kvm-vcpu:0`: one kind whatever the vCPU id.
            let kind = inode.split(':').next().unwrap_or(inode);
            return format!("anon_inode:{kind}");
        }
        // `socket:[123]`, `pipe:[456]`.
        target.split(':').next().unwrap_or(target).to_owned()
    }

    /// Threads of this process by name, with digits folded to `N` (`vcpu0` -> `vcpuN`).
    pub fn thread_kinds() -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for t in threads_cpu() {
            let mut name = String::new();
            for c in t.name.chars() {
                if c.is_ascii_digit() {
                    if !name.ends_with('N') {
                        name.push('N');
                    }
                } else {
                    name.push(c);
                }
            }
            *kinds.entry(name).or_insert(0) += 1;
        }
        kinds
    }

    /// Threads of this process.
    pub fn thread_count() -> usize {
        thread_count_of("self")
    }

    /// Threads of process `pid` (a number, or `self`).
    pub fn thread_count_of(pid: &str) -> usize {
        status_field_of(pid, "Threads:")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Resident set size in KiB.
    pub fn rss_kib() -> u64 {
        rss_kib_of("self")
    }

    /// Resident set size of process `pid` (a number, or `self`) in KiB.
    pub fn rss_kib_of(pid: &str) -> u64 {
        status_field_of(pid, "VmRSS:").unwrap_or(0)
    }

    /// Memory mappings of this process.
    pub fn mapping_count() -> usize {
        fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
    }

    /// Resident anonymous memory in KiB (`RssAnon`: heap, stacks; not the guests' memfd pages).
    pub fn rss_anon_kib() -> u64 {
        status_field("RssAnon:").unwrap_or(0)
    }

    /// Resident shared memory in KiB (`RssShmem`: the guests' memfd pages this process mapped).
    pub fn rss_shmem_kib() -> u64 {
        status_field("RssShmem:").unwrap_or(0)
    }

    /// The system's `MemAvailable` in KiB (every process's use moves it, not only this one's).
    pub fn mem_available_kib() -> Option<u64> {
        let info = fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn status_field(name: &str) -> Option<u64> {
        status_field_of("self", name)
    }

    fn status_field_of(pid: &str, name: &str) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// One thread of this process and the CPU time it has used.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct ThreadCpu {
        /// Thread id.
        pub tid: u32,
        /// Thread name (`comm`, at most 15 bytes).
        pub name: String,
        /// Time on a CPU in ns (`/proc/<tid>/schedstat`, the scheduler's own clock: exact, unlike
        /// the 10 ms ticks of `stat`).
        pub cpu_ns: u64,
    }

    /// Every live thread of this process with its CPU time so far. Threads that ended are not
    /// listed; the kernel's per-VM worker threads that KVM attaches to the process are.
    pub fn threads_cpu() -> Vec<ThreadCpu> {
        let Ok(dir) = fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let cpu_ns = fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            let name = fs::read_to_string(path.join("comm"))
                .map(|n| n.trim_end().to_owned())
                .unwrap_or_default();
            if let Some(cpu_ns) = cpu_ns {
                out.push(ThreadCpu { tid, name, cpu_ns });
            }
        }
        out
    }

    /// CPU time of this process so far in ns: user + system of every thread, ended ones
    /// included (`getrusage(RUSAGE_SELF)`, microseconds).
    pub fn process_cpu_ns() -> u64 {
        use nix::sys::resource::{UsageWho, getrusage};
        getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| {
            let us = |t: nix::sys::time::TimeVal| {
                u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
                    + u64::try_from(t.tv_usec()).unwrap_or(0)
            };
            (us(u.user_time()) + us(u.system_time())) * 1000
        })
    }
}

/// Percentile summary of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Minimum, ms.
    pub min_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (nearest-rank percentiles). Empty input gives zeros.
    pub fn of(samples: &[Duration]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p% of the sample at or below it.
        let rank = |percent: usize| {
            let idx = (percent * v.len()).div_ceil(100);
            v[idx.clamp(1, v.len()) - 1]
        };
        Summary {
            p50_ms: rank(50),
            p99_ms: rank(99),
            min_ms: v[0],
            max_ms: v[v.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(Summary::of(&[]), Summary::default());
        let one = Summary::of(&[Duration::from_millis(3)]);
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
    }

    #[test]
    fn fd_kinds_fold_what_differs_between_instances() {
        assert_eq!(procstat::fd_kind("socket:[4242]"), "socket");
        assert_eq!(procstat::fd_kind("pipe:[7]"), "pipe");
        assert_eq!(
            procstat::fd_kind("anon_inode:[eventfd]"),
            "anon_inode:[eventfd]"
        );
        assert_eq!(
            procstat::fd_kind("anon_inode:kvm-vcpu:3"),
            "anon_inode:kvm-vcpu"
        );
        assert_eq!(
            procstat::fd_kind("/memfd:sandboxer-guest-ram (deleted)"),
            "memfd:sandboxer-guest-ram"
        );
        assert_eq!(
            procstat::fd_kind("/run/x/y/console.log"),
            "file:console.log"
        );
        // Other tests open and close fds meanwhile: only what this test holds is certain.
        let file = std::fs::File::open("Cargo.toml").unwrap();
        let kinds = procstat::fd_kinds();
        assert!(
            kinds.get("file:Cargo.toml").is_some_and(|n| *n >= 1),
            "{kinds:?}"
        );
        assert!(
            !kinds.contains_key("file:fd"),
            "the listing's own fd: {kinds:?}"
        );
        drop(file);
        let threads = procstat::thread_kinds();
        assert!(threads.values().sum::<usize>() >= 1, "{threads:?}");
    }

    #[test]
    fn proc_counts_are_live() {
        assert!(procstat::fd_count() >= 3);
        assert!(procstat::thread_count() >= 1);
        assert!(procstat::rss_kib() > 0);
        assert!(procstat::rss_anon_kib() > 0);
        assert!(procstat::mapping_count() > 0);
        assert!(procstat::mem_available_kib().is_some_and(|k| k > 0));
    }

    #[test]
    fn thread_cpu_clocks_move() {
        let worker = std::thread::Builder::new()
            .name("cpu-probe".into())
            .spawn(|| {
                let t0 = std::time::Instant::now();
                let mut x = 0u64;
                while t0.elapsed() < Duration::from_millis(30) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                procstat::threads_cpu()
            })
            .unwrap();
        let seen = worker.join().unwrap();
        let me = seen.iter().find(|t| t.name == "cpu-probe").unwrap();
        // It spun for 30 ms of wall time; on a busy machine it got at least some of it.
        assert!(me.cpu_ns > 1_000_000, "{me:?}");
        // The process total includes the thread, which has ended by now.
        assert!(
            procstat::process_cpu_ns() + 1_000_000 >= me.cpu_ns,
            "{me:?}"
        );
    }
}
