// SPDX-License-Identifier: Apache-2.0
//! Interrupts in long mode: an IDT whose every vector enters Rust through one common stub, the
//! 8259 PICs masked, the xAPIC enabled with a one-shot timer that bounds waits, and IOAPIC
//! routing of device interrupt lines.
//!
//! Routing: IOAPIC pin `n` -> vector [`LINE_VECTOR_BASE`] + `n`, fixed delivery, physical
//! destination (this CPU's APIC id), active high, edge triggered: what a KVM irqfd delivers.
//! The spurious vector is 0xff.
//!
//! No periodic tick: the LAPIC timer runs in one-shot mode and is armed only while a wait with
//! a bound ([`wait_until`], [`Deadline`]) halts, then stopped again. An idle guest waiting for a
//! device therefore takes no interrupt at all until the device (or its bound) wakes it. A tick
//! is not free here: every timer interrupt and its EOI is emulated under `kvm_pvm`, and at
//! 100 Hz an idle guest cost about 0.9% of a host core (DESIGN.md §6). Time is counted only
//! while the CPU waits, from the timer's current count (1 GHz APIC bus under KVM and QEMU alike,
//! divide by [`TIMER_DIVIDE`], so one count is [`NS_PER_COUNT`] ns), which is what bounds on
//! waits need: the guest's own work between waits is not time it waited.
//!
//! Interrupts stay disabled (RFLAGS.IF = 0) everywhere but inside [`wait_for_interrupt`]
//! (`sti; hlt; cli`), so handlers only run at that point and never race the code they
//! interrupt. With the in-kernel irqchip a `hlt` waits inside `KVM_RUN` until an interrupt
//! arrives, which costs no guest instructions (they are all emulated, ~1 us each, on the
//! project's nested `kvm_pvm` host).
//!
//! A device registered with [`register_source`] has its 32-bit interrupt status register read
//! on each interrupt of its line, the value written to its acknowledge register and the bits
//! recorded (virtio-mmio `InterruptStatus`/`InterruptACK`, virtio 1.2 §4.2.2).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use crate::smp::{DEFAULT_LAPIC_ADDR, LocalApic};
use crate::{exit, phys, println, serial};

/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of IOAPIC pin 0; pin `n` uses this + `n`.
pub const LINE_VECTOR_BASE: u8 = 0x30;
/// LAPIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// IOAPIC MMIO base (layout::IOAPIC_ADDR).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// IOAPIC input pins.
pub const IOAPIC_PINS: u8 = 24;
/// Divider of the LAPIC timer: one count every 16 bus cycles.
pub const TIMER_DIVIDE: u64 = 16;
/// Nanoseconds per timer count (the APIC bus runs at 1 GHz).
pub const NS_PER_COUNT: u64 = TIMER_DIVIDE;
/// The longest single one-shot (about 68.7 s); longer waits re-arm.
pub const MAX_ONE_SHOT_NS: u64 = u32::MAX as u64 * NS_PER_COUNT;
/// Interrupt sources that can be registered.
pub const MAX_SOURCES: usize = 8;

// xAPIC register offsets (Intel SDM vol. 3, "Local APIC Register Address Map").
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const SVR_APIC_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration "divide by 16" (SDM: bits 3, 1:0 = 0b0_11), [`TIMER_DIVIDE`].
const TIMER_DIVIDE_BY_16: u32 = 0b0011;
/// IOAPIC register select and data window.
const IOAPIC_REGSEL: u64 = IOAPIC_ADDR;
const IOAPIC_WINDOW: u64 = IOAPIC_ADDR + 0x10;
/// First redirection-table register (pin `n`: low half 0x10 + 2n, high half 0x11 + 2n).
const IOAPIC_REDTBL: u32 = 0x10;
/// Data ports of the master and slave 8259 (writes outside initialisation set the mask).
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_DATA: u16 = 0xa1;
/// Exceptions that push an error code.
const ERROR_CODE_VECTORS: [u64; 8] = [8, 10, 11, 12, 13, 14, 17, 21];

// One 16-byte stub per vector at `fw_isr_stubs + 16 * vector`: push the vector, jump to the
// common part, which saves the caller-saved registers, aligns the stack and calls
// `fw_interrupt(vector, frame)`. Exceptions never return (the handler ends the guest), so the
// error code some of them push needs no special case on the way out.
core::arch::global_asm!(
    r#"
    .section .text.fw_isr, "ax", @progbits
    .balign 16
    .globl fw_isr_stubs
fw_isr_stubs:
    .set fw_isr_vec, 0
    .rept 256
    .balign 16
    pushq $fw_isr_vec
    jmp fw_isr_common
    .set fw_isr_vec, fw_isr_vec + 1
    .endr
fw_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbx
    mov 80(%rsp), %rdi
    lea 88(%rsp), %rsi
    mov %rsp, %rbx
    and $-16, %rsp
    cld
    call fw_interrupt
    mov %rbx, %rsp
    pop %rbx
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq
    .section .text, "ax", @progbits
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// First interrupt stub (`global_asm!` above).
    static fw_isr_stubs: u8;
}

/// Code segment of the boot GDT (boot64.S).
const KERNEL_CS: u64 = 0x08;
/// Gate type: present, DPL 0, 64-bit interrupt gate (clears IF on entry).
const INTERRUPT_GATE: u64 = 0x8e;

/// The IDT: 256 gates of two words each.
static IDT: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];
/// Timer interrupts since [`init`] (each ends one bounded wait's one-shot).
static TIMER_INTERRUPTS: AtomicU32 = AtomicU32::new(0);
/// Interrupts on vectors nobody expects.
static UNEXPECTED: AtomicU32 = AtomicU32::new(0);

/// A device interrupt source (see [`register_source`]).
struct Source {
    /// IOAPIC pin, or `u32::MAX` while the slot is free.
    line: AtomicU32,
    status_addr: AtomicU64,
    ack_addr: AtomicU64,
    bits: AtomicU32,
    count: AtomicU32,
}

impl Source {
    const fn new() -> Self {
        Self {
            line: AtomicU32::new(u32::MAX),
            status_addr: AtomicU64::new(0),
            ack_addr: AtomicU64::new(0),
            bits: AtomicU32::new(0),
            count: AtomicU32::new(0),
        }
    }
}

static SOURCES: [Source; MAX_SOURCES] = [const { Source::new() }; MAX_SOURCES];
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);
/// Destination APIC id for routed lines (the BSP's), set by [`init`].
static APIC_ID: AtomicU32 = AtomicU32::new(0);

/// Why interrupts could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqError {
    /// The APIC is in x2APIC mode; only the xAPIC MMIO page is supported.
    X2Apic,
    /// The LAPIC timer's current count does not move.
    TimerStuck,
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::X2Apic => write!(f, "APIC in x2APIC mode"),
            Self::TimerStuck => write!(f, "LAPIC timer does not count"),
        }
    }
}

fn lapic_write(reg: u64, value: u32) {
    phys::mmio_write_u32(DEFAULT_LAPIC_ADDR + reg, value);
}

fn lapic_read(reg: u64) -> u32 {
    phys::mmio_read_u32(DEFAULT_LAPIC_ADDR + reg).unwrap_or(0)
}

fn ioapic_write(index: u32, value: u32) {
    phys::mmio_write_u32(IOAPIC_REGSEL, index);
    phys::mmio_write_u32(IOAPIC_WINDOW, value);
}

fn set_gate(vector: usize, handler: u64) {
    let low = (handler & 0xffff)
        | (KERNEL_CS << 16)
        | (INTERRUPT_GATE << 40)
        | ((handler >> 16) & 0xffff) << 48;
    if let (Some(lo), Some(hi)) = (IDT.get(2 * vector), IDT.get(2 * vector + 1)) {
        lo.store(low, Ordering::Relaxed);
        hi.store(handler >> 32, Ordering::Relaxed);
    }
}

/// Installs the IDT, masks the PICs and LAPIC LINT0, enables the LAPIC and checks that its timer
/// counts; the timer is left stopped (one-shot mode, initial count 0) until a bounded wait arms
/// it. Interrupts stay disabled until [`wait_for_interrupt`].
pub fn init() -> Result<(), IrqError> {
    if LocalApic::x2apic_enabled() {
        return Err(IrqError::X2Apic);
    }
    // The VMM wires the PIC to LINT0 (ExtINT); an unprogrammed PIC would deliver device lines
    // on exception vectors. Mask it at both ends.
    serial::outb(PIC_MASTER_DATA, 0xff);
    serial::outb(PIC_SLAVE_DATA, 0xff);
    let stubs = (&raw const fw_isr_stubs).addr() as u64;
    for vector in 0..256 {
        set_gate(vector, stubs + 16 * vector as u64);
    }
    let idt_base = IDT.as_ptr().addr() as u64;
    let mut idtr = [0u8; 10];
    idtr[..2].copy_from_slice(&(16u16 * 256 - 1).to_le_bytes());
    idtr[2..].copy_from_slice(&idt_base.to_le_bytes());
    // SAFETY: `idtr` is a live 10-byte pseudo-descriptor naming `IDT`, a static that lives
    // forever and whose every gate points at a stub of `fw_isr_stubs` in the boot code
    // segment. Interrupts are disabled (boot code `cli`), so nothing uses the IDT until
    // `wait_for_interrupt`.
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) idtr.as_ptr(), options(readonly, nostack)) };

    APIC_ID.store(
        u32::from(LocalApic::new(DEFAULT_LAPIC_ADDR).id()),
        Ordering::Relaxed,
    );
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    // One-shot mode (LVT timer mode bits 0), masked while the check below runs.
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    let first = lapic_read(LAPIC_TIMER_CURRENT);
    exit::delay_cycles(100_000);
    let counts = lapic_read(LAPIC_TIMER_CURRENT) != first;
    // Initial count 0 stops the timer (SDM vol. 3, "APIC Timer").
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    if !counts {
        return Err(IrqError::TimerStuck);
    }
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    Ok(())
}

/// Routes IOAPIC pin `line` to vector [`LINE_VECTOR_BASE`] + `line` on this CPU, unmasked;
/// `false` for a pin the IOAPIC does not have.
pub fn route_line(line: u8) -> bool {
    if line >= IOAPIC_PINS {
        return false;
    }
    let index = IOAPIC_REDTBL + 2 * u32::from(line);
    ioapic_write(index + 1, APIC_ID.load(Ordering::Relaxed) << 24);
    // Fixed delivery, physical destination, active high, edge triggered, not masked.
    ioapic_write(index, u32::from(LINE_VECTOR_BASE + line));
    true
}

/// A registered interrupt source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId(usize);

impl SourceId {
    fn source(self) -> Option<&'static Source> {
        SOURCES.get(self.0)
    }

    /// The status bits recorded since the last call (cleared).
    pub fn take_bits(self) -> u32 {
        self.source()
            .map_or(0, |s| s.bits.swap(0, Ordering::Relaxed))
    }

    /// Interrupts taken on the source's line since registration.
    pub fn count(self) -> u32 {
        self.source().map_or(0, |s| s.count.load(Ordering::Relaxed))
    }
}

/// Registers a device on IOAPIC pin `line` and routes the pin. Each interrupt of the line then
/// reads the 32-bit register at `status_addr`, writes a non-zero value to `ack_addr` and ORs it
/// into the source's bits. `None` when the line is invalid or all slots are taken.
pub fn register_source(line: u8, status_addr: u64, ack_addr: u64) -> Option<SourceId> {
    if line >= IOAPIC_PINS {
        return None;
    }
    let id = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    let source = SOURCES.get(id)?;
    source.status_addr.store(status_addr, Ordering::Relaxed);
    source.ack_addr.store(ack_addr, Ordering::Relaxed);
    source.line.store(u32::from(line), Ordering::Relaxed);
    route_line(line);
    Some(SourceId(id))
}

/// Timer interrupts since [`init`] (wrapping): one per bounded wait that ran out, or per
/// [`MAX_ONE_SHOT_NS`] of a longer one; none while the guest waits without a bound.
pub fn timer_interrupts() -> u32 {
    TIMER_INTERRUPTS.load(Ordering::Relaxed)
}

/// Interrupts taken on vectors nobody registered.
pub fn unexpected() -> u32 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// Enables interrupts, halts until one arrives, lets its handler run, disables them again. An
/// interrupt that became pending while they were disabled ends the `hlt` at once (`sti` holds
/// interrupts off until after the next instruction), so no wake-up is lost.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is installed (`init`) and every handler saves what it clobbers and
    // returns with `iretq`; the only memory handlers touch is this module's atomics (the asm
    // block may read and write memory, so the compiler reloads them afterwards).
    unsafe { core::arch::asm!("sti", "hlt", "cli") };
}

/// The time left of a bounded wait that may span several calls of [`Deadline::wait_until`]
/// (a receive loop that takes other work between its waits, say). Only time spent waiting is
/// counted (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    left_ns: u64,
}

impl Deadline {
    /// A bound of `timeout` of waiting.
    pub fn after(timeout: Duration) -> Self {
        Self {
            left_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Whether the bound is used up.
    pub fn expired(&self) -> bool {
        self.left_ns == 0
    }

    /// Waits (with [`wait_for_interrupt`]) until `done` returns true or the bound is used up;
    /// returns whether `done` did. The timer is armed for the time left while the CPU halts,
    /// and stopped before this returns.
    pub fn wait_until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        loop {
            if done() {
                return true;
            }
            if self.left_ns == 0 {
                return false;
            }
            let counts = u32::try_from(self.left_ns.div_ceil(NS_PER_COUNT)).unwrap_or(u32::MAX);
            lapic_write(LAPIC_TIMER_INITIAL, counts);
            wait_for_interrupt();
            // The count runs down to 0 and stays there: what is left is the time not waited.
            let left = lapic_read(LAPIC_TIMER_CURRENT);
            lapic_write(LAPIC_TIMER_INITIAL, 0);
            // Rounded up to whole counts, so a one-shot that ran out uses up the bound (or its
            // part of a bound longer than MAX_ONE_SHOT_NS).
            let waited = u64::from(counts.saturating_sub(left)) * NS_PER_COUNT;
            self.left_ns = self.left_ns.saturating_sub(waited);
        }
    }
}

/// Waits (with [`wait_for_interrupt`]) until `done` returns true or `timeout` has passed
/// waiting; returns whether `done` did. The LAPIC timer runs only during this call.
pub fn wait_until(timeout: Duration, done: impl FnMut() -> bool) -> bool {
    Deadline::after(timeout).wait_until(done)
}

/// Waits `duration` (device interrupts that arrive meanwhile are handled and waited past).
pub fn sleep(duration: Duration) {
    wait_until(duration, || false);
}

fn device_line(line: u32) {
    for source in &SOURCES {
        if source.line.load(Ordering::Relaxed) != line {
            continue;
        }
        source.count.fetch_add(1, Ordering::Relaxed);
        let status = phys::mmio_read_u32(source.status_addr.load(Ordering::Relaxed)).unwrap_or(0);
        if status != 0 {
            phys::mmio_write_u32(source.ack_addr.load(Ordering::Relaxed), status);
            source.bits.fetch_or(status, Ordering::Relaxed);
        }
    }
}

fn exception(vector: u64, frame: u64) -> ! {
    let (error, rip_at) = if ERROR_CODE_VECTORS.contains(&vector) {
        (phys::read_u64(frame), frame.wrapping_add(8))
    } else {
        (None, frame)
    };
    let rip = phys::read_u64(rip_at).unwrap_or(0);
    match error {
        Some(e) => println!("EXCEPTION: vector {vector} error {e:#x} rip {rip:#x}"),
        None => println!("EXCEPTION: vector {vector} rip {rip:#x}"),
    }
    exit::triple_fault()
}

/// Called by the common stub with the vector and the address of the CPU's frame.
#[unsafe(no_mangle)]
extern "C" fn fw_interrupt(vector: u64, frame: u64) {
    const TIMER: u64 = TIMER_VECTOR as u64;
    const SPURIOUS: u64 = SPURIOUS_VECTOR as u64;
    const LINES: core::ops::Range<u64> =
        LINE_VECTOR_BASE as u64..LINE_VECTOR_BASE as u64 + IOAPIC_PINS as u64;
    match vector {
        0..32 => exception(vector, frame),
        TIMER => {
            TIMER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        }
        // A spurious interrupt must not be acknowledged.
        SPURIOUS => return,
        v if LINES.contains(&v) => device_line(u32::try_from(v - LINES.start).unwrap_or(u32::MAX)),
        _ => {
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        }
    }
    lapic_write(LAPIC_EOI, 0);
}
