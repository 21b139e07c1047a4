// SPDX-License-Identifier: Apache-2.0
//! Live upgrade (docs/restarts.md, "Upgrade") against the real `sandboxer` binary with KVM test
//! guests: `sandboxer upgrade` hands every running sandbox to a new process and no VM
//! restarts. Each guest (the agent-mode test guest with `agent.counter_port`) streams a counter
//! that lives in its memory to a unix socket the test listens on (the hybrid vsock path
//! `<sandbox dir>/vsock.sock_<port>`); across upgrades the numbers only go up. An upgrade that
//! fails half way, or meets a binary of another handover version, leaves every sandbox running
//! in the old process. The tests' sandbox ids differ: their CPU cgroups are named after them.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::V2Client;
use common::guest_daemon::{self, BIN};
use common::netns::{Netns, can_make_netns};
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
    ControllerStatusRequest, ControllerStopRequest, ControllerWaitRequest,
};
use containerd_shim_protos::api::StateRequest;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use test_guests::{agent, require_kvm};

const COUNTER_PORT: u32 = 5005;
/// One test at a time: a daemon that starts removes the empty sandbox cgroups it finds under
/// the shared parent, which may be another test's daemon's between a Create and its Start.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon process by pid: the first one is the test's child, the ones after an upgrade are
/// not. Killed on drop, so a failing test leaves none behind.
struct Pid(u32, Option<Child>);

impl Pid {
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.0)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.0))
                .is_ok_and(|s| s.contains(") Z "))
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0))
            .unwrap()
            .count()
    }

    /// The descriptor count once it has stopped moving (the daemon builds its VM template
    /// in the background after a start).
    fn settled_fds(&self) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = self.fds();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.fds();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Waits until the process is gone (reaped, if it is the test's child).
    fn wait_gone(&mut self) {
        if let Some(child) = &mut self.1 {
            let status = child.wait().unwrap();
            assert!(status.success(), "the old daemon exited with {status}");
            return;
        }
        let deadline = Instant::now() + TIMEOUT;
        while self.alive() {
            assert!(Instant::now() < deadline, "process {} did not exit", self.0);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .output();
        if let Some(child) = &mut self.1 {
            let _ = child.wait();
        }
    }
}

struct Setup {
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        Setup { dir, socket }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the daemon (the test guest as its kernel, counting on COUNTER_PORT) and waits
    /// for its socket.
    fn daemon(&self) -> Pid {
        let counter = agent::counter_port(COUNTER_PORT);
        let args = [counter.as_str(), agent::QUIET, agent::EXIT_ON_SHUTDOWN];
        let child = guest_daemon::spawn(self.dir.path(), &self.socket, &args, "warn");
        Pid(child.id(), Some(child))
    }

    async fn client(&self) -> V2Client {
        V2Client::new(containerd_client::connect(&self.socket).await.unwrap())
    }

    /// `sandboxer upgrade` with `binary`: its JSON answer, or its error output.
    fn upgrade(&self, binary: &Path) -> Result<serde_json::Value, String> {
        let out = Command::new(BIN)
            .arg("upgrade")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--binary")
            .arg(binary)
            .arg("--json")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A script that runs the daemon binary with `env` set: a "new binary" that behaves
    /// differently.
    fn wrapper(&self, name: &str, env: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexport {env}\nexec {BIN} \"$@\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

/// What one guest's counter streams have shown: every number, in the order read, and how many
/// connections they came on.
#[derive(Default)]
struct Counts {
    values: Vec<u64>,
    connections: usize,
}

/// Listens on a sandbox's counter port (its hybrid vsock path) and records every line of
/// every connection the guest makes, on a thread of its own.
fn watch_counter(sandbox_dir: &Path) -> Arc<Mutex<Counts>> {
    let path = sandbox_dir.join(format!("vsock.sock_{COUNTER_PORT}"));
    let listener = UnixListener::bind(&path).unwrap();
    let counts = Arc::new(Mutex::new(Counts::default()));
    let out = Arc::clone(&counts);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            out.lock().unwrap().connections += 1;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let Ok(n) = line.parse::<u64>() else { break };
                out.lock().unwrap().values.push(n);
            }
        }
    });
    counts
}

/// The last number seen, once at least `more` numbers beyond `seen` have come.
fn wait_counts(counts: &Mutex<Counts>, seen: usize, more: usize) -> (usize, u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        {
            let c = counts.lock().unwrap();
            if c.values.len() >= seen + more {
                return (c.values.len(), *c.values.last().unwrap());
            }
        }
        assert!(Instant::now() < deadline, "the counter stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every number larger than the one before: the guest never restarted.
fn assert_monotonic(id: &str, counts: &Mutex<Counts>) {
    let c = counts.lock().unwrap();
    assert!(
        c.values.windows(2).all(|w| w[0] < w[1]),
        "{id}: the counter went back: {:?}",
        c.values
    );
}

/// Creates and starts sandbox `id`; every fourth one (by the number its id ends with) boots
/// its VM instead of cloning the template (the pod annotation that opts out), so both kinds
/// are handed over.
async fn start(c: &mut V2Client, id: &str) {
    let n: usize = id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let annotations = if n.is_multiple_of(4) {
        [(
            controller::pod::TEMPLATE_ANNOTATION.to_string(),
            "false".to_string(),
        )]
        .into()
    } else {
        Default::default()
    };
    c.create(ControllerCreateRequest {
        sandbox_id: id.into(),
        annotations,
        ..Default::default()
    })
    .await
    .unwrap();
    c.start(ControllerStartRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn state(c: &mut V2Client, id: &str) -> String {
    c.status(ControllerStatusRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .state
}

/// The `pct`th percentile (0..=100) of `sorted`, nearest rank.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    let i = (sorted.len() * pct).div_ceil(100).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sandboxes_keep_running_across_two_upgrades() {
    require_kvm!();
    let _serial = SERIAL.lock().await;
    const N: usize = 20;
    let s = Setup::new();
    let mut daemon = s.daemon();
    let mut c = s.client().await;
    let ids: Vec<String> = (0..N).map(|i| format!("up-{i}")).collect();
    let mut counters = Vec::new();
    for id in &ids {
        start(&mut c, id).await;
        counters.push(watch_counter(
            &s.state().join(controller::store::SANDBOXES_DIR).join(id),
        ));
    }
    // One more with a pod network: its TAP queue must survive the old process.
    let net = can_make_netns().then(Netns::new);
    if let Some(net) = &net {
        c.create(ControllerCreateRequest {
            sandbox_id: "up-net".into(),
            netns_path: net.path(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.start(ControllerStartRequest {
            sandbox_id: "up-net".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(net.links().contains("tap"), "{}", net.links());
    }
    let mut seen: Vec<(usize, u64)> = counters.iter().map(|k| wait_counts(k, 0, 5)).collect();
    // Both kinds of VM are handed over: booted ones and clones of the VM template.
    let clones = template_clones(&s).await;
    assert!(
        clones > 0 && clones < N,
        "{clones} of {N} from the template"
    );
    drop(c);
    let mut fds_after = Vec::new();
    let first_filters = seccomp_filters(daemon.0);
    assert!(
        first_filters > 0,
        "the daemon runs without its seccomp baseline"
    );
    // containerd's way of holding a sandbox's Task API: one ttrpc connection for the pod's
    // life. It must go on across the upgrades (containerd takes one that ends for a dead shim).
    let task = task_client(&s, &ids[0]).await;
    task_state(&task).await.expect("State before any upgrade");

    for round in 0..2 {
        let report = s
            .upgrade(Path::new(BIN))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let handed = N + usize::from(net.is_some());
        assert_eq!(report["sandboxes"], handed, "round {round}: {report}");
        assert_eq!(report["failed"].as_array().unwrap().len(), 0, "{report}");
        let new_pid = u32::try_from(report["new_pid"].as_u64().unwrap()).unwrap();
        daemon.wait_gone();
        let new = Pid(new_pid, None);
        assert!(new.alive(), "round {round}: the new daemon is not running");
        let mut pauses: Vec<u64> = report["pauses_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        pauses.sort_unstable();
        assert_eq!(pauses.len(), handed, "{report}");
        // Both processes report the CPU they took over the window (a handover of 20 running
        // VMs cannot take none).
        for key in ["old_window_cpu_us", "new_window_cpu_us"] {
            assert!(report[key].as_u64().unwrap_or(0) > 0, "{key}: {report}");
        }
        eprintln!(
            "upgrade {round}: {N} sandboxes, pause p50 {} us p99 {} us, total {} us",
            percentile(&pauses, 50),
            percentile(&pauses, 99),
            report["total_us"]
        );
        // Every guest goes on counting from where it was.
        for (i, counter) in counters.iter().enumerate() {
            let (len, last) = wait_counts(counter, seen[i].0, 5);
            assert!(last > seen[i].1, "{}: {last} after {}", ids[i], seen[i].1);
            assert_monotonic(&ids[i], counter);
            seen[i] = (len, last);
        }
        let mut c = s.client().await;
        for id in &ids {
            assert_eq!(
                state(&mut c, id).await,
                "SANDBOX_READY",
                "round {round}: {id}"
            );
        }
        // The same Task connection, served by the new process (the old one is gone).
        task_state(&task)
            .await
            .unwrap_or_else(|e| panic!("round {round}: State on the kept connection: {e:?}"));
        if let Some(net) = &net {
            assert_eq!(state(&mut c, "up-net").await, "SANDBOX_READY");
            let links = net.links();
            assert!(
                links.contains("tap"),
                "round {round}: the tap went: {links}"
            );
            assert!(net.has_ingress());
        }
        assert!(!s.state().join(controller::upgrade::SOCKET).exists());
        fds_after.push(new.settled_fds());
        // The new process runs under its predecessor's seccomp baseline and adds none.
        assert_eq!(
            seccomp_filters(new.0),
            first_filters,
            "round {round}: filters pile up"
        );
        daemon = new;
    }
    // The second new process holds what the first did: nothing leaks per upgrade.
    assert!(
        fds_after[1] <= fds_after[0] + 2,
        "descriptors after each upgrade: {fds_after:?}"
    );

    // Status, Stop, Wait and Shutdown work on every sandbox of the new process.
    let mut c = s.client().await;
    for id in &ids {
        c.stop(ControllerStopRequest {
            sandbox_id: id.clone(),
            timeout_secs: 5,
            ..Default::default()
        })
        .await
        .unwrap();
        let exit = tokio::time::timeout(
            TIMEOUT,
            c.wait(ControllerWaitRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert_eq!(exit.exit_status, 0, "{id}: the guest ended by its Shutdown");
        c.shutdown(ControllerShutdownRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    if let Some(net) = &net {
        c.shutdown(ControllerShutdownRequest {
            sandbox_id: "up-net".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(!net.links().contains("tap"), "{}", net.links());
        assert!(!net.has_ingress());
    }
    drop(daemon);
}

/// How many seccomp filters confine process `pid` (`Seccomp_filters` of its status).
fn seccomp_filters(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A ttrpc Task client on sandbox `id`'s `task.sock`.
async fn task_client(s: &Setup, id: &str) -> TaskClient {
    let sock = s
        .state()
        .join(controller::store::SANDBOXES_DIR)
        .join(id)
        .join("task.sock");
    TaskClient::new(
        Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    )
}

/// Task.State on `task` (the test guest's agent answers any call with an empty OK).
async fn task_state(task: &TaskClient) -> ttrpc::Result<()> {
    let mut r = StateRequest::new();
    r.id = "c1".into();
    task.state(ttrpc::context::with_duration(TIMEOUT), &r)
        .await
        .map(drop)
}

/// How many of the daemon's sandboxes started as clones of its VM template.
async fn template_clones(s: &Setup) -> usize {
    let channel = containerd_client::connect(&s.socket).await.unwrap();
    let list = proto::admin::v1::admin_client::AdminClient::new(channel)
        .list(proto::admin::v1::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    list.sandboxes.iter().filter(|s| s.from_template).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_every_sandbox_in_the_old_process() {
    require_kvm!();
    let _serial = SERIAL.lock().await;
    const N: usize = 5;
    let s = Setup::new();
    let mut daemon = s.daemon();
    let mut c = s.client().await;
    let ids: Vec<String> = (0..N).map(|i| format!("keep-{i}")).collect();
    let mut counters = Vec::new();
    for id in &ids {
        start(&mut c, id).await;
        counters.push(watch_counter(
            &s.state().join(controller::store::SANDBOXES_DIR).join(id),
        ));
    }
    // A Task connection held across both attempts, as containerd holds one.
    let task = task_client(&s, &ids[0]).await;
    task_state(&task).await.expect("State before the attempts");
    let fds = daemon.settled_fds();
    let half_way = s.wrapper(
        "half-way",
        &format!("{}=2", controller::upgrade::FAIL_AFTER_ENV),
    );
    let other_version = s.wrapper(
        "other-version",
        &format!("{}=99", controller::upgrade::PROTOCOL_ENV),
    );
    for (binary, expect) in [(&half_way, "exited"), (&other_version, "protocol 99")] {
        let seen: Vec<(usize, u64)> = counters.iter().map(|k| wait_counts(k, 0, 3)).collect();
        let err = s.upgrade(binary).unwrap_err();
        assert!(err.contains(expect), "{}: {err}", binary.display());
        assert!(daemon.1.as_mut().unwrap().try_wait().unwrap().is_none());
        for (i, counter) in counters.iter().enumerate() {
            let (_, last) = wait_counts(counter, seen[i].0, 5);
            assert!(last > seen[i].1);
            assert_monotonic(&ids[i], counter);
        }
        for id in &ids {
            assert_eq!(state(&mut c, id).await, "SANDBOX_READY", "{id}");
        }
        assert!(!s.state().join(controller::upgrade::SOCKET).exists());
        // The Task endpoint was cut (the half-way attempt) or not, and serves on: the kept
        // connection, and a new one (its socket accepts again).
        task_state(&task)
            .await
            .unwrap_or_else(|e| panic!("{}: the kept Task connection: {e:?}", binary.display()));
        task_state(&task_client(&s, &ids[1]).await)
            .await
            .unwrap_or_else(|e| panic!("{}: a new Task connection: {e:?}", binary.display()));
    }
    // Nothing of the attempts stays open in the old process.
    assert!(
        daemon.fds() <= fds + 2,
        "{} descriptors, {fds} before",
        daemon.fds()
    );
    // It still serves lifecycle calls.
    c.stop(ControllerStopRequest {
        sandbox_id: ids[0].clone(),
        timeout_secs: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(c);
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place() {
    require_kvm!();
    let _serial = SERIAL.lock().await;
    let s = Setup::new();
    let mut daemon = s.daemon();
    let mut c = s.client().await;
    let ids = ["usr2-1", "usr2-2"];
    let mut counters = Vec::new();
    for id in ids {
        start(&mut c, id).await;
        counters.push(watch_counter(
            &s.state().join(controller::store::SANDBOXES_DIR).join(id),
        ));
    }
    let seen: Vec<(usize, u64)> = counters.iter().map(|k| wait_counts(k, 0, 3)).collect();
    drop(c);
    // What `systemctl reload` can send instead of running `sandboxer upgrade`: the old
    // process hands over and exits 0 by itself.
    let old_pid = daemon.0;
    let killed = Command::new("kill")
        .args(["-USR2", &old_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    daemon.wait_gone();
    let mut c = s.client().await;
    let mut new_pid = 0;
    for (i, id) in ids.iter().enumerate() {
        let status = c
            .status(ControllerStatusRequest {
                sandbox_id: (*id).into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.state, "SANDBOX_READY", "{id}");
        assert_ne!(status.pid, old_pid, "{id}: still the old process's");
        new_pid = status.pid;
        let (_, last) = wait_counts(&counters[i], seen[i].0, 3);
        assert!(last > seen[i].1, "{id}: {last} after {}", seen[i].1);
        assert_monotonic(id, &counters[i]);
    }
    let new = Pid(new_pid, None);
    assert!(new.alive());
    drop(c);
    drop(new);
}
