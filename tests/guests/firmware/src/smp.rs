// SPDX-License-Identifier: Apache-2.0
//! Starting application processors through the xAPIC: INIT, then two SIPIs pointing at a
//! real-mode trampoline copied to [`TRAMPOLINE_ADDR`]. Each AP increments a counter with
//! `lock inc` and parks in a `cli; hlt` loop, so the BSP can count the APs that came up.

use crate::{exit, phys};

/// Physical address of the AP trampoline (layout::GUEST_FREE_LOW_START; SIPI vector 0x10).
pub const TRAMPOLINE_ADDR: u64 = 0x1_0000;
/// Default xAPIC MMIO base.
pub const DEFAULT_LAPIC_ADDR: u64 = 0xfee0_0000;

const APIC_ID: u64 = 0x20;
const APIC_SVR: u64 = 0xf0;
const APIC_ICR_LOW: u64 = 0x300;
const APIC_ICR_HIGH: u64 = 0x310;
const ICR_INIT: u32 = 0x0000_4500; // delivery mode INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // delivery mode start-up, level assert
const ICR_PENDING: u32 = 1 << 12;
/// IA32_APIC_BASE MSR.
const MSR_APIC_BASE: u32 = 0x1b;

// The trampoline: entered in real mode at 0x1000:0000. Position independent (it addresses its
// counter relative to cs), assembled into .rodata and copied at run time.
core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a", @progbits
    .balign 16
    .globl ap_trampoline_start, ap_trampoline_counter, ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lock incl (ap_trampoline_counter - ap_trampoline_start)
1:
    cli
    hlt
    jmp 1b
    .balign 4
ap_trampoline_counter:
    .long 0
ap_trampoline_end:
    .code64
    .section .text, "ax", @progbits
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_counter: u8;
    static ap_trampoline_end: u8;
}

fn sym(s: *const u8) -> u64 {
    s.addr() as u64
}

fn rdmsr(msr: u32) -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: reads an architectural MSR present on every x86-64 CPU with an APIC.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The BSP's local APIC (xAPIC, MMIO).
#[derive(Debug, Clone, Copy)]
pub struct LocalApic {
    base: u64,
}

impl LocalApic {
    /// The local APIC at `base`.
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    fn read(&self, reg: u64) -> u32 {
        self.base
            .checked_add(reg)
            .and_then(phys::mmio_read_u32)
            .unwrap_or(0)
    }

    fn write(&self, reg: u64, value: u32) {
        if let Some(addr) = self.base.checked_add(reg) {
            phys::mmio_write_u32(addr, value);
        }
    }

    /// Whether the APIC is in x2APIC mode (then the MMIO page does not work).
    pub fn x2apic_enabled() -> bool {
        rdmsr(MSR_APIC_BASE) & (1 << 10) != 0
    }

    /// This CPU's APIC id.
    pub fn id(&self) -> u8 {
        (self.read(APIC_ID) >> 24).to_le_bytes()[0]
    }

    /// Software-enables the APIC (spurious vector 0xff).
    pub fn enable(&self) {
        self.write(APIC_SVR, self.read(APIC_SVR) | 0x1ff);
    }

    /// Sends an IPI and waits (bounded) until the APIC has accepted it.
    pub fn send_ipi(&self, apic_id: u8, icr_low: u32) {
        self.write(APIC_ICR_HIGH, u32::from(apic_id) << 24);
        self.write(APIC_ICR_LOW, icr_low);
        for _ in 0..100_000 {
            if self.read(APIC_ICR_LOW) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// Copies the trampoline to [`TRAMPOLINE_ADDR`] and clears its counter.
fn install_trampoline() -> u64 {
    let start = sym(&raw const ap_trampoline_start);
    let end = sym(&raw const ap_trampoline_end);
    let counter = sym(&raw const ap_trampoline_counter);
    let mut off = 0;
    while start + off < end {
        let byte = phys::read_u8(start + off).unwrap_or(0);
        phys::write_u8(TRAMPOLINE_ADDR + off, byte);
        off += 1;
    }
    let counter = TRAMPOLINE_ADDR + (counter - start);
    for i in 0..4 {
        phys::write_u8(counter + i, 0);
    }
    counter
}

/// Reads the trampoline counter (APs that have run the trampoline).
fn started(counter: u64) -> u32 {
    phys::mmio_read_u32(counter).unwrap_or(0)
}

/// Starts every processor in `apic_ids` except the caller and waits up to `timeout_cycles`
/// TSC ticks for them. Returns how many APs came up.
pub fn start_aps(lapic: &LocalApic, apic_ids: &[u8], timeout_cycles: u64) -> u32 {
    let me = lapic.id();
    let aps = apic_ids.iter().filter(|&&id| id != me);
    let want = u32::try_from(aps.clone().count()).unwrap_or(u32::MAX);
    if want == 0 {
        return 0;
    }
    let counter = install_trampoline();
    lapic.enable();
    let vector = u32::try_from(TRAMPOLINE_ADDR >> 12).unwrap_or(0);
    for &id in aps.clone() {
        lapic.send_ipi(id, ICR_INIT);
    }
    exit::delay_cycles(2_000_000); // ~1 ms: INIT settles (MP spec asks 10 ms of real hardware)
    for _ in 0..2 {
        for &id in aps.clone() {
            lapic.send_ipi(id, ICR_STARTUP | vector);
        }
        exit::delay_cycles(400_000); // ~200 us between SIPIs
        if started(counter) >= want {
            break;
        }
    }
    let t0 = exit::rdtsc();
    while started(counter) < want && exit::rdtsc().wrapping_sub(t0) < timeout_cycles {
        core::hint::spin_loop();
    }
    started(counter)
}
