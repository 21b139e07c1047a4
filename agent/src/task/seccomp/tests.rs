// SPDX-License-Identifier: Apache-2.0
//! Compiled profiles run for real: each test forks, the child installs the filter (with
//! no_new_privs, so no privilege is needed), makes raw syscalls and writes their results
//! (`-errno` on failure) to a pipe; the parent compares them with what the profile says.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use serde_json::json;

use super::*;

/// containerd's default profile (contrib/seccomp `DefaultProfile`) for amd64 and a process
/// with containerd's default capabilities (no `CAP_SYS_ADMIN`: `clone` without namespace
/// flags, `clone3` ENOSYS; `CAP_SYS_CHROOT`: `chroot`), as containerd 2.1 writes it.
const CONTAINERD_DEFAULT: &str =
    include_str!("../../../tests/fixtures/containerd-seccomp-default.json");

fn profile(v: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(v).unwrap()
}

fn compile(v: serde_json::Value) -> SeccompProgram {
    SeccompProgram::compile(&profile(v)).unwrap()
}

/// A raw syscall: number and six arguments.
type Call = (libc::c_long, [u64; 6]);

fn call(nr: libc::c_long, args: &[u64]) -> Call {
    let mut a = [0; 6];
    a[..args.len()].copy_from_slice(args);
    (nr, a)
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Each call's return value, or `-errno`.
    Results(Vec<i64>),
    /// The child was killed by this signal.
    Killed(nix::sys::signal::Signal),
}

/// Runs `calls` in a forked child under `prog`.
fn run(prog: &SeccompProgram, calls: &[Call]) -> Outcome {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only makes raw syscalls (no allocation, no locks) and leaves with
    // `_exit`, so the other threads of the test binary do not matter.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only.
            let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if nnp != 0 || prog.install().is_err() {
                // SAFETY: ends the child at once; nothing to clean up.
                unsafe { libc::_exit(100) };
            }
            for (nr, a) in calls {
                // SAFETY: the test calls are chosen to touch no memory of the process (their
                // pointer arguments are 0) and to be harmless to the child.
                let rc = unsafe { libc::syscall(*nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
                let v: i64 = if rc == -1 {
                    -i64::from(nix::errno::Errno::last_raw())
                } else {
                    rc
                };
                let bytes = v.to_ne_bytes();
                // SAFETY: writes 8 bytes from a live local buffer to the pipe.
                unsafe { libc::write(w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            }
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut out = Vec::new();
            std::fs::File::from(r).read_to_end(&mut out).unwrap();
            match waitpid(child, None).unwrap() {
                WaitStatus::Exited(_, 0) => Outcome::Results(
                    out.chunks_exact(8)
                        .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                WaitStatus::Signaled(_, sig, _) => Outcome::Killed(sig),
                other => panic!("child: {other:?}"),
            }
        }
    }
}

fn results(prog: &SeccompProgram, calls: &[Call]) -> Vec<i64> {
    match run(prog, calls) {
        Outcome::Results(r) => r,
        other => panic!("{other:?}"),
    }
}

fn errno(e: i32) -> i64 {
    -i64::from(e)
}

/// What `getppid` returns in the child: this process's pid.
fn ppid() -> i64 {
    i64::from(nix::unistd::getpid().as_raw())
}

/// The calls the child itself needs after the install.
const CHILD_NEEDS: [&str; 3] = ["write", "exit_group", "exit"];

#[test]
fn default_errno_and_allow_list() {
    let prog = compile(json!({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 95,
        "syscalls": [
            {"names": CHILD_NEEDS, "action": "SCMP_ACT_ALLOW"},
            {"names": ["getpid", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["gettid"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ]
    }));
    let r = results(
        &prog,
        &[
            call(libc::SYS_getpid, &[]),
            call(libc::SYS_getppid, &[]),
            call(libc::SYS_gettid, &[]),
            call(libc::SYS_getuid, &[]),
        ],
    );
    assert!(r[0] > 0, "{r:?}");
    assert_eq!(r[1..], [errno(95), errno(libc::EPERM), errno(libc::EACCES)]);
}

/// Every comparison on a 64-bit value whose halves both matter, against probes below, at and
/// above it in each half.
#[test]
fn argument_comparisons_are_unsigned_64_bit() {
    let v: u64 = 0x0000_0001_8000_0005;
    let probes: Vec<u64> = vec![
        v,
        v - 1,
        v + 1,
        0x8000_0005,
        0x0000_0002_0000_0000,
        0x0000_0000_ffff_ffff,
        0x0000_0001_0000_0000,
        0x0000_0001_ffff_ffff,
        0x0000_0002_8000_0005,
        0x0000_0000_8000_0006,
        u64::MAX,
        0,
    ];
    type Holds = fn(u64, u64) -> bool;
    let ops: [(&str, Holds); 6] = [
        ("SCMP_CMP_EQ", |x, v| x == v),
        ("SCMP_CMP_NE", |x, v| x != v),
        ("SCMP_CMP_LT", |x, v| x < v),
        ("SCMP_CMP_LE", |x, v| x <= v),
        ("SCMP_CMP_GT", |x, v| x > v),
        ("SCMP_CMP_GE", |x, v| x >= v),
    ];
    for (op, holds) in ops {
        // getppid ignores its arguments; the filter sees them.
        let prog = compile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77,
                          "args": [{"index": 2, "value": v, "op": op}]}]
        }));
        let calls: Vec<Call> = probes
            .iter()
            .map(|&x| call(libc::SYS_getppid, &[0, 0, x]))
            .collect();
        let want: Vec<i64> = probes
            .iter()
            .map(|&x| if holds(x, v) { errno(77) } else { ppid() })
            .collect();
        assert_eq!(results(&prog, &calls), want, "{op}");
    }
}

#[test]
fn masked_eq_and_conditions_combine() {
    let mask: u64 = 0xff00_0000_0000_00f0;
    let datum: u64 = 0x1200_0000_0000_0030;
    let prog = compile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 60,
             "args": [{"index": 5, "value": mask, "valueTwo": datum, "op": "SCMP_CMP_MASKED_EQ"}]},
            // Two arguments: both must hold.
            {"names": ["getpgrp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 61,
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]},
            // Two conditions on one argument: either one (runc adds a rule for each).
            {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 62,
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
        ]
    }));
    let pgrp = i64::from(nix::unistd::getpgrp().as_raw());
    let uid = i64::from(nix::unistd::getuid().as_raw());
    let r = results(
        &prog,
        &[
            call(libc::SYS_getppid, &[0, 0, 0, 0, 0, datum]),
            call(
                libc::SYS_getppid,
                &[0, 0, 0, 0, 0, datum | 0x0034_5678_9abc_de0f],
            ),
            call(libc::SYS_getppid, &[0, 0, 0, 0, 0, datum ^ (1 << 56)]),
            call(libc::SYS_getppid, &[0, 0, 0, 0, 0, datum ^ (1 << 4)]),
            call(libc::SYS_getppid, &[0, 0, 0, 0, datum, 0]),
            call(libc::SYS_getpgrp, &[1, 2]),
            call(libc::SYS_getpgrp, &[1, 3]),
            call(libc::SYS_getpgrp, &[0, 2]),
            call(libc::SYS_getuid, &[1]),
            call(libc::SYS_getuid, &[2]),
            call(libc::SYS_getuid, &[3]),
        ],
    );
    assert_eq!(
        r,
        [
            errno(60),
            errno(60),
            ppid(),
            ppid(),
            ppid(),
            errno(61),
            pgrp,
            pgrp,
            errno(62),
            errno(62),
            uid,
        ]
    );
}

#[test]
fn first_matching_rule_wins_and_misses_fall_through() {
    let prog = compile(json!({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 99,
        "syscalls": [
            {"names": CHILD_NEEDS, "action": "SCMP_ACT_ALLOW"},
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 20,
             "args": [{"index": 0, "value": 7, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getppid"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 21,
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getpgrp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30,
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getpgrp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 31,
             "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
            // Same action as the default: skipped (libseccomp refuses it, runc skips it), so
            // the rule after it decides.
            {"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99,
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getuid"], "action": "SCMP_ACT_ALLOW"},
        ]
    }));
    let uid = i64::from(nix::unistd::getuid().as_raw());
    let r = results(
        &prog,
        &[
            call(libc::SYS_getppid, &[7]),
            call(libc::SYS_getppid, &[8]),
            call(libc::SYS_getppid, &[9]),
            call(libc::SYS_getpgrp, &[1]),
            call(libc::SYS_getpgrp, &[2]),
            call(libc::SYS_getpgrp, &[3]),
            call(libc::SYS_getuid, &[1]),
        ],
    );
    assert_eq!(
        r,
        [
            errno(20),
            ppid(),
            ppid(),
            errno(30),
            errno(31),
            errno(99),
            uid
        ]
    );
}

/// A program far longer than a conditional jump reaches: the last listed syscall is still
/// allowed, the rules in the middle still match, an unlisted syscall is still denied.
#[test]
fn long_programs_jump_through_trampolines() {
    let mut syscalls = vec![json!({"names": CHILD_NEEDS, "action": "SCMP_ACT_ALLOW"})];
    // 150 rules on getppid (6 instructions each) ahead of everything else.
    for i in 0..150_u64 {
        syscalls.push(json!({
            "names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 100 + i,
            "args": [{"index": 1, "value": (i << 32) | i, "op": "SCMP_CMP_EQ"}]
        }));
    }
    // Many unconditional names, so the dispatch list is long too.
    let many: Vec<&str> = Sysno::iter()
        .map(|s| s.name())
        .filter(|n| !["getpid", "gettid", "getppid", "write", "exit_group", "exit"].contains(n))
        .take(300)
        .collect();
    syscalls.push(json!({"names": many, "action": "SCMP_ACT_ERRNO", "errnoRet": 5}));
    syscalls.push(json!({"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}));
    let prog = compile(json!({"defaultAction": "SCMP_ACT_KILL_PROCESS", "syscalls": syscalls}));
    assert!(prog.len() > 1000, "{} instructions", prog.len());
    // Every short jump really is short, and the trampolines exist.
    assert!(prog.filter.iter().any(|i| i.code == JMP_JA && i.k > 255));
    let r = results(
        &prog,
        &[
            call(libc::SYS_getpid, &[]),
            call(libc::SYS_getppid, &[0, 0]),
            call(libc::SYS_getppid, &[0, (149 << 32) | 149]),
            call(libc::SYS_getppid, &[0, (75 << 32) | 75]),
        ],
    );
    assert!(r[0] > 0, "{r:?}");
    assert_eq!(r[1..], [errno(100), errno(249), errno(175)]);
    // No getppid rule matches (high half differs): past all 150 to the default action.
    let sigsys = Outcome::Killed(nix::sys::signal::Signal::SIGSYS);
    assert_eq!(run(&prog, &[call(libc::SYS_getppid, &[0, 75])]), sigsys);
    assert_eq!(run(&prog, &[call(libc::SYS_gettid, &[])]), sigsys);
}

#[test]
fn kill_trap_log_and_trace_actions() {
    let with = |action: &str| {
        compile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": action}]
        }))
    };
    let sigsys = Outcome::Killed(nix::sys::signal::Signal::SIGSYS);
    for action in [
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_TRAP",
    ] {
        assert_eq!(
            run(&with(action), &[call(libc::SYS_getppid, &[])]),
            sigsys,
            "{action}"
        );
    }
    assert_eq!(
        results(&with("SCMP_ACT_LOG"), &[call(libc::SYS_getppid, &[])]),
        [ppid()]
    );
    // TRACE with no tracer attached: the kernel fails the call with ENOSYS.
    assert_eq!(
        results(&with("SCMP_ACT_TRACE"), &[call(libc::SYS_getppid, &[])]),
        [errno(libc::ENOSYS)]
    );
}

/// runc's stub: numbers above the highest the profile names get ENOSYS, not the default.
#[test]
fn syscalls_newer_than_the_profile_get_enosys() {
    let v = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": CHILD_NEEDS, "action": "SCMP_ACT_ALLOW"},
                     {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}]
    });
    let highest = libc::SYS_exit_group; // 231, the highest of the names above
    let r = results(
        &compile(v),
        &[
            call(libc::SYS_gettid, &[]),
            call(highest + 1, &[]),
            call(libc::SYS_getpid + i64::from(X32_SYSCALL_BIT), &[]),
        ],
    );
    assert_eq!(r[..2], [errno(libc::EPERM), errno(libc::ENOSYS)]);
    // x32 is not listed: its calls get the default action.
    assert_eq!(r[2], errno(libc::EPERM));
    // With an allowing default there is no stub.
    let prog = compile(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}]
    }));
    assert_eq!(results(&prog, &[call(400, &[])]), [errno(libc::ENOSYS)]);
}

#[test]
fn x32_calls_follow_the_x86_64_rules_when_listed() {
    let prog = compile(json!({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 99,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": CHILD_NEEDS, "action": "SCMP_ACT_ALLOW"},
                     {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}]
    }));
    let x32 = i64::from(X32_SYSCALL_BIT);
    let r = results(
        &prog,
        &[
            call(x32 + libc::SYS_getpid, &[]),
            call(x32 + libc::SYS_gettid, &[]),
            call(x32 + 520, &[]),
        ],
    );
    // Allowed through to the kernel: ENOSYS where the host has no x32 ABI, else the pid.
    assert_ne!(r[0], errno(99), "{r:?}");
    assert_eq!(r[1..], [errno(99), errno(99)]);
}

#[test]
fn profiles_the_agent_cannot_honour_are_refused() {
    let err = |v| {
        SeccompProgram::compile(&profile(v))
            .unwrap_err()
            .to_string()
    };
    let e = err(json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
    assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW",
                       "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}));
    assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW",
                       "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}));
    assert!(e.contains("WAIT_KILLABLE_RECV"), "{e}");
    let e = err(json!({"defaultAction": "SCMP_ACT_ALLOW",
                       "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                     "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}));
    assert!(e.contains("index 6"), "{e}");
    let e = err(json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}));
    assert!(e.contains("70000"), "{e}");
    // Supported flags are passed to seccomp(2).
    let prog = compile(json!({"defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_TSYNC"]}));
    assert_eq!(prog.flags, FLAG_LOG | FLAG_SPEC_ALLOW | FLAG_TSYNC);
    assert_eq!(results(&prog, &[call(libc::SYS_getppid, &[])]), [ppid()]);
}

#[test]
fn containerd_default_profile() {
    let p: LinuxSeccomp = serde_json::from_str(CONTAINERD_DEFAULT).unwrap();
    let prog = SeccompProgram::compile(&p).unwrap();
    assert!(prog.len() < 1000, "{} instructions", prog.len());
    eprintln!("containerd default profile: {} instructions", prog.len());
    let clone_thread = 0x0001_0000; // CLONE_THREAD without CLONE_SIGHAND: EINVAL
    let r = results(
        &prog,
        &[
            call(libc::SYS_getpid, &[]),
            call(libc::SYS_keyctl, &[0]),
            call(libc::SYS_add_key, &[]),
            call(libc::SYS_unshare, &[libc::CLONE_NEWUSER as u64]),
            call(libc::SYS_personality, &[0xffff_ffff]),
            call(libc::SYS_personality, &[0x1234]),
            call(libc::SYS_personality, &[u64::MAX]),
            call(libc::SYS_clone, &[clone_thread]),
            call(
                libc::SYS_clone,
                &[clone_thread | libc::CLONE_NEWUSER as u64],
            ),
            call(libc::SYS_clone3, &[]),
            call(libc::SYS_mount, &[]),
            call(500, &[]),
        ],
    );
    let eperm = errno(libc::EPERM);
    assert!(r[0] > 0, "{r:?}");
    assert_eq!(r[1..4], [eperm, eperm, eperm], "keyctl, add_key, unshare");
    assert!(r[4] >= 0, "personality(0xffffffff) {r:?}");
    assert_eq!(r[5..7], [eperm, eperm], "personality");
    assert_eq!(
        r[7],
        errno(libc::EINVAL),
        "clone without namespace flags reaches the kernel"
    );
    assert_eq!(r[8], eperm, "clone(CLONE_NEWUSER)");
    assert_eq!(r[9], errno(libc::ENOSYS), "clone3");
    assert_eq!(r[10], eperm, "mount");
    assert_eq!(r[11], errno(libc::ENOSYS), "newer than the profile");
}

#[test]
fn sys_admin_is_lent_only_without_no_new_privs() {
    let prog = std::sync::Arc::new(compile(json!({"defaultAction": "SCMP_ACT_ALLOW"})));
    let process = |nnp: Option<bool>| -> Process {
        let mut v = json!({
            "cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                             "permitted": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}
        });
        if let Some(n) = nnp {
            v["noNewPrivileges"] = json!(n);
        }
        serde_json::from_value(v).unwrap()
    };
    for nnp in [None, Some(false)] {
        let mut p = process(nnp);
        let s = ProcessSeccomp::prepare(prog.clone(), &mut p);
        assert!(s.drop_admin_effective && !s.drop_admin_permitted);
        let caps = p.capabilities().as_ref().unwrap();
        assert!(
            caps.effective()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysAdmin)
        );
        assert!(
            !caps
                .bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysAdmin)
        );
    }
    let mut p = process(Some(true));
    let before = p.clone();
    let s = ProcessSeccomp::prepare(prog, &mut p);
    assert!(!s.drop_admin_effective && !s.drop_admin_permitted);
    assert_eq!(p, before);
}
