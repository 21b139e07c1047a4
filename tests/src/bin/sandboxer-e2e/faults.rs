// SPDX-License-Identifier: Apache-2.0
//! The `faults` case (issue 21): what one Linux guest does stays in its sandbox. Two pods run
//! side by side. In `e2e-flood` a container writes to its stdout as fast as it can while
//! nobody reads the FIFO: the daemon's memory stays bounded (the stdio window holds the guest
//! back) and the pod keeps answering. Then that pod's guest kernel panics (a container writes
//! `c` to `/proc/sysrq-trigger`): its sandbox ends, Wait returns, and `e2e-calm` goes on
//! running containers as if nothing happened.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use proto::v2::sandbox as v2;

use super::{
    Controller, Steps, WAIT_TIMEOUT, end_pod, rootfs_mount, start_pod_as, wait_exit, write_bundle,
};

/// How much the daemon's resident memory may grow while a guest floods a FIFO nobody reads.
const FLOOD_RSS_BOUND_KIB: u64 = 16 * 1024;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

pub(crate) async fn case_faults(
    api: &mut Controller,
    image: &Path,
    work: &Path,
    daemon_pid: u32,
) -> Result<()> {
    let mut steps = Steps::new("faults");
    let dir = work.join("faults");
    fs::create_dir_all(&dir)?;
    let flood = start_pod_as(api, "e2e-flood", "e2e-flood", "", &mut steps).await?;
    let calm = start_pod_as(api, "e2e-calm", "e2e-calm", "", &mut steps).await?;

    // A FIFO nobody reads: the host bridge opens it (read-write, as containerd's shim does),
    // the pipe fills, and from then on the guest may only send what the window allows.
    let fifo = dir.join("flood.out");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .with_context(|| format!("mkfifo {}", fifo.display()))?;
    let fifo = fifo.to_string_lossy().into_owned();
    let bundle = dir.join("flood");
    write_bundle(&bundle, &["/bin/sh", "-c", "cat /dev/zero"])?;
    flood
        .create("flood", &bundle, rootfs_mount(image), ["", &fifo, &fifo])
        .await?;
    flood.start("flood", "").await?;
    steps.done("flood-start");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kib(daemon_pid)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = rss_kib(daemon_pid)?;
    println!("E2E-OUTPUT faults daemon RSS while flooding: {before} KiB, 10 s later {after} KiB");
    ensure!(
        after <= before + FLOOD_RSS_BOUND_KIB,
        "the daemon grew from {before} KiB to {after} KiB while a guest flooded a FIFO nobody reads"
    );
    let state = super::task_state(&flood.task, "flood").await?;
    ensure!(
        state == super::Status::RUNNING,
        "the flooding container is {state:?}, not running"
    );
    steps.done("flood-bounded");

    // The guest kernel panics; /proc/sysrq-trigger is read-only in a container by default,
    // so this one is given it.
    let bundle = dir.join("panic");
    write_bundle(
        &bundle,
        &["/bin/sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"],
    )?;
    let config = bundle.join("config.json");
    let mut spec = oci_spec::runtime::Spec::load(&config)?;
    if let Some(linux) = spec.linux_mut() {
        linux.set_readonly_paths(None);
    }
    spec.save(&config)?;
    flood
        .create("panic", &bundle, rootfs_mount(image), ["", "", ""])
        .await?;
    flood.start("panic", "").await?;
    steps.done("panic-start");
    let waited = tokio::time::timeout(
        WAIT_TIMEOUT,
        api.wait(v2::ControllerWaitRequest {
            sandbox_id: "e2e-flood".into(),
            sandboxer: "sandboxer".into(),
        }),
    )
    .await
    .context("Wait did not return after the guest kernel panicked")?
    .context("Wait")?
    .into_inner();
    println!(
        "E2E-OUTPUT faults e2e-flood ended after its kernel panicked: exit status {}",
        waited.exit_status
    );
    ensure!(waited.exited_at.is_some(), "Wait: no exit time");
    // 255: the sandbox failed (its guest reset with nobody asking), not a clean exit.
    ensure!(
        waited.exit_status == 255,
        "exit status {} after a kernel panic, want 255",
        waited.exit_status
    );
    steps.done("panic-ended");

    // The other pod is untouched.
    let out = calm
        .run_script(&dir, "calm", rootfs_mount(image), "echo calm-and-well")
        .await?;
    ensure!(wait_exit(&calm.task, "calm", "").await? == 0, "calm: exit");
    out.wait_for("calm-and-well").await?;
    calm.delete("calm").await?;
    steps.done("calm-runs");

    api.shutdown(v2::ControllerShutdownRequest {
        sandbox_id: "e2e-flood".into(),
        sandboxer: "sandboxer".into(),
    })
    .await
    .context("Shutdown e2e-flood")?;
    steps.done("flood-shutdown");
    end_pod(api, &calm, &mut steps).await
}
