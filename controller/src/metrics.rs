// SPDX-License-Identifier: Apache-2.0
//! The daemon's Prometheus metrics, served over HTTP at `GET /metrics` when
//! `[metrics] listen` names an address (off by default):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sandboxer_sandboxes{state}` | gauge | sandboxes the daemon holds, by state |
//! | `sandboxer_start_phase_seconds{phase}` | histogram | each phase of every successful Start (`vm`, `agent_ready`, ..., `total`) |
//! | `sandboxer_starts_total{source}` | counter | successful Starts: `template` (a clone) or `boot` |
//! | `sandboxer_vm_exits_total{reason}` | counter | sandboxes that ended: `guest_shutdown` (asked), `guest_ended_unasked`, `stopped`, `forced`, `crashed`, `start_failed` |
//! | `sandboxer_guest_events_dropped_total{reason}` | counter | agent events not forwarded: `unknown_topic`, `unknown_container` (not a container of that sandbox), `rate_limited` |
//! | `sandboxer_guest_stdio_overruns_total` | counter | stdio streams ended because the agent sent more output than the window granted to it |
//! | `sandboxer_templates{state}` | gauge | the backend's VM templates now, and its build counts (`ready`, `built`, `failed`) |
//! | `process_resident_memory_bytes`, `process_open_fds`, `process_threads` | gauge | the daemon process (every VM lives in it) |
//!
//! The registry is process-wide: the process is what Prometheus scrapes, and it holds every
//! VM of every sandbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::backend::template::TemplateStats;
use crate::sandbox::{EXIT_FAILED, EXIT_FORCED, ExitInfo, SandboxState, SandboxSummary};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Every state a sandbox can be in, so a scrape shows the empty ones as 0.
const STATES: [SandboxState; 7] = [
    SandboxState::Created,
    SandboxState::Starting,
    SandboxState::Ready,
    SandboxState::Stopping,
    SandboxState::Stopped,
    SandboxState::Failed,
    SandboxState::Deleted,
];

/// The reason an exit reports when the guest shut itself down (see the lifecycle).
pub const GUEST_SHUTDOWN_REASON: &str = "the guest shut down";
/// The reason an exit reports when the guest powered off or reset without being asked to (a
/// guest kernel panic reboots it).
pub const GUEST_ENDED_UNASKED_REASON: &str =
    "the guest powered off or reset without being asked to (a guest kernel panic does)";
/// The start of the reason of a sandbox whose Start failed.
pub const START_FAILED_PREFIX: &str = "start failed: ";

fn phase_histogram() -> Histogram {
    // 50 us to ~1.6 s, doubling: a clone's phases are tens of microseconds, a nested boot
    // seconds.
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    start_phase: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    starts: Family<SourceLabel, Counter>,
    exits: Family<ReasonLabel, Counter>,
    event_drops: Family<ReasonLabel, Counter>,
    stdio_overruns: Counter,
    templates: Family<StateLabel, Gauge>,
    rss: Gauge,
    fds: Gauge,
    threads: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let sandboxes = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sandboxer_sandboxes",
            "Sandboxes the daemon holds, by state",
            sandboxes.clone(),
        );
        let start_phase = Family::<PhaseLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            phase_histogram as fn() -> Histogram,
        );
        registry.register(
            "sandboxer_start_phase_seconds",
            "Duration of each phase of successful sandbox Starts",
            start_phase.clone(),
        );
        let starts = Family::<SourceLabel, Counter>::default();
        registry.register(
            "sandboxer_starts",
            "Successful sandbox Starts, by how the VM came up (template clone or boot)",
            starts.clone(),
        );
        let exits = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sandboxer_vm_exits",
            "Sandboxes that ended, by why",
            exits.clone(),
        );
        let event_drops = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sandboxer_guest_events_dropped",
            "Agent events not forwarded, by why",
            event_drops.clone(),
        );
        let stdio_overruns = Counter::default();
        registry.register(
            "sandboxer_guest_stdio_overruns",
            "Stdio streams ended because the agent sent more output than it was granted",
            stdio_overruns.clone(),
        );
        let templates = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sandboxer_templates",
            "VM templates: ready now, built and failed since the daemon started",
            templates.clone(),
        );
        let (rss, fds, threads) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the daemon (every VM's host-side memory included)",
            rss.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors of the daemon",
            fds.clone(),
        );
        registry.register(
            "process_threads",
            "Threads of the daemon (each VM's vCPU and VMM threads included)",
            threads.clone(),
        );
        Metrics {
            registry,
            sandboxes,
            start_phase,
            starts,
            exits,
            event_drops,
            stdio_overruns,
            templates,
            rss,
            fds,
            threads,
        }
    }

    /// Records a successful Start: its phases (microseconds, as the record keeps them) and
    /// whether it cloned a template.
    pub fn observe_start(&self, start_us: &BTreeMap<String, u64>, from_template: bool) {
        for (phase, us) in start_us {
            self.start_phase
                .get_or_create(&PhaseLabel {
                    phase: phase.clone(),
                })
                .observe(Duration::from_micros(*us).as_secs_f64());
        }
        let source = if from_template { "template" } else { "boot" };
        self.starts
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
    }

    /// Records an agent event that was not forwarded, and why.
    pub fn observe_event_drop(&self, reason: &'static str) {
        self.event_drops
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Records a stdio stream ended because the agent overran its window.
    pub fn observe_stdio_overrun(&self) {
        self.stdio_overruns.inc();
    }

    /// Records a sandbox's end.
    pub fn observe_exit(&self, exit: &ExitInfo) {
        self.exits
            .get_or_create(&ReasonLabel {
                reason: exit_reason(exit).into(),
            })
            .inc();
    }

    /// The exposition text: the event metrics so far, and the gauges as of now (`sandboxes`
    /// and `templates` from the caller, the process's own from /proc).
    pub fn render(&self, sandboxes: &[SandboxSummary], templates: Option<TemplateStats>) -> String {
        for state in STATES {
            let n = sandboxes.iter().filter(|s| s.state == state).count();
            self.sandboxes
                .get_or_create(&StateLabel {
                    state: state.name().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(t) = templates {
            for (state, n) in [("ready", t.ready), ("built", t.built), ("failed", t.failed)] {
                self.templates
                    .get_or_create(&StateLabel {
                        state: state.into(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        };
        if let Some(kib) = field("VmRSS:") {
            self.rss.set(kib.saturating_mul(1024));
        }
        if let Some(n) = field("Threads:") {
            self.threads.set(n);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(i64::try_from(dir.count()).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

/// The `reason` label of an exit: a small fixed set, never the free text.
fn exit_reason(exit: &ExitInfo) -> &'static str {
    match exit.status {
        0 if exit.reason == GUEST_SHUTDOWN_REASON => "guest_shutdown",
        0 => "stopped",
        EXIT_FORCED => "forced",
        EXIT_FAILED if exit.reason.starts_with(START_FAILED_PREFIX) => "start_failed",
        EXIT_FAILED if exit.reason == GUEST_ENDED_UNASKED_REASON => "guest_ended_unasked",
        EXIT_FAILED => "crashed",
        _ => "other",
    }
}

/// Where the scrape's data comes from.
pub trait Source: Send + Sync + 'static {
    /// The sandboxes now.
    fn sandboxes(&self) -> Vec<SandboxSummary>;
    /// The backend's template counters, if it keeps templates.
    fn templates(&self) -> Option<TemplateStats>;
}

/// Largest request head read from a scraper.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listen` until the task is dropped. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    source: std::sync::Arc<dyn Source>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "serving metrics at /metrics");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = std::sync::Arc::clone(&source);
            tokio::spawn(async move {
                if let Err(e) = answer(stream, source.as_ref()).await {
                    tracing::debug!(error = %e, "metrics: a scrape failed");
                }
            });
        }
    });
    Ok((addr, task))
}

/// Answers one HTTP/1.x request: `GET /metrics` gets the text, anything else 404 or 405.
async fn answer(mut stream: TcpStream, source: &dyn Source) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return Err(std::io::Error::other("bad request head"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            global().render(&source.sandboxes(), source.templates()),
        ),
        (b"GET", _) => ("404 Not Found", "try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_get_a_fixed_reason() {
        let exit = |status, reason: &str| ExitInfo {
            status,
            at: std::time::SystemTime::UNIX_EPOCH,
            reason: reason.into(),
        };
        assert_eq!(
            exit_reason(&exit(0, GUEST_SHUTDOWN_REASON)),
            "guest_shutdown"
        );
        assert_eq!(exit_reason(&exit(0, "stopped")), "stopped");
        assert_eq!(
            exit_reason(&exit(EXIT_FAILED, GUEST_ENDED_UNASKED_REASON)),
            "guest_ended_unasked"
        );
        assert_eq!(exit_reason(&exit(EXIT_FORCED, "x")), "forced");
        assert_eq!(
            exit_reason(&exit(
                EXIT_FAILED,
                &format!("{START_FAILED_PREFIX}no kernel")
            )),
            "start_failed"
        );
        assert_eq!(exit_reason(&exit(EXIT_FAILED, "triple fault")), "crashed");
    }
}
