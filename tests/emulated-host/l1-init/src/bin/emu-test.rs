// SPDX-License-Identifier: Apache-2.0
//! `emu-test`: the test payload that runs inside L1.
//!
//! `emu-test <case>` (or a link named `<case>` to it) runs one built-in case (see
//! `emu_l1::cases`), echoes the guest console (`L2| `) and the sandboxer's messages (`VMM| `),
//! writes a one-line detail to `$EMU_DETAIL_FILE` and exits 0 on a pass, 1 on a failure.
//! `emu-test --list` prints `<name> <ci|full> <description>` per case (the host's selection).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use emu_l1::cases::{self, BootCase, ConsoleCheck, E2eCase, RustTestCase, VmmOutcome};

/// Extra time past the VM's own bound before the test kills `sandboxer`.
const KILL_GRACE: Duration = Duration::from_secs(30);

/// A line from one of the child's streams.
enum Line {
    Console(String),
    Vmm(String),
    Closed,
}

fn reader<R: Read + Send + 'static>(
    stream: R,
    tx: mpsc::Sender<(Line, Instant)>,
    wrap: fn(String) -> Line,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    if tx.send((wrap(line), Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send((Line::Closed, Instant::now()));
    });
}

/// Starts `program` with its stdout and stderr piped: their lines arrive on the receiver
/// (stdout as [`Line::Console`], stderr as [`Line::Vmm`], then one [`Line::Closed`] each).
fn spawn_piped(
    program: &str,
    args: &[String],
    envs: &[(&str, &str)],
) -> Result<(Child, mpsc::Receiver<(Line, Instant)>), String> {
    let mut child = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        reader(out, tx.clone(), Line::Console);
    }
    if let Some(err) = child.stderr.take() {
        reader(err, tx, Line::Vmm);
    }
    Ok((child, rx))
}

/// Echoes both streams' lines behind `prefix` until both have closed; the lines, in order.
fn echo_until_closed(rx: &mpsc::Receiver<(Line, Instant)>, prefix: &str) -> Vec<String> {
    let mut open = 2;
    let mut lines = Vec::new();
    while open > 0 {
        match rx.recv() {
            Ok((Line::Console(l) | Line::Vmm(l), _)) => {
                println!("{prefix}{l}");
                lines.push(l);
            }
            Ok((Line::Closed, _)) => open -= 1,
            Err(_) => break,
        }
    }
    lines
}

fn run_case(case: &BootCase) -> Result<String, String> {
    let args = case.sandboxer_args();
    println!("EMU-RUN {} {}", cases::SANDBOXER, args.join(" "));
    let start = Instant::now();
    let (mut child, rx) = spawn_piped(cases::SANDBOXER, &args, &[])?;

    let deadline = start + Duration::from_secs(case.vm_timeout_secs) + KILL_GRACE;
    let mut check = ConsoleCheck::new(case.expect);
    let mut vmm_lines = Vec::new();
    let mut open = 2;
    let mut killed = false;
    let mut stdout = std::io::stdout().lock();
    while open > 0 {
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            killed = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((Line::Console(l), at)) => {
                let _ = writeln!(stdout, "L2| {l}");
                check.line(&l, at.duration_since(start));
                if check.fatal().is_some() {
                    // The guest is lost (panic=-1 reboots it, which ends the VM soon anyway).
                    let _ = child.kill();
                    killed = true;
                    break;
                }
            }
            Ok((Line::Vmm(l), _)) => {
                let _ = writeln!(stdout, "VMM| {l}");
                vmm_lines.push(l);
            }
            Ok((Line::Closed, _)) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(stdout);
    let status = child
        .wait()
        .map_err(|e| format!("wait for sandboxer: {e}"))?;
    let elapsed = start.elapsed();
    // Lines still queued (the child ended between two receives).
    while let Ok((line, at)) = rx.try_recv() {
        match line {
            Line::Console(l) => {
                println!("L2| {l}");
                check.line(&l, at.duration_since(start));
            }
            Line::Vmm(l) => {
                println!("VMM| {l}");
                vmm_lines.push(l);
            }
            Line::Closed => {}
        }
    }
    let vmm = VmmOutcome::from_stderr(if killed { None } else { status.code() }, &vmm_lines);
    println!(
        "EMU-TIME {} sandboxer ran {:.1}s (L1 clock; not a performance figure)",
        case.name,
        elapsed.as_secs_f64()
    );
    if killed && check.fatal().is_none() {
        return Err(format!(
            "sandboxer did not end within {} s; {}",
            deadline.duration_since(start).as_secs(),
            cases::verdict(&check, &vmm).err().unwrap_or_default()
        ));
    }
    cases::verdict(&check, &vmm)
}

/// Runs `sandboxer-e2e` for one flow, echoing its output as `E2E| ` lines.
fn run_e2e(case: &E2eCase) -> Result<String, String> {
    let args = case.args();
    println!("EMU-RUN {} {}", cases::SANDBOXER_E2E, args.join(" "));
    let start = Instant::now();
    let (mut child, rx) = spawn_piped(cases::SANDBOXER_E2E, &args, &[])?;
    let output = echo_until_closed(&rx, "E2E| ");
    let last_fail = output
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("E2E-FAIL "))
        .unwrap_or_default();
    let status = child
        .wait()
        .map_err(|e| format!("wait for sandboxer-e2e: {e}"))?;
    let work = format!("/run/e2e-{}", case.name);
    if !status.success() {
        // The daemon's log and the guest consoles say why; print their ends.
        let log = format!("{work}/sandboxer.log");
        if let Ok(text) = std::fs::read_to_string(&log) {
            for l in text
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                println!("VMM| {l}");
            }
        }
        for entry in std::fs::read_dir(format!("{work}/state"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let console = entry.path().join("console.log");
            if let Ok(text) = std::fs::read_to_string(&console) {
                for l in text
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("L2| {l}");
                }
            }
        }
    }
    println!(
        "EMU-TIME {} sandboxer-e2e ran {:.1}s (L1 clock; not a performance figure)",
        case.name,
        start.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(format!("{} passed", case.flow))
    } else if last_fail.is_empty() {
        Err(format!("sandboxer-e2e {} exited with {status}", case.flow))
    } else {
        Err(last_fail.to_owned())
    }
}

/// Runs one Rust test of a packed test binary, echoing its output as `TEST| ` lines.
fn run_rust_test(case: &RustTestCase) -> Result<String, String> {
    // containerd's CRI serves its streaming server on 127.0.0.1: L1 brings up no interface.
    let lo = Command::new("/bin/busybox")
        .args(["ip", "link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("busybox ip: {e}"))?;
    if !lo.success() {
        return Err(format!("ip link set lo up: {lo}"));
    }
    let args = case.args();
    println!("EMU-RUN {} {}", case.binary, args.join(" "));
    let start = Instant::now();
    let (mut child, rx) = spawn_piped(case.binary, &args, case.env)?;
    let output = echo_until_closed(&rx, "TEST| ");
    let status = child
        .wait()
        .map_err(|e| format!("wait for {}: {e}", case.binary))?;
    println!(
        "EMU-TIME {} {} ran {:.1}s (L1 clock; not a performance figure)",
        case.name,
        case.test,
        start.elapsed().as_secs_f64()
    );
    case.verdict(status.success(), &output)
}

fn write_detail(detail: &str) {
    if let Some(path) = std::env::var_os(emu_l1::DETAIL_ENV)
        && let Err(e) = std::fs::write(&path, format!("{}\n", cases::short(detail)))
    {
        eprintln!("emu-test: cannot write {}: {e}", path.to_string_lossy());
    }
}

/// Writes the detail line; the exit code of the verdict.
fn finish(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(detail) => {
            write_detail(&detail);
            ExitCode::SUCCESS
        }
        Err(reason) => {
            write_detail(&reason);
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let called = argv0.rsplit('/').next().unwrap_or_default().to_owned();
    let name = if called == "emu-test" {
        match args.next() {
            Some(a) if a == "--list" => {
                for c in cases::CASES {
                    let set = if c.ci { "ci" } else { "full" };
                    println!("{} {set} {}", c.name, c.description);
                }
                for c in cases::E2E_CASES {
                    let set = if c.ci { "ci" } else { "full" };
                    println!("{} {set} {}", c.name, c.description);
                }
                for c in cases::RUST_TEST_CASES {
                    let set = if c.ci { "ci" } else { "full" };
                    println!("{} {set} {}", c.name, c.description);
                }
                return ExitCode::SUCCESS;
            }
            Some(a) => a,
            None => {
                eprintln!("usage: emu-test <case> | --list");
                return ExitCode::from(2);
            }
        }
    } else {
        called
    };
    if let Some(case) = cases::find_e2e(&name) {
        return finish(run_e2e(case));
    }
    if let Some(case) = cases::find_rust_test(&name) {
        return finish(run_rust_test(case));
    }
    let Some(case) = cases::find(&name) else {
        let detail = format!("no built-in case named {name:?}");
        eprintln!("emu-test: {detail}");
        write_detail(&detail);
        return ExitCode::from(2);
    };
    finish(run_case(case))
}
