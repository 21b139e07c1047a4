// SPDX-License-Identifier: Apache-2.0
//! The agent's Control service end to end on the host: the real `sandboxer-agent` binary serves
//! ttrpc on a unix socket inside its own network, UTS and mount namespaces (`unshare`), so the
//! links, routes, sysctls and hostname that Setup changes are the test's own; the test calls
//! every RPC through the generated `ControlClient` and checks the result from outside with
//! `nsenter` + `ip`/`hostname` and /proc.
//!
//! Needs root, `unshare`/`nsenter` (util-linux), `ip` (iproute2), veth support and cgroup v2.
//! On a hybrid cgroup host (cgroup2 only at `/sys/fs/cgroup/unified`) the agent's mount
//! namespace gets cgroup2 mounted on `/sys/fs/cgroup`, as in the guest. Without these the test
//! prints a loud SKIP, or fails under CI (`CI=true` or `SANDBOXER_REQUIRE_ROOT=1`).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(clippy::tests_outside_test_module, reason = "integration test file")]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use containerd_shim_protos::protobuf::Message;
use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;
use proto::agent::control::{
    BundleFile, Dns, HealthRequest, Interface, IpAddress, PrepareBundleRequest,
    RemoveBundleRequest, Route, SetupRequest, ShutdownRequest, StatsRequest, SyncClockRequest,
    WaitEventRequest,
};
use proto::agent::control_ttrpc::ControlClient;
use ttrpc::Code;

/// The MAC of the veth end the test hands to Setup.
const MAC: &str = "02:5b:00:00:00:01";
/// The MAC of its peer.
const PEER_MAC: &str = "02:5b:00:00:00:02";

/// Skips with a loud message, or fails under CI (`CI=true` or SANDBOXER_REQUIRE_ROOT=1).
fn skip(why: &str) {
    if std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() == Ok("1")
        || std::env::var("CI").as_deref() == Ok("true")
    {
        panic!("{why} (required: CI=true or SANDBOXER_REQUIRE_ROOT=1)");
    }
    eprintln!("SKIP control_api: {why}");
}

fn is_cgroup2(path: &str) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Where the test sees the cgroup2 root, and whether the agent needs it mounted.
#[derive(Debug, Clone)]
struct Env {
    cgroup_root: PathBuf,
    hybrid: bool,
}

fn preconditions() -> Option<Env> {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root");
        return None;
    }
    for cmd in ["unshare", "nsenter", "ip"] {
        if !have(cmd) {
            skip(&format!("needs {cmd}"));
            return None;
        }
    }
    if is_cgroup2("/sys/fs/cgroup") {
        Some(Env {
            cgroup_root: "/sys/fs/cgroup".into(),
            hybrid: false,
        })
    } else if is_cgroup2("/sys/fs/cgroup/unified") {
        Some(Env {
            cgroup_root: "/sys/fs/cgroup/unified".into(),
            hybrid: true,
        })
    } else {
        skip("needs cgroup v2");
        None
    }
}

/// The agent process in its namespaces; SIGTERM and cleanup on drop.
struct Agent {
    child: Child,
    pid: i32,
    sock: PathBuf,
    state: PathBuf,
    /// Host path of the pod cgroup.
    pod_cgroup: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir(&self.pod_cgroup);
    }
}

impl Agent {
    fn start(env: &Env, dir: &Path, name: &str) -> Self {
        let sock = dir.join("agent.sock");
        let state = dir.join("state");
        let cg = format!("sandboxer-control-test-{}-{name}", std::process::id());
        let agent = env!("CARGO_BIN_EXE_sandboxer-agent");
        let listen = format!("unix:{}", sock.display());
        // `unshare` execs its command, so the child's pid is the agent's (for nsenter).
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--net",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
        ]);
        let mount = if env.hybrid {
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && "
        } else {
            ""
        };
        cmd.arg(format!("{mount}exec \"$0\" \"$@\""))
            .arg(agent)
            .args(["--listen", &listen, "--ready-fd", "1", "--state-dir"])
            .arg(&state)
            .args(["--cgroup-parent", &cg]);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let pid = i32::try_from(child.id()).unwrap();
        let agent = Agent {
            child,
            pid,
            sock: sock.clone(),
            state,
            pod_cgroup: env.cgroup_root.join(&cg),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("ready line within 30 s");
        assert_eq!(line, format!("READY unix:{}\n", sock.display()));
        agent
    }

    async fn client(&self) -> ControlClient {
        let c = ttrpc::asynchronous::Client::connect(&format!("unix://{}", self.sock.display()))
            .await
            .expect("connect");
        ControlClient::new(c)
    }

    /// Runs `args` in the agent's network and UTS namespaces; returns stdout.
    fn ns(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-n", "-u", "--"])
            .args(args)
            .output()
            .expect("run nsenter");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Waits for the agent to exit.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        wait_child(&mut self.child, within).expect("the agent did not exit")
    }
}

fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos().try_into().unwrap())
}

/// The status code and message of a failed call.
fn status<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn ip(address: &str, prefix_len: u32) -> IpAddress {
    let mut a = IpAddress::new();
    a.address = address.into();
    a.prefix_len = prefix_len;
    a
}

fn route(destination: &str, gateway: &str, device: &str, metric: u32) -> Route {
    let mut r = Route::new();
    r.destination = destination.into();
    r.gateway = gateway.into();
    r.device = device.into();
    r.metric = metric;
    r
}

fn iface(mac: &str, name: &str, mtu: u32, addresses: Vec<IpAddress>) -> Interface {
    let mut i = Interface::new();
    i.mac = mac.into();
    i.name = name.into();
    i.mtu = mtu;
    i.addresses = addresses;
    i
}

/// A veth pair with known MACs in the agent's network namespace; the peer is up so routes
/// through the other end have a carrier.
fn add_veth(agent: &Agent) {
    agent.ns(&[
        "ip", "link", "add", "veth-a", "address", MAC, "type", "veth", "peer", "name", "veth-b",
        "address", PEER_MAC,
    ]);
    agent.ns(&["ip", "link", "set", "veth-b", "up"]);
}

fn full_setup() -> SetupRequest {
    let mut req = SetupRequest::new();
    req.hostname = "pod-h3.example".into();
    let mut dns = Dns::new();
    dns.servers = vec!["10.96.0.10".into(), "fd00::53".into()];
    dns.searches = vec![
        "default.svc.cluster.local".into(),
        "svc.cluster.local".into(),
    ];
    dns.options = vec!["ndots:5".into()];
    req.dns = Some(dns).into();
    req.interfaces = vec![iface(
        MAC,
        "eth0",
        1400,
        vec![ip("10.1.0.2", 24), ip("fd00:1::2", 64)],
    )];
    req.routes = vec![
        route("", "10.1.0.1", "", 0),
        route("10.9.0.0/16", "", "eth0", 100),
        route("10.10.0.0/16", "10.1.0.254", "eth0", 0),
    ];
    req.sysctls = [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "2"),
        ("net.core.somaxconn", "1234"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    // The host's clock (host mode never sets it; a Linux guest's agent does).
    req.unix_nanos = unix_nanos_now();
    req
}

/// The realtime clock, nanoseconds since the Unix epoch.
fn unix_nanos_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

fn check_full_setup(agent: &Agent) {
    assert_eq!(agent.ns(&["hostname"]).trim(), "pod-h3.example");
    let link = agent.ns(&["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains(&format!("link/ether {MAC}")), "{link}");
    assert!(link.contains("<BROADCAST,MULTICAST,UP,LOWER_UP>"), "{link}");
    let addrs = agent.ns(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert_eq!(addrs.matches("inet 10.1.0.2/24").count(), 1, "{addrs}");
    assert_eq!(addrs.matches("inet6 fd00:1::2/64").count(), 1, "{addrs}");
    let lo = agent.ns(&["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP,"), "lo is not up: {lo}");
    let routes = agent.ns(&["ip", "route", "show"]);
    assert!(routes.contains("default via 10.1.0.1 dev eth0"), "{routes}");
    assert!(
        routes.contains("10.9.0.0/16 dev eth0 proto static scope link metric 100"),
        "{routes}"
    );
    assert!(
        routes.contains("10.10.0.0/16 via 10.1.0.254 dev eth0"),
        "{routes}"
    );
    assert_eq!(routes.matches("default").count(), 1, "{routes}");
    for (path, want) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv4/conf/all/rp_filter", "2"),
        ("/proc/sys/net/core/somaxconn", "1234"),
    ] {
        assert_eq!(agent.ns(&["cat", path]).trim(), want, "{path}");
    }
    let resolv = std::fs::read_to_string(agent.state.join("etc/resolv.conf")).unwrap();
    assert!(
        resolv.ends_with(
            "nameserver 10.96.0.10\nnameserver fd00::53\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        ),
        "{resolv}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn setup_configures_the_pod_namespaces_idempotently() {
    let Some(env) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&env, dir.path(), "setup");
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    add_veth(&agent);
    let c = agent.client().await;

    c.setup(ctx(), &full_setup()).await.expect("setup");
    check_full_setup(&agent);
    // Again, with the link renamed and up already: nothing changes, nothing fails.
    c.setup(ctx(), &full_setup()).await.expect("second setup");
    check_full_setup(&agent);
    // An empty Setup changes nothing either.
    c.setup(ctx(), &SetupRequest::new())
        .await
        .expect("empty setup");
    check_full_setup(&agent);
    // The host's own settings were never touched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward
    );
}

#[tokio::test(flavor = "current_thread")]
async fn setup_rejects_bad_input_naming_the_field() {
    let Some(env) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&env, dir.path(), "bad");
    add_veth(&agent);
    let c = agent.client().await;
    let hostname_before = agent.ns(&["hostname"]);

    let cases: Vec<(SetupRequest, Code, &str)> = vec![
        (
            {
                let mut r = SetupRequest::new();
                r.hostname = "changed".into();
                r.unix_nanos = -1;
                r
            },
            Code::INVALID_ARGUMENT,
            "unix_nanos: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.interfaces = vec![iface("02:5b:00:00:00:99", "", 0, vec![])];
                r
            },
            Code::NOT_FOUND,
            "interfaces[0].mac: no link with MAC 02:5b:00:00:00:99",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.interfaces = vec![
                    iface(MAC, "", 0, vec![]),
                    iface("02:5b:00:00", "", 0, vec![]),
                ];
                r
            },
            Code::INVALID_ARGUMENT,
            "interfaces[1].mac: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.interfaces = vec![iface(MAC, "veth-b", 0, vec![])];
                r
            },
            Code::ALREADY_EXISTS,
            "interfaces[0].name: another link is named \"veth-b\"",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.interfaces = vec![iface(MAC, "", 0, vec![ip("10.1.0.2", 40)])];
                r
            },
            Code::INVALID_ARGUMENT,
            "interfaces[0].addresses[0].prefix_len: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.routes = vec![route("10.9.0.0/16", "", "eth7", 0)];
                r
            },
            Code::NOT_FOUND,
            "routes[0].device: no link named \"eth7\"",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.routes = vec![route("10.9.0.0/16", "", "", 0)];
                r
            },
            Code::INVALID_ARGUMENT,
            "routes[0].device: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.routes = vec![route("", "", "veth-a", 0)];
                r
            },
            Code::INVALID_ARGUMENT,
            "routes[0].destination: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.sysctls = [("net.ipv4/../../kernel.hostname".to_owned(), "x".to_owned())].into();
                r
            },
            Code::INVALID_ARGUMENT,
            "sysctls[net.ipv4/../../kernel.hostname]: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.sysctls = [("net.ipv4.no_such_knob".to_owned(), "1".to_owned())].into();
                r
            },
            Code::NOT_FOUND,
            "sysctls[net.ipv4.no_such_knob]: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.hostname = "x".repeat(65);
                r
            },
            Code::INVALID_ARGUMENT,
            "hostname: ",
        ),
        (
            {
                let mut r = SetupRequest::new();
                r.hostname = "changed-before-dns-failed".into();
                let mut dns = Dns::new();
                dns.servers = vec!["not-an-ip".into()];
                r.dns = Some(dns).into();
                r
            },
            Code::INVALID_ARGUMENT,
            "dns.servers[0]: ",
        ),
    ];
    for (req, code, prefix) in cases {
        let (got, msg) = status(c.setup(ctx(), &req).await);
        assert_eq!(got, code, "{msg}");
        assert!(
            msg.starts_with(prefix),
            "{msg:?} does not start with {prefix:?}"
        );
    }
    // Checked before anything was applied: the hostname of the last case did not change.
    assert_eq!(agent.ns(&["hostname"]), hostname_before);
    // Not renamed by the ALREADY_EXISTS case.
    agent.ns(&["ip", "link", "show", "veth-a"]);
    // The agent still serves.
    c.health(ctx(), &HealthRequest::new())
        .await
        .expect("health");
}

#[tokio::test(flavor = "current_thread")]
async fn health_clock_bundles_and_events() {
    let Some(env) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&env, dir.path(), "misc");
    let c = agent.client().await;

    // Health.
    let h1 = c
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("health");
    assert_eq!(h1.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h1.containers, 0);
    assert!(h1.uptime_ns > 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let h2 = c
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("health");
    assert!(h2.uptime_ns >= h1.uptime_ns + 20_000_000, "{h1:?} {h2:?}");

    // SyncClock: the host's own time is accepted (host mode never sets the clock);
    // nonsense is refused.
    let mut req = SyncClockRequest::new();
    req.unix_nanos = unix_nanos_now();
    c.sync_clock(ctx(), &req).await.expect("sync clock");
    for bad in [-1, 0, i64::MAX] {
        req.unix_nanos = bad;
        let (code, msg) = status(c.sync_clock(ctx(), &req).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{bad}: {msg}");
        assert!(msg.starts_with("unix_nanos: "), "{msg}");
    }

    // PrepareBundle / RemoveBundle.
    let mut req = PrepareBundleRequest::new();
    req.container_id = "c1".into();
    req.config_json = br#"{"ociVersion":"1.2.0","process":{"args":["sh"]}}"#.to_vec();
    let mut hosts = BundleFile::new();
    hosts.path = "etc/hosts".into();
    hosts.data = b"127.0.0.1 localhost\n".to_vec();
    hosts.mode = 0o644;
    req.files = vec![hosts];
    let bundle = c.prepare_bundle(ctx(), &req).await.expect("prepare").bundle;
    let want = agent.state.join("bundles/c1");
    assert_eq!(Path::new(&bundle), want);
    assert_eq!(
        std::fs::read(want.join("config.json")).unwrap(),
        req.config_json
    );
    assert_eq!(
        std::fs::read_to_string(want.join("files/etc/hosts")).unwrap(),
        "127.0.0.1 localhost\n"
    );
    let (code, msg) = status(c.prepare_bundle(ctx(), &req).await);
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    for (id, json, field) in [
        ("../c1", "{}", "container_id: "),
        ("a/b", "{}", "container_id: "),
        ("", "{}", "container_id: "),
        (&*"x".repeat(77), "{}", "container_id: "),
        ("c2", "{not json", "config_json: "),
    ] {
        let mut bad = PrepareBundleRequest::new();
        bad.container_id = id.into();
        bad.config_json = json.as_bytes().to_vec();
        let (code, msg) = status(c.prepare_bundle(ctx(), &bad).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{id:?}: {msg}");
        assert!(msg.starts_with(field), "{msg}");
    }
    assert!(!agent.state.join("bundles/c2").exists());
    let mut rm = RemoveBundleRequest::new();
    rm.container_id = "c1".into();
    c.remove_bundle(ctx(), &rm).await.expect("remove");
    assert!(!want.exists());
    let (code, msg) = status(c.remove_bundle(ctx(), &rm).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    rm.container_id = "..".into();
    let (code, _) = status(c.remove_bundle(ctx(), &rm).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);

    // WaitEvent is a long poll: with no event it is still waiting when the deadline passes.
    let short = ttrpc::context::with_timeout(300_000_000);
    let started = Instant::now();
    match c.wait_event(short, &WaitEventRequest::new()).await {
        Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), Code::DEADLINE_EXCEEDED),
        Err(ttrpc::Error::Others(m)) => assert!(m.contains("deadline"), "{m}"),
        other => panic!("WaitEvent returned without an event: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    // ... and the agent still serves afterwards.
    c.health(ctx(), &HealthRequest::new())
        .await
        .expect("health");
}

/// Starts `sh -c <script>` moved into the cgroup at `cgroup` before it runs `script`.
fn spawn_in_cgroup(cgroup: &Path, script: &str) -> Child {
    let procs = cgroup.join("cgroup.procs");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {} && {script}", procs.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh");
    // Wait until it is in the cgroup.
    let pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .lines()
        .any(|l| l == pid)
    {
        assert!(Instant::now() < deadline, "{pid} did not join {procs:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn cpu_usage_usec(cgroup: &Path) -> u64 {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn stats_then_shutdown_ends_the_pod() {
    let Some(env) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&env, dir.path(), "stats");
    std::fs::create_dir(&agent.pod_cgroup).expect("create the pod cgroup");
    // One process that burns some CPU in the pod cgroup and then sleeps; one that ignores
    // SIGTERM.
    let mut polite = spawn_in_cgroup(
        &agent.pod_cgroup,
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 1000",
    );
    let mut stubborn = spawn_in_cgroup(
        &agent.pod_cgroup,
        "trap '' TERM; while :; do sleep 0.05; done",
    );
    let c = agent.client().await;

    // Stats: the pod cgroup's counters, as containerd's cgroups v2 Metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let any = c
            .stats(ctx(), &StatsRequest::new())
            .await
            .expect("stats")
            .metrics
            .into_option()
            .expect("metrics");
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).expect("decode Metrics");
        if m.cpu.usage_usec > 0 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let usage = metrics.cpu.usage_usec;
    assert!(usage > 0, "{metrics:?}");
    assert!(usage <= cpu_usage_usec(&agent.pod_cgroup), "{metrics:?}");

    // Shutdown: answers first, then SIGTERM, SIGKILL after the grace time, and the agent exits.
    let mut req = ShutdownRequest::new();
    req.timeout_secs = 1;
    let asked = Instant::now();
    c.shutdown(ctx(), &req).await.expect("shutdown");
    let status = agent.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "agent exited with {status}");
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(900), "exited after {took:?}");
    let polite = wait_child(&mut polite, Duration::from_secs(5)).expect("sleep still runs");
    assert_eq!(polite.signal(), Some(Signal::SIGTERM as i32), "{polite}");
    let stubborn = wait_child(&mut stubborn, Duration::from_secs(5)).expect("still runs");
    assert_eq!(
        stubborn.signal(),
        Some(Signal::SIGKILL as i32),
        "{stubborn}"
    );
}
