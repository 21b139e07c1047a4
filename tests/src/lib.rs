// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the integration tests and the `sandboxer-bench` benchmarks.
#![forbid(unsafe_code)]

use std::time::Duration;

/// Process resource counts used by leak checks and memory benchmarks.
pub mod procstat {
    use std::fs;

    /// Open file descriptors of this process.
    pub fn fd_count() -> usize {
        fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
    }

    /// Threads of this process.
    pub fn thread_count() -> usize {
        status_field("Threads:")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Resident set size in KiB.
    pub fn rss_kib() -> u64 {
        status_field("VmRSS:").unwrap_or(0)
    }

    /// Memory mappings of this process.
    pub fn mapping_count() -> usize {
        fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
    }

    fn status_field(name: &str) -> Option<u64> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
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
    fn proc_counts_are_live() {
        assert!(procstat::fd_count() >= 3);
        assert!(procstat::thread_count() >= 1);
        assert!(procstat::rss_kib() > 0);
        assert!(procstat::mapping_count() > 0);
    }
}
