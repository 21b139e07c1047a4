// SPDX-License-Identifier: Apache-2.0
//! Network part of Setup: interfaces found by MAC (rename, MTU, up, addresses) and routes,
//! over rtnetlink.
//!
//! The request is checked first into a [`NetPlan`] ([`NetPlan::new`]: addresses, prefixes,
//! families, names), so a malformed request changes nothing. Applying is idempotent:
//! addresses and routes are added with `NLM_F_REPLACE`, a link that already has the wanted
//! name or MTU is left alone, so a repeated Setup with the same request succeeds.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proto::agent::control::{Interface, Route};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio_stream::StreamExt;

use super::error::{ControlError, chain};

/// Longest interface name (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

/// One checked interface of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    /// Position in the request (for error messages).
    pub index: usize,
    /// The link's MAC address.
    pub mac: [u8; 6],
    /// The MAC it gets, if it changes (a VM cloned from a template).
    pub new_mac: Option<[u8; 6]>,
    /// New name, if any.
    pub name: Option<String>,
    /// MTU, if any.
    pub mtu: Option<u32>,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// One checked route of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Position in the request (for error messages).
    pub index: usize,
    /// Destination network and prefix length (0 for a default route).
    pub destination: (IpAddr, u8),
    /// Next hop; `None` for an on-link route.
    pub gateway: Option<IpAddr>,
    /// Output interface name.
    pub device: Option<String>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Route priority (0 = kernel default).
    pub metric: u32,
}

/// The checked network part of a Setup request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// Interfaces, in request order.
    pub interfaces: Vec<InterfacePlan>,
    /// Routes, in request order (after the interfaces).
    pub routes: Vec<RoutePlan>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks an interface name: 1..=15 bytes of printable ASCII, no `/`, `:` or spaces, not
/// `.` or `..` (what the kernel's `dev_valid_name` accepts, minus `:`).
pub fn check_ifname(field: &str, name: &str) -> Result<(), ControlError> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(ControlError::invalid(
            field,
            format!("{name:?} must be 1 to {IFNAME_MAX} bytes"),
        ));
    }
    if name == "." || name == ".." {
        return Err(ControlError::invalid(
            field,
            format!("{name:?} is reserved"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | ':'))
    {
        return Err(ControlError::invalid(
            field,
            format!("{name:?} contains {c:?}"),
        ));
    }
    Ok(())
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, ControlError> {
    s.parse()
        .map_err(|_| ControlError::invalid(field, format!("{s:?} is not an IP address")))
}

fn check_prefix(field: &str, ip: IpAddr, prefix_len: u32) -> Result<u8, ControlError> {
    u8::try_from(prefix_len)
        .ok()
        .filter(|p| *p <= max_prefix(ip))
        .ok_or_else(|| {
            ControlError::invalid(
                field,
                format!(
                    "{prefix_len} is longer than {} bits of {ip}",
                    max_prefix(ip)
                ),
            )
        })
}

/// Whether `ip` has no bits set beyond its first `prefix_len` bits.
fn is_network(ip: IpAddr, prefix_len: u8) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let host_bits = 32 - u32::from(prefix_len.min(32));
            host_bits == 0 || u32::from(v4) & (u32::MAX >> (32 - host_bits)) == 0
        }
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(prefix_len.min(128));
            host_bits == 0 || u128::from(v6) & (u128::MAX >> (128 - host_bits)) == 0
        }
    }
}

/// Parses a route destination: a CIDR (`10.0.0.0/8`) or a single address (host route).
fn parse_cidr(field: &str, s: &str) -> Result<(IpAddr, u8), ControlError> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip = parse_ip(field, addr)?;
    let prefix = match prefix {
        None => max_prefix(ip),
        Some(p) => {
            let n: u32 = p.parse().map_err(|_| {
                ControlError::invalid(field, format!("{s:?}: prefix {p:?} is not a number"))
            })?;
            check_prefix(field, ip, n)?
        }
    };
    if !is_network(ip, prefix) {
        return Err(ControlError::invalid(
            field,
            format!("{s:?} has host bits set beyond the prefix"),
        ));
    }
    Ok((ip, prefix))
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

impl NetPlan {
    /// Checks the interfaces and routes of a Setup request.
    pub fn new(interfaces: &[Interface], routes: &[Route]) -> Result<Self, ControlError> {
        let mut plan = Self::default();
        let mut macs = HashSet::new();
        let mut new_macs = HashSet::new();
        let mut names = HashSet::new();
        for (i, iface) in interfaces.iter().enumerate() {
            let f = |name: &str| format!("interfaces[{i}].{name}");
            let mac = parse_mac(&iface.mac).ok_or_else(|| {
                ControlError::invalid(
                    f("mac"),
                    format!("{:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", iface.mac),
                )
            })?;
            if !macs.insert(mac) {
                return Err(ControlError::invalid(
                    f("mac"),
                    format!("{} is given twice", format_mac(&mac)),
                ));
            }
            let new_mac = if iface.new_mac.is_empty() {
                None
            } else {
                let new = parse_mac(&iface.new_mac).ok_or_else(|| {
                    ControlError::invalid(
                        f("new_mac"),
                        format!(
                            "{:?} is not a MAC address (aa:bb:cc:dd:ee:ff)",
                            iface.new_mac
                        ),
                    )
                })?;
                if new.first().is_some_and(|b| b & 1 != 0) {
                    return Err(ControlError::invalid(
                        f("new_mac"),
                        format!("{} is a multicast address", format_mac(&new)),
                    ));
                }
                if !new_macs.insert(new) {
                    return Err(ControlError::invalid(
                        f("new_mac"),
                        format!("{} is given twice", format_mac(&new)),
                    ));
                }
                Some(new)
            };
            let name = if iface.name.is_empty() {
                None
            } else {
                check_ifname(&f("name"), &iface.name)?;
                if !names.insert(iface.name.clone()) {
                    return Err(ControlError::invalid(
                        f("name"),
                        format!("{:?} is given twice", iface.name),
                    ));
                }
                Some(iface.name.clone())
            };
            let mut addresses = Vec::with_capacity(iface.addresses.len());
            for (j, a) in iface.addresses.iter().enumerate() {
                let field = format!("interfaces[{i}].addresses[{j}]");
                let ip = parse_ip(&format!("{field}.address"), &a.address)?;
                let prefix = check_prefix(&format!("{field}.prefix_len"), ip, a.prefix_len)?;
                addresses.push((ip, prefix));
            }
            plan.interfaces.push(InterfacePlan {
                index: i,
                mac,
                new_mac,
                name,
                mtu: (iface.mtu != 0).then_some(iface.mtu),
                addresses,
            });
        }
        for (i, r) in routes.iter().enumerate() {
            plan.routes.push(Self::route(i, r)?);
        }
        Ok(plan)
    }

    fn route(i: usize, r: &Route) -> Result<RoutePlan, ControlError> {
        let f = |name: &str| format!("routes[{i}].{name}");
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(parse_ip(&f("gateway"), &r.gateway)?)
        };
        let destination = if r.destination.is_empty() {
            let gw = gateway.ok_or_else(|| {
                ControlError::invalid(
                    f("destination"),
                    "empty (the default route) needs a gateway to tell its family; \
                     give 0.0.0.0/0 or ::/0 for an on-link default route",
                )
            })?;
            (unspecified_like(gw), 0)
        } else {
            parse_cidr(&f("destination"), &r.destination)?
        };
        if let Some(gw) = gateway.filter(|gw| !same_family(*gw, destination.0)) {
            return Err(ControlError::invalid(
                f("gateway"),
                format!(
                    "{gw} is not of the destination's family ({})",
                    destination.0
                ),
            ));
        }
        let source = if r.source.is_empty() {
            None
        } else {
            let s = parse_ip(&f("source"), &r.source)?;
            if !same_family(s, destination.0) {
                return Err(ControlError::invalid(
                    f("source"),
                    format!("{s} is not of the destination's family ({})", destination.0),
                ));
            }
            Some(s)
        };
        let device = if r.device.is_empty() {
            None
        } else {
            check_ifname(&f("device"), &r.device)?;
            Some(r.device.clone())
        };
        if gateway.is_none() && device.is_none() {
            return Err(ControlError::invalid(
                f("device"),
                "an on-link route (no gateway) needs a device",
            ));
        }
        Ok(RoutePlan {
            index: i,
            destination,
            gateway,
            device,
            source,
            metric: r.metric,
        })
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.routes.is_empty()
    }
}

/// A netlink failure about `field`, coded by its errno.
fn nl_error(field: &str, what: &str, e: &rtnetlink::Error) -> ControlError {
    match e {
        rtnetlink::Error::NetlinkError(m) => ControlError::from_io(field, what, &m.to_io()),
        other => ControlError::Internal(format!("{field}: {what}: {}", chain(other))),
    }
}

/// A link as seen in a dump.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: Option<u32>,
    up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Self {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(mac) => link.mac.clone_from(mac),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                _ => {}
            }
        }
        link
    }
}

async fn links(handle: &Handle) -> Result<Vec<Link>, ControlError> {
    let mut stream = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| nl_error("interfaces", "list links", &e))?;
        out.push(Link::from_message(&m));
    }
    Ok(out)
}

async fn set_link(
    handle: &Handle,
    field: &str,
    what: &str,
    m: LinkMessage,
) -> Result<(), ControlError> {
    handle
        .link()
        .set(m)
        .execute()
        .await
        .map_err(|e| nl_error(field, what, &e))
}

/// Brings `lo` up: every guest needs it, and it costs one message when it is up already.
async fn loopback_up(handle: &Handle) -> Result<(), ControlError> {
    let all = links(handle).await?;
    match all.iter().find(|l| l.name == "lo") {
        Some(lo) if !lo.up => {
            set_link(
                handle,
                "interfaces",
                "set lo up",
                LinkUnspec::new_with_index(lo.index).up().build(),
            )
            .await
        }
        _ => Ok(()),
    }
}

async fn apply_interface(handle: &Handle, plan: &InterfacePlan) -> Result<(), ControlError> {
    let f = |name: &str| format!("interfaces[{}].{name}", plan.index);
    let all = links(handle).await?;
    let link = all
        .iter()
        .find(|l| l.mac == plan.mac)
        .ok_or_else(|| {
            ControlError::not_found(
                f("mac"),
                format!("no link with MAC {}", format_mac(&plan.mac)),
            )
        })?
        .clone();
    let mut up = link.up;
    if let Some(new_mac) = plan.new_mac.filter(|m| link.mac != m.as_slice()) {
        if up {
            // Without VIRTIO_NET_F_CTRL_MAC_ADDR virtio-net changes its MAC only while down.
            set_link(
                handle,
                &f("new_mac"),
                "set the link down to change its MAC",
                LinkUnspec::new_with_index(link.index).down().build(),
            )
            .await?;
            up = false;
        }
        set_link(
            handle,
            &f("new_mac"),
            &format!(
                "change the MAC from {} to {}",
                format_mac(&plan.mac),
                format_mac(&new_mac)
            ),
            LinkUnspec::new_with_index(link.index)
                .address(new_mac.to_vec())
                .build(),
        )
        .await?;
    }
    if let Some(name) = plan.name.as_ref().filter(|n| **n != link.name) {
        if all.iter().any(|l| l.name == *name) {
            return Err(ControlError::AlreadyExists {
                field: f("name"),
                reason: format!(
                    "another link is named {name:?} (renaming {} {:?})",
                    format_mac(&plan.mac),
                    link.name
                ),
            });
        }
        if up {
            // The kernel renames only links that are down.
            set_link(
                handle,
                &f("name"),
                "set the link down to rename it",
                LinkUnspec::new_with_index(link.index).down().build(),
            )
            .await?;
            up = false;
        }
        set_link(
            handle,
            &f("name"),
            &format!("rename {:?} to {name:?}", link.name),
            LinkUnspec::new_with_index(link.index)
                .name(name.clone())
                .build(),
        )
        .await?;
    }
    if let Some(mtu) = plan.mtu.filter(|m| Some(*m) != link.mtu) {
        set_link(
            handle,
            &f("mtu"),
            &format!("set MTU {mtu}"),
            LinkUnspec::new_with_index(link.index).mtu(mtu).build(),
        )
        .await?;
    }
    if !up {
        set_link(
            handle,
            &f("mac"),
            "set the link up",
            LinkUnspec::new_with_index(link.index).up().build(),
        )
        .await?;
    }
    for (j, (ip, prefix)) in plan.addresses.iter().enumerate() {
        handle
            .address()
            .add(link.index, *ip, *prefix)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                nl_error(
                    &f(&format!("addresses[{j}]")),
                    &format!("add {ip}/{prefix}"),
                    &e,
                )
            })?;
    }
    Ok(())
}

async fn apply_route(handle: &Handle, plan: &RoutePlan) -> Result<(), ControlError> {
    let f = |name: &str| format!("routes[{}].{name}", plan.index);
    let invalid =
        |name: &str, e: &dyn std::fmt::Display| ControlError::invalid(f(name), e.to_string());
    let (dst, prefix) = plan.destination;
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .map_err(|e| invalid("destination", &e))?;
    if let Some(gw) = plan.gateway {
        b = b.gateway(gw).map_err(|e| invalid("gateway", &e))?;
    } else {
        b = b.scope(RouteScope::Link);
    }
    if let Some(src) = plan.source {
        b = b.pref_source(src).map_err(|e| invalid("source", &e))?;
    }
    if let Some(dev) = &plan.device {
        let all = links(handle).await?;
        let link = all.iter().find(|l| l.name == *dev).ok_or_else(|| {
            ControlError::not_found(f("device"), format!("no link named {dev:?}"))
        })?;
        b = b.output_interface(link.index);
    }
    if plan.metric != 0 {
        b = b.priority(plan.metric);
    }
    let what = match plan.gateway {
        Some(gw) => format!("add route {dst}/{prefix} via {gw}"),
        None => format!("add route {dst}/{prefix}"),
    };
    handle
        .route()
        .add(b.build())
        .replace()
        .execute()
        .await
        .map_err(|e| nl_error(&f("destination"), &what, &e))
}

/// Applies `plan`: `lo` up, then the interfaces, then the routes (their devices may be
/// renamed interfaces).
pub async fn apply(plan: &NetPlan) -> Result<(), ControlError> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| ControlError::internal("Failed to open a netlink socket", &e))?;
    let conn = tokio::spawn(connection);
    let result = async {
        loopback_up(&handle).await?;
        for iface in &plan.interfaces {
            apply_interface(&handle, iface).await?;
        }
        for route in &plan.routes {
            apply_route(&handle, route).await?;
        }
        Ok(())
    }
    .await;
    drop(handle);
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use proto::agent::control::IpAddress;

    use super::*;

    fn iface(mac: &str, name: &str, addrs: &[(&str, u32)]) -> Interface {
        let mut i = Interface::new();
        i.mac = mac.into();
        i.name = name.into();
        i.addresses = addrs
            .iter()
            .map(|(a, p)| {
                let mut ip = IpAddress::new();
                ip.address = (*a).into();
                ip.prefix_len = *p;
                ip
            })
            .collect();
        i
    }

    fn route(dst: &str, gw: &str, dev: &str) -> Route {
        let mut r = Route::new();
        r.destination = dst.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    fn err(ifaces: &[Interface], routes: &[Route]) -> String {
        NetPlan::new(ifaces, routes).unwrap_err().to_string()
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:AB:cd:00:11:ff"),
            Some([2, 0xab, 0xcd, 0, 0x11, 0xff])
        );
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "2:ab:cd:00:11:ff",
            "zz:ab:cd:00:11:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
    }

    #[test]
    fn networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_network(ip("10.0.0.0"), 8));
        assert!(!is_network(ip("10.0.0.1"), 8));
        assert!(is_network(ip("10.0.0.1"), 32));
        assert!(is_network(ip("0.0.0.0"), 0));
        assert!(!is_network(ip("1.0.0.0"), 0));
        assert!(is_network(ip("fd00::"), 8));
        assert!(!is_network(ip("fd00::1"), 64));
        assert!(is_network(ip("fd00::1"), 128));
        assert!(is_network(ip("::"), 0));
    }

    #[test]
    fn good_plan() {
        let plan = NetPlan::new(
            &[iface(
                "02:00:00:00:00:01",
                "eth0",
                &[("10.1.0.2", 24), ("fd00::2", 64)],
            )],
            &[
                route("", "10.1.0.1", ""),
                route("10.9.0.0/16", "", "eth0"),
                route("fd01::/64", "fd00::1", "eth0"),
                route("0.0.0.0/0", "", "eth0"),
                route("192.168.7.7", "10.1.0.1", ""),
            ],
        )
        .unwrap();
        assert_eq!(plan.interfaces[0].mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            plan.interfaces[0].addresses[1],
            ("fd00::2".parse().unwrap(), 64)
        );
        assert_eq!(plan.routes[0].destination, ("0.0.0.0".parse().unwrap(), 0));
        assert_eq!(plan.routes[1].gateway, None);
        assert_eq!(
            plan.routes[4].destination,
            ("192.168.7.7".parse().unwrap(), 32)
        );
    }

    #[test]
    fn a_new_mac_is_checked_and_planned() {
        let mut i = iface("02:00:00:00:00:01", "eth0", &[]);
        i.new_mac = "02:aa:00:00:00:07".into();
        let plan = NetPlan::new(&[i.clone()], &[]).unwrap();
        assert_eq!(plan.interfaces[0].new_mac, Some([2, 0xaa, 0, 0, 0, 7]));
        i.new_mac = "03:aa:00:00:00:07".into();
        assert!(
            err(&[i.clone()], &[])
                .starts_with("interfaces[0].new_mac: 03:aa:00:00:00:07 is a multicast")
        );
        i.new_mac = "nope".into();
        assert!(err(&[i.clone()], &[]).starts_with("interfaces[0].new_mac: "));
        let mut j = iface("02:00:00:00:00:02", "", &[]);
        i.new_mac = "02:aa:00:00:00:07".into();
        j.new_mac = "02:aa:00:00:00:07".into();
        assert!(
            err(&[i, j], &[])
                .starts_with("interfaces[1].new_mac: 02:aa:00:00:00:07 is given twice")
        );
    }

    #[test]
    fn bad_plans_name_the_field() {
        let m = "02:00:00:00:00:01";
        assert!(err(&[iface("02:00", "", &[])], &[]).starts_with("interfaces[0].mac: "));
        assert!(
            err(&[iface(m, "", &[]), iface(m, "", &[])], &[])
                .starts_with("interfaces[1].mac: 02:00:00:00:00:01 is given twice")
        );
        assert!(err(&[iface(m, "a/b", &[])], &[]).starts_with("interfaces[0].name: "));
        assert!(err(&[iface(m, "sixteen-chars-xx", &[])], &[]).starts_with("interfaces[0].name: "));
        assert!(
            err(&[iface(m, "", &[("10.0.0.1", 8), ("10.0.0.300", 8)])], &[])
                .starts_with("interfaces[0].addresses[1].address: ")
        );
        assert!(
            err(&[iface(m, "", &[("10.0.0.1", 33)])], &[])
                .starts_with("interfaces[0].addresses[0].prefix_len: 33 is longer")
        );
        assert!(err(&[], &[route("", "", "eth0")]).starts_with("routes[0].destination: "));
        assert!(err(&[], &[route("10.0.0.1/8", "", "eth0")]).contains("host bits"));
        assert!(
            err(&[], &[route("10.0.0.0/x", "", "eth0")]).starts_with("routes[0].destination: ")
        );
        assert!(err(&[], &[route("10.0.0.0/8", "fd00::1", "")]).starts_with("routes[0].gateway: "));
        assert!(err(&[], &[route("10.0.0.0/8", "", "")]).starts_with("routes[0].device: "));
        let mut r = route("10.0.0.0/8", "10.1.0.1", "");
        r.source = "fd00::1".into();
        assert!(
            err(&[], &[route("1.0.0.0/8", "1.0.0.1", ""), r]).starts_with("routes[1].source: ")
        );
    }
}
