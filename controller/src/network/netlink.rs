// SPDX-License-Identifier: Apache-2.0
//! The netlink work done inside a pod netns (on the netns thread, see `netns.rs`): list links,
//! create the taps, add the ingress qdiscs and the `u32` match-all `mirred egress redirect`
//! filters both ways, read addresses and routes, and undo it all.

use std::net::IpAddr;
use std::pin::pin;

use nix::errno::Errno;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::{
    TcActionAttribute, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcOption,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio_stream::{Stream, StreamExt};
use tracing::{debug, info, warn};

use super::{
    CleanupReport, IpPrefix, MacAddr, NetworkError, PodNic, PodRoute, is_own_tap, tap_name,
};
use devices::virtio::net::Tap;

/// `ETH_P_ALL`: the filters match every protocol. The tc header carries it in network byte
/// order (`tcm_info` minor is a `__be16`).
const ETH_P_ALL: u16 = 0x0003;
/// `TC_H_MAKE(TC_H_INGRESS, 0)`: the parent of filters on the ingress qdisc.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// What teardown needs of one NIC.
#[derive(Debug)]
pub(super) struct TeardownTarget {
    pub(super) veth: String,
    pub(super) veth_index: u32,
    pub(super) tap_name: String,
}

/// The parts of a link the plan uses.
#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    kind: Option<InfoKind>,
    mac: Option<Vec<u8>>,
    mtu: Option<u32>,
    loopback: bool,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            mtu: None,
            loopback: msg.header.link_layer_type == LinkLayerType::Loopback
                || msg.header.flags.contains(LinkFlags::Loopback),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = Some(mac),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind);
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn netlink_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let op = op.into();
    move |source| NetworkError::Netlink { op, source }
}

/// The errno of a netlink error reply, if it is one.
fn errno(err: &rtnetlink::Error) -> Option<Errno> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => {
            msg.code.map(|c| Errno::from_raw(c.get().saturating_neg()))
        }
        _ => None,
    }
}

/// Collects a dump stream into a vector.
async fn collect<T>(
    stream: impl Stream<Item = Result<T, rtnetlink::Error>>,
    op: &str,
) -> Result<Vec<T>, NetworkError> {
    let mut stream = pin!(stream);
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        out.push(item.map_err(netlink_err(op))?);
    }
    Ok(out)
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let msgs = collect(handle.link().get().execute(), "list links").await?;
    Ok(msgs.into_iter().map(Link::from_message).collect())
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, NetworkError> {
    let stream = handle.link().get().match_name(name.to_string()).execute();
    let mut stream = pin!(stream);
    match stream.next().await {
        Some(Ok(msg)) => Ok(Some(Link::from_message(msg))),
        Some(Err(e)) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
        Some(Err(e)) => Err(NetworkError::Netlink {
            op: format!("get link {name}"),
            source: e,
        }),
        None => Ok(None),
    }
}

fn tc_index(index: u32) -> Result<i32, NetworkError> {
    i32::try_from(index).map_err(|_| NetworkError::LinkIndex(index))
}

async fn add_ingress(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(tc_index(index)?)
        .ingress()
        .execute()
        .await
        .map_err(netlink_err(format!("add ingress qdisc on {name}")))
}

/// Deletes the ingress qdisc of a link (its filters go with it). Returns whether there was one.
async fn del_ingress(handle: &Handle, index: u32, name: &str) -> Result<bool, NetworkError> {
    let mut req = handle.qdisc().del(tc_index(index)?);
    req.message_mut().header.parent = TcHandle::INGRESS;
    match req.execute().await {
        Ok(()) => Ok(true),
        // No ingress qdisc (ENOENT, or EINVAL on older kernels), or the link is gone.
        Err(e)
            if matches!(
                errno(&e),
                Some(Errno::ENOENT | Errno::EINVAL | Errno::ENODEV)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(NetworkError::Netlink {
            op: format!("delete ingress qdisc on {name}"),
            source: e,
        }),
    }
}

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0 action mirred egress
/// redirect dev <to>`.
async fn add_redirect(handle: &Handle, from: &Link, to: &Link) -> Result<(), NetworkError> {
    let op = format!("add mirred redirect {} -> {}", from.name, to.name);
    handle
        .traffic_filter(tc_index(from.index)?)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(ETH_P_ALL.to_be())
        .redirect(to.index)
        .map_err(netlink_err(op.clone()))?
        .execute()
        .await
        .map_err(netlink_err(op))
}

async fn delete_link(handle: &Handle, index: u32, name: &str) -> Result<bool, NetworkError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(false),
        Err(e) => Err(NetworkError::Netlink {
            op: format!("delete link {name}"),
            source: e,
        }),
    }
}

/// Sets up every veth of the netns; on failure removes what it set up.
pub(super) async fn attach(
    handle: Handle,
    sandbox_id: &str,
) -> Result<(Vec<PodNic>, Vec<PodRoute>), NetworkError> {
    let all = links(&handle).await?;
    let mut veths = Vec::new();
    for link in all {
        if link.loopback {
            debug!(link = %link.name, "pod netns: leaving loopback alone");
        } else if link.kind == Some(InfoKind::Veth) {
            veths.push(link);
        } else {
            info!(
                link = %link.name,
                kind = ?link.kind,
                "pod netns: skipping link, only veth links are connected to the guest"
            );
        }
    }
    if veths.is_empty() {
        warn!("pod netns has no veth: the guest gets no network interface");
    }
    veths.sort_by_key(|l| l.index);

    let mut nics: Vec<PodNic> = Vec::with_capacity(veths.len());
    for (n, veth) in veths.iter().enumerate() {
        match attach_one(&handle, n, veth, sandbox_id).await {
            Ok(nic) => nics.push(nic),
            Err(e) => {
                rollback(&handle, nics).await;
                return Err(e);
            }
        }
    }
    let plan = async {
        let addresses = collect(handle.address().get().execute(), "list addresses").await?;
        let routes = routes(&handle, &nics).await?;
        Ok::<_, NetworkError>((addresses, routes))
    }
    .await;
    let (addresses, routes) = match plan {
        Ok(plan) => plan,
        Err(e) => {
            rollback(&handle, nics).await;
            return Err(e);
        }
    };
    for addr in addresses {
        if let Some(nic) = nics.iter_mut().find(|n| n.veth_index == addr.header.index)
            && let Some(prefix) = address_prefix(&addr)
        {
            nic.addresses.push(prefix);
        }
    }
    Ok((nics, routes))
}

/// Creates, configures and connects the tap for one veth.
async fn attach_one(
    handle: &Handle,
    n: usize,
    veth: &Link,
    sandbox_id: &str,
) -> Result<PodNic, NetworkError> {
    let mac = veth
        .mac
        .as_deref()
        .and_then(|m| <[u8; 6]>::try_from(m).ok())
        .ok_or_else(|| NetworkError::LinkAttribute {
            link: veth.name.clone(),
            what: "MAC address",
        })?;
    let mtu = veth.mtu.ok_or_else(|| NetworkError::LinkAttribute {
        link: veth.name.clone(),
        what: "MTU",
    })?;
    let name = tap_name(n, sandbox_id);
    // The tap is created in this thread's netns, the pod's. It lives while the fd is open:
    // on any error below, dropping `tap` removes it.
    let tap = Tap::open(&name).map_err(|source| NetworkError::Tap {
        name: name.clone(),
        source,
    })?;
    disable_ipv6(&name);
    let tap_link =
        link_by_name(handle, &name)
            .await?
            .ok_or_else(|| NetworkError::LinkAttribute {
                link: name.clone(),
                what: "interface index (it vanished after creation)",
            })?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_link.index)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_err(format!("set {name} up with MTU {mtu}")))?;

    add_ingress(handle, veth.index, &veth.name).await?;
    let connected = async {
        add_ingress(handle, tap_link.index, &name).await?;
        add_redirect(handle, veth, &tap_link).await?;
        add_redirect(handle, &tap_link, veth).await
    }
    .await;
    if let Err(e) = connected {
        if let Err(undo) = del_ingress(handle, veth.index, &veth.name).await {
            warn!(error = %undo, "cannot undo the ingress qdisc on {}", veth.name);
        }
        return Err(e);
    }
    info!(veth = %veth.name, tap = %name, mtu, "pod netns: veth redirected to tap");
    Ok(PodNic {
        veth: veth.name.clone(),
        veth_index: veth.index,
        tap_name: name,
        tap_index: tap_link.index,
        mac: MacAddr(mac),
        mtu,
        addresses: Vec::new(),
        tap: Some(tap),
    })
}

/// Turns IPv6 off on a tap before it goes up: otherwise the pod netns gives it a link-local
/// address and sends router solicitations and MLD reports through it, straight to the guest.
/// Runs on the netns thread, where `/proc/sys/net` is the pod netns's. Best effort: without
/// IPv6 in the kernel there is nothing to turn off.
fn disable_ipv6(tap: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
    match std::fs::write(&path, b"1") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(error = %e, "cannot turn IPv6 off on {tap}"),
    }
}

/// Undoes `attach_one` for each NIC, logging what cannot be undone.
pub(super) async fn rollback(handle: &Handle, nics: Vec<PodNic>) {
    for nic in nics {
        if let Err(e) = del_ingress(handle, nic.veth_index, &nic.veth).await {
            warn!(error = %e, "cannot undo the ingress qdisc on {}", nic.veth);
        }
        // Dropping the nic closes the tap, which removes it.
    }
}

/// The address of an address message with its prefix, unless it is one the guest makes itself.
fn address_prefix(msg: &AddressMessage) -> Option<IpPrefix> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
    // links and the same as IFA_LOCAL otherwise (IPv6 sends only IFA_ADDRESS).
    let mut address = None;
    let mut local = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            _ => {}
        }
    }
    let addr = local.or(address)?;
    if let IpAddr::V6(v6) = addr
        && v6.is_unicast_link_local()
    {
        return None;
    }
    Some(IpPrefix {
        addr,
        prefix_len: msg.header.prefix_len,
    })
}

fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The main-table unicast routes through the veths, on-link routes first. Routes the kernel
/// made from addresses (`proto kernel`) are left out: the guest's kernel makes the same ones.
async fn routes(handle: &Handle, nics: &[PodNic]) -> Result<Vec<PodRoute>, NetworkError> {
    let mut msgs = collect(
        handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
            .execute(),
        "list IPv4 routes",
    )
    .await?;
    msgs.extend(
        collect(
            handle
                .route()
                .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
                .execute(),
            "list IPv6 routes",
        )
        .await?,
    );
    let mut out: Vec<PodRoute> = msgs.iter().filter_map(|msg| pod_route(msg, nics)).collect();
    // Stable: on-link routes (no gateway) first, otherwise in kernel order.
    out.sort_by_key(|r| r.gateway.is_some());
    Ok(out)
}

fn pod_route(msg: &RouteMessage, nics: &[PodNic]) -> Option<PodRoute> {
    let mut table = u32::from(msg.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut source = None;
    let mut metric = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => destination = route_address(a),
            RouteAttribute::Gateway(a) => gateway = route_address(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(a) => source = route_address(a),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::MultiPath(_) => {
                info!("pod netns: skipping a multipath route (not supported in the guest)");
                return None;
            }
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN
        || msg.header.kind != RouteType::Unicast
        || msg.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let oif = oif?;
    let Some(nic) = nics.iter().find(|n| n.veth_index == oif) else {
        debug!(
            oif,
            "pod netns: skipping a route through a link the guest does not have"
        );
        return None;
    };
    let destination = if msg.header.destination_prefix_length == 0 {
        None
    } else {
        let addr = destination.or(match msg.header.address_family {
            AddressFamily::Inet => Some(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            _ => Some(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        })?;
        Some(IpPrefix {
            addr,
            prefix_len: msg.header.destination_prefix_length,
        })
    };
    Some(PodRoute {
        destination,
        gateway,
        device: nic.veth.clone(),
        source,
        metric,
    })
}

/// Removes the taps and the veths' ingress qdiscs.
pub(super) async fn teardown(
    handle: Handle,
    targets: &[TeardownTarget],
) -> Result<(), NetworkError> {
    let mut first_err = None;
    for t in targets {
        match del_ingress(&handle, t.veth_index, &t.veth).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "teardown: cannot delete the ingress qdisc on {}", t.veth);
                first_err.get_or_insert(e);
            }
        }
        // A tap whose fd is closed is already gone; one a VM still holds is deleted here.
        let removed = match link_by_name(&handle, &t.tap_name).await {
            Ok(Some(link)) if link.kind == Some(InfoKind::Tun) => {
                delete_link(&handle, link.index, &t.tap_name).await
            }
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            warn!(error = %e, "teardown: cannot delete tap {}", t.tap_name);
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Whether a filter message carries a `mirred` action (ours are u32 + mirred).
fn has_mirred(msg: &TcMessage) -> bool {
    msg.attributes.iter().any(|attr| match attr {
        TcAttribute::Options(opts) => opts.iter().any(|opt| match opt {
            TcOption::U32(TcFilterU32Option::Action(actions)) => actions.iter().any(|a| {
                a.attributes
                    .iter()
                    .any(|aa| matches!(aa, TcActionAttribute::Kind(k) if k == "mirred"))
            }),
            _ => false,
        }),
        _ => false,
    })
}

/// Deletes this sandbox's taps and the ingress qdisc of every veth with a mirred filter.
pub(super) async fn cleanup_leftovers(
    handle: Handle,
    sandbox_id: &str,
) -> Result<CleanupReport, NetworkError> {
    let mut report = CleanupReport::default();
    for link in links(&handle).await? {
        if link.kind == Some(InfoKind::Tun) && is_own_tap(&link.name, sandbox_id) {
            if delete_link(&handle, link.index, &link.name).await? {
                info!(tap = %link.name, "removed a leftover tap");
                report.taps = report.taps.saturating_add(1);
            }
        } else if link.kind == Some(InfoKind::Veth) {
            let filters = collect(
                handle
                    .traffic_filter(tc_index(link.index)?)
                    .get()
                    .ingress()
                    .execute(),
                &format!("list ingress filters of {}", link.name),
            )
            .await;
            let filters = match filters {
                Ok(f) => f,
                // No ingress qdisc: nothing to list.
                Err(NetworkError::Netlink { source, .. })
                    if matches!(errno(&source), Some(Errno::EINVAL | Errno::ENOENT)) =>
                {
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            if filters.iter().any(has_mirred)
                && del_ingress(&handle, link.index, &link.name).await?
            {
                info!(veth = %link.name, "removed a leftover ingress qdisc");
                report.qdiscs = report.qdiscs.saturating_add(1);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rtnetlink::packet_route::route::{RouteHeader, RouteScope};

    use super::*;

    fn nic(index: u32, name: &str) -> PodNic {
        PodNic {
            veth: name.into(),
            veth_index: index,
            tap_name: String::new(),
            tap_index: 0,
            mac: MacAddr([0; 6]),
            mtu: 1500,
            addresses: Vec::new(),
            tap: None,
        }
    }

    fn route(
        dst: Option<(IpAddr, u8)>,
        gw: Option<IpAddr>,
        oif: u32,
        proto: RouteProtocol,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = proto;
        msg.header.scope = RouteScope::Universe;
        msg.header.address_family = AddressFamily::Inet;
        if let Some((addr, len)) = dst {
            msg.header.destination_prefix_length = len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        }
        if let Some(gw) = gw {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        msg
    }

    #[test]
    fn routes_are_filtered_and_converted() {
        let nics = [nic(5, "eth0")];
        let gw = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));
        let default = route(None, Some(gw), 5, RouteProtocol::Boot);
        let r = pod_route(&default, &nics).unwrap();
        assert_eq!(r.destination, None);
        assert_eq!(r.gateway, Some(gw));
        assert_eq!(r.device, "eth0");

        let onlink = route(Some((gw, 32)), None, 5, RouteProtocol::Static);
        let r = pod_route(&onlink, &nics).unwrap();
        assert_eq!(r.destination.unwrap().to_string(), "169.254.1.1/32");
        assert_eq!(r.gateway, None);

        // Kernel-made subnet routes, other links and other tables are not the guest's.
        let kernel = route(
            Some((IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 24)),
            None,
            5,
            RouteProtocol::Kernel,
        );
        assert_eq!(pod_route(&kernel, &nics), None);
        assert_eq!(
            pod_route(&route(None, Some(gw), 9, RouteProtocol::Boot), &nics),
            None
        );
        let mut other_table = default.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        assert_eq!(pod_route(&other_table, &nics), None);
        let mut local = default;
        local.header.kind = RouteType::Local;
        assert_eq!(pod_route(&local, &nics), None);
    }

    #[test]
    fn addresses_skip_ipv6_link_local() {
        let mut msg = AddressMessage::default();
        msg.header.prefix_len = 64;
        msg.attributes.push(AddressAttribute::Address(IpAddr::V6(
            "fe80::1".parse::<Ipv6Addr>().unwrap(),
        )));
        assert_eq!(address_prefix(&msg), None);
        let mut msg = AddressMessage::default();
        msg.header.prefix_len = 24;
        // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(
                10, 0, 0, 1,
            ))));
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                10, 0, 0, 2,
            ))));
        assert_eq!(address_prefix(&msg).unwrap().to_string(), "10.0.0.2/24");
    }
}
