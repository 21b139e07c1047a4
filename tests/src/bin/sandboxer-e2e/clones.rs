// SPDX-License-Identifier: Apache-2.0
//! The `clones` case: two pods started from the same VM template (issue 15) are two different
//! machines. Each pod has its own network namespace (as CNI leaves it), both start right
//! after each other, and the daemon must have cloned its template for both (Status: no agent
//! ready phase, a Setup phase). A container in each then reports what must differ between
//! clones of one saved VM: the hostname, the NIC's MAC and address (the pod's, not the
//! template's), and the kernel's random numbers (the host reseeds the clone's CRNG at Setup;
//! without it both clones would print the same bytes). Both guests answer ping on their
//! address.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use proto::v2::sandbox as v2;

use super::net::{NetPlan, PodNetns, bb, retry};
use super::{Controller, Steps, end_pod, rootfs_mount, start_pod_as, wait_exit};

const PODS: [(&str, NetPlan); 2] = [
    (
        "e2e-clone-a",
        NetPlan {
            pod_ip: Ipv4Addr::new(10, 88, 1, 2),
            host_ip: Ipv4Addr::new(10, 88, 1, 1),
            host_if: "e2e-va",
        },
    ),
    (
        "e2e-clone-b",
        NetPlan {
            pod_ip: Ipv4Addr::new(10, 88, 2, 2),
            host_ip: Ipv4Addr::new(10, 88, 2, 1),
            host_if: "e2e-vb",
        },
    ),
];

/// What a container prints about its machine, one `key=value` per line.
const REPORT: &str = "echo host=$(hostname); \
    echo mac=$(cat /sys/class/net/eth0/address); \
    echo ip=$(ip -o -4 addr show dev eth0 | awk '{print $4}'); \
    echo now=$(date +%s); \
    echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')";

/// The host's clock, seconds since the Unix epoch.
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The sandbox's start phases (`start_<phase>_us` of Status info).
async fn phases(api: &mut Controller, id: &str) -> Result<BTreeMap<String, u64>> {
    let info = api
        .status(v2::ControllerStatusRequest {
            sandbox_id: id.into(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        })
        .await
        .context("Status")?
        .into_inner()
        .info;
    Ok(controller::sandbox::start_phases(&info))
}

pub(crate) async fn case_clones(
    api: &mut Controller,
    image: &Path,
    busybox: &Path,
    work: &Path,
) -> Result<()> {
    let mut steps = Steps::new("clones");
    let mut nets = Vec::new();
    for (id, plan) in PODS {
        nets.push(PodNetns::new(
            busybox,
            work.join(format!("netns/{id}")),
            plan,
        )?);
    }
    steps.done("netns");
    let mut pods = Vec::new();
    for ((id, _), net) in PODS.iter().zip(&nets) {
        let hostname = format!("{id}-host");
        let pod = start_pod_as(api, id, &hostname, &net.path.to_string_lossy(), &mut steps).await?;
        let p = phases(api, id).await?;
        println!("E2E-OUTPUT clones {id} start phases (us): {p:?}");
        ensure!(
            p.get("agent_ready") == Some(&0) && p.get("setup").is_some_and(|&us| us > 0),
            "{id} was booted, not cloned from the template: start phases {p:?}"
        );
        pods.push(pod);
    }
    steps.done("cloned");

    let mut reports = Vec::new();
    for (((id, plan), net), pod) in PODS.iter().zip(&nets).zip(&pods) {
        // Each pod's bundle and FIFO apart: the container has the same id in both.
        let dir = work.join("clones").join(id);
        std::fs::create_dir_all(&dir)?;
        let before = unix_secs();
        let out = pod
            .run_script(&dir, "report", rootfs_mount(image), REPORT)
            .await?;
        let status = wait_exit(&pod.task, "report", "").await?;
        ensure!(status == 0, "{id}: report exited {status}");
        let text = out.wait_for("random=").await?;
        let after = unix_secs();
        pod.delete("report").await?;
        for line in text.lines() {
            println!("E2E-OUTPUT clones {id}: {line}");
        }
        let kv: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let field = |k: &str| kv.get(k).copied().unwrap_or_default().to_owned();
        ensure!(
            field("host") == format!("{id}-host"),
            "{id}: hostname {:?}",
            field("host")
        );
        let mac = net.pod_mac()?;
        ensure!(
            field("mac") == mac,
            "{id}: NIC MAC {:?}, the pod's is {mac}",
            field("mac")
        );
        ensure!(
            field("ip") == format!("{}/24", plan.pod_ip),
            "{id}: address {:?}, want {}/24",
            field("ip"),
            plan.pod_ip
        );
        // The clone's clock is the template's until Setup sets it to the host's.
        let now: u64 = field("now").parse().unwrap_or(0);
        ensure!(
            (before.saturating_sub(2)..=after + 2).contains(&now),
            "{id}: the guest's clock says {now}, the host's {before}..{after}"
        );
        ensure!(
            field("random").len() == 32,
            "{id}: random {:?}",
            field("random")
        );
        reports.push((field("mac"), field("random")));
    }
    ensure!(
        reports[0].0 != reports[1].0,
        "both clones have MAC {}",
        reports[0].0
    );
    ensure!(
        reports[0].1 != reports[1].1,
        "both clones' /dev/urandom gave {}: the CRNG was not reseeded",
        reports[0].1
    );
    steps.done("differ");

    for (id, plan) in PODS {
        retry(&format!("ping {id}"), || {
            bb(
                busybox,
                &["ping", "-c", "1", "-W", "5", &plan.pod_ip.to_string()],
            )
        })
        .await?;
    }
    steps.done("ping");
    for pod in &pods {
        end_pod(api, pod, &mut steps).await?;
    }
    drop(nets);
    Ok(())
}
