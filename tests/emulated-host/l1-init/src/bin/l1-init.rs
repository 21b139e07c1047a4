// SPDX-License-Identifier: Apache-2.0
//! `l1-init`: PID 1 of the emulated KVM host.
//!
//! Mounts proc, sys, devtmpfs, tmpfs (`/run`, `/tmp`) and cgroup2; probes `/dev/kvm`; runs each
//! test named by `emu.tests=` (`/tests/<name>`, in its own process group, bounded by
//! `emu.timeout=`) while reaping every other child; prints `EMU-RESULT <name> pass|fail
//! <seconds>s <detail>` per test and `EMU-DONE <passed> <failed>`; then restarts the machine,
//! which `reboot=t` + QEMU `-no-reboot` turn into QEMU's exit. It never returns: if PID 1
//! exited, the kernel would panic.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use emu_l1::cmdline::{self, L1Settings};
use emu_l1::sys::{self, ChildEnd};
use emu_l1::{BEAT_PREFIX, BEAT_SECS, DETAIL_DIR, DETAIL_ENV, DONE_PREFIX, RESULT_PREFIX};

fn log(msg: &str) {
    println!("EMU-L1 [{:8.3}] {msg}", sys::uptime_secs());
}

fn mount_all() {
    let mounts: &[(&str, &str, &str, Option<&str>)] = &[
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", None),
    ];
    for (source, target, fstype, data) in mounts {
        if let Err(e) = std::fs::create_dir_all(target) {
            log(&format!("cannot create {target}: {e}"));
        }
        if let Err(e) = sys::mount(source, target, fstype, *data) {
            // devtmpfs may be mounted by the kernel already (DEVTMPFS_MOUNT).
            if e.raw_os_error() != Some(libc::EBUSY) {
                log(&format!("cannot mount {fstype} on {target}: {e}"));
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(DETAIL_DIR) {
        log(&format!("cannot create {DETAIL_DIR}: {e}"));
    }
}

/// The facts about L1 worth a line in the log: clock source and TSC calibration.
fn describe_l1() {
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let svm = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "svm"));
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    log(&format!(
        "cpus={cpus} svm={svm} cpu_mhz={mhz} clocksource={}",
        clocksource.trim()
    ));
}

/// Runs `/tests/<name>`; returns (passed, detail).
fn run_test(name: &str, timeout: Duration) -> (bool, String) {
    if !cmdline::valid_test_name(name) {
        return (false, "invalid test name".into());
    }
    let path = Path::new("/tests").join(name);
    if !path.exists() {
        return (false, format!("no {} in the L1 initramfs", path.display()));
    }
    let detail_file = Path::new(DETAIL_DIR).join(format!("{name}.detail"));
    let _ = std::fs::remove_file(&detail_file);
    let child = Command::new(&path)
        .env(DETAIL_ENV, &detail_file)
        .env("PATH", "/bin")
        .process_group(0)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {}: {e}", path.display())),
    };
    let Ok(pid) = i32::try_from(child.id()) else {
        return (false, "child pid out of range".into());
    };
    // Never call child.wait(): PID 1 reaps every child itself with waitpid(-1).
    drop(child);
    let start = Instant::now();
    let end = loop {
        match sys::reap_any() {
            Ok(Some((p, end))) if p == pid => break Some(end),
            Ok(Some(_)) => continue, // an orphan
            Ok(None) => {}
            Err(e) => {
                log(&format!("waitpid: {e}"));
            }
        }
        if start.elapsed() >= timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let detail = std::fs::read_to_string(&detail_file)
        .ok()
        .map(|d| d.trim().to_owned())
        .filter(|d| !d.is_empty());
    match end {
        Some(ChildEnd::Exited(0)) => (true, detail.unwrap_or_else(|| "ok".into())),
        Some(ChildEnd::Exited(code)) => (
            false,
            detail.unwrap_or_else(|| format!("exited with {code}")),
        ),
        Some(ChildEnd::Signaled(sig)) => (false, format!("killed by signal {sig}")),
        None => {
            let _ = sys::kill_group(pid, libc::SIGKILL);
            // Collect it so the next test starts clean.
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some((p, _))) = sys::reap_any()
                    && p == pid
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (
                false,
                format!(
                    "timed out after {} s{}",
                    timeout.as_secs(),
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            )
        }
    }
}

fn main() {
    mount_all();
    log("init up");
    // The heartbeat: a line every BEAT_SECS from a thread that only sleeps. It stops when L1's
    // timer interrupts or its scheduler stop, which is what an emulator freeze looks like;
    // the host then stops this L1 within a minute instead of waiting out a test's bound.
    let beat = std::thread::Builder::new().name("beat".into()).spawn(|| {
        loop {
            std::thread::sleep(Duration::from_secs(BEAT_SECS));
            println!("{BEAT_PREFIX} {:.0}", sys::uptime_secs());
        }
    });
    if let Err(e) = beat {
        log(&format!("cannot start the heartbeat thread: {e}"));
    }
    describe_l1();
    // From here on only warnings and worse from L1's kernel reach the console, so that they
    // rarely cut into the lines the host parses.
    if let Err(e) = std::fs::write("/proc/sys/kernel/printk", "5 4 1 7") {
        log(&format!("cannot lower the console log level: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let L1Settings {
        tests,
        timeout_secs,
        warnings,
    } = cmdline::parse(&cmdline);
    for w in &warnings {
        log(&format!("ignored command line word {w:?}"));
    }
    let timeout = Duration::from_secs(timeout_secs);

    let kvm = sys::probe_kvm();
    let kvm_error = match &kvm {
        Ok(p) if p.api_version == sys::KVM_API_VERSION => {
            println!("EMU-KVM ok api={} nr_vcpus={}", p.api_version, p.nr_vcpus);
            None
        }
        Ok(p) => Some(format!("KVM API version {}", p.api_version)),
        Err(e) => Some(format!("/dev/kvm: {e}")),
    };
    if let Some(e) = &kvm_error {
        println!("EMU-KVM unavailable: {e}");
    }

    let (mut passed, mut failed) = (0u32, 0u32);
    if tests.is_empty() {
        log("no tests selected (emu.tests=)");
    }
    for name in &tests {
        let start = Instant::now();
        let (ok, detail) = match &kvm_error {
            Some(e) => (false, format!("L1 has no usable KVM: {e}")),
            None => {
                log(&format!("test {name}: start"));
                run_test(name, timeout)
            }
        };
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        println!(
            "{RESULT_PREFIX} {name} {} {:.1}s {detail}",
            if ok { "pass" } else { "fail" },
            start.elapsed().as_secs_f64()
        );
    }
    println!("{DONE_PREFIX} {passed} {failed}");
    log("restarting (end of L1)");
    let e = sys::restart();
    log(&format!("reboot failed: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
