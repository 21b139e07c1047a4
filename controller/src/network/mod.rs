// SPDX-License-Identifier: Apache-2.0
//! Pod networking: connects the veth links that CNI put into a pod's network namespace to the
//! guest, and plans what the guest agent must configure.
//!
//! For each veth in the netns, [`attach`] creates a tap *inside that netns* (on a dedicated
//! thread that `setns`es into it, never on a tokio worker), opens it with virtio-net headers,
//! gives it the veth's MTU, and redirects every frame both ways with an `ingress` qdisc and a
//! match-all `u32` filter whose action is `mirred egress redirect` (veth -> tap, tap -> veth).
//! The guest NIC gets the veth's MAC, so the pod keeps the identity CNI gave it; the veth's
//! addresses and the netns routes become the agent's `Control.Setup` interfaces and routes.
//!
//! The taps are not persistent: each lives while its fd is open (in [`PodNetwork`], then in
//! the VM's virtio-net device), so a crashed sandboxer leaves no tap behind; the veth's ingress
//! qdisc does stay, and [`cleanup_leftovers`] removes it after a restart.

mod netlink;
mod netns;

pub use netns::{NsId, check_pod_netns};

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use devices::virtio::net::{NetConfig, Tap, TapError};
use vmm::{DeviceConfig, NetBackendConfig};

use crate::pod::{GuestInterface, GuestIp, GuestRoute};

/// Errors setting up or tearing down a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The netns path does not exist.
    #[error("Network namespace {netns_path:?} does not exist")]
    NetnsNotFound {
        /// The path given by the engine.
        netns_path: PathBuf,
    },
    /// The path exists but is not a network namespace file.
    #[error("{netns_path:?} is not a network namespace ({reason})")]
    NotANetns {
        /// The path given by the engine.
        netns_path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The netns file could not be inspected or opened.
    #[error("Cannot open network namespace {netns_path:?}")]
    OpenNetns {
        /// The path given by the engine.
        netns_path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `setns` into the netns failed.
    #[error("Cannot enter network namespace {netns_path:?}")]
    EnterNetns {
        /// The path given by the engine.
        netns_path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The netns thread could not be started.
    #[error("Cannot start the network namespace thread")]
    SpawnThread(#[source] std::io::Error),
    /// The netns thread ended without an answer (it panicked).
    #[error("The network namespace thread died")]
    ThreadDied,
    /// The netns thread's runtime could not be built.
    #[error("Cannot build the network namespace thread's runtime")]
    Runtime(#[source] std::io::Error),
    /// The netlink socket could not be opened.
    #[error("Cannot open a netlink socket")]
    NetlinkSocket(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("Netlink request failed: {op}")]
    Netlink {
        /// What was asked, e.g. `add ingress qdisc on eth0`.
        op: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// A link lacks an attribute the plan needs.
    #[error("Link {link} has no {what}")]
    LinkAttribute {
        /// The link's name.
        link: String,
        /// The missing attribute, e.g. `MAC address`.
        what: &'static str,
    },
    /// A link index does not fit the netlink tc header.
    #[error("Link index {0} is out of range")]
    LinkIndex(u32),
    /// The tap could not be created or opened.
    #[error("Cannot create tap {name}")]
    Tap {
        /// The tap's name.
        name: String,
        /// Cause.
        #[source]
        source: TapError,
    },
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An address with its prefix length (`10.1.2.3/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix_len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One pod interface: a veth in the pod netns, its tap, and what the guest NIC gets.
#[derive(Debug)]
pub struct PodNic {
    /// The veth's name in the netns; also the guest NIC's name (the agent renames to it).
    pub veth: String,
    /// The veth's interface index in the netns.
    pub veth_index: u32,
    /// The tap's name in the netns.
    pub tap_name: String,
    /// The tap's interface index in the netns.
    pub tap_index: u32,
    /// The veth's MAC address, which the guest NIC gets.
    pub mac: MacAddr,
    /// The veth's MTU (also set on the tap).
    pub mtu: u32,
    /// The veth's addresses (IPv6 link-local ones left out: the guest makes its own).
    pub addresses: Vec<IpPrefix>,
    /// The open tap, until [`PodNetwork::take_device_configs`] hands it to the VM.
    tap: Option<Tap>,
}

/// A route of the pod netns, to be set in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination; `None` is the default route.
    pub destination: Option<IpPrefix>,
    /// Next hop; `None` for an on-link route.
    pub gateway: Option<IpAddr>,
    /// The outgoing interface (a [`PodNic::veth`] name).
    pub device: String,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Metric (priority); 0 when unset.
    pub metric: u32,
}

/// What [`attach`] set up in one pod netns: the NICs (with their open taps) and the routes.
#[derive(Debug)]
pub struct PodNetwork {
    netns_path: PathBuf,
    sandbox_id: String,
    nics: Vec<PodNic>,
    routes: Vec<PodRoute>,
}

/// Connects every veth of the pod netns at `netns_path` to a new tap and returns the plan.
///
/// Links other than veths (and `lo`) are left alone and logged. A netns without veths gives a
/// `PodNetwork` without NICs. On failure, whatever was set up is removed again; so it is when
/// the returned future is dropped before it completes (e.g. a cancelled gRPC call).
pub async fn attach(netns_path: &Path, sandbox_id: &str) -> Result<PodNetwork, NetworkError> {
    let ns = netns::NetnsFile::open(netns_path)?;
    let sid = sandbox_id.to_string();
    let (nics, routes) = ns
        .run(
            move |handle| async move { netlink::attach(handle, &sid).await },
            |handle, (nics, _routes)| async move { netlink::rollback(&handle, nics).await },
        )
        .await?;
    Ok(PodNetwork {
        netns_path: netns_path.to_path_buf(),
        sandbox_id: sandbox_id.to_string(),
        nics,
        routes,
    })
}

/// Removes what a previous sandboxer process left behind in `netns_path` for `sandbox_id`:
/// its taps (if some process still holds them) and the `ingress` qdisc of every veth whose
/// ingress filters redirect with `mirred` (the redirect filters go with the qdisc).
///
/// A netns that no longer exists has nothing left in it: that is not an error. Returns how
/// many links and qdiscs were removed.
pub async fn cleanup_leftovers(
    netns_path: &Path,
    sandbox_id: &str,
) -> Result<CleanupReport, NetworkError> {
    let ns = match netns::NetnsFile::open(netns_path) {
        Ok(ns) => ns,
        Err(NetworkError::NetnsNotFound { .. }) => return Ok(CleanupReport::default()),
        Err(e) => return Err(e),
    };
    let sid = sandbox_id.to_string();
    ns.run(
        move |handle| async move { netlink::cleanup_leftovers(handle, &sid).await },
        |_, _| async {},
    )
    .await
}

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CleanupReport {
    /// Taps deleted.
    pub taps: usize,
    /// Ingress qdiscs deleted.
    pub qdiscs: usize,
}

impl PodNetwork {
    /// The netns this network lives in.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The sandbox it was attached for.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The pod interfaces, in link-index order.
    pub fn nics(&self) -> &[PodNic] {
        &self.nics
    }

    /// The routes to set in the guest, on-link routes first (a gateway must be reachable
    /// before a route through it is added).
    pub fn routes(&self) -> &[PodRoute] {
        &self.routes
    }

    /// The guest NICs for the agent's `Control.Setup`.
    pub fn guest_interfaces(&self) -> Vec<GuestInterface> {
        self.nics
            .iter()
            .map(|nic| GuestInterface {
                mac: nic.mac.to_string(),
                new_mac: String::new(),
                name: nic.veth.clone(),
                mtu: nic.mtu,
                addresses: nic
                    .addresses
                    .iter()
                    .map(|a| GuestIp {
                        address: a.addr.to_string(),
                        prefix_len: u32::from(a.prefix_len),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The routes for the agent's `Control.Setup`.
    pub fn guest_routes(&self) -> Vec<GuestRoute> {
        self.routes
            .iter()
            .map(|r| GuestRoute {
                destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                metric: r.metric,
            })
            .collect()
    }

    /// One virtio-net [`DeviceConfig`] per NIC, in [`PodNetwork::nics`] order, carrying the
    /// open tap (already in the pod netns, so the VMM needs no netns of its own) and the
    /// veth's MAC and MTU. The taps move into the configs: a second call returns only the
    /// NICs whose tap was not taken yet.
    pub fn take_device_configs(&mut self) -> Vec<DeviceConfig> {
        self.nics
            .iter_mut()
            .filter_map(|nic| {
                let tap = nic.tap.take()?;
                Some(DeviceConfig::Net {
                    config: NetConfig {
                        mac: nic.mac.0,
                        // Above 65535 the device cannot announce it; the guest then keeps
                        // its default and the agent sets `mtu` from the plan.
                        mtu: u16::try_from(nic.mtu).ok(),
                    },
                    backend: NetBackendConfig::Custom(Box::new(tap)),
                })
            })
            .collect()
    }

    /// Removes the taps and the veths' ingress qdiscs (their redirect filters go with them).
    ///
    /// Call it once the VM has stopped (a running VM's tap would vanish under it). Taps not
    /// yet handed to a VM are closed first. A netns that is already gone (the engine removed
    /// it) has nothing left to remove.
    pub async fn teardown(mut self) -> Result<(), NetworkError> {
        for nic in &mut self.nics {
            drop(nic.tap.take());
        }
        let ns = match netns::NetnsFile::open(&self.netns_path) {
            Ok(ns) => ns,
            Err(NetworkError::NetnsNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let targets: Vec<netlink::TeardownTarget> = self
            .nics
            .iter()
            .map(|nic| netlink::TeardownTarget {
                veth: nic.veth.clone(),
                veth_index: nic.veth_index,
                tap_name: nic.tap_name.clone(),
            })
            .collect();
        ns.run(
            move |handle| async move { netlink::teardown(handle, &targets).await },
            |_, ()| async {},
        )
        .await
    }
}

/// The tap name for the `n`th NIC of a sandbox: `tap_<n>_<short id>`, at most 15 bytes (the
/// kernel's `IFNAMSIZ` less the NUL). The short id is the first alphanumeric characters of the
/// sandbox id, so [`cleanup_leftovers`] can tell this sandbox's taps.
pub fn tap_name(n: usize, sandbox_id: &str) -> String {
    const MAX: usize = 15;
    let prefix = format!("tap_{n}_");
    let room = MAX.saturating_sub(prefix.len());
    let short: String = sandbox_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(room)
        .collect();
    let short = if short.is_empty() {
        "x".to_string()
    } else {
        short
    };
    let mut name = prefix;
    name.push_str(&short);
    name.truncate(MAX);
    name
}

/// Whether `name` is a tap that [`tap_name`] makes for `sandbox_id`.
fn is_own_tap(name: &str, sandbox_id: &str) -> bool {
    let Some(rest) = name.strip_prefix("tap_") else {
        return false;
    };
    let Some((n, _)) = rest.split_once('_') else {
        return false;
    };
    n.parse::<usize>()
        .is_ok_and(|n| tap_name(n, sandbox_id) == name)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn tap_names_fit_and_are_recognised() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(tap_name(0, id), "tap_0_012345678");
        assert_eq!(tap_name(12, id), "tap_12_01234567");
        assert_eq!(tap_name(1234, id), "tap_1234_012345");
        assert_eq!(tap_name(0, "--"), "tap_0_x");
        assert_eq!(tap_name(3, "a-b_c"), "tap_3_abc");
        for n in [0, 1, 9, 10, 99, 100, 100_000] {
            let name = tap_name(n, id);
            assert!(name.len() <= 15, "{name}");
            assert!(is_own_tap(&name, id), "{name}");
            assert!(!is_own_tap(&name, "ffff"), "{name}");
        }
        assert_ne!(tap_name(0, id), tap_name(1, id));
        assert!(!is_own_tap("eth0", id));
        assert!(!is_own_tap("tap_0", id));
        assert!(!is_own_tap("tap_x_012345678", id));
    }

    #[test]
    fn mac_formats_lowercase_with_colons() {
        let mac = MacAddr([0x02, 0xAB, 0, 1, 0x10, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:00:01:10:ff");
        assert_eq!(format!("{mac:?}"), "02:ab:00:01:10:ff");
    }

    fn sample() -> PodNetwork {
        PodNetwork {
            netns_path: PathBuf::from("/run/netns/x"),
            sandbox_id: "sb".into(),
            nics: vec![PodNic {
                veth: "eth0".into(),
                veth_index: 3,
                tap_name: "tap_0_sb".into(),
                tap_index: 4,
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                mtu: 1450,
                addresses: vec![
                    IpPrefix {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                        prefix_len: 24,
                    },
                    IpPrefix {
                        addr: IpAddr::V6("fd00::2".parse::<Ipv6Addr>().unwrap()),
                        prefix_len: 64,
                    },
                ],
                tap: None,
            }],
            routes: vec![
                PodRoute {
                    destination: Some(IpPrefix {
                        addr: IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)),
                        prefix_len: 32,
                    }),
                    gateway: None,
                    device: "eth0".into(),
                    source: None,
                    metric: 0,
                },
                PodRoute {
                    destination: None,
                    gateway: Some(IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1))),
                    device: "eth0".into(),
                    source: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
                    metric: 100,
                },
            ],
        }
    }

    #[test]
    fn converts_to_agent_messages() {
        let net = sample();
        let ifs = net.guest_interfaces();
        assert_eq!(ifs.len(), 1);
        assert_eq!(ifs[0].mac, "02:00:00:00:00:01");
        assert_eq!(ifs[0].name, "eth0");
        assert_eq!(ifs[0].mtu, 1450);
        let addrs: Vec<(String, u32)> = ifs[0]
            .addresses
            .iter()
            .map(|a| (a.address.clone(), a.prefix_len))
            .collect();
        assert_eq!(
            addrs,
            [("10.0.0.2".to_string(), 24), ("fd00::2".to_string(), 64)]
        );
        let routes = net.guest_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].destination, "169.254.1.1/32");
        assert_eq!(routes[0].gateway, "");
        assert_eq!(routes[0].device, "eth0");
        assert_eq!(routes[1].destination, "");
        assert_eq!(routes[1].gateway, "169.254.1.1");
        assert_eq!(routes[1].source, "10.0.0.2");
        assert_eq!(routes[1].metric, 100);
    }

    #[test]
    fn device_configs_need_an_open_tap() {
        // Without a tap (already taken) there is nothing to give the VM.
        let mut net = sample();
        assert!(net.take_device_configs().is_empty());
    }
}
