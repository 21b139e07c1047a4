// SPDX-License-Identifier: Apache-2.0
//! A VM's KVM-held state, read and written back: per vCPU the registers, system registers,
//! FPU and XSAVE areas, XCRs, local APIC, MSRs, MP state, pending events, debug registers and
//! TSC frequency; per VM the in-kernel PIC pair and IOAPIC, the PIT and the KVM clock
//! (DESIGN.md section 8).
//!
//! Restoring follows the order the state depends on (Firecracker's and Cloud Hypervisor's
//! order): TSC frequency first, the MP state, general and system registers, XSAVE (the FPU
//! state with it)/XCRs, debug registers, the LAPIC, then MSRs (after the system registers: EFER
//! and friends) and the pending events last (they refer to the LAPIC). On the VM: the PIT and
//! the clock, then the three irqchips. Where KVM syncs registers through `kvm_run`
//! ([`Registers`]), the general registers and events are loaded by the first `KVM_RUN`.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES, Msrs,
    Xsave, kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, SyncReg, VcpuFd, VmFd};

/// Why reading or writing KVM state failed: the ioctl that failed and its error.
#[derive(Debug, thiserror::Error)]
#[error("KVM state: {op} failed")]
pub struct StateError {
    /// The ioctl, e.g. `KVM_SET_SREGS`.
    pub op: &'static str,
    /// Its error.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { op, source }
}

/// One vCPU's state.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    #[serde(with = "FpuDef")]
    fpu: kvm_fpu,
    /// The whole XSAVE area (`kvm_xsave` and, with `KVM_CAP_XSAVE2`, what follows it), in
    /// 32-bit words; saved as its bytes ([`xsave_bytes`]).
    #[serde(with = "xsave_bytes")]
    xsave: Vec<u32>,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debug_regs: kvm_debugregs,
    tsc_khz: Option<u32>,
}

/// A vCPU's XSAVE area as a saved state holds it: its bytes (the words little-endian, as the
/// CPU lays them out), which postcard writes as they are; a sequence of words went one
/// variable-length integer at a time, a tenth of a handover's encoding and decoding.
mod xsave_bytes {
    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(words: &[u32], out: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.serialize_bytes(&bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Vec<u32>, D::Error> {
        input.deserialize_bytes(Words)
    }

    struct Words;

    impl de::Visitor<'_> for Words {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an XSAVE area: bytes, a whole number of 32-bit words")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u32>, E> {
            let words = bytes.chunks_exact(4);
            if !words.remainder().is_empty() {
                return Err(E::invalid_length(bytes.len(), &self));
            }
            // Each chunk is 4 bytes long.
            Ok(words
                .map(|w| w.try_into().map_or(0, u32::from_le_bytes))
                .collect())
        }
    }
}

/// `kvm_fpu` field by field, for serde (kvm-bindings gives it no serde implementation).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "kvm_fpu")]
struct FpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// Words of `kvm_xsave` (its fixed 4 KiB region).
const XSAVE_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;

/// The XSAVE area size of VMs of `vm`'s kind: `KVM_CAP_XSAVE2` when the host has it (it can
/// exceed 4 KiB, e.g. with AMX), else the fixed `kvm_xsave`.
pub(crate) fn xsave_words(vm: &VmFd) -> usize {
    let bytes = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    bytes.div_ceil(4).max(XSAVE_WORDS)
}

/// Reads `indexes` (the host's MSR list) in batches; an MSR KVM refuses to read is left out
/// (`KVM_GET_MSRS` stops at the first one it cannot read and reports how many it did).
fn read_msrs(fd: &VcpuFd, indexes: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indexes.len());
    let mut rest = indexes;
    while !rest.is_empty() {
        let batch = rest
            .get(..rest.len().min(KVM_MAX_MSR_ENTRIES))
            .unwrap_or_default();
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            op: "KVM_GET_MSRS (batch)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(msrs.as_slice().get(..read).unwrap_or_default());
        // Skip the one it could not read (if it stopped early) and go on after it.
        let skip = if read < batch.len() { read + 1 } else { read };
        rest = rest.get(skip..).unwrap_or_default();
    }
    Ok(out)
}

/// Lets KVM finish an exit the vCPU left half done. After an MMIO or port read exit, KVM
/// writes the value into the guest's register only on the next `KVM_RUN`; state read before
/// that would lose it. `KVM_RUN` with `immediate_exit` set completes such an exit and returns
/// `EINTR` without entering the guest (the KVM API documents this use).
pub(crate) fn settle(fd: &mut VcpuFd) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let ran = fd.run().map(drop);
    fd.set_kvm_immediate_exit(0);
    match ran {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(source) => Err(StateError {
            op: "KVM_RUN (immediate exit)",
            source,
        }),
    }
}

/// How a vCPU's registers, system registers and pending events are read and written: through
/// `kvm_run` (`KVM_CAP_SYNC_REGS`: KVM stores them there on the way out of `KVM_RUN`, and loads
/// what is marked dirty on the way in) or with one ioctl each. Every vCPU ioctl costs a
/// `vcpu_load`, which on some hosts (a pagetable-based KVM inside a VM, `kvm_pvm`) reads host
/// MSRs at ~8 us a call: the save and restore of a live handover are mostly ioctls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Registers {
    /// `KVM_CAP_SYNC_REGS` covers the registers, system registers and events.
    pub(crate) sync: bool,
}

/// The register sets `kvm_run` carries.
const SYNCED: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// What reading a vCPU's state needs besides the vCPU.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    /// The host's MSR list (`KVM_GET_MSR_INDEX_LIST`).
    pub(crate) msr_list: std::sync::Arc<[u32]>,
    /// The XSAVE area size ([`xsave_words`]).
    pub(crate) xsave_words: usize,
    /// The TSC frequency the VM's vCPUs run at (kHz), known from its start: KVM's default for
    /// a booted VM, the saved one for a restored VM.
    pub(crate) tsc_khz: Option<u32>,
    /// How registers are read.
    pub(crate) registers: Registers,
}

/// The parts of a vCPU's state that KVM gives every new vCPU of one role (the boot vCPU or
/// another) and that a guest often leaves as they are: a restore skips the write of each part
/// the saved state has as KVM made it (one `vcpu_load` fewer apiece, see [`Registers`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fresh {
    mp_state: kvm_mp_state,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
}

impl Fresh {
    /// Reads them from `fd`, a vCPU that has neither run nor been written (its CPUID aside).
    pub(crate) fn read(fd: &VcpuFd) -> Result<Self, StateError> {
        Ok(Fresh {
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        })
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is parked outside
    /// `KVM_RUN`), after finishing an exit it left half done ([`settle`]); that `KVM_RUN` also
    /// hands over the registers, system registers and events where KVM syncs them.
    pub(crate) fn save(fd: &mut VcpuFd, reading: &Reading) -> Result<Self, StateError> {
        let (regs, sregs, events) = if reading.registers.sync {
            for reg in SYNCED {
                fd.set_sync_valid_reg(reg);
            }
            let settled = settle(fd);
            let synced = fd.sync_regs();
            for reg in SYNCED {
                fd.clear_sync_valid_reg(reg);
            }
            settled?;
            (synced.regs, synced.sregs, synced.events)
        } else {
            settle(fd)?;
            // Events first: reading them does not change them, but the order keeps what the
            // vCPU was about to do next to the registers it would do it with.
            let events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
            let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
            let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            (regs, sregs, events)
        };
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let xsave = read_xsave(fd, reading.xsave_words)?;
        let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, &reading.msr_list)?;
        Ok(VcpuState {
            regs,
            sregs,
            // The x87/SSE state is in the XSAVE area, which a restore writes; the copy kept
            // here is read from it (what KVM_GET_FPU would have said).
            fpu: fpu_of(&xsave),
            xsave,
            xcrs,
            lapic,
            msrs,
            mp_state,
            events,
            debug_regs,
            tsc_khz: reading.tsc_khz,
        })
    }

    /// The TSC frequency the vCPU ran at, if it was known.
    pub(crate) fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Writes the state into a new vCPU (whose CPUID is already set) of a VM whose vCPUs run
    /// at `default_tsc_khz` unless told otherwise; `fresh`, what KVM gives such a vCPU, spares
    /// the writes that would change nothing. With synced registers, the general registers and
    /// the events are loaded by the vCPU's first `KVM_RUN` (the events last, as they must be);
    /// the system registers still go first, by ioctl: they carry the APIC base (its mode),
    /// which the LAPIC's state is read against.
    pub(crate) fn restore(
        &self,
        fd: &mut VcpuFd,
        default_tsc_khz: Option<u32>,
        registers: Registers,
        fresh: Option<&Fresh>,
    ) -> Result<(), StateError> {
        if let Some(khz) = self.tsc_khz
            && default_tsc_khz != Some(khz)
        {
            fd.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ"))?;
        }
        if fresh.is_none_or(|f| f.mp_state != self.mp_state) {
            fd.set_mp_state(self.mp_state)
                .map_err(err("KVM_SET_MP_STATE"))?;
        }
        if registers.sync {
            let synced = fd.sync_regs_mut();
            synced.regs = self.regs;
            synced.events = self.events;
            fd.set_sync_dirty_reg(SyncReg::Register);
            fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
        } else {
            fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        }
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        write_xsave(fd, &self.xsave)?;
        if fresh.is_none_or(|f| f.xcrs != self.xcrs) {
            fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        }
        if fresh.is_none_or(|f| f.debug_regs != self.debug_regs) {
            fd.set_debug_regs(&self.debug_regs)
                .map_err(err("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for batch in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(batch).map_err(|_| StateError {
                op: "KVM_SET_MSRS (batch)",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let written = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if written != batch.len() {
                let index = batch.get(written).map_or(0, |e| e.index);
                log::warn!("KVM_SET_MSRS refused MSR {index:#x}; it keeps KVM's value");
            }
        }
        if !registers.sync {
            fd.set_vcpu_events(&self.events)
                .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// The x87/SSE state of an XSAVE area (its legacy region, laid out as `FXSAVE` writes it), as
/// `kvm_fpu` holds it.
fn fpu_of(xsave: &[u32]) -> kvm_fpu {
    /// `N` bytes at `off` (zeros past the end).
    fn take<const N: usize>(bytes: &[u8], off: usize) -> [u8; N] {
        bytes
            .get(off..)
            .and_then(|b| b.get(..N))
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; N])
    }
    // The first 416 bytes of the 512-byte legacy region: control words, 8 x87 and 16 XMM
    // registers.
    let bytes: Vec<u8> = xsave
        .iter()
        .take(104)
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let mut fpu = kvm_fpu {
        fcw: u16::from_le_bytes(take(&bytes, 0)),
        fsw: u16::from_le_bytes(take(&bytes, 2)),
        ftwx: u8::from_le_bytes(take(&bytes, 4)),
        last_opcode: u16::from_le_bytes(take(&bytes, 6)),
        last_ip: u64::from_le_bytes(take(&bytes, 8)),
        last_dp: u64::from_le_bytes(take(&bytes, 16)),
        mxcsr: u32::from_le_bytes(take(&bytes, 24)),
        ..Default::default()
    };
    for (i, reg) in fpu.fpr.iter_mut().enumerate() {
        *reg = take(&bytes, 32 + 16 * i);
    }
    for (i, reg) in fpu.xmm.iter_mut().enumerate() {
        *reg = take(&bytes, 160 + 16 * i);
    }
    fpu
}

fn read_xsave(fd: &VcpuFd, words: usize) -> Result<Vec<u32>, StateError> {
    if words <= XSAVE_WORDS {
        let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let extra = words.saturating_sub(XSAVE_WORDS);
    let mut xsave = Xsave::new(extra).map_err(|_| StateError {
        op: "KVM_GET_XSAVE2 (size)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    // SAFETY: `xsave` holds `kvm_xsave` plus `extra` words, which is the size
    // KVM_CAP_XSAVE2 reported for this VM: the kernel writes no more than that.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(err("KVM_GET_XSAVE2"))?;
    let fam = xsave.as_fam_struct_ref();
    let mut out = fam.xsave.region.to_vec();
    out.extend_from_slice(xsave.as_slice());
    Ok(out)
}

fn write_xsave(fd: &VcpuFd, words: &[u32]) -> Result<(), StateError> {
    let extra = words.len().saturating_sub(XSAVE_WORDS);
    let mut xsave = Xsave::new(extra).map_err(|_| StateError {
        op: "KVM_SET_XSAVE (size)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    // SAFETY: only the fixed `region` is written through the reference; the length of the
    // flexible array, which the wrapper relies on, is not touched.
    let fixed = unsafe { xsave.as_mut_fam_struct() };
    for (dst, src) in fixed.xsave.region.iter_mut().zip(words) {
        *dst = *src;
    }
    for (dst, src) in xsave
        .as_mut_slice()
        .iter_mut()
        .zip(words.get(XSAVE_WORDS..).unwrap_or_default())
    {
        *dst = *src;
    }
    // SAFETY: the buffer holds `kvm_xsave` plus every word read from a vCPU of the same kind of
    // VM (the size KVM_CAP_XSAVE2 reported), so the kernel reads no more than it holds.
    unsafe { fd.set_xsave2(&xsave) }.map_err(err("KVM_SET_XSAVE"))
}

/// The VM-wide state held by KVM's in-kernel devices.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the irqchips, the PIT and the clock of a VM whose vCPUs are paused.
    pub(crate) fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(VmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a new VM that has its irqchip and PIT. The guest's clock goes on
    /// from where it was saved (as if the VM had been paused since), not from the time that
    /// passed in between: the agent sets the guest's wall clock after a restore.
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        // No KVM_CLOCK_REALTIME: that would move the clock on by the time since the save.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_regs;

    use super::*;
    use crate::kvm::KvmCell;
    use crate::pool::VmShell;

    /// A VM with one vCPU (its CPUID set), and what a save of it reads with.
    fn vcpu(kvm: &crate::kvm::KvmContext) -> (VmShell, VcpuFd, Reading) {
        let (shell, _) = VmShell::build(kvm, 32 << 20).unwrap();
        let fd = shell.vm_fd.create_vcpu(0).unwrap();
        crate::arch::set_cpuid(&fd, kvm.supported_cpuid(), 0, 1).unwrap();
        let reading = Reading {
            msr_list: kvm.msr_list().into(),
            xsave_words: xsave_words(&shell.vm_fd),
            tsc_khz: kvm.default_tsc_khz(&fd),
            registers: Registers { sync: false },
        };
        (shell, fd, reading)
    }

    /// Registers that are not a new vCPU's.
    fn marked() -> kvm_regs {
        kvm_regs {
            rax: 0x1234_5678,
            rbx: 0xdead_beef,
            rsp: 0x8000,
            rip: 0x1000,
            rflags: 0x2 | 0x40,
            ..Default::default()
        }
    }

    #[test]
    fn registers_synced_through_kvm_run_are_the_ioctls_registers() {
        test_guests::require_kvm!();
        let kvm = KvmCell::default().get().unwrap();
        if !kvm.sync_regs() {
            eprintln!("SKIP: this KVM does not sync registers through kvm_run");
            return;
        }
        let (_shell, mut fd, by_ioctl) = vcpu(&kvm);
        fd.set_regs(&marked()).unwrap();
        let synced = Reading {
            registers: Registers { sync: true },
            ..by_ioctl.clone()
        };
        let a = VcpuState::save(&mut fd, &synced).unwrap();
        let b = VcpuState::save(&mut fd, &by_ioctl).unwrap();
        assert_eq!(a.regs, marked());
        assert_eq!((a.regs, a.sregs, a.events), (b.regs, b.sregs, b.events));
        // The copy of the x87/SSE state read from the XSAVE area is KVM_GET_FPU's, but for
        // MXCSR: a vCPU that never ran has 0 in KVM's own FXSAVE buffer, while its XSAVE area
        // says what the CPU holds, the reset value (0x1f80). A restore writes the XSAVE area.
        let fpu = fd.get_fpu().unwrap();
        assert_eq!(a.fpu.mxcsr, 0x1f80);
        assert_eq!(kvm_fpu { mxcsr: 0, ..a.fpu }, kvm_fpu { mxcsr: 0, ..fpu });

        // Written back through kvm_run into another VM's vCPU: its first KVM_RUN loads them.
        let (_other, mut fd2, _) = vcpu(&kvm);
        a.restore(&mut fd2, synced.tsc_khz, Registers { sync: true }, None)
            .unwrap();
        settle(&mut fd2).unwrap();
        assert_eq!(fd2.get_regs().unwrap(), marked());
        assert_eq!(fd2.get_sregs().unwrap(), a.sregs);
        assert_eq!(fd2.get_vcpu_events().unwrap(), a.events);
    }

    #[test]
    fn the_xsave_area_is_saved_as_its_bytes_and_read_back_as_words() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Area(#[serde(with = "xsave_bytes")] Vec<u32>);
        let area = Area(vec![0x1f80, 0, u32::MAX, 0x0102_0304]);
        let bytes = postcard::to_stdvec(&area).unwrap();
        // A length, then the words' bytes as they are.
        assert_eq!(bytes.len(), 1 + 16);
        assert_eq!(bytes.get(13..17), Some(&[4, 3, 2, 1][..]));
        assert_eq!(postcard::from_bytes::<Area>(&bytes).unwrap(), area);
        // Not a whole number of words: refused, not cut short.
        let ragged = postcard::to_stdvec(&serde_bytes_of(&[1, 2, 3, 4, 5])).unwrap();
        postcard::from_bytes::<Area>(&ragged).unwrap_err();
    }

    /// Bytes serialized as postcard writes a byte string.
    fn serde_bytes_of(bytes: &[u8]) -> impl serde::Serialize + '_ {
        struct Bytes<'a>(&'a [u8]);
        impl serde::Serialize for Bytes<'_> {
            fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
                out.serialize_bytes(self.0)
            }
        }
        Bytes(bytes)
    }

    #[test]
    fn a_restore_skips_only_the_parts_a_new_vcpu_already_has() {
        test_guests::require_kvm!();
        let kvm = KvmCell::default().get().unwrap();
        let (_shell, mut fd, reading) = vcpu(&kvm);
        let fresh = Fresh::read(&fd).unwrap();
        // Not a new vCPU's: a breakpoint armed, the vCPU halted (past the reset vector's code
        // segment: KVM makes a boot vCPU that is set to it runnable).
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.selector = 0x10;
        sregs.cs.base = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut debug_regs = fresh.debug_regs;
        debug_regs.db[0] = 0x1000;
        debug_regs.dr7 |= 1;
        fd.set_debug_regs(&debug_regs).unwrap();
        let halted = kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
        };
        fd.set_mp_state(halted).unwrap();
        let saved = VcpuState::save(&mut fd, &reading).unwrap();
        assert_eq!(
            saved.xcrs, fresh.xcrs,
            "the XCRs were left as KVM made them"
        );

        let (_other, mut fd2, _) = vcpu(&kvm);
        saved
            .restore(&mut fd2, reading.tsc_khz, reading.registers, Some(&fresh))
            .unwrap();
        assert_eq!(fd2.get_debug_regs().unwrap(), saved.debug_regs);
        assert_eq!(fd2.get_debug_regs().unwrap().db[0], 0x1000);
        assert_eq!(fd2.get_mp_state().unwrap(), halted);
        assert_eq!(fd2.get_xcrs().unwrap(), saved.xcrs);
    }
}
