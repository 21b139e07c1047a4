// SPDX-License-Identifier: Apache-2.0
//! The `stdin` case: stdio both ways through FIFOs, as containerd's `fifo` io type gives them.
//! A container reads lines from its stdin FIFO and answers on stdout and stderr (kept apart);
//! closing the engine's end of the stdin FIFO is the process's end of input. An exec process
//! gets stdin the same way.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::{
    Controller, OutFifo, Steps, end_pod, rootfs_mount, start_pod, wait_exit, write_bundle,
};
use anyhow::{Context, Result, ensure};

/// The engine's end of a stdin FIFO: created, then opened read-write so the open does not wait
/// for the reader (as containerd's fifo package does); dropping it is the end of input.
struct InFifo {
    path: String,
    file: Option<fs::File>,
}

impl InFifo {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("mkfifo {}", path.display()))?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        Ok(Self {
            path: path.to_string_lossy().into_owned(),
            file: Some(file),
        })
    }

    fn write(&mut self, text: &str) -> Result<()> {
        let file = self.file.as_mut().context("stdin already closed")?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("write to {}", self.path))
    }

    /// Closes the only writer: the reader sees the end of the input.
    fn close(&mut self) {
        self.file = None;
    }
}

pub(crate) async fn case_stdin(api: &mut Controller, image: &Path, work: &Path) -> Result<()> {
    let mut steps = Steps::new("stdin");
    let pod = start_pod(api, "e2e-stdin", &mut steps).await?;
    let dir = work.join("stdin");
    fs::create_dir_all(&dir)?;
    let bundle = dir.join("c3");
    write_bundle(
        &bundle,
        &[
            "/bin/sh",
            "-c",
            "read l; echo got:$l; echo err:$l >&2; cat; echo eof",
        ],
    )?;
    let mut stdin = InFifo::new(&dir, "c3.stdin")?;
    let out = OutFifo::new(&dir, "c3.stdout")?;
    let err = OutFifo::new(&dir, "c3.stderr")?;
    pod.create(
        "c3",
        &bundle,
        rootfs_mount(image),
        [&stdin.path, &out.path(), &err.path()],
    )
    .await?;
    pod.start("c3", "").await?;
    steps.done("task-start");

    stdin.write("first-line\n")?;
    out.wait_for("got:first-line").await?;
    let errors = err.wait_for("err:first-line").await?;
    ensure!(
        !errors.contains("got:"),
        "stdout leaked into stderr: {errors:?}"
    );
    steps.done("line-answered");
    stdin.write("echoed-by-cat\n")?;
    out.wait_for("echoed-by-cat").await?;
    stdin.close();
    let status = wait_exit(&pod.task, "c3", "").await?;
    ensure!(
        status == 0,
        "exit status {status} after end of input, want 0"
    );
    let text = out.wait_for("eof").await?;
    for line in text.lines() {
        println!("E2E-OUTPUT stdin c3: {line}");
    }
    ensure!(
        !text.contains("err:"),
        "stderr leaked into stdout: {text:?}"
    );
    steps.done("end-of-input");
    pod.delete("c3").await?;

    // An exec process with stdin, in a long-running container.
    let bundle = dir.join("c4");
    write_bundle(&bundle, &["/bin/sleep", "600"])?;
    pod.create("c4", &bundle, rootfs_mount(image), ["", "", ""])
        .await?;
    pod.start("c4", "").await?;
    let mut exec_in = InFifo::new(&dir, "x1.stdin")?;
    let exec_out = OutFifo::new(&dir, "x1.stdout")?;
    let script = "tr a-z A-Z; echo exec-done";
    pod.exec(
        "c4",
        "x1",
        &["/bin/sh", "-c", script],
        &exec_in.path,
        &exec_out.path(),
    )
    .await?;
    pod.start("c4", "x1").await?;
    exec_in.write("shout me\n")?;
    exec_in.close();
    let status = wait_exit(&pod.task, "c4", "x1").await?;
    ensure!(status == 0, "exec exit status {status}");
    let text = exec_out.wait_for("exec-done").await?;
    ensure!(text.contains("SHOUT ME"), "exec stdout {text:?}");
    for line in text.lines() {
        println!("E2E-OUTPUT stdin x1: {line}");
    }
    steps.done("exec-stdin");
    pod.kill("c4", 9).await?;
    wait_exit(&pod.task, "c4", "").await?;
    pod.delete("c4").await?;
    steps.done("delete");
    end_pod(api, &pod, &mut steps).await
}
