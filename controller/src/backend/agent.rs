// SPDX-License-Identifier: Apache-2.0
//! The host side of the guest agent's start-up protocol, over a VM's vsock device.
//!
//! The agent dials host port [`READY_PORT`] and writes `READY <port>\n` (listened for before the
//! vCPUs can reach their driver: in-process, plus the hybrid `<uds>_1025` listener for a guest
//! faster than that); the host then connects to `<port>`, builds one shared ttrpc client and
//! calls `Control.Setup`, which carries the host's clock too. No ready line within
//! `agent_ready_timeout`:
//! [`BackendError::AgentNotReady`] (gRPC `DEADLINE_EXCEEDED`). Every agent call carries a ttrpc
//! timeout, so a dead VM never hangs an RPC.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::{BackendError, StartPhases, VmEnd, VmSpec, wait_end};
use crate::pod::GuestSetup;
use crate::sandbox::StoredAny;

/// Host vsock port the guest agent sends its ready line to (`sandboxer.ready_port`).
pub const READY_PORT: u32 = 1025;
/// Longest ready line accepted (`READY ` and a u32 and `\n` are at most 17 bytes).
const MAX_READY_LINE: usize = 128;
/// Bound on each call to the agent, so a dead VM never hangs an RPC.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the statistics call of a Metrics RPC.
const AGENT_STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// The agent's own ttrpc service (for logs).
const CONTROL: &str = "sandboxer.agent.v1.Control";

/// Parses the agent's ready line: `Some(port)` for exactly `READY <decimal u32>\n`.
pub fn parse_ready_line(line: &str) -> Option<u32> {
    let rest = line.strip_suffix('\n')?.strip_prefix("READY ")?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// The hybrid-vsock path a guest connection to host port `port` falls back to.
fn hybrid_listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// The hybrid-vsock listener for the ready port, bound before the VM boots, so a guest that
/// dials before the in-process listener exists is still heard (the VMM's muxer falls back to
/// `<uds>_<port>`). Removed once the agent is ready or Start failed.
pub(super) struct ReadyFallback {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ReadyFallback {
    pub(super) fn bind(uds: &Path) -> Option<Self> {
        let path = hybrid_listener_path(uds, READY_PORT);
        // A stale socket from an earlier Start of this sandbox.
        let _ = std::fs::remove_file(&path);
        match tokio::net::UnixListener::bind(&path) {
            Ok(listener) => Some(ReadyFallback { listener, path }),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "no hybrid ready listener");
                None
            }
        }
    }
}

impl Drop for ReadyFallback {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts one guest connection on an in-process vsock listener, blocking the calling thread
/// (its readiness is an eventfd, which the async side cannot register without `unsafe`) until
/// a connection arrives or `cancel` is written.
fn accept_vsock_blocking(
    listener: &devices::virtio::vsock::VsockListener,
    cancel: &EventFd,
) -> io::Result<std::os::unix::net::UnixStream> {
    const LISTENER: u64 = 0;
    const CANCEL: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        cancel.as_raw_fd(),
        EpollEvent::new(EventSet::IN, CANCEL),
    )?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        match listener.try_accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if events
            .get(..n)
            .unwrap_or_default()
            .iter()
            .any(|e| e.data() == CANCEL)
        {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "wait cancelled"));
        }
    }
}

/// Ends a blocking accept when dropped.
struct CancelOnDrop(EventFd);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

/// Waits for a guest connection on an in-process vsock listener; dropping the future ends the
/// helper thread's wait.
async fn accept_vsock(
    listener: devices::virtio::vsock::VsockListener,
) -> io::Result<std::os::unix::net::UnixStream> {
    let cancel = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
    let guard = CancelOnDrop(cancel.try_clone()?);
    let accepted = tokio::task::spawn_blocking(move || accept_vsock_blocking(&listener, &cancel))
        .await
        .map_err(io::Error::other)?;
    drop(guard);
    accepted
}

/// Waits for a guest connection on the hybrid fallback listener (forever without one).
async fn accept_fallback(fallback: Option<&ReadyFallback>) -> io::Result<tokio::net::UnixStream> {
    match fallback {
        Some(f) => f.listener.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Reads the ready line (up to `\n`, at most [`MAX_READY_LINE`] bytes) and returns the port.
async fn read_ready_line(stream: tokio::net::UnixStream) -> Result<u32, BackendError> {
    let mut line = Vec::with_capacity(32);
    let mut buf = [0u8; MAX_READY_LINE];
    while !line.ends_with(b"\n") && line.len() < MAX_READY_LINE {
        stream.readable().await.map_err(BackendError::Ready)?;
        let room = MAX_READY_LINE.saturating_sub(line.len());
        let chunk = buf.get_mut(..room).unwrap_or_default();
        match stream.try_read(chunk) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(BackendError::Ready(e)),
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    parse_ready_line(&text).ok_or(BackendError::BadReadyLine(text))
}

fn control(client: &ttrpc::asynchronous::Client) -> proto::agent::control_ttrpc::ControlClient {
    proto::agent::control_ttrpc::ControlClient::new(client.clone())
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// Bytes of fresh host entropy every Setup carries (the agent reseeds the guest's CRNG with
/// them: a VM cloned from a template must not share its RNG state).
const SETUP_ENTROPY: usize = 64;

/// The agent's `SetupRequest` for `setup`, with fresh entropy.
fn setup_request(setup: &GuestSetup) -> Result<proto::agent::control::SetupRequest, BackendError> {
    use proto::agent::control as c;
    let dns = &setup.dns;
    let has_dns = !(dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty());
    let mut entropy = vec![0u8; SETUP_ENTROPY];
    getrandom::fill(&mut entropy).map_err(|e| BackendError::HostEntropy(e.to_string()))?;
    Ok(c::SetupRequest {
        entropy,
        hostname: setup.hostname.clone(),
        dns: if has_dns {
            proto::protobuf::MessageField::some(c::Dns {
                servers: dns.servers.clone(),
                searches: dns.searches.clone(),
                options: dns.options.clone(),
                ..Default::default()
            })
        } else {
            proto::protobuf::MessageField::none()
        },
        interfaces: setup
            .interfaces
            .iter()
            .map(|i| c::Interface {
                mac: i.mac.clone(),
                new_mac: i.new_mac.clone(),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| c::IpAddress {
                        address: a.address.clone(),
                        prefix_len: a.prefix_len,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: setup
            .routes
            .iter()
            .map(|r| c::Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                source: r.source.clone(),
                metric: r.metric,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// Nanoseconds since the Unix epoch, now.
fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Waits for the agent's ready line, connects to its port and sends Setup (which sets the
/// guest's clock too); fills in the phases it ran in `phases`.
pub(super) async fn connect_agent(
    vm: &Arc<vmm::Vm>,
    spec: &VmSpec,
    listener: io::Result<devices::virtio::vsock::VsockListener>,
    fallback: Option<&ReadyFallback>,
    end: watch::Receiver<Option<VmEnd>>,
    phases: &mut StartPhases,
) -> Result<(ttrpc::asynchronous::Client, u32), BackendError> {
    let t = Instant::now();
    let port = wait_ready(spec, listener, fallback, end).await?;
    phases.agent_ready = t.elapsed();
    let client = connect_and_setup(vm, port, &spec.setup, phases).await?;
    Ok((client, port))
}

/// Waits (up to `agent_ready_timeout`) for the agent's ready line and returns its port.
pub(super) async fn wait_ready(
    spec: &VmSpec,
    listener: io::Result<devices::virtio::vsock::VsockListener>,
    fallback: Option<&ReadyFallback>,
    end: watch::Receiver<Option<VmEnd>>,
) -> Result<u32, BackendError> {
    let console = spec
        .console_log
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display().to_string());
    let listener = listener.map_err(BackendError::Ready)?;
    // A configured timeout too large for the clock means no practical bound.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(spec.agent_ready_timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let ready = async {
        let stream = tokio::select! {
            // The end first: a VM's end is recorded before its vsock device goes, so an
            // accept that failed for that reason must not hide the end (the guest's reason).
            biased;
            e = wait_end(end) => {
                return Err(BackendError::EndedBeforeReady {
                    reason: format!("{:?}", e.kind),
                    console: console.clone(),
                });
            }
            s = accept_vsock(listener) => {
                let s = s.map_err(BackendError::Ready)?;
                s.set_nonblocking(true).map_err(BackendError::Ready)?;
                tokio::net::UnixStream::from_std(s).map_err(BackendError::Ready)?
            }
            s = accept_fallback(fallback) => s.map_err(BackendError::Ready)?,
        };
        read_ready_line(stream).await
    };
    match tokio::time::timeout_at(deadline, ready).await {
        Ok(port) => port,
        Err(_) => Err(BackendError::AgentNotReady {
            timeout_ms: spec.agent_ready_timeout.as_millis(),
            console,
        }),
    }
}

/// Connects to the agent's ttrpc `port` over the VM's vsock and sends `setup` with the host's
/// clock (one round trip sets the guest's clock and configures the pod); fills in the phases
/// it ran.
pub(super) async fn connect_and_setup(
    vm: &Arc<vmm::Vm>,
    port: u32,
    setup: &GuestSetup,
    phases: &mut StartPhases,
) -> Result<ttrpc::asynchronous::Client, BackendError> {
    let t = Instant::now();
    let client = connect(vm, port).await?;
    phases.agent_connect = t.elapsed();
    let mut req = setup_request(setup)?;
    let t = Instant::now();
    req.unix_nanos = unix_nanos();
    control(&client)
        .setup(ctx(AGENT_CALL_TIMEOUT), &req)
        .await
        .map_err(|e| BackendError::Agent("Control.Setup", e))?;
    phases.setup = t.elapsed();
    Ok(client)
}

/// Connects one ttrpc client to the agent's `port` over the VM's vsock device.
pub(super) async fn connect(
    vm: &Arc<vmm::Vm>,
    port: u32,
) -> Result<ttrpc::asynchronous::Client, BackendError> {
    let handle = vm
        .vsock()
        .cloned()
        .ok_or_else(|| BackendError::AgentConnect(port, io::Error::other("no vsock device")))?;
    let stream = tokio::task::spawn_blocking(move || handle.connect(port))
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    let stream = tokio::net::UnixStream::from_std(stream)
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    Ok(ttrpc::asynchronous::Client::new(stream.into()))
}

/// Sets the guest's clock to the host's (`Control.SyncClock`): after a live upgrade's pause,
/// where no Setup follows.
pub(super) async fn sync_clock(client: &ttrpc::asynchronous::Client) -> Result<(), BackendError> {
    let clock = proto::agent::control::SyncClockRequest {
        unix_nanos: unix_nanos(),
        ..Default::default()
    };
    control(client)
        .sync_clock(ctx(AGENT_CALL_TIMEOUT), &clock)
        .await
        .map_err(|e| BackendError::Agent("Control.SyncClock", e))?;
    Ok(())
}

/// Asks the agent to end the pod (its containers get `grace` between SIGTERM and SIGKILL).
pub(super) async fn request_shutdown(
    client: &ttrpc::asynchronous::Client,
    grace: Duration,
) -> Result<(), BackendError> {
    let req = proto::agent::control::ShutdownRequest {
        timeout_secs: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    control(client)
        .shutdown(
            ctx(AGENT_CALL_TIMEOUT.min(grace.max(Duration::from_secs(1)))),
            &req,
        )
        .await
        .map_err(|e| BackendError::Agent("Control.Shutdown", e))?;
    Ok(())
}

/// The pod's cgroup statistics (`Control.Stats`), if the agent has them; a failed call is
/// logged and gives none.
pub(super) async fn pod_stats(
    client: &ttrpc::asynchronous::Client,
    sandbox_id: &str,
) -> Option<StoredAny> {
    let stats = control(client)
        .stats(
            ctx(AGENT_STATS_TIMEOUT),
            &proto::agent::control::StatsRequest::new(),
        )
        .await;
    match stats {
        Ok(s) => s.metrics.into_option().map(|a| StoredAny {
            type_url: a.type_url,
            value: a.value,
        }),
        Err(e) => {
            warn!(sandbox_id = %sandbox_id, error = %e, "{CONTROL}.Stats failed");
            None
        }
    }
}

/// Applies new resources to a container (`Task.Update`).
pub(super) async fn update_resources(
    client: &ttrpc::asynchronous::Client,
    container_id: &str,
    resources: &StoredAny,
) -> Result<(), BackendError> {
    let req = containerd_shim_protos::api::UpdateTaskRequest {
        id: container_id.to_string(),
        resources: proto::protobuf::MessageField::some(
            proto::protobuf::well_known_types::any::Any {
                type_url: resources.type_url.clone(),
                value: resources.value.clone(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    containerd_shim_protos::shim_async::TaskClient::new(client.clone())
        .update(ctx(AGENT_CALL_TIMEOUT), &req)
        .await
        .map_err(|e| BackendError::Agent("Task.Update", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{GuestInterface, GuestIp, GuestRoute};
    use crate::sandbox::DnsConfig;

    #[test]
    fn ready_lines() {
        assert_eq!(parse_ready_line("READY 1024\n"), Some(1024));
        assert_eq!(parse_ready_line("READY 4294967295\n"), Some(u32::MAX));
        for bad in [
            "READY 1024",
            "READY \n",
            "READY +1\n",
            "READY -1\n",
            "READY 4294967296\n",
            "ready 1\n",
            "READY 1 \n",
            "READY unix:/a\n",
            "",
        ] {
            assert_eq!(parse_ready_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn setup_request_carries_the_pod_settings() {
        let setup = GuestSetup {
            hostname: "web-0".into(),
            dns: DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.local".into()],
                options: vec!["ndots:5".into()],
            },
            interfaces: vec![GuestInterface {
                mac: "02:00:00:00:00:01".into(),
                new_mac: "02:00:00:00:00:09".into(),
                name: "eth0".into(),
                mtu: 1500,
                addresses: vec![GuestIp {
                    address: "10.0.0.2".into(),
                    prefix_len: 24,
                }],
            }],
            routes: vec![GuestRoute {
                gateway: "10.0.0.1".into(),
                device: "eth0".into(),
                ..GuestRoute::default()
            }],
        };
        let req = setup_request(&setup).unwrap();
        assert_eq!(req.entropy.len(), SETUP_ENTROPY);
        assert_ne!(req.entropy, setup_request(&setup).unwrap().entropy);
        assert_eq!(req.hostname, "web-0");
        let dns = req.dns.as_ref().unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.searches, ["svc.local"]);
        assert_eq!(dns.options, ["ndots:5"]);
        let nic = &req.interfaces[0];
        assert_eq!(
            (nic.mac.as_str(), nic.name.as_str(), nic.mtu),
            ("02:00:00:00:00:01", "eth0", 1500)
        );
        assert_eq!(nic.new_mac, "02:00:00:00:00:09");
        assert_eq!(nic.addresses[0].address, "10.0.0.2");
        assert_eq!(nic.addresses[0].prefix_len, 24);
        assert_eq!(req.routes[0].gateway, "10.0.0.1");
        assert_eq!(req.routes[0].destination, "");
        // No DNS settings: the message has none, so the agent leaves resolv.conf alone.
        assert!(setup_request(&GuestSetup::default()).unwrap().dns.is_none());
    }

    #[tokio::test]
    async fn the_hybrid_fallback_takes_a_ready_line_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vsock.sock");
        let fallback = ReadyFallback::bind(&uds).unwrap();
        let path = tmp.path().join("vsock.sock_1025");
        assert!(path.exists());
        // What the VMM's muxer does for a guest connection nobody listens to in-process.
        let mut guest = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut guest, b"READY 4321\n").unwrap();
        let stream = accept_fallback(Some(&fallback)).await.unwrap();
        assert_eq!(read_ready_line(stream).await.unwrap(), 4321);
        drop(fallback);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_bad_or_cut_ready_line_is_an_error() {
        for (sent, want) in [(&b"READY x\n"[..], "READY x\n"), (b"READY 12", "READY 12")] {
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            std::io::Write::write_all(&mut b, sent).unwrap();
            drop(b);
            a.set_nonblocking(true).unwrap();
            let a = tokio::net::UnixStream::from_std(a).unwrap();
            match read_ready_line(a).await {
                Err(BackendError::BadReadyLine(line)) => assert_eq!(line, want),
                other => panic!("{other:?}"),
            }
        }
        // A peer that never stops talking is cut off at the line limit.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, &[b'x'; 4 * MAX_READY_LINE]).unwrap();
        a.set_nonblocking(true).unwrap();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        match read_ready_line(a).await {
            Err(BackendError::BadReadyLine(line)) => assert_eq!(line.len(), MAX_READY_LINE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hybrid_listener_path_appends_the_port() {
        assert_eq!(
            hybrid_listener_path(Path::new("/run/s/pod/vsock.sock"), 1025),
            Path::new("/run/s/pod/vsock.sock_1025")
        );
    }
}
