// SPDX-License-Identifier: Apache-2.0
//! The `overlay` case: container root filesystems given the way containerd's default overlayfs
//! snapshotter gives them (`type overlay`, `lowerdir=top:bottom`, `upperdir=`, `workdir=`).
//! The sandboxer turns the lower chain into one erofs image (cached and shared) and a
//! non-empty upperdir into a layer of its own; the container must see exactly the merged
//! view overlayfs would give: files of both layers, the top layer's versions, whiteouts and
//! opaque directories honoured.
//!
//! The layers are built here from the host's static busybox (`--busybox`, default
//! `/bin/busybox`): layer 1 is a busybox root with a few files; layer 2 changes one, adds one,
//! deletes one through a whiteout (char device 0:0) and makes a directory opaque.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use containerd_shim_protos::api::Mount;

use super::{Controller, Steps, end_pod, start_pod, wait_exit};

/// What the container prints about its root filesystem.
const PROBE: &str = "cat /etc/greeting /etc/added; \
    test -e /etc/doomed && echo doomed-present || echo doomed-gone; \
    echo old:$(ls /data/old); \
    test -e /upper-file && cat /upper-file; \
    echo w > /written && cat /written && echo probe-done";

/// Layer 1: a busybox root (every applet linked) with files layer 2 changes.
fn lower_layer(dir: &Path, busybox: &Path) -> Result<()> {
    for d in ["bin", "etc", "data/old", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy(busybox, dir.join("bin/busybox"))
        .with_context(|| format!("copy {}", busybox.display()))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("{} --list", busybox.display()))?;
    ensure!(list.status.success(), "{} --list failed", busybox.display());
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = dir.join("bin").join(applet);
        if !applet.is_empty() && applet != "busybox" && !link.exists() {
            symlink("busybox", &link)?;
        }
    }
    fs::write(dir.join("etc/greeting"), "greeting-from-lower\n")?;
    fs::write(dir.join("etc/doomed"), "deleted by the top layer\n")?;
    fs::write(
        dir.join("data/old/file1"),
        "hidden by an opaque directory\n",
    )?;
    Ok(())
}

/// Layer 2 (top): changes, adds, deletes (whiteout) and hides (opaque directory).
fn top_layer(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir.join("etc"))?;
    fs::create_dir_all(dir.join("data/old"))?;
    fs::write(dir.join("etc/greeting"), "greeting-from-top\n")?;
    fs::write(dir.join("etc/added"), "added-by-top\n")?;
    nix::sys::stat::mknod(
        &dir.join("etc/doomed"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        0,
    )
    .context("whiteout etc/doomed")?;
    set_opaque(&dir.join("data/old"))?;
    fs::write(dir.join("data/old/file2"), "in the opaque directory\n")?;
    Ok(())
}

/// Marks `dir` opaque for overlayfs (`trusted.overlay.opaque=y`).
fn set_opaque(dir: &Path) -> Result<()> {
    rustix::fs::setxattr(
        dir,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| anyhow::anyhow!("setxattr {}: {e}", dir.display()))
}

/// The overlay mount containerd would pass for a snapshot on `lowers` (top first).
fn overlay_mount(lowers: &[&Path], upper: &Path, work: &Path) -> Mount {
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    Mount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            "index=off".into(),
            format!("workdir={}", work.display()),
            format!("upperdir={}", upper.display()),
            format!("lowerdir={lowerdir}"),
        ],
        ..Default::default()
    }
}

/// Runs one container with `rootfs` to its end and returns its stdout.
async fn run_probe(pod: &super::Pod, dir: &Path, id: &str, rootfs: Mount) -> Result<String> {
    let out = pod.run_script(dir, id, rootfs, PROBE).await?;
    let status = wait_exit(&pod.task, id, "").await?;
    let text = out.wait_for("probe-done").await;
    let text = match (status, text) {
        (0, Ok(text)) => text,
        (status, text) => bail!("{id}: exit status {status}, output {text:?}"),
    };
    for line in text.lines() {
        println!("E2E-OUTPUT overlay {id}: {line}");
    }
    Ok(text)
}

/// Image files in the daemon's image directory.
fn images(state: &Path) -> Vec<PathBuf> {
    fs::read_dir(state.join("images"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) async fn case_overlay(
    api: &mut Controller,
    busybox: &Path,
    work: &Path,
    state: &Path,
) -> Result<()> {
    let mut steps = Steps::new("overlay");
    let layers = work.join("overlay-layers");
    let (l1, l2) = (layers.join("1/fs"), layers.join("2/fs"));
    lower_layer(&l1, busybox)?;
    top_layer(&l2)?;
    steps.done("layers");
    let pod = start_pod(api, "e2e-ovl", &mut steps).await?;
    let dir = work.join("ovl");
    fs::create_dir_all(&dir)?;

    // A fresh snapshot: empty upperdir.
    let (up1, wk1) = (layers.join("3/fs"), layers.join("3/work"));
    fs::create_dir_all(&up1)?;
    fs::create_dir_all(&wk1)?;
    let text = run_probe(&pod, &dir, "o1", overlay_mount(&[&l2, &l1], &up1, &wk1)).await?;
    for want in [
        "greeting-from-top",
        "added-by-top",
        "doomed-gone",
        "old:file2",
        "w\n",
    ] {
        ensure!(text.contains(want), "o1 does not see {want:?}: {text:?}");
    }
    ensure!(
        !text.contains("greeting-from-lower") && !text.contains("file1"),
        "o1 sees what the top layer hides: {text:?}"
    );
    let after_first = images(state);
    ensure!(
        after_first.len() == 1,
        "one lower image expected after o1: {after_first:?}"
    );
    steps.done("merged-view");

    // The same lower chain with files in the upperdir (a snapshot with changes, as after a
    // commit of a container's writes): the lower image is reused, the upper becomes a layer.
    let (up2, wk2) = (layers.join("4/fs"), layers.join("4/work"));
    fs::create_dir_all(&up2)?;
    fs::create_dir_all(&wk2)?;
    fs::write(up2.join("upper-file"), "from-the-upperdir\n")?;
    let text = run_probe(&pod, &dir, "o2", overlay_mount(&[&l2, &l1], &up2, &wk2)).await?;
    for want in ["greeting-from-top", "from-the-upperdir", "doomed-gone"] {
        ensure!(text.contains(want), "o2 does not see {want:?}: {text:?}");
    }
    let lowers_now: Vec<_> = images(state)
        .into_iter()
        .filter(|p| after_first.contains(p))
        .collect();
    ensure!(
        lowers_now.len() == 1,
        "the lower image of o1 was not kept for o2: {:?}",
        images(state)
    );
    steps.done("cached-lower-and-upper");
    // The container's writes stayed in the VM: the snapshot's upperdir is unchanged.
    ensure!(
        !up1.join("written").exists(),
        "a guest write reached the host upperdir"
    );
    for id in ["o1", "o2"] {
        pod.delete(id).await?;
    }
    let left = images(state);
    ensure!(
        left.is_empty(),
        "images left after both containers were deleted: {left:?}"
    );
    steps.done("delete");
    end_pod(api, &pod, &mut steps).await
}
