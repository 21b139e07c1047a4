// SPDX-License-Identifier: Apache-2.0
//! Containers' OCI seccomp profiles (`linux.seccomp`): compiled by the agent into a classic-BPF
//! program for x86_64 and installed with seccomp(2), with runc's (libseccomp's) semantics.
//!
//! libcontainer applies a profile only through C libseccomp, which cannot be linked into the
//! static musl agent; without it libcontainer ignores `linux.seccomp` entirely. So the agent
//! compiles the profile at `Create`/`Exec` (a bad profile fails the call) and the container
//! process installs it right before `execve` (`runtime::StdExecutor`). What runc does, and so
//! what this module does:
//! - Actions: `SCMP_ACT_ALLOW`, `ERRNO` (`errnoRet`, EPERM when unset), `KILL` and
//!   `KILL_THREAD` (the thread), `KILL_PROCESS`, `TRAP`, `LOG`, `TRACE` (`errnoRet` as the
//!   tracer's message, EPERM when unset). `SCMP_ACT_NOTIFY` is refused: the guest has no
//!   seccomp listener. A rule whose action equals the default action is skipped (libseccomp
//!   refuses such rules and runc skips them).
//! - Names resolve through the x86_64 table of the `syscalls` crate; a name the table does not
//!   know is skipped (runc skips names libseccomp cannot resolve), not an error.
//! - `args`: all conditions of a rule must hold (AND), compared as unsigned 64-bit values;
//!   `SCMP_CMP_MASKED_EQ` is `(arg & value) == valueTwo`. A rule with two conditions on the same
//!   argument becomes one rule per condition (OR), as runc does.
//! - The rules of one syscall are tried in the order the profile lists them; the first that
//!   matches gives the action; none matching gives the default action.
//! - runc's `-ENOSYS` stub: unless the default action lets calls through (`ALLOW`, `LOG`,
//!   `TRACE`), a syscall number above the highest one the profile names fails with ENOSYS
//!   rather than the default action, so libc falls back from syscalls newer than the profile.
//!
//! Architectures. The guest kernel is x86_64 without `IA32_EMULATION` and without the x32 ABI
//! (guest/kernel/config-fragment), so only x86_64 calls can reach it; `architectures` never
//! makes compilation fail. The program first checks `seccomp_data.arch`: anything but
//! `AUDIT_ARCH_X86_64` is killed (`KILL_PROCESS`; libseccomp would apply its bad-arch action,
//! also a kill). `SCMP_ARCH_X86` and the other arches are accepted and have no rules: their
//! calls cannot happen here. x32 calls (`nr & __X32_SYSCALL_BIT`) get the default action unless
//! the profile lists `SCMP_ARCH_X32`; then those below 512 (the numbers x32 shares with
//! x86_64) follow the x86_64 rules and the x32-only ones (512 and up) get the default action.
//!
//! The program is a linear list of `nr == X` tests (containerd's default profile compiles to
//! 500 instructions, far below the kernel's 4096). Conditional jumps reach 255
//! instructions at most; `assemble` turns any longer jump into a short one onto `ja`
//! trampolines (32-bit offsets).
#![allow(
    unsafe_code,
    reason = "seccomp(2) has no safe wrapper in nix or rustix; one documented syscall"
)]

use std::collections::HashMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
    Process,
};
use syscalls::x86_64::Sysno;

/// Kernel ABI numbers (linux/seccomp.h, linux/filter.h, linux/audit.h).
mod defs {
    /// `AUDIT_ARCH_X86_64`.
    pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    /// `__X32_SYSCALL_BIT`.
    pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    /// The first x32-only syscall number (below it x32 shares x86_64's numbers).
    pub const X32_ONLY_FIRST: u32 = 512;
    /// `BPF_MAXINSNS`.
    pub const BPF_MAXINSNS: usize = 4096;

    /// `BPF_LD | BPF_W | BPF_ABS`.
    pub const LD_W_ABS: u16 = 0x20;
    /// `BPF_ALU | BPF_AND | BPF_K`.
    pub const ALU_AND_K: u16 = 0x54;
    /// `BPF_ALU | BPF_SUB | BPF_K`.
    pub const ALU_SUB_K: u16 = 0x14;
    /// `BPF_JMP | BPF_JA`.
    pub const JMP_JA: u16 = 0x05;
    /// `BPF_JMP | BPF_JEQ | BPF_K`.
    pub const JMP_JEQ_K: u16 = 0x15;
    /// `BPF_JMP | BPF_JGT | BPF_K`.
    pub const JMP_JGT_K: u16 = 0x25;
    /// `BPF_JMP | BPF_JGE | BPF_K`.
    pub const JMP_JGE_K: u16 = 0x35;
    /// `BPF_JMP | BPF_JSET | BPF_K`.
    pub const JMP_JSET_K: u16 = 0x45;
    /// `BPF_RET | BPF_K`.
    pub const RET_K: u16 = 0x06;

    /// Offsets in `struct seccomp_data`.
    pub const DATA_NR: u32 = 0;
    /// See [`DATA_NR`].
    pub const DATA_ARCH: u32 = 4;
    /// See [`DATA_NR`]; `args[i]` is at `DATA_ARGS + 8 * i`, low half first (little endian).
    pub const DATA_ARGS: u32 = 16;

    /// `SECCOMP_RET_*`.
    pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_KILL_THREAD: u32 = 0x0000_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_TRAP: u32 = 0x0003_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_ERRNO: u32 = 0x0005_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_TRACE: u32 = 0x7ff0_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_LOG: u32 = 0x7ffc_0000;
    /// See [`RET_KILL_PROCESS`].
    pub const RET_ALLOW: u32 = 0x7fff_0000;
    /// `SECCOMP_RET_DATA`: the largest `errnoRet`.
    pub const RET_DATA_MAX: u32 = 0xffff;

    /// `SECCOMP_SET_MODE_FILTER`.
    pub const SET_MODE_FILTER: libc::c_ulong = 1;
    /// `SECCOMP_FILTER_FLAG_TSYNC`.
    pub const FLAG_TSYNC: u32 = 1;
    /// `SECCOMP_FILTER_FLAG_LOG`.
    pub const FLAG_LOG: u32 = 2;
    /// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`.
    pub const FLAG_SPEC_ALLOW: u32 = 4;

    /// EPERM, the default `errnoRet`.
    pub const EPERM: u32 = 1;
    /// ENOSYS, for syscalls newer than the profile.
    pub const ENOSYS: u32 = 38;
}

use defs::*;

/// A profile the agent cannot compile or install.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `SCMP_ACT_NOTIFY` needs a seccomp listener, which the guest does not have.
    #[error("SCMP_ACT_NOTIFY is not supported (no seccomp listener in the guest)")]
    Notify,
    /// A filter flag the agent does not support.
    #[error("Seccomp flag {0} is not supported")]
    Flag(String),
    /// An `errnoRet` beyond the 16 bits of `SECCOMP_RET_DATA`.
    #[error("errnoRet {0} is larger than 65535")]
    ErrnoRet(u32),
    /// An argument index beyond the six syscall arguments.
    #[error("Argument index {index} of syscall {name:?} is not in 0-5")]
    ArgIndex {
        /// The syscall named with it.
        name: String,
        /// The index.
        index: usize,
    },
    /// More instructions than the kernel accepts.
    #[error("The compiled filter has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
    /// A jump the assembler could not place (a bug in this module).
    #[error("Seccomp assembler: {0}")]
    Assemble(&'static str),
    /// seccomp(2) failed.
    #[error("Failed to install the seccomp filter")]
    Install(#[source] std::io::Error),
}

/// One classic-BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// The kernel's `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// A compiled profile, ready to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompProgram {
    filter: Vec<SockFilter>,
    flags: u32,
}

impl SeccompProgram {
    /// Compiles `profile` for x86_64 (see the module documentation for the semantics).
    pub fn compile(profile: &LinuxSeccomp) -> Result<Self, SeccompError> {
        let flags = filter_flags(profile)?;
        let default_action = profile.default_action();
        let default_ret = action_ret(default_action, profile.default_errno_ret())?;
        let table = SyscallTable::from_profile(profile, default_ret)?;
        let enosys_above = match default_action {
            LinuxSeccompAction::ScmpActAllow
            | LinuxSeccompAction::ScmpActLog
            | LinuxSeccompAction::ScmpActTrace => None,
            _ => table.highest,
        };
        let x32 = profile
            .architectures()
            .as_ref()
            .is_some_and(|a| a.contains(&oci_spec::runtime::Arch::ScmpArchX32));
        let filter = generate(&table, default_ret, enosys_above, x32)?;
        Ok(Self { filter, flags })
    }

    /// The number of instructions.
    pub fn len(&self) -> usize {
        self.filter.len()
    }

    /// Whether the program is empty (never, for a compiled one).
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }

    /// Installs the filter on the calling thread (with `SECCOMP_FILTER_FLAG_TSYNC`, on all of
    /// the process's threads). Needs no_new_privs or `CAP_SYS_ADMIN` in the effective set.
    pub fn install(&self) -> Result<(), SeccompError> {
        let len = u16::try_from(self.filter.len())
            .map_err(|_| SeccompError::TooLong(self.filter.len()))?;
        let prog = SockFprog {
            len,
            filter: self.filter.as_ptr(),
        };
        // SAFETY: `prog` is a valid `sock_fprog` whose `filter` points to `len` initialised
        // `sock_filter`s owned by `self`, alive for the whole call; the kernel copies the
        // program before it returns and keeps no pointer to it. The call changes no memory of
        // this process.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SET_MODE_FILTER,
                libc::c_ulong::from(self.flags),
                &raw const prog,
            )
        };
        match rc {
            0 => Ok(()),
            r if r < 0 => Err(SeccompError::Install(std::io::Error::last_os_error())),
            // TSYNC: the id of a thread that could not be synchronised.
            tid => Err(SeccompError::Install(std::io::Error::other(format!(
                "thread {tid} could not take the filter (TSYNC)"
            )))),
        }
    }
}

/// How a container process applies its profile right before `execve`.
#[derive(Debug, Clone)]
pub struct ProcessSeccomp {
    /// The compiled profile.
    pub program: std::sync::Arc<SeccompProgram>,
    /// `CAP_SYS_ADMIN` was added to the effective set libcontainer applies only so that the
    /// filter can be installed: drop it from the effective set once installed.
    pub drop_admin_effective: bool,
    /// The same for the permitted set.
    pub drop_admin_permitted: bool,
}

impl ProcessSeccomp {
    /// Readies `process` for `program` with runc's ordering. With `noNewPrivileges: true`
    /// libcontainer sets no_new_privs and the filter installs without privilege. Otherwise
    /// installing needs `CAP_SYS_ADMIN` in the effective set: runc installs before it drops
    /// capabilities, but libcontainer drops them before it calls the executor, so the spec
    /// libcontainer applies gets `CAP_SYS_ADMIN` in its effective and permitted sets (never
    /// bounding, inheritable or ambient) and the executor drops it again right after the
    /// install, under the filter as in runc. The process then execs with the spec's sets.
    pub fn prepare(program: std::sync::Arc<SeccompProgram>, process: &mut Process) -> Self {
        let mut this = Self {
            program,
            drop_admin_effective: false,
            drop_admin_permitted: false,
        };
        if process.no_new_privileges() == Some(true) {
            return this;
        }
        let Some(mut caps) = process.capabilities().clone() else {
            // No capabilities in the spec: libcontainer keeps all of them.
            return this;
        };
        if let Some(mut set) = caps.effective().clone()
            && set.insert(Capability::SysAdmin)
        {
            caps.set_effective(Some(set));
            this.drop_admin_effective = true;
        }
        if let Some(mut set) = caps.permitted().clone()
            && set.insert(Capability::SysAdmin)
        {
            caps.set_permitted(Some(set));
            this.drop_admin_permitted = true;
        }
        process.set_capabilities(Some(caps));
        this
    }
}

fn filter_flags(profile: &LinuxSeccomp) -> Result<u32, SeccompError> {
    let mut flags = 0;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SeccompError::Flag(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (only for a seccomp listener)".into(),
                ));
            }
        };
    }
    Ok(flags)
}

/// The `SECCOMP_RET_*` value of an action.
fn action_ret(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    let data = || match errno.unwrap_or(EPERM) {
        e if e > RET_DATA_MAX => Err(SeccompError::ErrnoRet(e)),
        e => Ok(e),
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data()?,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data()?,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Notify),
    })
}

/// One argument condition.
#[derive(Debug, Clone, Copy)]
struct Cond {
    /// 0-5.
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

/// Conditions that must all hold, and the action when they do.
#[derive(Debug, Clone)]
struct Rule {
    conds: Vec<Cond>,
    ret: u32,
}

/// The profile's rules by syscall number, in the order numbers first appear.
#[derive(Debug, Default)]
struct SyscallTable {
    syscalls: Vec<(u32, Vec<Rule>)>,
    /// The highest syscall number the profile names (rules skipped for having the default
    /// action count too, as in runc).
    highest: Option<u32>,
}

impl SyscallTable {
    fn from_profile(profile: &LinuxSeccomp, default_ret: u32) -> Result<Self, SeccompError> {
        let mut table = Self::default();
        let mut index_of: HashMap<u32, usize> = HashMap::new();
        for entry in profile.syscalls().iter().flatten() {
            let ret = action_ret(entry.action(), entry.errno_ret())?;
            let mut conds = Vec::new();
            for arg in entry.args().iter().flatten() {
                let index = u32::try_from(arg.index())
                    .ok()
                    .filter(|i| *i <= 5)
                    .ok_or_else(|| SeccompError::ArgIndex {
                        name: entry.names().first().cloned().unwrap_or_default(),
                        index: arg.index(),
                    })?;
                conds.push(Cond {
                    index,
                    op: arg.op(),
                    value: arg.value(),
                    value_two: arg.value_two().unwrap_or(0),
                });
            }
            let mut indexes: Vec<u32> = conds.iter().map(|c| c.index).collect();
            indexes.sort_unstable();
            indexes.dedup();
            let rules: Vec<Rule> = if indexes.len() < conds.len() {
                // Two conditions on one argument: libseccomp cannot AND them, runc adds one
                // rule per condition.
                conds
                    .iter()
                    .map(|c| Rule {
                        conds: vec![*c],
                        ret,
                    })
                    .collect()
            } else {
                vec![Rule { conds, ret }]
            };
            for name in entry.names() {
                let Ok(sysno) = Sysno::from_str(name) else {
                    log::debug!("seccomp: syscall {name:?} is unknown on x86_64, skipped");
                    continue;
                };
                let Ok(nr) = u32::try_from(sysno.id()) else {
                    continue;
                };
                table.highest = table.highest.max(Some(nr));
                if ret == default_ret {
                    continue;
                }
                let i = *index_of.entry(nr).or_insert_with(|| {
                    table.syscalls.push((nr, Vec::new()));
                    table.syscalls.len() - 1
                });
                if let Some((_, list)) = table.syscalls.get_mut(i) {
                    list.extend(rules.iter().cloned());
                }
            }
        }
        Ok(table)
    }
}

/// A place in the program that jumps can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

/// Where a conditional jump goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Label(Label),
    /// A fixed offset (only in the trampoline form made by [`assemble`]).
    Rel(u8),
}

/// Where a conditional jump goes, as the generator says it.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    L(Label),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Stmt {
        code: u16,
        k: u32,
    },
    Jump {
        code: u16,
        k: u32,
        jt: Target,
        jf: Target,
    },
    Ja(Label),
    Bind(Label),
}

/// The program under construction, with symbolic jumps.
#[derive(Debug, Default)]
struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    fn bind(&mut self, l: Label) {
        self.ops.push(Op::Bind(l));
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.ops.push(Op::Stmt { code, k });
    }

    fn load(&mut self, offset: u32) {
        self.stmt(LD_W_ABS, offset);
    }

    fn ret(&mut self, k: u32) {
        self.stmt(RET_K, k);
    }

    fn ja(&mut self, l: Label) {
        self.ops.push(Op::Ja(l));
    }

    fn jump(&mut self, code: u16, k: u32, jt: To, jf: To) {
        let next = self.label();
        let target = |t| match t {
            To::Next => Target::Label(next),
            To::L(l) => Target::Label(l),
        };
        self.ops.push(Op::Jump {
            code,
            k,
            jt: target(jt),
            jf: target(jf),
        });
        self.bind(next);
    }
}

/// Instruction positions of each op and each label.
fn layout(ops: &[Op], labels: usize) -> (Vec<usize>, Vec<Option<usize>>) {
    let mut pos = Vec::with_capacity(ops.len());
    let mut at = vec![None; labels];
    let mut n = 0;
    for op in ops {
        pos.push(n);
        match op {
            Op::Bind(Label(l)) => {
                if let Some(slot) = at.get_mut(*l) {
                    *slot = Some(n);
                }
            }
            _ => n += 1,
        }
    }
    (pos, at)
}

/// The offset of `label` from the instruction after `from` (cBPF jumps are forward only).
fn offset(at: &[Option<usize>], from: usize, label: Label) -> Result<usize, SeccompError> {
    let to = at
        .get(label.0)
        .copied()
        .flatten()
        .ok_or(SeccompError::Assemble("unbound label"))?;
    to.checked_sub(from + 1)
        .ok_or(SeccompError::Assemble("backward jump"))
}

/// Resolves the jumps. A conditional jump holds 8-bit offsets: one with a target more than 255
/// instructions away becomes `jxx k, 0, 1; ja jt; ja jf` (`ja` has a 32-bit offset). Each
/// rewrite only lengthens the program, so other jumps are checked again until none is too
/// long; a rewritten jump never is, so this ends.
fn assemble(mut ops: Vec<Op>, labels: usize) -> Result<Vec<SockFilter>, SeccompError> {
    loop {
        let (pos, at) = layout(&ops, labels);
        let mut out = Vec::with_capacity(ops.len());
        let mut changed = false;
        for (op, &p) in ops.iter().zip(&pos) {
            if let Op::Jump {
                code,
                k,
                jt: Target::Label(t),
                jf: Target::Label(f),
            } = *op
                && (offset(&at, p, t)? > 255 || offset(&at, p, f)? > 255)
            {
                out.push(Op::Jump {
                    code,
                    k,
                    jt: Target::Rel(0),
                    jf: Target::Rel(1),
                });
                out.push(Op::Ja(t));
                out.push(Op::Ja(f));
                changed = true;
            } else {
                out.push(*op);
            }
        }
        ops = out;
        if !changed {
            break;
        }
    }
    let (pos, at) = layout(&ops, labels);
    let mut filter = Vec::with_capacity(ops.len());
    for (op, &p) in ops.iter().zip(&pos) {
        let short = |t: Target| match t {
            Target::Rel(r) => Ok(r),
            Target::Label(l) => u8::try_from(offset(&at, p, l)?)
                .map_err(|_| SeccompError::Assemble("long conditional jump left")),
        };
        filter.push(match *op {
            Op::Bind(_) => continue,
            Op::Stmt { code, k } => SockFilter {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            Op::Jump { code, k, jt, jf } => SockFilter {
                code,
                jt: short(jt)?,
                jf: short(jf)?,
                k,
            },
            Op::Ja(l) => SockFilter {
                code: JMP_JA,
                jt: 0,
                jf: 0,
                k: u32::try_from(offset(&at, p, l)?)
                    .map_err(|_| SeccompError::Assemble("jump beyond 32 bits"))?,
            },
        });
    }
    if filter.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(filter.len()));
    }
    Ok(filter)
}

fn halves(v: u64) -> (u32, u32) {
    let hi = u32::try_from(v >> 32).unwrap_or(u32::MAX);
    let lo = u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX);
    (hi, lo)
}

/// Falls through when `c` holds, jumps to `fail` when not. Unsigned 64-bit comparisons: the
/// high halves decide unless they are equal, then the low halves do.
fn emit_cond(a: &mut Asm, c: &Cond, fail: Label) {
    let lo_at = DATA_ARGS + 8 * c.index;
    let hi_at = lo_at + 4;
    let (hv, lv) = halves(c.value);
    let f = To::L(fail);
    let next = To::Next;
    let ok = a.label();
    let o = To::L(ok);
    match c.op {
        LinuxSeccompOperator::ScmpCmpEq => {
            a.load(hi_at);
            a.jump(JMP_JEQ_K, hv, next, f);
            a.load(lo_at);
            a.jump(JMP_JEQ_K, lv, next, f);
        }
        LinuxSeccompOperator::ScmpCmpNe => {
            a.load(hi_at);
            a.jump(JMP_JEQ_K, hv, next, o);
            a.load(lo_at);
            a.jump(JMP_JEQ_K, lv, f, next);
        }
        LinuxSeccompOperator::ScmpCmpGt => {
            a.load(hi_at);
            a.jump(JMP_JGT_K, hv, o, next);
            a.jump(JMP_JEQ_K, hv, next, f);
            a.load(lo_at);
            a.jump(JMP_JGT_K, lv, next, f);
        }
        LinuxSeccompOperator::ScmpCmpGe => {
            a.load(hi_at);
            a.jump(JMP_JGT_K, hv, o, next);
            a.jump(JMP_JEQ_K, hv, next, f);
            a.load(lo_at);
            a.jump(JMP_JGE_K, lv, next, f);
        }
        LinuxSeccompOperator::ScmpCmpLt => {
            a.load(hi_at);
            a.jump(JMP_JGE_K, hv, next, o);
            a.jump(JMP_JEQ_K, hv, next, f);
            a.load(lo_at);
            a.jump(JMP_JGE_K, lv, f, next);
        }
        LinuxSeccompOperator::ScmpCmpLe => {
            a.load(hi_at);
            a.jump(JMP_JGE_K, hv, next, o);
            a.jump(JMP_JEQ_K, hv, next, f);
            a.load(lo_at);
            a.jump(JMP_JGT_K, lv, f, next);
        }
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (hd, ld) = halves(c.value_two);
            a.load(hi_at);
            a.stmt(ALU_AND_K, hv);
            a.jump(JMP_JEQ_K, hd, next, f);
            a.load(lo_at);
            a.stmt(ALU_AND_K, lv);
            a.jump(JMP_JEQ_K, ld, next, f);
        }
    }
    a.bind(ok);
}

/// The whole program:
///
/// ```text
///     ld arch; jeq AUDIT_ARCH_X86_64 ? next : kill
///     ld nr;   jset X32_BIT ? x32 : x86_64
/// x32:    (SCMP_ARCH_X32 listed) jge X32_BIT + 512 ? default; nr -= X32_BIT; enosys check; ja dispatch
///         (not listed)           ja default
/// x86_64: jgt highest ? enosys : dispatch          (the ENOSYS stub, when it applies)
/// dispatch: jeq nr_1 ? <ret stub or rule body> : next ... ja default
/// bodies:   per rule: its conditions (mismatch -> next rule); ret action ... ja default
/// default: ret default   enosys: ret ERRNO(ENOSYS)   kill: ret KILL_PROCESS   ret stubs
/// ```
fn generate(
    table: &SyscallTable,
    default_ret: u32,
    enosys_above: Option<u32>,
    x32: bool,
) -> Result<Vec<SockFilter>, SeccompError> {
    let mut a = Asm::default();
    let kill = a.label();
    let default = a.label();
    let enosys = a.label();
    let dispatch = a.label();
    let x32_entry = a.label();
    let x86_64_entry = a.label();

    a.load(DATA_ARCH);
    a.jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, To::Next, To::L(kill));
    a.load(DATA_NR);
    a.jump(
        JMP_JSET_K,
        X32_SYSCALL_BIT,
        To::L(x32_entry),
        To::L(x86_64_entry),
    );
    a.bind(x32_entry);
    if x32 {
        a.jump(
            JMP_JGE_K,
            X32_SYSCALL_BIT | X32_ONLY_FIRST,
            To::L(default),
            To::Next,
        );
        a.stmt(ALU_SUB_K, X32_SYSCALL_BIT);
        if let Some(highest) = enosys_above {
            a.jump(JMP_JGT_K, highest, To::L(enosys), To::Next);
        }
        a.ja(dispatch);
    } else {
        a.ja(default);
    }
    a.bind(x86_64_entry);
    if let Some(highest) = enosys_above {
        a.jump(JMP_JGT_K, highest, To::L(enosys), To::Next);
    }
    a.bind(dispatch);

    let mut stubs: Vec<(u32, Label)> = Vec::new();
    let mut stub = |a: &mut Asm, ret: u32| {
        if let Some((_, l)) = stubs.iter().find(|(r, _)| *r == ret) {
            *l
        } else {
            let l = a.label();
            stubs.push((ret, l));
            l
        }
    };
    let mut bodies = Vec::new();
    for (nr, rules) in &table.syscalls {
        let target = match rules.first() {
            Some(r) if r.conds.is_empty() => stub(&mut a, r.ret),
            _ => {
                let body = a.label();
                bodies.push((body, rules));
                body
            }
        };
        a.jump(JMP_JEQ_K, *nr, To::L(target), To::Next);
    }
    a.ja(default);
    for (body, rules) in bodies {
        a.bind(body);
        let mut unconditional = false;
        for rule in rules {
            let next_rule = a.label();
            for c in &rule.conds {
                emit_cond(&mut a, c, next_rule);
            }
            a.ret(rule.ret);
            a.bind(next_rule);
            if rule.conds.is_empty() {
                // Later rules of this syscall can never match.
                unconditional = true;
                break;
            }
        }
        if !unconditional {
            a.ja(default);
        }
    }
    a.bind(default);
    a.ret(default_ret);
    a.bind(enosys);
    a.ret(RET_ERRNO | ENOSYS);
    a.bind(kill);
    a.ret(RET_KILL_PROCESS);
    for (ret, l) in stubs {
        a.bind(l);
        a.ret(ret);
    }
    assemble(a.ops, a.labels)
}

#[cfg(test)]
mod tests;
