// SPDX-License-Identifier: Apache-2.0
//! The `agent-faults` case (issue 21): a container turns on its guest's agent, and the host
//! copes. In pod `e2e-signalled` a container runs in the guest's root PID namespace (it sees the
//! agent as PID 1) with `CAP_KILL`: it sends the agent `SIGKILL`, `SIGSTOP` and `SIGSEGV`. The
//! agent is the guest's init, and the kernel drops signals init has no handler for, so the pod
//! keeps serving (an init that did die would panic the kernel: the `faults` case covers that
//! end). Then `SIGTERM`, which the agent takes as the guest's own shutdown: the VM ends without
//! the host asking, Wait reports the sandbox failed (status 255), and pod `e2e-bystander` runs a
//! container as if nothing happened.
//!
//! A guest whose agent answers nothing at all (frozen through cgroup v2 by a container) was
//! tried here too: the emulated host's L1 then stops taking interrupts (a pending LAPIC timer
//! interrupt with IF=1 that is never delivered, in every run), which says nothing about the
//! sandboxer.
//!
//! The `ignore-shutdown` case: Linux guests whose agent answers Control.Shutdown and does
//! nothing (`sandboxer.test_ignore_shutdown=1` on a daemon of its own). Stop must end such a
//! pod itself once the grace time is up, Wait and Status must say so, and a pod beside it keeps
//! running.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use oci_spec::runtime::{Capabilities, Capability, LinuxNamespaceType, Spec};
use proto::v2::sandbox as v2;

use super::{
    Args, Controller, Daemon, OutFifo, Pod, Steps, WAIT_TIMEOUT, end_pod, rootfs_mount,
    start_pod_as, wait_exit, write_bundle,
};

/// A bundle for `sh -c script` that shares the guest's PID namespace, with `CAP_KILL`.
fn write_guest_admin_bundle(dir: &Path, script: &str) -> Result<()> {
    write_bundle(dir, &["/bin/sh", "-c", script])?;
    let config = dir.join("config.json");
    let mut spec = Spec::load(&config)?;
    if let Some(linux) = spec.linux_mut()
        && let Some(ns) = linux.namespaces_mut()
    {
        ns.retain(|n| {
            !matches!(
                n.typ(),
                LinuxNamespaceType::Pid | LinuxNamespaceType::Cgroup
            )
        });
    }
    if let Some(process) = spec.process_mut()
        && let Some(mut caps) = process.capabilities().clone()
    {
        let with = |set: &Option<Capabilities>| {
            let mut set = set.clone().unwrap_or_default();
            set.insert(Capability::Kill);
            Some(set)
        };
        caps.set_bounding(with(caps.bounding()));
        caps.set_effective(with(caps.effective()));
        caps.set_permitted(with(caps.permitted()));
        process.set_capabilities(Some(caps));
    }
    spec.save(&config)?;
    Ok(())
}

/// Creates and starts container `id` from a [`write_guest_admin_bundle`] bundle; returns its
/// output.
async fn run_as_guest_admin(
    pod: &Pod,
    dir: &Path,
    id: &str,
    image: &Path,
    script: &str,
) -> Result<OutFifo> {
    let bundle = dir.join(id);
    write_guest_admin_bundle(&bundle, script)?;
    let out = OutFifo::new(dir, &format!("{id}.out"))?;
    pod.create(
        id,
        &bundle,
        rootfs_mount(image),
        ["", &out.path(), &out.path()],
    )
    .await?;
    pod.start(id, "").await?;
    Ok(out)
}

async fn wait_sandbox(api: &mut Controller, id: &str) -> Result<v2::ControllerWaitResponse> {
    Ok(tokio::time::timeout(
        WAIT_TIMEOUT,
        api.wait(v2::ControllerWaitRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
        }),
    )
    .await
    .with_context(|| format!("Wait {id} did not return"))?
    .with_context(|| format!("Wait {id}"))?
    .into_inner())
}

async fn shutdown(api: &mut Controller, id: &str) -> Result<()> {
    api.shutdown(v2::ControllerShutdownRequest {
        sandbox_id: id.into(),
        sandboxer: "sandboxer".into(),
    })
    .await
    .with_context(|| format!("Shutdown {id}"))?;
    Ok(())
}

pub(crate) async fn case_agent_faults(
    api: &mut Controller,
    image: &Path,
    work: &Path,
) -> Result<()> {
    let mut steps = Steps::new("agent-faults");
    let dir = work.join("agent-faults");
    fs::create_dir_all(&dir)?;
    let signalled = start_pod_as(api, "e2e-signalled", "e2e-signalled", "", &mut steps).await?;
    let bystander = start_pod_as(api, "e2e-bystander", "e2e-bystander", "", &mut steps).await?;

    // Signals init has no handler for are dropped by the kernel: the agent lives on.
    let out = run_as_guest_admin(
        &signalled,
        &dir,
        "killer",
        image,
        "echo init-is-$(cat /proc/1/comm); kill -KILL 1; kill -STOP 1; kill -SEGV 1; \
         sleep 1; grep -q '^State:.*[RS]' /proc/1/status && echo init-survived",
    )
    .await?;
    let text = out.wait_for("init-survived").await?;
    println!("E2E-OUTPUT agent-faults {}", text.replace('\n', " "));
    // Its output may arrive before its exit is known: Delete needs it stopped.
    wait_exit(&signalled.task, "killer", "").await?;
    signalled.delete("killer").await?;
    let out = signalled
        .run_script(
            &dir,
            "after-signals",
            rootfs_mount(image),
            "echo still-serving",
        )
        .await?;
    out.wait_for("still-serving").await?;
    wait_exit(&signalled.task, "after-signals", "").await?;
    signalled.delete("after-signals").await?;
    steps.done("init-ignores-fatal-signals");

    // SIGTERM is the guest's own shutdown: the sandbox ends with nobody asking.
    run_as_guest_admin(
        &signalled,
        &dir,
        "terminator",
        image,
        "kill -TERM 1; sleep 60",
    )
    .await?;
    let waited = wait_sandbox(api, "e2e-signalled").await?;
    println!(
        "E2E-OUTPUT agent-faults e2e-signalled ended after SIGTERM to its agent: exit status {}",
        waited.exit_status
    );
    ensure!(waited.exited_at.is_some(), "Wait: no exit time");
    ensure!(
        waited.exit_status == 255,
        "exit status {} after the guest shut itself down, want 255",
        waited.exit_status
    );
    shutdown(api, "e2e-signalled").await?;
    steps.done("sigterm-ends-sandbox");

    // The pod beside it is untouched.
    let out = bystander
        .run_script(&dir, "calm", rootfs_mount(image), "echo calm-and-well")
        .await?;
    ensure!(
        wait_exit(&bystander.task, "calm", "").await? == 0,
        "calm: exit"
    );
    out.wait_for("calm-and-well").await?;
    bystander.delete("calm").await?;
    steps.done("bystander-runs");
    end_pod(api, &bystander, &mut steps).await?;
    Ok(())
}

/// Stops `pod` with `grace_secs`: how long Stop took.
async fn stop_timed(
    api: &mut Controller,
    id: &str,
    grace_secs: u32,
) -> Result<std::time::Duration> {
    let t0 = std::time::Instant::now();
    api.stop(v2::ControllerStopRequest {
        sandbox_id: id.into(),
        timeout_secs: grace_secs,
        sandboxer: "sandboxer".into(),
    })
    .await
    .with_context(|| format!("Stop {id}"))?;
    Ok(t0.elapsed())
}

/// Wait's answer for `id`: its exit status.
async fn waited(api: &mut Controller, id: &str) -> Result<u32> {
    let w = wait_sandbox(api, id).await?;
    ensure!(w.exited_at.is_some(), "Wait {id}: no exit time");
    Ok(w.exit_status)
}

async fn state_of(api: &mut Controller, id: &str) -> Result<String> {
    Ok(api
        .status(v2::ControllerStatusRequest {
            sandbox_id: id.into(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        })
        .await
        .with_context(|| format!("Status {id}"))?
        .into_inner()
        .state)
}

/// The grace time Stop gives the deaf guests.
const GRACE_SECS: u32 = 2;

pub(crate) async fn case_ignore_shutdown(a: &Args) -> Result<()> {
    let mut steps = Steps::new("ignore-shutdown");
    let cmdline = format!(
        "{} sandboxer.test_ignore_shutdown=1",
        controller::config::Config::default().vm.cmdline
    );
    let daemon = Daemon::start_named(a, "deaf", &["--cmdline".into(), cmdline])?;
    let mut api = controller::client::v2_client(&daemon.socket)
        .await
        .context("connect to the second daemon")?;
    steps.done("daemon");
    let deaf = start_pod_as(&mut api, "e2e-deaf", "e2e-deaf", "", &mut steps).await?;
    let beside = start_pod_as(&mut api, "e2e-beside", "e2e-beside", "", &mut steps).await?;
    // The guest answers Shutdown and goes on: Stop waits out the grace time, then ends the VM
    // from the host.
    let took = stop_timed(&mut api, &deaf.id, GRACE_SECS).await?;
    ensure!(
        took >= std::time::Duration::from_secs(u64::from(GRACE_SECS)),
        "Stop returned after {took:?}, within the {GRACE_SECS} s grace: the guest did not ignore it"
    );
    // The force itself is a kick of the vCPU threads: quick (a shipped binary whose kicks its
    // own seccomp filter refused waited 5 s for them and then left them running).
    ensure!(
        took < std::time::Duration::from_secs(u64::from(GRACE_SECS) + 4),
        "Stop took {took:?}"
    );
    steps.done("stop-forced");
    let status = waited(&mut api, &deaf.id).await?;
    println!("E2E-OUTPUT ignore-shutdown: Stop took {took:?}, Wait exit status {status}");
    // What the daemon said about it (how the VM was ended).
    let log = fs::read_to_string(a.work.join("deaf.log")).unwrap_or_default();
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        println!("E2E-OUTPUT ignore-shutdown daemon: {line}");
    }
    ensure!(
        !log.contains("did not stop"),
        "the forced Stop left vCPU threads behind"
    );
    let state = state_of(&mut api, &deaf.id).await?;
    ensure!(
        state == "SANDBOX_NOTREADY",
        "Status after the forced Stop: {state}"
    );
    steps.done("wait");
    // The pod beside it did not notice.
    let state = state_of(&mut api, &beside.id).await?;
    ensure!(state == "SANDBOX_READY", "the pod beside it: {state}");
    let dir = a.work.join("ignore-shutdown");
    fs::create_dir_all(&dir)?;
    let bundle = dir.join("c1");
    write_bundle(&bundle, &["/bin/sh", "-c", "exit 5"])?;
    beside
        .create("c1", &bundle, rootfs_mount(&a.image), ["", "", ""])
        .await?;
    beside.start("c1", "").await?;
    let code = wait_exit(&beside.task, "c1", "").await?;
    ensure!(
        code == 5,
        "a container beside the forced pod exited {code}, want 5"
    );
    beside.delete("c1").await?;
    steps.done("beside");
    shutdown(&mut api, &deaf.id).await?;
    let _ = stop_timed(&mut api, &beside.id, 1).await?;
    waited(&mut api, &beside.id).await?;
    shutdown(&mut api, &beside.id).await?;
    steps.done("shutdown");
    let left = fs::read_dir(
        a.work
            .join("deaf-state")
            .join(controller::store::SANDBOXES_DIR),
    )
    .map(|d| d.filter_map(|e| e.ok()).count())
    .unwrap_or(0);
    ensure!(
        left == 0,
        "{left} sandbox dirs left in the second daemon's state"
    );
    drop(daemon);
    Ok(())
}
