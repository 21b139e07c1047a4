// SPDX-License-Identifier: Apache-2.0
//! The built-in test cases and the checks on their output.
//!
//! A boot case runs `sandboxer vm run` inside L1 against L1's `/dev/kvm` with the guest kernel
//! and the agent initramfs (`sandboxer.oneshot`: the agent ends the VM right after `ready`),
//! echoes the guest console as `L2| ` lines and the sandboxer's own messages as `VMM| ` lines,
//! and passes when every expected console line appeared in order, no kernel panic was seen, the
//! VM ended through a guest reset and `sandboxer` exited with 0.

use std::time::Duration;

/// Where the guest files are inside L1.
pub const GUEST_VMLINUX: &str = "/guest/vmlinux";
/// The guest bzImage inside L1.
pub const GUEST_BZIMAGE: &str = "/guest/bzImage";
/// The agent initramfs inside L1.
pub const GUEST_INITRAMFS: &str = "/guest/initramfs";
/// The sandboxer binary inside L1.
pub const SANDBOXER: &str = "/bin/sandboxer";

/// Command line shared by every boot case: serial console, triple-fault reboot (the VM's
/// end), reboot on panic, and the agent's one-shot mode.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 sandboxer.oneshot";

/// Console lines that end a boot case at once: the guest is lost.
pub const FATAL_CONSOLE: &[&str] = &["Kernel panic - not syncing"];

/// Guest kernel complaints that fail a case (they often point at the VMM's boot state: CPUID,
/// MSRs, APIC, memory map), unless the line also matches [`KNOWN_NOISE`].
pub const COMPLAINTS: &[&str] = &["WARNING: CPU:", "BUG:", "Oops:", "[Firmware Bug]"];

/// Complaints this environment causes by itself. The XSAVE check warns because QEMU's TCG SVM
/// lets the nested guest's XSETBV through without the intercept that KVM in L1 relies on, so
/// L1 never updates CPUID 0xD's size; the scratch runs of the emulated-host issue saw the same
/// with QEMU as the nested VMM.
pub const KNOWN_NOISE: &[&str] = &["at fpu__init_system_xstate"];

/// One guest boot inside L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootCase {
    /// Test name (`/tests/<name>`).
    pub name: &'static str,
    /// One line for `--list`.
    pub description: &'static str,
    /// Part of the CI selection (the others run on demand).
    pub ci: bool,
    /// Guest kernel path inside L1.
    pub kernel: &'static str,
    /// vCPUs of the guest.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Words appended to [`BASE_CMDLINE`] (console verbosity, mostly: every serial byte is a
    /// VM exit, and each exit is slow in a nested guest).
    pub extra_cmdline: &'static str,
    /// Console substrings that must appear, in this order.
    pub expect: &'static [&'static str],
    /// Bound of the VM's life (`sandboxer vm run --timeout`).
    pub vm_timeout_secs: u64,
}

impl BootCase {
    /// The full guest command line.
    pub fn cmdline(&self) -> String {
        if self.extra_cmdline.is_empty() {
            BASE_CMDLINE.to_owned()
        } else {
            format!("{BASE_CMDLINE} {}", self.extra_cmdline)
        }
    }

    /// The `sandboxer` arguments that boot this case.
    pub fn sandboxer_args(&self) -> Vec<String> {
        vec![
            "vm".into(),
            "run".into(),
            "--kernel".into(),
            self.kernel.into(),
            "--initrd".into(),
            GUEST_INITRAMFS.into(),
            "--cmdline".into(),
            self.cmdline(),
            "--mem".into(),
            self.mem_mib.to_string(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--timeout".into(),
            self.vm_timeout_secs.to_string(),
        ]
    }
}

/// Every built-in case, in the order a full run takes them.
pub const CASES: &[BootCase] = &[
    BootCase {
        name: "agent-ready",
        description: "PVH vmlinux, 1 vCPU: the kernel boots and the agent prints ready as PID 1",
        ci: true,
        kernel: GUEST_VMLINUX,
        vcpus: 1,
        mem_mib: 256,
        // The whole kernel log: this case is the one to read when the boot path breaks.
        extra_cmdline: "",
        expect: &[
            "Linux version",
            "Run /init as init process",
            "sandboxer-agent: ready",
        ],
        vm_timeout_secs: 60,
    },
    BootCase {
        name: "bzimage",
        description: "bzImage through the Linux 64-bit boot protocol, 1 vCPU: agent ready",
        ci: true,
        kernel: GUEST_BZIMAGE,
        vcpus: 1,
        mem_mib: 256,
        extra_cmdline: "quiet",
        expect: &["sandboxer-agent: ready"],
        vm_timeout_secs: 60,
    },
    BootCase {
        name: "smp",
        description: "PVH vmlinux, 2 vCPUs: the kernel brings up both CPUs, agent ready",
        ci: true,
        kernel: GUEST_VMLINUX,
        vcpus: 2,
        mem_mib: 256,
        // The "Brought up" line is KERN_INFO: loglevel 7 prints it (and the rest of the log).
        extra_cmdline: "loglevel=7",
        expect: &["smp: Brought up 1 node, 2 CPUs", "sandboxer-agent: ready"],
        vm_timeout_secs: 60,
    },
];

/// The case called `name`.
pub fn find(name: &str) -> Option<&'static BootCase> {
    CASES.iter().find(|c| c.name == name)
}

/// The end-to-end client inside L1 (`tests/src/bin/sandboxer-e2e.rs`).
pub const SANDBOXER_E2E: &str = "/bin/sandboxer-e2e";
/// The busybox root filesystem image (ext4) containers run from.
pub const ROOTFS_IMAGE: &str = "/images/busybox.ext4";

/// One end-to-end flow: `sandboxer-e2e` runs the `sandboxer` daemon inside L1, drives its
/// Sandbox API and the Task API it returns, and boots the real guest kernel and agent for each
/// pod. It passes when `sandboxer-e2e` exits with 0 (it prints `E2E-PASS <case>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E2eCase {
    /// Test name (`/tests/<name>`).
    pub name: &'static str,
    /// One line for `--list`.
    pub description: &'static str,
    /// Part of the CI selection.
    pub ci: bool,
    /// The `sandboxer-e2e` case.
    pub flow: &'static str,
    /// The dist binary as shipped, on a fresh host: `sandboxer serve` with no flag and no
    /// config file (sandboxer-e2e `--defaults`), so it boots the guest kernel and agent built
    /// into it and keeps its sockets and state where it does by default; the case's files are
    /// under /run/containerd, where the Task API opens files by default.
    pub embedded: bool,
}

impl E2eCase {
    /// The `sandboxer-e2e` arguments.
    pub fn args(&self) -> Vec<String> {
        let guest: Vec<String> = if self.embedded {
            vec!["--defaults".into()]
        } else {
            vec![
                "--kernel".into(),
                GUEST_VMLINUX.into(),
                "--initramfs".into(),
                GUEST_INITRAMFS.into(),
            ]
        };
        [
            vec!["--sandboxer".into(), SANDBOXER.into()],
            guest,
            vec![
                "--image".into(),
                ROOTFS_IMAGE.into(),
                "--work".into(),
                if self.embedded {
                    format!("/run/containerd/e2e-{}", self.name)
                } else {
                    format!("/run/e2e-{}", self.name)
                },
                "--keep".into(),
                self.flow.into(),
            ],
        ]
        .concat()
    }
}

/// Every end-to-end case.
pub const E2E_CASES: &[E2eCase] = &[
    E2eCase {
        name: "e2e-pod",
        description: "sandboxer daemon: Create, Start (agent ready), Status, Platform, Stop, Wait, Shutdown",
        ci: true,
        flow: "pod",
        embedded: false,
    },
    E2eCase {
        name: "e2e-container",
        description: "a container from an ext4 image runs to its exit: exit code, stdout, pod hostname",
        ci: true,
        flow: "container",
        embedded: false,
    },
    E2eCase {
        name: "e2e-exec",
        description: "a long-running container: exec with output, State, Pids, Kill, Delete",
        ci: true,
        flow: "exec",
        embedded: false,
    },
    E2eCase {
        name: "e2e-cgroups",
        description: "cgroup v2 in the guest: Pause/Resume, Stats, Update, an OOM kill forwarded to containerd",
        ci: true,
        flow: "cgroups",
        embedded: false,
    },
    E2eCase {
        name: "e2e-stdin",
        description: "stdio both ways through FIFOs: lines in and out, stderr apart, end of input, an exec with stdin",
        ci: true,
        flow: "stdin",
        embedded: false,
    },
    E2eCase {
        name: "e2e-overlay",
        description: "overlayfs-snapshotter rootfs: merged view of two layers, whiteout, opaque dir, cached lower image, upperdir layer",
        ci: true,
        flow: "overlay",
        embedded: false,
    },
    E2eCase {
        name: "e2e-net",
        description: "pod networking: a CNI-style netns + veth, ping the guest, TCP into and out of a container, teardown",
        ci: true,
        flow: "net",
        embedded: false,
    },
    E2eCase {
        name: "e2e-clones",
        description: "two pods cloned from one VM template: hostname, MAC, address and /dev/urandom differ; both answer ping",
        ci: true,
        flow: "clones",
        embedded: false,
    },
    E2eCase {
        name: "e2e-faults",
        description: "a guest floods a FIFO nobody reads (the daemon's RSS stays bounded), then its kernel panics: that sandbox ends, the pod beside it runs on",
        ci: true,
        flow: "faults",
        embedded: false,
    },
    E2eCase {
        name: "e2e-agent-faults",
        description: "a container sends the guest's agent SIGKILL, SIGSTOP and SIGSEGV (init survives them) and SIGTERM (the sandbox ends as failed); the pod beside it runs on",
        ci: true,
        flow: "agent-faults",
        embedded: false,
    },
    E2eCase {
        name: "e2e-ignore-shutdown",
        description: "guests whose agent answers Shutdown and does nothing: Stop ends the pod itself after the grace time, Wait and Status say so, the pod beside it runs a container",
        ci: true,
        flow: "ignore-shutdown",
        embedded: false,
    },
    E2eCase {
        name: "dist",
        description: "the dist sandboxer as `sandboxer serve` with no flag or config boots its own kernel and agent and runs a container",
        ci: true,
        flow: "container",
        embedded: true,
    },
];

/// The end-to-end case called `name`.
pub fn find_e2e(name: &str) -> Option<&'static E2eCase> {
    E2E_CASES.iter().find(|c| c.name == name)
}

/// The CRI test binary inside L1 (`tests/tests/cri.rs`, built for musl).
pub const CRI_TEST: &str = "/bin/cri-test";
/// The OCI image tarball `tests/containerd/build-image` made on the host.
pub const CRI_IMAGE_TAR: &str = "/images/busybox-oci.tar";
/// The agent's Task API test binary (`agent/tests/task_api.rs`, musl, release) inside L1.
pub const AGENT_TASK_API_TEST: &str = "/bin/agent-task-api-test";
/// The static agent binary (stripped) inside L1, for tests that run it on L1 itself.
pub const AGENT: &str = "/bin/sandboxer-agent";
/// containerd's install inside L1, laid out as `tests/containerd/install` leaves its cache.
pub const CONTAINERD_CACHE: &str = "/opt/containerd";
/// `tests/containerd/` inside L1.
pub const CONTAINERD_SCRIPTS: &str = "/opt/sandboxer/containerd";

/// One Rust test of a packed test binary, run with `--exact`: it passes when the binary exits
/// with 0 and its summary says exactly one test passed, and fails when the test skipped itself
/// (a line starting with `SKIP `): a skip inside L1 means the harness is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RustTestCase {
    /// Test name (`/tests/<name>`).
    pub name: &'static str,
    /// One line for `--list`.
    pub description: &'static str,
    /// Part of the CI selection.
    pub ci: bool,
    /// The test binary inside L1.
    pub binary: &'static str,
    /// The test's full name.
    pub test: &'static str,
    /// Environment of the test, besides `PATH`.
    pub env: &'static [(&'static str, &'static str)],
}

impl RustTestCase {
    /// The test binary's arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            self.test.into(),
            "--exact".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ]
    }

    /// The verdict from the exit status and the output lines.
    pub fn verdict(&self, success: bool, output: &[String]) -> Result<String, String> {
        if let Some(skip) = output.iter().find(|l| l.starts_with("SKIP ")) {
            return Err(format!("the test skipped itself: {}", short(skip)));
        }
        let summary = output
            .iter()
            .rev()
            .find(|l| l.starts_with("test result: "))
            .map(String::as_str);
        if !success {
            // The panic message names what failed.
            let why = output
                .iter()
                .find(|l| l.contains("panicked at"))
                .and_then(|at| {
                    let i = output.iter().position(|l| std::ptr::eq(l, at))?;
                    output.get(i + 1)
                })
                .or_else(|| output.last());
            return Err(format!(
                "{} failed: {}",
                self.test,
                short(why.map(String::as_str).unwrap_or("no output"))
            ));
        }
        match summary {
            Some(s) if s.contains(" 1 passed;") => Ok(format!("{} passed", self.test)),
            Some(s) => Err(format!("{} did not run: {}", self.test, short(s))),
            None => Err(format!("{} printed no test summary", self.test)),
        }
    }
}

/// Every Rust test run inside L1.
/// The environment of the CRI tests (`tests/tests/cri.rs`) in L1.
const CRI_ENV: &[(&str, &str)] = &[
    ("SANDBOXER_LINUX_GUEST_KERNEL", GUEST_VMLINUX),
    ("SANDBOXER_LINUX_GUEST_INITRAMFS", GUEST_INITRAMFS),
    ("SANDBOXER_CONTAINERD_CACHE", CONTAINERD_CACHE),
    ("SANDBOXER_CONTAINERD_SCRIPTS", CONTAINERD_SCRIPTS),
    ("SANDBOXER_CRI_IMAGE_TAR", CRI_IMAGE_TAR),
    ("SANDBOXER_BIN", SANDBOXER),
    ("SANDBOXER_REQUIRE_KVM", "1"),
    ("SANDBOXER_REQUIRE_ROOT", "1"),
    ("SANDBOXER_REQUIRE_CONTAINERD", "1"),
    ("TMPDIR", "/tmp"),
    ("RUST_BACKTRACE", "1"),
];

pub const RUST_TEST_CASES: &[RustTestCase] = &[
    RustTestCase {
        name: "agent-memcg",
        description: "agent/tests/task_api.rs oom_kill_is_published on L1's cgroup v2 memory controller (the development hosts keep it on cgroup v1): Update writes memory.max and memory.swap.max, an OOM kill is published as /tasks/oom",
        ci: true,
        binary: AGENT_TASK_API_TEST,
        test: "oom_kill_is_published",
        env: &[
            ("SANDBOXER_AGENT_BIN", AGENT),
            ("SANDBOXER_REQUIRE_MEMCG", "1"),
            ("SANDBOXER_REQUIRE_ROOT", "1"),
            ("TMPDIR", "/tmp"),
            ("RUST_BACKTRACE", "1"),
        ],
    },
    RustTestCase {
        name: "cri-containers",
        description: "stock containerd 2.1 through CRI: containers in a Linux guest for both IO types (exec, logs, exit codes, a second container, a containerd restart, stop/remove)",
        ci: true,
        binary: CRI_TEST,
        test: "containers_run_in_a_linux_guest",
        env: CRI_ENV,
    },
    RustTestCase {
        name: "cri-upgrade",
        description: "stock containerd 2.1 through CRI: `sandboxer upgrade` with a pod running containers in a Linux guest, for each IO type (no log line lost, no gap beyond the pause, ExecSync after, an exit code reported by the new process)",
        ci: true,
        binary: CRI_TEST,
        test: "a_pod_lives_through_an_upgrade",
        env: CRI_ENV,
    },
];

/// The Rust test case called `name`.
pub fn find_rust_test(name: &str) -> Option<&'static RustTestCase> {
    RUST_TEST_CASES.iter().find(|c| c.name == name)
}

/// Follows a guest console line by line against a case's expectations.
#[derive(Debug, Clone)]
pub struct ConsoleCheck {
    expect: &'static [&'static str],
    /// When each expected line was seen, in order.
    seen: Vec<Duration>,
    /// The fatal line, if one appeared.
    fatal: Option<String>,
    /// The first complaint that is not known noise.
    complaint: Option<String>,
    /// Lines seen.
    lines: usize,
    /// The last non-empty line.
    last: String,
}

impl ConsoleCheck {
    /// Starts checking for `expect`.
    pub fn new(expect: &'static [&'static str]) -> Self {
        Self {
            expect,
            seen: Vec::new(),
            fatal: None,
            complaint: None,
            lines: 0,
            last: String::new(),
        }
    }

    /// Feeds one console line seen at `at` (since the VM was started).
    pub fn line(&mut self, line: &str, at: Duration) {
        self.lines = self.lines.saturating_add(1);
        if !line.trim().is_empty() {
            line.trim_end().clone_into(&mut self.last);
        }
        if self.fatal.is_none() && FATAL_CONSOLE.iter().any(|f| line.contains(f)) {
            self.fatal = Some(line.trim_end().to_owned());
        }
        if self.complaint.is_none()
            && COMPLAINTS.iter().any(|c| line.contains(c))
            && !KNOWN_NOISE.iter().any(|n| line.contains(n))
        {
            self.complaint = Some(line.trim_end().to_owned());
        }
        if let Some(next) = self.expect.get(self.seen.len())
            && line.contains(next)
        {
            self.seen.push(at);
        }
    }

    /// Every expected line seen.
    pub fn complete(&self) -> bool {
        self.seen.len() == self.expect.len()
    }

    /// A fatal line was seen.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// The first guest kernel complaint that is not known noise.
    pub fn complaint(&self) -> Option<&str> {
        self.complaint.as_deref()
    }

    /// The first expected line not seen yet.
    pub fn missing(&self) -> Option<&'static str> {
        self.expect.get(self.seen.len()).copied()
    }

    /// When the last expected line was seen.
    pub fn last_seen(&self) -> Option<Duration> {
        self.seen.last().copied()
    }

    /// Lines seen so far.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// The last non-empty line.
    pub fn last_line(&self) -> &str {
        &self.last
    }
}

/// How `sandboxer vm run` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmOutcome {
    /// Exit code of `sandboxer` (`None`: killed by a signal or by the test's own bound).
    pub exit_code: Option<i32>,
    /// Its `VM ended: ...` line, if it printed one.
    pub ended: Option<String>,
    /// It stopped the VM because of `--timeout`.
    pub timed_out: bool,
}

impl VmmOutcome {
    /// Reads what `sandboxer` printed on stderr.
    pub fn from_stderr(exit_code: Option<i32>, stderr: &[String]) -> Self {
        let ended = stderr
            .iter()
            .find_map(|l| l.split_once("VM ended: ").map(|(_, rest)| rest.to_owned()));
        let timed_out = stderr
            .iter()
            .any(|l| l.contains("sandboxer: timeout after"));
        Self {
            exit_code,
            ended,
            timed_out,
        }
    }
}

/// The verdict: `Ok(detail)` on a pass, `Err(reason)` on a failure.
pub fn verdict(check: &ConsoleCheck, vmm: &VmmOutcome) -> Result<String, String> {
    if let Some(fatal) = check.fatal() {
        return Err(format!("guest: {fatal}"));
    }
    if let Some(missing) = check.missing() {
        let how = if vmm.timed_out {
            "the VM timed out".to_owned()
        } else {
            match (&vmm.ended, vmm.exit_code) {
                (Some(end), _) => format!("the VM ended: {}", short(end)),
                (None, Some(code)) => format!("sandboxer exited with {code}"),
                (None, None) => "sandboxer was killed".to_owned(),
            }
        };
        return Err(format!(
            "never saw {missing:?} ({how}; {} console lines, last: {:?})",
            check.lines(),
            short(check.last_line())
        ));
    }
    if let Some(complaint) = check.complaint() {
        return Err(format!("guest kernel complained: {}", short(complaint)));
    }
    if vmm.timed_out {
        return Err(
            "the agent was ready but the VM did not end (oneshot) before the timeout".into(),
        );
    }
    let end = vmm.ended.as_deref().unwrap_or("");
    if !end.starts_with("Reset") {
        return Err(format!(
            "the VM did not end through a guest reset: {:?}",
            short(end)
        ));
    }
    if vmm.exit_code != Some(0) {
        return Err(format!("sandboxer exited with {:?}", vmm.exit_code));
    }
    Ok(format!(
        "all {} expected lines after {:.1}s, {} console lines",
        check.expect.len(),
        check.last_seen().unwrap_or_default().as_secs_f64(),
        check.lines()
    ))
}

/// At most 160 characters of `s`, on one line.
pub fn short(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(160) {
        Some((i, _)) => format!("{}...", one_line.get(..i).unwrap_or_default()),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn case(name: &str) -> &'static BootCase {
        find(name).unwrap()
    }

    fn ok_vmm() -> VmmOutcome {
        VmmOutcome::from_stderr(
            Some(0),
            &["sandboxer: VM ended: Reset(TripleFault); start-up 1 ms".into()],
        )
    }

    #[test]
    fn names_are_unique_and_valid() {
        for (i, c) in CASES.iter().enumerate() {
            assert!(crate::cmdline::valid_test_name(c.name), "{}", c.name);
            assert!(CASES[..i].iter().all(|o| o.name != c.name), "{}", c.name);
            assert!(!c.expect.is_empty());
        }
        for (i, c) in E2E_CASES.iter().enumerate() {
            assert!(crate::cmdline::valid_test_name(c.name), "{}", c.name);
            assert!(
                E2E_CASES[..i].iter().all(|o| o.name != c.name),
                "{}",
                c.name
            );
            assert!(find(c.name).is_none(), "{} is also a boot case", c.name);
        }
    }

    #[test]
    fn rust_test_cases_are_unique_and_checked() {
        for (i, c) in RUST_TEST_CASES.iter().enumerate() {
            assert!(crate::cmdline::valid_test_name(c.name), "{}", c.name);
            assert!(
                RUST_TEST_CASES[..i].iter().all(|o| o.name != c.name),
                "{}",
                c.name
            );
            assert!(
                find(c.name).is_none() && find_e2e(c.name).is_none(),
                "{}",
                c.name
            );
            assert!(c.args().iter().any(|a| a == "--exact"));
        }
    }

    #[test]
    fn rust_test_verdict() {
        let c = find_rust_test("cri-containers").unwrap();
        let lines = |v: &[&str]| v.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
        let ok = lines(&[
            "running 1 test",
            "test containers_run_in_a_linux_guest ... ok",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out",
        ]);
        assert!(c.verdict(true, &ok).is_ok());
        // A skip passes the Rust test but is a failure here.
        let mut skipped = ok.clone();
        skipped.insert(
            1,
            "SKIP containers_run_in_a_linux_guest: needs a Linux guest".into(),
        );
        assert!(c.verdict(true, &skipped).unwrap_err().contains("skipped"));
        // A wrong name runs nothing.
        let none = lines(&[
            "running 0 tests",
            "test result: ok. 0 passed; 0 failed; 10 filtered out",
        ]);
        assert!(c.verdict(true, &none).unwrap_err().contains("did not run"));
        let failed = lines(&[
            "thread 'containers_run_in_a_linux_guest' panicked at tests/tests/cri.rs:1:1:",
            "sandboxer: ExecSync gave nothing",
            "test result: FAILED. 0 passed; 1 failed",
        ]);
        let e = c.verdict(false, &failed).unwrap_err();
        assert!(e.contains("ExecSync gave nothing"), "{e}");
        assert!(
            c.verdict(true, &[])
                .unwrap_err()
                .contains("no test summary")
        );
    }

    #[test]
    fn e2e_arguments() {
        let args = find_e2e("e2e-exec").unwrap().args();
        assert_eq!(args[..2], ["--sandboxer", SANDBOXER]);
        assert_eq!(args.last().map(String::as_str), Some("exec"));
        assert!(args.windows(2).any(|w| w == ["--image", ROOTFS_IMAGE]));
    }

    #[test]
    fn sandboxer_arguments() {
        let args = case("smp").sandboxer_args();
        assert_eq!(args[..4], ["vm", "run", "--kernel", GUEST_VMLINUX]);
        let at = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(args[at + 1], format!("{BASE_CMDLINE} loglevel=7"));
        let at = args.iter().position(|a| a == "--vcpus").unwrap();
        assert_eq!(args[at + 1], "2");
        assert_eq!(case("agent-ready").cmdline(), BASE_CMDLINE);
    }

    #[test]
    fn expected_lines_must_come_in_order() {
        let mut c = ConsoleCheck::new(case("smp").expect);
        c.line("sandboxer-agent: ready", ms(1));
        c.line("[    0.5] smp: Brought up 1 node, 2 CPUs", ms(2));
        assert!(!c.complete());
        assert_eq!(c.missing(), Some("sandboxer-agent: ready"));
        c.line("sandboxer-agent: ready\r", ms(3));
        assert!(c.complete());
        assert_eq!(c.last_seen(), Some(ms(3)));
        assert!(verdict(&c, &ok_vmm()).is_ok());
    }

    #[test]
    fn panic_fails_even_after_ready() {
        let mut c = ConsoleCheck::new(case("bzimage").expect);
        c.line("sandboxer-agent: ready", ms(1));
        c.line("Kernel panic - not syncing: Attempted to kill init!", ms(2));
        let e = verdict(&c, &ok_vmm()).unwrap_err();
        assert!(e.contains("Attempted to kill init"), "{e}");
    }

    #[test]
    fn missing_line_names_how_the_vm_ended() {
        let mut c = ConsoleCheck::new(case("agent-ready").expect);
        c.line("Linux version 6.12", ms(1));
        c.line("", ms(2));
        let timeout = VmmOutcome::from_stderr(
            Some(0),
            &[
                "sandboxer: timeout after 60 s, stopping the VM".into(),
                "sandboxer: VM ended: Stopped; start-up".into(),
            ],
        );
        let e = verdict(&c, &timeout).unwrap_err();
        assert!(e.contains("Run /init") && e.contains("timed out"), "{e}");
        assert!(e.contains("Linux version 6.12"), "{e}");
        let crashed =
            VmmOutcome::from_stderr(Some(1), &["sandboxer: VM ended: Crashed(\"x\")".into()]);
        let e = verdict(&c, &crashed).unwrap_err();
        assert!(e.contains("Crashed"), "{e}");
        let killed = VmmOutcome::from_stderr(None, &[]);
        assert!(verdict(&c, &killed).unwrap_err().contains("killed"));
    }

    #[test]
    fn ready_but_wrong_end_fails() {
        let mut c = ConsoleCheck::new(case("bzimage").expect);
        c.line("sandboxer-agent: ready", ms(1));
        let stopped = VmmOutcome::from_stderr(
            Some(0),
            &[
                "sandboxer: timeout after 60 s, stopping the VM".into(),
                "sandboxer: VM ended: Stopped".into(),
            ],
        );
        assert!(verdict(&c, &stopped).is_err());
        let crashed =
            VmmOutcome::from_stderr(Some(1), &["sandboxer: VM ended: Crashed(\"x\")".into()]);
        assert!(verdict(&c, &crashed).is_err());
        let bad_code = VmmOutcome::from_stderr(Some(3), &["sandboxer: VM ended: Reset(X)".into()]);
        assert!(verdict(&c, &bad_code).is_err());
        assert!(verdict(&c, &ok_vmm()).is_ok());
    }

    #[test]
    fn kernel_complaints_fail_unless_known_noise() {
        let mut c = ConsoleCheck::new(case("bzimage").expect);
        c.line(
            "[ 1.6] WARNING: CPU: 0 PID: 0 at fpu__init_system_xstate+0xac3/0xb70",
            ms(1),
        );
        c.line("sandboxer-agent: ready", ms(2));
        assert!(verdict(&c, &ok_vmm()).is_ok());
        c.line(
            "[ 2.0] WARNING: CPU: 0 PID: 1 at arch/x86/kernel/apic/apic.c:1",
            ms(3),
        );
        c.line("[ 2.1] [Firmware Bug]: TSC_DEADLINE disabled", ms(4));
        let e = verdict(&c, &ok_vmm()).unwrap_err();
        assert!(e.contains("apic.c"), "{e}");
    }

    #[test]
    fn short_cuts_and_flattens() {
        assert_eq!(short("a\tb"), "a b");
        let long = "x".repeat(200);
        assert_eq!(short(&long).len(), 163);
    }
}
