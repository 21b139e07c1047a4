// SPDX-License-Identifier: Apache-2.0
//! The pod as the engine describes it: the CRI `PodSandboxConfig` in Create's `options`
//! (hostname, DNS, labels, resources), the VM size it asks for, and what the guest agent is told
//! to set up for it (hostname, DNS, interfaces, routes: [`GuestSetup`]).

use std::collections::BTreeMap;

use prost::Message;

use crate::cgroup::CpuLimit;
use crate::config::VmDefaults;
use crate::sandbox::{DnsConfig, PodConfig, StoredAny, VmSize};

/// Name of the CRI pod configuration message carried in Create's `options`.
const POD_SANDBOX_CONFIG: &str = "runtime.v1.PodSandboxConfig";
/// Longest hostname Linux accepts.
const HOST_NAME_MAX: usize = 64;

/// A request field of the pod that is invalid (gRPC `INVALID_ARGUMENT` at the edge).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Invalid {field}: {reason}")]
pub struct PodError {
    /// The request field, e.g. `options.hostname`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Pod annotation that keeps a pod off VM templates: `"false"` (or `off`, `no`, `0`) boots
/// its VM instead of cloning a template (its memory then shares no page with other pods).
pub const TEMPLATE_ANNOTATION: &str = "io.sandboxer.template";

/// Whether `annotations` let the pod start from a template.
pub fn template_allowed(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(TEMPLATE_ANNOTATION).is_none_or(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    })
}

/// A pod config and the pod's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// What the sandbox record keeps of the pod.
    pub config: PodConfig,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Decodes Create's `options` when it is a CRI `PodSandboxConfig`; other option types are kept
/// in the record but not read (`None`).
pub fn parse(options: &StoredAny) -> Result<Option<Pod>, PodError> {
    let name = options.type_url.rsplit('/').next().unwrap_or_default();
    if name != POD_SANDBOX_CONFIG {
        return Ok(None);
    }
    let c = proto::cri::v1::PodSandboxConfig::decode(options.value.as_slice()).map_err(|e| {
        PodError {
            field: "options",
            reason: format!("not a valid {POD_SANDBOX_CONFIG}: {e}"),
        }
    })?;
    validate_hostname(&c.hostname)?;
    let meta = c.metadata.unwrap_or_default();
    let dns = c.dns_config.unwrap_or_default();
    let linux = c.linux.unwrap_or_default();
    let res = linux.resources.unwrap_or_default();
    let config = PodConfig {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        hostname: c.hostname,
        dns: DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        },
        cpu_quota: res.cpu_quota,
        cpu_period: res.cpu_period,
        memory_limit_bytes: res.memory_limit_in_bytes,
        cpu_shares: res.cpu_shares,
        cgroup_parent: linux.cgroup_parent,
    };
    cpu_limit(Some(&config))?;
    Ok(Some(Pod {
        config,
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
    }))
}

fn validate_hostname(h: &str) -> Result<(), PodError> {
    let bad = |reason: String| PodError {
        field: "options.hostname",
        reason,
    };
    if h.len() > HOST_NAME_MAX {
        return Err(bad(format!("longer than {HOST_NAME_MAX} bytes")));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(bad(format!("contains {c:?}")));
    }
    Ok(())
}

/// The VM size for a pod: at least the default vCPUs, more if the pod's CPU limit needs them
/// (capped at `max_vcpus`); the base memory plus the pod's memory limit.
pub fn vm_size(d: &VmDefaults, pod: Option<&PodConfig>) -> Result<VmSize, PodError> {
    let mut size = VmSize {
        vcpus: d.vcpus,
        mem_mib: d.mem_mib,
    };
    let Some(pod) = pod else {
        return Ok(size);
    };
    // Negative values mean "unlimited" in CRI: treat them as unset.
    let quota = u64::try_from(pod.cpu_quota).unwrap_or(0);
    let period = u64::try_from(pod.cpu_period).unwrap_or(0);
    if quota > 0 && period > 0 {
        let want = u8::try_from(quota.div_ceil(period)).unwrap_or(u8::MAX);
        size.vcpus = size.vcpus.max(want.min(d.max_vcpus));
    }
    let limit = u64::try_from(pod.memory_limit_bytes).unwrap_or(0);
    if limit > 0 {
        let extra = u32::try_from(limit.div_ceil(1 << 20)).ok();
        size.mem_mib = extra
            .and_then(|m| size.mem_mib.checked_add(m))
            .ok_or_else(|| PodError {
                field: "options.linux.resources.memory_limit_in_bytes",
                reason: format!("{limit} is too large"),
            })?;
    }
    Ok(size)
}

/// The host CPU limit of a pod's sandbox (its cgroup's bandwidth and weight); the defaults
/// (no quota) without a pod.
pub fn cpu_limit(pod: Option<&PodConfig>) -> Result<CpuLimit, PodError> {
    let Some(pod) = pod else {
        return Ok(CpuLimit::default());
    };
    CpuLimit::from_cri(pod.cpu_quota, pod.cpu_period, pod.cpu_shares).map_err(|reason| PodError {
        field: if reason.starts_with("cpu_period") {
            "options.linux.resources.cpu_period"
        } else {
            "options.linux.resources.cpu_quota"
        },
        reason,
    })
}

/// One IP address of a guest interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestIp {
    /// IPv4 or IPv6 address, without prefix.
    pub address: String,
    /// Prefix length.
    pub prefix_len: u32,
}

/// A guest NIC the agent configures, found by its MAC address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInterface {
    /// `aa:bb:cc:dd:ee:ff`: the MAC the guest's driver has.
    pub mac: String,
    /// The MAC it gets instead (a VM cloned from a template has the template's); empty keeps it.
    pub new_mac: String,
    /// New link name (e.g. `eth0`); empty keeps it.
    pub name: String,
    /// MTU; 0 keeps it.
    pub mtu: u32,
    /// Addresses to add.
    pub addresses: Vec<GuestIp>,
}

/// A route the agent adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestRoute {
    /// CIDR; empty for the default route of the gateway's family.
    pub destination: String,
    /// Gateway; empty for an on-link route.
    pub gateway: String,
    /// Interface name (after renames).
    pub device: String,
    /// Preferred source address; empty for none.
    pub source: String,
    /// Metric.
    pub metric: u32,
}

/// What the agent is told to set up once it is ready (`Control.Setup`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestSetup {
    /// Hostname; empty leaves it.
    pub hostname: String,
    /// resolv.conf settings; all empty leaves it.
    pub dns: DnsConfig,
    /// Guest NICs (from the pod's network; empty until pod networking fills it).
    pub interfaces: Vec<GuestInterface>,
    /// Routes (from the pod's network).
    pub routes: Vec<GuestRoute>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_size_rules() {
        let d = VmDefaults::default();
        let pod = |quota, period, mem| PodConfig {
            cpu_quota: quota,
            cpu_period: period,
            memory_limit_bytes: mem,
            ..PodConfig::default()
        };
        let size = |p: &PodConfig| vm_size(&d, Some(p)).unwrap();
        assert_eq!(
            vm_size(&d, None).unwrap(),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        // Unlimited (-1) and unset (0) keep the defaults.
        assert_eq!(
            size(&pod(-1, 100_000, -1)),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        assert_eq!(
            size(&pod(50_000, 0, 0)),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        // Half a CPU rounds up to one; 1 byte rounds up to 1 MiB.
        assert_eq!(
            size(&pod(50_000, 100_000, 1)),
            VmSize {
                vcpus: 1,
                mem_mib: 257
            }
        );
        // Capped at max_vcpus, also for absurd quotas.
        assert_eq!(size(&pod(i64::MAX, 1, 0)).vcpus, d.max_vcpus);
        let e = vm_size(&d, Some(&pod(0, 0, i64::MAX))).unwrap_err();
        assert_eq!(e.field, "options.linux.resources.memory_limit_in_bytes");
    }

    #[test]
    fn hostnames() {
        validate_hostname("web-0.svc_1").unwrap();
        validate_hostname(&"h".repeat(HOST_NAME_MAX)).unwrap();
        for bad in ["bad/host", "a b", &"h".repeat(HOST_NAME_MAX + 1)] {
            assert_eq!(
                validate_hostname(bad).unwrap_err().field,
                "options.hostname"
            );
        }
    }

    #[test]
    fn the_template_annotation_opts_out() {
        let with = |v: &str| BTreeMap::from([(TEMPLATE_ANNOTATION.to_string(), v.to_string())]);
        assert!(template_allowed(&BTreeMap::new()));
        assert!(template_allowed(&with("true")));
        for off in ["false", "FALSE", "off", "no", "0", " false "] {
            assert!(!template_allowed(&with(off)), "{off:?}");
        }
    }

    #[test]
    fn other_option_types_are_not_read() {
        let other = StoredAny {
            type_url: "example.com/Other".into(),
            value: vec![1, 2, 3],
        };
        assert_eq!(parse(&other), Ok(None));
        let bad = StoredAny {
            type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
            value: vec![0xff, 0xff, 0xff],
        };
        assert_eq!(parse(&bad).unwrap_err().field, "options");
    }
}
