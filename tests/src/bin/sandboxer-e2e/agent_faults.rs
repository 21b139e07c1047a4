// SPDX-License-Identifier: Apache-2.0
//! The `agent-faults` case (issue 21): a guest turns on its own agent, and the host copes.
//! Two pods, each with a container that runs in the guest's root PID namespace (it sees the
//! agent as PID 1) with the capabilities to act on it.
//!
//! - `e2e-signalled`: the container sends the agent `SIGKILL`, `SIGSTOP` and `SIGSEGV`. The
//!   agent is the guest's init, and the kernel drops signals init has no handler for, so the
//!   pod keeps serving (an init that did die would panic the kernel: the `faults` case covers
//!   that end). Then `SIGTERM`, which the agent takes as the guest's own shutdown: the VM
//!   ends without the host asking, and Wait reports the sandbox failed (status 255).
//! - `e2e-frozen`: the container moves the agent into a cgroup of its own and freezes it
//!   (cgroup v2 `cgroup.freeze`). The guest kernel runs on but nothing answers the host: Task
//!   calls time out, and Stop, whose Shutdown request the agent never sees, still returns
//!   within its grace time plus the agent call's bound, the VM stopped from the host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use oci_spec::runtime::{Capabilities, Capability, LinuxNamespaceType, Spec};
use proto::v2::sandbox as v2;

use super::{
    Controller, OutFifo, Pod, Steps, WAIT_TIMEOUT, rootfs_mount, start_pod_as, write_bundle,
};

/// Grace time the test gives Stop of the frozen pod.
const STOP_GRACE_SECS: u32 = 3;
/// How long a Task call to the frozen agent is given before the test takes it as unanswered.
const UNANSWERED: Duration = Duration::from_secs(5);

/// A bundle for `sh -c script` that shares the guest's PID and cgroup namespaces, with
/// `CAP_KILL` and `CAP_SYS_ADMIN` and a writable cgroup file system.
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
            set.insert(Capability::SysAdmin);
            Some(set)
        };
        caps.set_bounding(with(caps.bounding()));
        caps.set_effective(with(caps.effective()));
        caps.set_permitted(with(caps.permitted()));
        process.set_capabilities(Some(caps));
    }
    if let Some(mounts) = spec.mounts_mut() {
        for m in mounts
            .iter_mut()
            .filter(|m| m.typ().as_deref() == Some("cgroup"))
        {
            if let Some(options) = m.options_mut() {
                options.retain(|o| o != "ro");
            }
        }
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
    let frozen = start_pod_as(api, "e2e-frozen", "e2e-frozen", "", &mut steps).await?;

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

    // The agent frozen: the guest runs, nothing in it answers.
    let out = run_as_guest_admin(
        &frozen,
        &dir,
        "freezer",
        image,
        "exec 2>&1; echo freezing-init; sleep 1; cat /proc/1/cgroup; \
         mkdir /sys/fs/cgroup/agent-jail && echo made-jail && \
         echo 1 > /sys/fs/cgroup/agent-jail/cgroup.procs && echo moved-init && \
         echo 1 > /sys/fs/cgroup/agent-jail/cgroup.freeze && echo froze-init; sleep 600",
    )
    .await?;
    out.wait_for("freezing-init").await?;
    println!("E2E-OUTPUT agent-faults the container is about to freeze the agent");
    // The agent answers until the freeze lands, then never: poll until a call goes unanswered.
    let until = Instant::now() + WAIT_TIMEOUT;
    loop {
        if Instant::now() >= until {
            let said = out.wait_for("").await.unwrap_or_default();
            anyhow::bail!(
                "the agent still answers: the freeze did not take (the container said {said:?})"
            );
        }
        match tokio::time::timeout(UNANSWERED, super::task_state(&frozen.task, "freezer")).await {
            Err(_) => break,
            Ok(r) => {
                r?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    steps.done("agent-frozen");
    let asked = Instant::now();
    api.stop(v2::ControllerStopRequest {
        sandbox_id: "e2e-frozen".into(),
        timeout_secs: STOP_GRACE_SECS,
        sandboxer: "sandboxer".into(),
    })
    .await
    .context("Stop of the pod whose agent is frozen")?;
    let took = asked.elapsed();
    println!(
        "E2E-OUTPUT agent-faults Stop of the frozen pod returned after {} ms",
        took.as_millis()
    );
    // The Shutdown request goes unanswered for at most the grace time, then the host waits
    // for the guest as long again and stops it: twice the grace, plus room for a slow host.
    let bound = Duration::from_secs(2 * u64::from(STOP_GRACE_SECS) + 10);
    ensure!(took < bound, "Stop took {took:?}, more than {bound:?}");
    let waited = wait_sandbox(api, "e2e-frozen").await?;
    ensure!(waited.exited_at.is_some(), "Wait: no exit time");
    steps.done("stop-frozen");
    shutdown(api, "e2e-frozen").await?;
    steps.done("shutdown");
    Ok(())
}
