// SPDX-License-Identifier: Apache-2.0
//! The `net` case: pod networking with a real guest. This program plays CNI: it makes a pod
//! network namespace (bind-mounted like `/run/netns/<name>`) holding one end of a veth pair as
//! `eth0` with an address and a default route, and keeps the other end in its own namespace.
//! The sandboxer must carry that interface into the VM (tap + tc redirect, the veth's MAC and
//! addresses pushed to the agent). Traffic is checked both ways: ICMP echo to the guest,
//! TCP to a container listening in the pod, TCP from a container to this side. After
//! Shutdown no tap may be left in the pod namespace.
//!
//! Links, addresses and routes are made with busybox's `ip` and `nsenter` (`--busybox`), the
//! only network tools the emulated host has.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Controller, Steps, end_pod, rootfs_mount, start_pod_in, wait_exit};

/// A pod's addressing: its veth pair and /24.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NetPlan {
    /// The pod's address (the veth end in the pod namespace, then the guest's NIC).
    pub(crate) pod_ip: Ipv4Addr,
    /// This side's address (the veth end left outside), the pod's gateway.
    pub(crate) host_ip: Ipv4Addr,
    /// The outside veth end.
    pub(crate) host_if: &'static str,
}

/// The `net` case's pod.
const NET: NetPlan = NetPlan {
    pod_ip: Ipv4Addr::new(10, 88, 0, 2),
    host_ip: Ipv4Addr::new(10, 88, 0, 1),
    host_if: "e2e-veth",
};
/// Port a container listens on.
const POD_PORT: u16 = 8080;
/// Port this side listens on for a container.
const HOST_PORT: u16 = 9090;
/// How long traffic may take to start flowing (a nested guest is slow).
const NET_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs busybox `args`; the error carries its stderr.
pub(crate) fn bb(busybox: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(busybox)
        .args(args)
        .output()
        .with_context(|| format!("busybox {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "busybox {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod network namespace as CNI leaves it, and the veth pair into it; removed on drop.
pub(crate) struct PodNetns {
    busybox: PathBuf,
    plan: NetPlan,
    /// Holds the namespace while it is set up (its `/proc/<pid>/ns/net`).
    holder: Child,
    /// The bind mount of the namespace (what `netns_path` names).
    pub(crate) path: PathBuf,
}

impl PodNetns {
    pub(crate) fn new(busybox: &Path, path: PathBuf, plan: NetPlan) -> Result<Self> {
        let holder = Command::new(busybox)
            .args([
                "unshare",
                "-n",
                busybox.to_str().unwrap_or("busybox"),
                "sleep",
                "3600",
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("unshare a network namespace")?;
        let mut ns = PodNetns {
            busybox: busybox.to_owned(),
            plan,
            holder,
            path,
        };
        ns.set_up().context("set up the pod network namespace")?;
        Ok(ns)
    }

    fn bb(&self, args: &[&str]) -> Result<String> {
        bb(&self.busybox, args)
    }

    /// Runs busybox `args` inside the pod namespace.
    fn inside(&self, args: &[&str]) -> Result<String> {
        let net = format!("--net={}", self.path.display());
        let busybox = self.busybox.to_string_lossy().into_owned();
        let mut all = vec!["nsenter", net.as_str(), busybox.as_str()];
        all.extend_from_slice(args);
        self.bb(&all)
    }

    fn set_up(&mut self) -> Result<()> {
        let NetPlan {
            pod_ip,
            host_ip,
            host_if,
        } = self.plan;
        let pid = self.holder.id().to_string();
        let proc_ns = format!("/proc/{pid}/ns/net");
        // The unshare may not have happened yet when the child is spawned.
        let until = Instant::now() + Duration::from_secs(10);
        let own = std::fs::read_link("/proc/self/ns/net")?;
        while std::fs::read_link(&proc_ns).ok().as_ref() == Some(&own) {
            ensure!(Instant::now() < until, "the holder never left this netns");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.path, b"")?;
        self.bb(&["mount", "--bind", &proc_ns, &self.path.to_string_lossy()])?;
        // busybox names the peer itself (vethN): find it by its peer index after the move.
        let before = self.inside(&["ip", "-o", "link", "show"])?;
        ensure!(!before.contains("eth0"), "fresh netns has eth0: {before}");
        self.bb(&["ip", "link", "add", host_if, "type", "veth"])?;
        let links = self.bb(&["ip", "-o", "link", "show"])?;
        let peer = links
            .lines()
            .find_map(|l| {
                let name = l.split(": ").nth(1)?.split('@').collect::<Vec<_>>();
                (name.get(1) == Some(&host_if)).then(|| name[0].to_owned())
            })
            .with_context(|| format!("no peer of {host_if} in {links}"))?;
        self.bb(&["ip", "link", "set", &peer, "netns", &pid])?;
        self.inside(&["ip", "link", "set", &peer, "name", "eth0"])?;
        self.inside(&["ip", "addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
        self.inside(&["ip", "link", "set", "eth0", "up"])?;
        self.inside(&["ip", "link", "set", "lo", "up"])?;
        self.inside(&["ip", "route", "add", "default", "via", &host_ip.to_string()])?;
        self.bb(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            host_if,
        ])?;
        self.bb(&["ip", "link", "set", host_if, "up"])?;
        Ok(())
    }

    /// Names of the links in the pod namespace.
    pub(crate) fn links(&self) -> Result<String> {
        self.inside(&["ip", "-o", "link", "show"])
    }

    /// The MAC of the pod's `eth0` (what the guest's NIC must carry).
    pub(crate) fn pod_mac(&self) -> Result<String> {
        // Not /sys/class/net: sysfs shows the namespace of whoever mounted it, not this one.
        let out = self.inside(&["ip", "-o", "link", "show", "eth0"])?;
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == "link/ether")
            .and(words.next())
            .map(str::to_owned)
            .with_context(|| format!("no MAC in {out:?}"))
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = bb(&self.busybox, &["ip", "link", "del", self.plan.host_if]);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = bb(&self.busybox, &["umount", &self.path.to_string_lossy()]);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Retries `f` until it succeeds or [`NET_TIMEOUT`] passes.
pub(crate) async fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let until = Instant::now() + NET_TIMEOUT;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= until => return Err(e.context(what.to_owned())),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Reads what a TCP peer sends up to its first line's end or its close (bounded), then
/// closes: busybox `nc` waits for the other side to close once its input is sent.
fn read_line(mut s: TcpStream) -> Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut text = Vec::new();
    let mut chunk = [0u8; 256];
    while !text.contains(&b'\n') {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

pub(crate) async fn case_net(
    api: &mut Controller,
    image: &Path,
    busybox: &Path,
    work: &Path,
) -> Result<()> {
    let mut steps = Steps::new("net");
    let netns = PodNetns::new(busybox, work.join("netns/e2e-net"), NET)?;
    steps.done("netns");
    let pod = start_pod_in(api, "e2e-net", &netns.path.to_string_lossy(), &mut steps).await?;
    let links = netns.links()?;
    ensure!(
        links.contains("tap"),
        "no tap in the pod netns after Start: {links}"
    );

    // The guest kernel answers ICMP echo on the pod's address.
    let ping = retry("ping the guest", || {
        bb(
            busybox,
            &["ping", "-c", "1", "-W", "5", &NET.pod_ip.to_string()],
        )
    })
    .await?;
    println!(
        "E2E-OUTPUT net ping: {}",
        ping.lines()
            .find(|l| l.contains("bytes from"))
            .unwrap_or("")
    );
    steps.done("ping");

    let dir = work.join("net");
    std::fs::create_dir_all(&dir)?;
    // A server in a container, reached from outside the pod.
    let serve = format!("echo net-ok-from-container | nc -l -p {POD_PORT}");
    // The output FIFO's reader lives as long as its copy thread.
    let _output = pod
        .run_script(&dir, "srv", rootfs_mount(image), &serve)
        .await?;
    let text = retry("connect to the container's server", || {
        let s = TcpStream::connect_timeout(
            &SocketAddrV4::new(NET.pod_ip, POD_PORT).into(),
            Duration::from_secs(5),
        )?;
        let text = read_line(s)?;
        ensure!(!text.is_empty(), "connected, but nothing came");
        Ok(text)
    })
    .await?;
    ensure!(
        text.contains("net-ok-from-container"),
        "the container's server sent {text:?}"
    );
    println!("E2E-OUTPUT net srv: {}", text.trim());
    let status = wait_exit(&pod.task, "srv", "").await?;
    ensure!(status == 0, "srv: exit status {status}");
    pod.delete("srv").await?;
    steps.done("tcp-into-pod");

    // A container reaches a server outside the pod through its default route.
    let listener = TcpListener::bind(SocketAddrV4::new(NET.host_ip, HOST_PORT))?;
    listener.set_nonblocking(true)?;
    let dial = format!("echo hello-from-the-pod | nc {} {HOST_PORT}", NET.host_ip);
    let _output = pod
        .run_script(&dir, "cli", rootfs_mount(image), &dial)
        .await?;
    let text = retry("accept the container's connection", || {
        let (s, peer) = listener.accept()?;
        s.set_nonblocking(false)?;
        let text = read_line(s)?;
        Ok(format!("{peer}: {text}"))
    })
    .await?;
    ensure!(
        text.contains("hello-from-the-pod") && text.starts_with(&NET.pod_ip.to_string()),
        "this side got {text:?}"
    );
    println!("E2E-OUTPUT net host: {}", text.trim());
    let status = wait_exit(&pod.task, "cli", "").await?;
    ensure!(status == 0, "cli: exit status {status}");
    pod.delete("cli").await?;
    steps.done("tcp-out-of-pod");

    end_pod(api, &pod, &mut steps).await?;
    let links = netns.links()?;
    ensure!(
        !links.contains("tap"),
        "a tap is left in the pod netns after Shutdown: {links}"
    );
    ensure!(
        links.contains("eth0"),
        "the pod's eth0 is gone after Shutdown: {links}"
    );
    steps.done("teardown");
    Ok(())
}
