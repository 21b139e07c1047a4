// SPDX-License-Identifier: Apache-2.0
//! Pod networking against real network namespaces: each test makes its own pod netns (with a
//! veth, addresses and routes, as CNI would) and a peer netns on the veth's other end, runs
//! `network::attach`, checks the taps and tc filters with `ip`/`tc`, sends traffic through
//! the tap fd both ways without a guest, and tears down. Needs root (CAP_NET_ADMIN,
//! CAP_SYS_ADMIN) and iproute2: without them each test prints a loud SKIP, and fails instead
//! under CI (`CI=true` or SANDBOXER_REQUIRE_ROOT=1).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use controller::network::{self, NetworkError, PodNetwork};
use devices::virtio::net::NetBackend;
use nix::sched::{CloneFlags, setns};
use vmm::{DeviceConfig, NetBackendConfig};

const POD_MAC: [u8; 6] = [0x02, 0x5b, 0x00, 0x00, 0x00, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0x5b, 0x00, 0x00, 0x00, 0x01];
const MTU: u32 = 1400;
/// Virtio-net header length the tap is opened with.
const VNET_HDR: usize = 12;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(args: &[&str]) -> String {
    run(args).unwrap_or_else(|e| panic!("{e}"))
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A pod netns (`eth0` veth, a bridge br0, lo) and a peer netns holding the veth's other end
/// (`peer0`), as CNI would leave them. Both are deleted on drop.
struct TestNet {
    pod: String,
    peer: String,
    /// Third octet of the pod's 10.123.<n>.0/24 subnet.
    n: u8,
}

impl TestNet {
    fn new() -> Result<TestNet, String> {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let n = u8::try_from(std::process::id().wrapping_add(id) % 200 + 1).unwrap();
        let base = format!("sbxnet-{}-{id}", std::process::id());
        let net = TestNet {
            pod: format!("{base}-pod"),
            peer: format!("{base}-peer"),
            n,
        };
        run(&["ip", "netns", "add", &net.pod])?;
        run(&["ip", "netns", "add", &net.peer])?;
        let (pod, peer) = (net.pod.as_str(), net.peer.as_str());
        let pod_ip = format!("{}/24", net.pod_ip());
        let peer_ip = format!("{}/24", net.peer_ip());
        let pod6 = format!("fd00:5b:{n}::2/64");
        let gw6 = format!("fd00:5b:{n}::1");
        let (gw4, pod4) = (net.peer_ip_s(), net.pod_ip_s());
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                "netns", peer,
            ],
            vec!["ip", "-n", pod, "link", "add", "br0", "type", "bridge"],
            vec!["ip", "-n", pod, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", pod, "link", "set", "eth0", "address", &POD_MAC_S, "mtu", "1400", "up",
            ],
            vec!["ip", "-n", pod, "addr", "add", &pod_ip, "dev", "eth0"],
            vec![
                "ip", "-n", pod, "addr", "add", &pod6, "dev", "eth0", "nodad",
            ],
            vec![
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "10.124.0.0/16",
                "dev",
                "eth0",
            ],
            vec![
                "ip", "-n", pod, "route", "add", "default", "via", &gw4, "metric", "7",
            ],
            vec![
                "ip", "-n", pod, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
            ],
            vec![
                "ip",
                "-n",
                peer,
                "link",
                "set",
                "peer0",
                "address",
                &PEER_MAC_S,
                "mtu",
                "1400",
                "up",
            ],
            vec!["ip", "-n", peer, "addr", "add", &peer_ip, "dev", "peer0"],
            vec![
                "ip", "-n", peer, "neigh", "replace", &pod4, "lladdr", &POD_MAC_S, "dev", "peer0",
            ],
        ];
        for step in steps {
            run(&step)?;
        }
        Ok(net)
    }

    fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 123, self.n, 2)
    }

    fn peer_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 123, self.n, 1)
    }

    fn pod_ip_s(&self) -> String {
        self.pod_ip().to_string()
    }

    fn peer_ip_s(&self) -> String {
        self.peer_ip().to_string()
    }

    /// Link counters and tc statistics of both netns, for failure messages.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            vec!["ip", "-s", "-n", &self.pod, "link", "show"],
            vec![
                "tc", "-s", "-n", &self.pod, "filter", "show", "dev", "eth0", "ingress",
            ],
            vec!["ip", "-s", "-n", &self.peer, "link", "show"],
            vec!["ip", "-n", &self.peer, "neigh", "show"],
        ] {
            out.push_str(&format!("\n$ {}\n", args.join(" ")));
            out.push_str(&run(&args).unwrap_or_else(|e| e));
        }
        out
    }

    fn pod_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.pod)
    }

    /// Runs `f` on a thread inside netns `ns`; sockets it makes stay in that netns.
    fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new("/run/netns").join(ns);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

static POD_MAC_S: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| mac_str(POD_MAC));
static PEER_MAC_S: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| mac_str(PEER_MAC));

/// The test netns, or a loud SKIP (a failure under CI: `CI=true` or SANDBOXER_REQUIRE_ROOT=1).
fn setup(test: &str) -> Option<TestNet> {
    let ready = run(&["tc", "-V"]).and_then(|_| TestNet::new());
    match ready {
        Ok(net) => Some(net),
        Err(e) => {
            assert!(
                std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() != Ok("1")
                    && std::env::var("CI").as_deref() != Ok("true"),
                "{test}: cannot make test network namespaces: {e}"
            );
            eprintln!(
                "SKIP {test}: cannot make test network namespaces (needs root and iproute2): {e}"
            );
            None
        }
    }
}

/// Checks the pod netns has no tap and no ingress qdisc left.
fn assert_clean(net: &TestNet) {
    let links = must(&["ip", "-n", &net.pod, "-o", "link", "show"]);
    assert!(!links.contains("tap_"), "tap left behind:\n{links}");
    assert!(links.contains("eth0"), "{links}");
    let qdiscs = must(&["tc", "-n", &net.pod, "qdisc", "show"]);
    assert!(!qdiscs.contains("ingress"), "ingress qdisc left:\n{qdiscs}");
}

fn the_tap(configs: &mut [DeviceConfig]) -> &mut Box<dyn NetBackend> {
    match configs {
        [
            DeviceConfig::Net {
                config,
                backend: NetBackendConfig::Custom(tap),
            },
        ] => {
            assert_eq!(config.mac, POD_MAC);
            assert_eq!(config.mtu, Some(1400));
            tap
        }
        other => panic!("expected one net device with a tap, got {other:?}"),
    }
}

#[tokio::test]
async fn attach_plans_and_redirects_then_teardown_leaves_nothing() {
    let Some(net) = setup("attach_plans_and_redirects_then_teardown_leaves_nothing") else {
        return;
    };
    let id = "4f1d2c3b5a69788796a5b4c3d2e1f000";
    let pod_net: PodNetwork = network::attach(&net.pod_path(), id).await.unwrap();
    assert_eq!(pod_net.sandbox_id(), id);

    // One NIC: the veth; lo and the bridge br0 are skipped.
    let nics = pod_net.nics();
    assert_eq!(nics.len(), 1, "{nics:?}");
    let nic = &nics[0];
    assert_eq!(nic.veth, "eth0");
    assert_eq!(nic.mac.0, POD_MAC);
    assert_eq!(nic.mtu, MTU);
    assert_eq!(nic.tap_name, "tap_0_4f1d2c3b5");
    let addrs: Vec<String> = nic.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(
        addrs,
        [
            format!("{}/24", net.pod_ip()),
            format!("fd00:5b:{}::2/64", net.n)
        ]
    );

    // The tap exists in the pod netns (and only there), up, with the veth's MTU.
    let tap = must(&["ip", "-n", &net.pod, "-d", "link", "show", &nic.tap_name]);
    assert!(tap.contains("mtu 1400"), "{tap}");
    assert!(tap.contains("tun type tap"), "{tap}");
    assert!(tap.contains(",UP"), "{tap}");
    run(&["ip", "link", "show", &nic.tap_name]).unwrap_err();
    // The pod netns does not talk IPv6 on the tap (that would reach the guest).
    let tap_addrs = must(&["ip", "-n", &net.pod, "addr", "show", "dev", &nic.tap_name]);
    assert!(!tap_addrs.contains("inet6"), "{tap_addrs}");
    let dummy = must(&["tc", "-n", &net.pod, "qdisc", "show", "dev", "br0"]);
    assert!(!dummy.contains("ingress"), "{dummy}");

    // Both redirects.
    let f = must(&[
        "tc", "-n", &net.pod, "filter", "show", "dev", "eth0", "ingress",
    ]);
    assert!(f.contains("protocol all") && f.contains("u32"), "{f}");
    assert!(
        f.contains(&format!(
            "mirred (Egress Redirect to device {})",
            nic.tap_name
        )),
        "{f}"
    );
    let f = must(&[
        "tc",
        "-n",
        &net.pod,
        "filter",
        "show",
        "dev",
        &nic.tap_name,
        "ingress",
    ]);
    assert!(f.contains("protocol all"), "{f}");
    assert!(f.contains("mirred (Egress Redirect to device eth0)"), "{f}");

    // The routes: on-link first, then gateways, no kernel subnet routes.
    let routes: Vec<(String, String, String, u32)> = pod_net
        .guest_routes()
        .iter()
        .map(|r| {
            (
                r.destination.clone(),
                r.gateway.clone(),
                r.device.clone(),
                r.metric,
            )
        })
        .collect();
    let gw6 = format!("fd00:5b:{}::1", net.n);
    assert_eq!(routes.len(), 3, "{routes:?}");
    assert_eq!(
        routes[0],
        ("10.124.0.0/16".into(), String::new(), "eth0".into(), 0)
    );
    assert!(
        routes[1..].contains(&(String::new(), net.peer_ip_s(), "eth0".into(), 7)),
        "{routes:?}"
    );
    assert!(
        routes[1..]
            .iter()
            .any(|r| r.0.is_empty() && r.1 == gw6 && r.2 == "eth0"),
        "{routes:?}"
    );

    // The agent's view of the NIC.
    let ifs = pod_net.guest_interfaces();
    assert_eq!(ifs.len(), 1);
    assert_eq!(ifs[0].mac, *POD_MAC_S);
    assert_eq!(ifs[0].name, "eth0");
    assert_eq!(ifs[0].mtu, MTU);
    assert_eq!(ifs[0].addresses.len(), 2);

    pod_net.teardown().await.unwrap();
    assert_clean(&net);
}

/// Sends a UDP datagram from the peer netns to the pod IP and reads it from the tap fd (with
/// its virtio-net header), then writes a UDP frame into the tap fd and receives it in the peer
/// netns.
#[tokio::test]
async fn frames_flow_between_tap_fd_and_peer() {
    let Some(net) = setup("frames_flow_between_tap_fd_and_peer") else {
        return;
    };
    let mut pod_net = network::attach(&net.pod_path(), "datapath-1")
        .await
        .unwrap();
    let mut configs = pod_net.take_device_configs();
    assert!(
        pod_net.take_device_configs().is_empty(),
        "taps are handed out once"
    );
    let tap = the_tap(&mut configs);
    assert!(tap.has_vnet_hdr());

    // Peer -> pod: the frame arrives on the tap fd.
    let peer_ip = net.peer_ip();
    let peer_sock = TestNet::in_netns(&net.peer, move || {
        UdpSocket::bind(SocketAddrV4::new(peer_ip, 0)).unwrap()
    });
    let peer_port = peer_sock.local_addr().unwrap().port();
    let payload = b"sandboxer: peer to pod";
    peer_sock
        .send_to(payload, SocketAddrV4::new(net.pod_ip(), 4789))
        .unwrap();
    let frame = read_udp_frame(tap.as_mut(), payload, &net);
    let hdr = &frame[..VNET_HDR];
    // gso_type (byte 1) is NONE for a small datagram; the Ethernet frame starts right after
    // the 12-byte header.
    assert_eq!(hdr[1], 0, "gso_type in {hdr:?}");
    assert_eq!(&frame[VNET_HDR..VNET_HDR + 6], &POD_MAC);
    assert_eq!(&frame[VNET_HDR + 6..VNET_HDR + 12], &PEER_MAC);
    assert_eq!(&frame[VNET_HDR + 12..VNET_HDR + 14], &[0x08, 0x00]);

    // Pod -> peer: a frame written into the tap fd leaves through the veth.
    peer_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reply = b"sandboxer: pod to peer";
    let out = udp_frame(net.pod_ip(), 4789, peer_ip, peer_port, reply);
    tap.send(&out).unwrap();
    let mut buf = [0u8; 256];
    let (len, from) = peer_sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], reply);
    assert_eq!(from, SocketAddrV4::new(net.pod_ip(), 4789).into());

    // Teardown while the "VM" still holds the tap fd deletes the tap too.
    pod_net.teardown().await.unwrap();
    assert_clean(&net);
    drop(configs);
}

/// Reads frames from the tap until an IPv4/UDP one carrying `payload` (the tap also sees the
/// pod side's own IPv6 noise, e.g. router solicitations).
fn read_udp_frame(tap: &mut dyn NetBackend, payload: &[u8], net: &TestNet) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65562];
    loop {
        match tap.recv(&mut buf) {
            Ok(len) => {
                let frame = &buf[..len];
                if frame.len() > VNET_HDR + 42 && frame.ends_with(payload) {
                    return frame.to_vec();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    panic!(
                        "no frame with the payload on the tap; {}",
                        net.diagnostics()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("tap read: {e}"),
        }
    }
}

/// A virtio-net header + Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap();
    let ip_len = udp_len + 20;
    let mut f = vec![0u8; VNET_HDR];
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !u16::try_from((sum & 0xffff) + (sum >> 16)).unwrap();
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn bad_netns_paths_are_clear_errors() {
    // No root needed: the path is checked before anything is entered.
    let missing = Path::new("/run/netns/sandboxer-no-such-netns");
    let err = network::attach(missing, "x").await.unwrap_err();
    assert!(matches!(err, NetworkError::NetnsNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("sandboxer-no-such-netns"), "{err}");

    let file = std::env::temp_dir().join(format!("sbx-not-netns-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let err = network::attach(&file, "x").await.unwrap_err();
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(err, NetworkError::NotANetns { .. }), "{err:?}");
    assert!(err.to_string().contains("sbx-not-netns"), "{err}");

    // A namespace file of another kind passes the nsfs check but cannot be entered as a netns.
    let err = network::attach(Path::new("/proc/self/ns/uts"), "x")
        .await
        .unwrap_err();
    assert!(matches!(err, NetworkError::EnterNetns { .. }), "{err:?}");
    assert!(err.to_string().contains("/proc/self/ns/uts"), "{err}");

    // Teardown-side helpers treat a vanished netns as nothing left to clean.
    let report = network::cleanup_leftovers(missing, "x").await.unwrap();
    assert_eq!(report, network::CleanupReport::default());
}

/// An attach whose caller gives up (its future is dropped) undoes itself once it finishes.
#[tokio::test]
async fn cancelled_attach_leaves_nothing() {
    let Some(net) = setup("cancelled_attach_leaves_nothing") else {
        return;
    };
    let path = net.pod_path();
    // Polled exactly once (the netns thread starts), then dropped while the work runs. (A
    // zero timeout is no good: tokio's timer has 1 ms ticks, and a fast attach finished within
    // one.) Should the netns thread win the race to the first poll, the attach is undone and
    // tried again.
    let mut abandoned = false;
    for _ in 0..20 {
        let mut attach = std::pin::pin!(network::attach(&path, "cancelled"));
        let first = std::future::poll_fn(|cx| Poll::Ready(attach.as_mut().poll(cx))).await;
        match first {
            Poll::Pending => {
                abandoned = true;
                break;
            }
            Poll::Ready(done) => done.unwrap().teardown().await.unwrap(),
        }
    }
    assert!(abandoned, "every attach finished within its first poll");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let links = must(&["ip", "-n", &net.pod, "-o", "link", "show"]);
        let qdiscs = must(&["tc", "-n", &net.pod, "qdisc", "show"]);
        if !links.contains("tap_") && !qdiscs.contains("ingress") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled attach left:\n{links}\n{qdiscs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the netns is usable again.
    let again = network::attach(&net.pod_path(), "cancelled").await.unwrap();
    again.teardown().await.unwrap();
    assert_clean(&net);
}

/// A pod with two veths gets two NICs, each with its own tap, redirects and routes.
#[tokio::test]
async fn two_veths_in_one_pod() {
    let Some(net) = setup("two_veths_in_one_pod") else {
        return;
    };
    let (pod, peer, n) = (net.pod.as_str(), net.peer.as_str(), net.n);
    let addr = format!("10.125.{n}.2/24");
    let gw = format!("10.125.{n}.1");
    for step in [
        vec![
            "ip", "-n", pod, "link", "add", "eth1", "type", "veth", "peer", "name", "peer1",
            "netns", peer,
        ],
        vec!["ip", "-n", pod, "link", "set", "eth1", "mtu", "9000", "up"],
        vec!["ip", "-n", pod, "addr", "add", &addr, "dev", "eth1"],
        vec![
            "ip",
            "-n",
            pod,
            "route",
            "add",
            "10.126.0.0/16",
            "via",
            &gw,
            "dev",
            "eth1",
        ],
    ] {
        must(&step);
    }
    let mut pod_net = network::attach(&net.pod_path(), "multi").await.unwrap();
    let nics: Vec<(&str, &str, u32)> = pod_net
        .nics()
        .iter()
        .map(|n| (n.veth.as_str(), n.tap_name.as_str(), n.mtu))
        .collect();
    assert_eq!(
        nics,
        [("eth0", "tap_0_multi", MTU), ("eth1", "tap_1_multi", 9000)]
    );
    assert_eq!(pod_net.nics()[1].addresses[0].to_string(), addr);
    let f = must(&["tc", "-n", pod, "filter", "show", "dev", "eth1", "ingress"]);
    assert!(f.contains("Redirect to device tap_1_multi"), "{f}");
    let f = must(&[
        "tc",
        "-n",
        pod,
        "filter",
        "show",
        "dev",
        "tap_1_multi",
        "ingress",
    ]);
    assert!(f.contains("Redirect to device eth1"), "{f}");
    let tap = must(&["ip", "-n", pod, "link", "show", "tap_1_multi"]);
    assert!(tap.contains("mtu 9000"), "{tap}");
    assert!(
        pod_net.routes().iter().any(|r| r.device == "eth1"
            && r.gateway.map(|g| g.to_string()) == Some(gw.clone())
            && r.destination.map(|d| d.to_string()).as_deref() == Some("10.126.0.0/16")),
        "{:?}",
        pod_net.routes()
    );
    let configs = pod_net.take_device_configs();
    assert_eq!(configs.len(), 2);
    pod_net.teardown().await.unwrap();
    drop(configs);
    assert_clean(&net);
}

#[tokio::test]
async fn two_sandboxes_in_two_netns_at_once() {
    let (Some(a), Some(b)) = (
        setup("two_sandboxes_in_two_netns_at_once"),
        setup("two_sandboxes_in_two_netns_at_once"),
    ) else {
        return;
    };
    let (pa, pb) = (a.pod_path(), b.pod_path());
    let (na, nb) = tokio::join!(
        network::attach(&pa, "sandbox-a"),
        network::attach(&pb, "sandbox-b")
    );
    let (na, nb) = (na.unwrap(), nb.unwrap());
    assert_eq!(na.nics()[0].tap_name, "tap_0_sandboxa");
    assert_eq!(nb.nics()[0].tap_name, "tap_0_sandboxb");
    // Each tap is in its own netns only.
    must(&["ip", "-n", &a.pod, "link", "show", "tap_0_sandboxa"]);
    must(&["ip", "-n", &b.pod, "link", "show", "tap_0_sandboxb"]);
    run(&["ip", "-n", &a.pod, "link", "show", "tap_0_sandboxb"]).unwrap_err();
    run(&["ip", "-n", &b.pod, "link", "show", "tap_0_sandboxa"]).unwrap_err();
    assert_eq!(na.nics()[0].addresses[0].addr.to_string(), a.pod_ip_s());
    assert_eq!(nb.nics()[0].addresses[0].addr.to_string(), b.pod_ip_s());

    let (ta, tb) = tokio::join!(na.teardown(), nb.teardown());
    ta.unwrap();
    tb.unwrap();
    assert_clean(&a);
    assert_clean(&b);
}

/// A sandboxer that died (or lost its PodNetwork) leaves the veth's ingress qdisc, and taps a
/// still-running VM holds; `cleanup_leftovers` removes them.
#[tokio::test]
async fn cleanup_leftovers_after_a_lost_pod_network() {
    let Some(net) = setup("cleanup_leftovers_after_a_lost_pod_network") else {
        return;
    };
    let mut pod_net = network::attach(&net.pod_path(), "leftover-7")
        .await
        .unwrap();
    let tap_name = pod_net.nics()[0].tap_name.clone();
    let held = pod_net.take_device_configs();
    // The PodNetwork is lost without teardown; the "VM" still holds the tap.
    drop(pod_net);
    must(&["ip", "-n", &net.pod, "link", "show", &tap_name]);

    let report = network::cleanup_leftovers(&net.pod_path(), "leftover-7")
        .await
        .unwrap();
    assert_eq!(report, network::CleanupReport { taps: 1, qdiscs: 1 });
    assert_clean(&net);
    drop(held);

    // Nothing left: a second run removes nothing, and attach works again.
    let report = network::cleanup_leftovers(&net.pod_path(), "leftover-7")
        .await
        .unwrap();
    assert_eq!(report, network::CleanupReport::default());
    let again = network::attach(&net.pod_path(), "leftover-7")
        .await
        .unwrap();
    again.teardown().await.unwrap();
    assert_clean(&net);
}
