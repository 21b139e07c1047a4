// SPDX-License-Identifier: Apache-2.0
//! Purpose-built test guests for KVM tests and benchmarks, plus the `require_kvm!` gate.
//!
//! This environment's `/dev/kvm` cannot run a stock Linux guest (DESIGN.md §5), so the project
//! boots small guests of its own that exercise the VMM for real. `build.rs` builds them from
//! `firmware/` (a `no_std` crate for `x86_64-unknown-none`); nothing binary is committed.
//!
//! Every guest is an ELF64 linked at 0x100000 with one `PT_LOAD` and one `PT_NOTE` holding the
//! Xen PVH note (type 18, 32-bit entry). The long-mode guests also have a Linux 64-bit boot
//! protocol entry at [`LINUX64_ENTRY`] (also the ELF entry), and [`long64_bzimage`] wraps
//! `long64` as a bzImage. They talk to the VMM through COM1 (0x3f8), the boot timer (byte 123
//! at 0xd000_0000), and end with a triple fault (`KVM_EXIT_SHUTDOWN`) or an i8042 reset.
//! [`console`] has the exact lines they print; [`virtio`] has the command-line keys and the
//! protocol facts of the `virtio` guest.
//!
//! Guest instructions are all emulated on the project's nested `kvm_pvm` host (about 1 us
//! each), so the guests keep their work small.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::OpenOptions;
use std::path::Path;

/// Physical address the guests are linked and loaded at (layout::HIMEM_START).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Linux 64-bit boot protocol entry of the long-mode guests: [`LOAD_ADDR`] + 0x200. It is the
/// ELF entry of `long64`, `smp`, `reset` and `spin`, and the bzImage's 64-bit entry.
pub const LINUX64_ENTRY: u64 = LOAD_ADDR + 0x200;

/// One purpose-built test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Guest {
    /// Stays in 32-bit protected mode: prints its PVH start_info, boot timer, triple fault.
    Pvh32,
    /// Long mode through PVH or the Linux 64-bit entry: prints boot info, tests the top RAM
    /// page below 4 GiB, boot timer, triple fault.
    Long64,
    /// Starts every AP listed in the MP table (INIT/SIPI), counts them, boot timer, triple
    /// fault.
    Smp,
    /// Boot timer, then i8042 reset (0xfe to port 0x64); triple fault if still running.
    Reset,
    /// Boot timer, then prints `.` about every 7 ms (2^24 TSC ticks) forever.
    Spin,
    /// Signals the boot timer as its very first instruction, prints `quick: bye`, triple
    /// fault: the start-up benchmark guest (start -> signal is the VMM's own cost).
    Quick,
    /// Drives the virtio-mmio devices named by `virtio_mmio.device=` with a minimal virtio 1.x
    /// driver (interrupts through the IOAPIC, waits in `sti; hlt`) and prints one line per
    /// step: block, net and vsock tests chosen with the keys in [`virtio`]. Boot timer at
    /// start, triple fault at the end.
    Virtio,
}

impl Guest {
    /// Every guest.
    pub const ALL: [Guest; 7] = [
        Guest::Pvh32,
        Guest::Long64,
        Guest::Smp,
        Guest::Reset,
        Guest::Spin,
        Guest::Quick,
        Guest::Virtio,
    ];

    /// The guest's name (its binary's name in `firmware/src/bin/`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pvh32 => "pvh32",
            Self::Long64 => "long64",
            Self::Smp => "smp",
            Self::Reset => "reset",
            Self::Spin => "spin",
            Self::Quick => "quick",
            Self::Virtio => "virtio",
        }
    }

    /// Path of the guest's ELF image (boot it through its PVH note).
    pub fn elf(self) -> &'static Path {
        Path::new(match self {
            Self::Pvh32 => env!("TEST_GUEST_PVH32"),
            Self::Long64 => env!("TEST_GUEST_LONG64"),
            Self::Smp => env!("TEST_GUEST_SMP"),
            Self::Reset => env!("TEST_GUEST_RESET"),
            Self::Spin => env!("TEST_GUEST_SPIN"),
            Self::Quick => env!("TEST_GUEST_QUICK"),
            Self::Virtio => env!("TEST_GUEST_VIRTIO"),
        })
    }

    /// Whether the guest also has the Linux 64-bit entry at [`LINUX64_ENTRY`] (all but
    /// `pvh32`).
    pub fn has_linux64_entry(self) -> bool {
        !matches!(self, Self::Pvh32 | Self::Quick)
    }
}

/// Path of `long64` as a Linux boot protocol bzImage (protocol 2.12, `XLF_KERNEL_64`,
/// `code32_start` 0x100000, no real-mode code). Boot it through the 64-bit entry at load
/// address + 0x200 with `rsi` = boot_params; it prints `long64: hello (linux64)`.
pub fn long64_bzimage() -> &'static Path {
    Path::new(env!("TEST_GUEST_LONG64_BZIMAGE"))
}

/// The `virtio` guest's command-line keys and what its tests do, for the host side of a test.
///
/// The VMM appends one `virtio_mmio.device=<size>@<base>:<irq>` per device (`size` and `base`
/// take `0x` and K/M/G like Linux's `memparse`; an optional `:<id>` is ignored). Every request
/// is bounded, [`REQUEST_TIMEOUT_SECS`](crate::virtio::REQUEST_TIMEOUT_SECS) each, measured
/// with the LAPIC timer. Block requests and network transmits must each be followed by an
/// interrupt on the device's line (IOAPIC pin `irq`, edge triggered), or the step fails with
/// `completed without an interrupt`; the vsock echo step needs at least one.
pub mod virtio {
    /// Run only the block test.
    pub const TEST_BLK: &str = "virtio.test=blk";
    /// Run only the network test.
    pub const TEST_NET: &str = "virtio.test=net";
    /// Run only the vsock test.
    pub const TEST_VSOCK: &str = "virtio.test=vsock";
    /// Run every test whose device is present (also the default without `virtio.test=`).
    /// Explicitly named tests (`virtio.test=blk,net` works too) fail when their device is
    /// missing; `all` prints `virtio: <dev>: not present` instead.
    pub const TEST_ALL: &str = "virtio.test=all";
    /// After its steps, wait up to [`SWAP_TIMEOUT_SECS`] for a configuration-change interrupt
    /// on the first block device, then re-read capacity and sector 0.
    pub const BLK_SWAP: &str = "virtio.blk_swap=1";
    /// Test every block device (`blk`, `blk1`, `blk2`, ...), not only the first.
    pub const BLK_ALL: &str = "virtio.blk_all=1";
    /// After its steps (instead of [`BLK_SWAP`]), wait up to [`SWAP_TIMEOUT_SECS`] for a disk
    /// in the first block device (capacity at least 10 sectors), write, flush and read back
    /// the pattern, then every 10 ms read sector 0 (the host's mailbox): when its text changes,
    /// read the pattern back again and answer [`blk_ack`] at [`BLK_ACK_SECTOR`] (flushed).
    /// Ends once the disk is detached (capacity 0), or fails after about 2 minutes of polls.
    pub const BLK_WATCH: &str = "virtio.blk_watch=1";

    /// Bound on one request (and on each vsock step).
    pub const REQUEST_TIMEOUT_SECS: u64 = 5;
    /// Bound on the wait for a slot swap.
    pub const SWAP_TIMEOUT_SECS: u64 = 10;
    /// Bound on the wait for each host connection (and on silence while serving one).
    pub const VSOCK_ACCEPT_TIMEOUT_SECS: u64 = 30;

    /// The block test overwrites sectors 1..=8 with [`blk_pattern`] (skipped when the device
    /// is read-only; it needs at least 9 sectors).
    pub const BLK_PATTERN_SECTOR: u64 = 1;
    /// Length of the written pattern.
    pub const BLK_PATTERN_LEN: usize = 4096;
    /// Bytes of sector 0 the block test shows (see [`sector0_text`]).
    pub const BLK_SECTOR0_TEXT_LEN: usize = 16;
    /// Sector where [`BLK_WATCH`] answers the mailbox.
    pub const BLK_ACK_SECTOR: u64 = 9;
    /// Frame lengths the network test sends and expects back (Ethernet header included, after
    /// the 12-byte `virtio_net_hdr_v1`), in this order.
    pub const NET_FRAME_LENS: [usize; 3] = [60, 1000, 1514];
    /// Guest port of the guest -> host connection.
    pub const VSOCK_GUEST_PORT: u32 = 1234;
    /// Host port the guest connects to (CID 2): the host must echo what it reads.
    pub const VSOCK_HOST_PORT: u32 = 5000;
    /// What the guest sends to [`VSOCK_HOST_PORT`] and expects back.
    pub const VSOCK_PING: &[u8] = b"ping from guest";
    /// Guest port that serves host connections (echo in ASCII upper case).
    pub const VSOCK_LISTEN_PORT: u32 = 6000;
    /// Host connections the guest serves, one after the other, before it ends.
    pub const VSOCK_SERVE_COUNT: u32 = 2;
    /// `buf_alloc` the guest advertises on every connection.
    pub const VSOCK_BUF_ALLOC: u32 = 64 * 1024;

    /// The 4 KiB the block test writes at [`BLK_PATTERN_SECTOR`]: little-endian 64-bit word
    /// `i` is `0x7669_7274_696f_0000 | i`.
    pub fn blk_pattern() -> Vec<u8> {
        (0..BLK_PATTERN_LEN / 8)
            .flat_map(|i| (0x7669_7274_696f_0000u64 | i as u64).to_le_bytes())
            .collect()
    }

    /// The sector [`BLK_WATCH`] writes at [`BLK_ACK_SECTOR`] for mailbox text `text` (at most
    /// [`BLK_SECTOR0_TEXT_LEN`] bytes, no NUL).
    pub fn blk_ack(text: &[u8]) -> Vec<u8> {
        let mut sector = vec![0u8; 512];
        sector[..4].copy_from_slice(b"ack ");
        sector[4..4 + text.len()].copy_from_slice(text);
        sector
    }

    /// How the guest shows sector 0: the first [`BLK_SECTOR0_TEXT_LEN`] bytes up to the first
    /// NUL, bytes outside printable ASCII as `.`.
    pub fn sector0_text(sector0: &[u8]) -> String {
        sector0
            .iter()
            .take(BLK_SECTOR0_TEXT_LEN)
            .take_while(|&&b| b != 0)
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect()
    }

    /// What the guest answers a host connection's `data` with.
    pub fn vsock_echo_reply(data: &[u8]) -> Vec<u8> {
        data.to_ascii_uppercase()
    }
}

/// The `virtio` guest's agent mode (`virtio.test=agent`): it behaves like the sandboxer's guest
/// agent on the wire, so the host's agent path runs on a KVM that cannot boot Linux.
///
/// It needs a vsock device among the first 8 `virtio_mmio.device=` entries. It dials the host
/// (CID 2) on port `sandboxer.ready_port` (default [`READY_PORT`](agent::READY_PORT)), writes
/// `READY 1024\n` and closes that connection (a refused dial is retried 20 times, 10 ms
/// apart), then accepts connections on [`PORT`](agent::PORT) and answers every ttrpc request
/// frame with an OK response with an empty payload (status OK, `google.protobuf.Empty` or a
/// default message), forever, waiting in `sti; hlt`. It never ends by itself unless
/// [`EXIT_ON_SHUTDOWN`](agent::EXIT_ON_SHUTDOWN) is set. A transport-reset event drops every
/// connection it holds; it goes on accepting new ones. With
/// [`counter_port`](agent::counter_port) it also sends a liveness counter.
pub mod agent {
    /// Selects the agent mode of [`Guest::Virtio`](crate::Guest::Virtio).
    pub const TEST_AGENT: &str = "virtio.test=agent";
    /// After answering `sandboxer.agent.v1.Control/Shutdown`, end the VM (triple fault) as the
    /// real agent does.
    pub const EXIT_ON_SHUTDOWN: &str = "agent.exit_on_shutdown=1";
    /// Do not print a console line per request (each console byte is a VM exit).
    pub const QUIET: &str = "agent.quiet=1";
    /// Key of the liveness counter's host port; see [`counter_port`].
    pub const COUNTER_PORT: &str = "agent.counter_port";
    /// The counter's tick by default: it counts one per tick of waiting on the guest's LAPIC
    /// timer (time the guest spends working is not counted, so a tick is at least this long).
    pub const COUNTER_TICK_MS: u64 = 10;
    /// Key of the counter's tick in ms (1 to 60000; default [`COUNTER_TICK_MS`]); see
    /// [`counter_ms`].
    pub const COUNTER_MS: &str = "agent.counter_ms";
    /// Guest port the agent serves ttrpc on (announced in the ready line).
    pub const PORT: u32 = 1024;
    /// Host port the ready line goes to by default.
    pub const READY_PORT: u32 = 1025;
    /// Printed once the ready line was sent.
    pub const READY: &str = "agent: ready 1024\n";
    /// Printed before the VM ends after a Shutdown request (with [`EXIT_ON_SHUTDOWN`]).
    pub const EXITING: &str = "agent: exiting\n";
    /// Start of a failure line (`agent: FAIL <step> <why>`), followed by a triple fault.
    pub const FAIL: &str = "agent: FAIL ";

    /// The line printed for each request, before it is answered, unless [`QUIET`]: e.g.
    /// `("sandboxer.agent.v1.Control", "Setup")`.
    pub fn request(service: &str, method: &str) -> String {
        format!("agent: request {service}/{method}\n")
    }

    /// `agent.counter_port=<port>`: once the ready line is sent, the guest counts in its memory
    /// from 1, one per [`COUNTER_TICK_MS`], and keeps one stream connection to the host (CID
    /// 2) on `port` that carries the count at every tick as a decimal line, `<n>\n` (ASCII
    /// digits of a u64). A line the host has no room for (its credit is used up) is skipped.
    /// A refused, reset or closed connection, or one dropped by a transport reset, is dialled
    /// again every tick, forever, with the count going on: the numbers the host reads are
    /// strictly increasing across connections, and a guest that was booted again starts over
    /// at 1. The guest port of each dial is new (from 50000). The ttrpc serving is unchanged.
    pub fn counter_port(port: u32) -> String {
        format!("{COUNTER_PORT}={port}")
    }

    /// `agent.counter_ms=<ms>`: the counter ticks every `ms` instead of
    /// [`COUNTER_TICK_MS`] (many guests on few host cores: each tick costs the host a few VM
    /// exits and a vsock packet).
    pub fn counter_ms(ms: u64) -> String {
        format!("{COUNTER_MS}={ms}")
    }

    /// Key of the written buffer's size; see [`dirty_kib`].
    pub const DIRTY_KIB: &str = "agent.dirty_kib";

    /// `agent.dirty_kib=<kib>` (at most 65536): at every ttrpc connection the agent accepts
    /// (the host's first call to a clone, a new process's after a live handover) the guest
    /// writes the connection's number into each page of a `kib` KiB buffer, then leaves it
    /// alone: memory a clone wrote and keeps, as a real guest's page cache and heap.
    pub fn dirty_kib(kib: u64) -> String {
        format!("{DIRTY_KIB}={kib}")
    }

    /// A command line for the agent mode: `base` plus [`TEST_AGENT`] and `extra` words.
    pub fn cmdline(base: &str, extra: &[&str]) -> String {
        let mut s = format!("{base} {TEST_AGENT}");
        for w in extra {
            s.push(' ');
            s.push_str(w);
        }
        s
    }
}

/// The hostile mode of [`Guest::Virtio`] (`virtio.test=hostile`): one
/// attack on the VMM, repeated forever (the firmware's `hostile.rs` says what each does).
pub mod hostile {
    /// Every attack, by its `hostile.case=` name.
    pub const CASES: [&str; 9] = [
        "vsock-flood",
        "desc-loop",
        "huge-len",
        "oob-addr",
        "status-abuse",
        "config-oob",
        "notify-flood",
        "serial-flood",
        "spin",
    ];

    /// A command line for `case`: `base`, the hostile mode and the case.
    pub fn cmdline(base: &str, case: &str) -> String {
        format!("{base} virtio.test=hostile hostile.case={case}")
    }

    /// The attacks on the virtqueues: after their first round every attacked device must have
    /// shown it took the attack in (asked for a reset, or used a buffer of a bad chain).
    pub const RING_CASES: [&str; 4] = ["vsock-flood", "desc-loop", "huge-len", "oob-addr"];

    /// Start of the line printed once the attack's first round is done.
    pub fn attacking(case: &str) -> String {
        format!("hostile: {case} attacking, ")
    }

    /// `(reacted, attacked)` devices from the first round's line in `console`.
    pub fn reactions(console: &str, case: &str) -> Option<(u32, u32)> {
        let prefix = attacking(case);
        // Anywhere in a line: the serial flood's first round ends without a newline.
        let line = console
            .lines()
            .find_map(|l| l.find(prefix.as_str()).map(|at| &l[at + prefix.len()..]))?;
        let (reacted, rest) = line.split_once(" of ")?;
        let attacked = rest.strip_suffix(" devices reacted")?;
        Some((reacted.parse().ok()?, attacked.parse().ok()?))
    }
}

/// The exact console output of the guests (COM1). Lines end in `\n`.
pub mod console {
    /// `quick`: its only line.
    pub const QUICK_BYE: &str = "quick: bye\n";
    /// `pvh32`: first line.
    pub const PVH32_HELLO: &str = "pvh32: hello\n";
    /// `pvh32`: `hvm_start_info.magic` was not 0x336ec578 (replaces the cmdline and memmap
    /// lines).
    pub const PVH32_BAD_MAGIC: &str = "pvh32: bad start_info magic\n";
    /// `pvh32`: printed after the boot-timer write, right before the triple fault.
    pub const PVH32_BYE: &str = "pvh32: bye\n";
    /// `long64`: first line when entered through PVH.
    pub const LONG64_HELLO_PVH: &str = "long64: hello (pvh)\n";
    /// `long64`: first line when entered through the Linux 64-bit boot protocol.
    pub const LONG64_HELLO_LINUX64: &str = "long64: hello (linux64)\n";
    /// `long64`: bad `hvm_start_info.magic` (replaces the cmdline, memmap and memtest lines).
    pub const LONG64_BAD_MAGIC: &str = "long64: bad start_info magic\n";
    /// `long64`: the top page of RAM below 4 GiB read back what was written.
    pub const MEMTEST_OK: &str = "memtest: ok\n";
    /// `long64`: start of the memory test's failure line (a reason follows).
    pub const MEMTEST_FAIL: &str = "memtest: FAIL";
    /// `long64`: printed after the boot-timer write, right before the triple fault.
    pub const LONG64_BYE: &str = "long64: bye\n";
    /// `smp`: start of the line printed when no valid MP table was found.
    pub const SMP_NO_MPTABLE: &str = "smp: no MP table";
    /// `reset`: first line; the boot-timer write follows, then the i8042 reset.
    pub const RESET_HELLO: &str = "reset: hello\n";
    /// `reset`: the VMM ignored the i8042 reset (about 1 ms later); a triple fault follows.
    pub const RESET_STILL_ALIVE: &str = "reset: still alive\n";
    /// `spin`: first line; the boot-timer write follows, then dots.
    pub const SPIN_HELLO: &str = "spin: hello\n";
    /// `spin`: printed about every 7 ms (2^24 TSC ticks), without newlines.
    pub const SPIN_DOT: &str = ".";
    /// Any long-mode guest's panic handler: `PANIC: <message> at <file>:<line>`, then a
    /// triple fault.
    pub const PANIC: &str = "PANIC: ";
    /// `virtio`: a CPU exception: `EXCEPTION: vector <n> [error <e>] rip <rip>`, then a triple
    /// fault.
    pub const EXCEPTION: &str = "EXCEPTION: ";

    /// `virtio`: first line; the boot-timer write follows.
    pub const VIRTIO_HELLO: &str = "virtio: hello\n";
    /// `virtio`: the last line, right before the triple fault.
    pub const VIRTIO_DONE: &str = "virtio: done\n";
    /// `virtio`: every step before `virtio: done` passed.
    pub const VIRTIO_NO_FAILURES: &str = "virtio: failures 0\n";
    /// `virtio`: present in every failed step's line, `virtio: <dev>: <step> FAIL <why>`.
    pub const VIRTIO_FAIL: &str = " FAIL ";
    /// `virtio`: the 4 KiB pattern was written at sector 1 (a 3-descriptor chain).
    pub const VIRTIO_BLK_WRITE_OK: &str = "virtio: blk: write ok\n";
    /// `virtio`: the slot has no backing (capacity 0): no write, flush, readback or sector0
    /// step; the bounds step still runs (sector 0 must fail with IOERR).
    pub const VIRTIO_BLK_EMPTY_SLOT: &str = "virtio: blk: empty slot\n";
    /// `virtio`: the device is read-only (`VIRTIO_BLK_F_RO`): no write, flush or readback.
    pub const VIRTIO_BLK_WRITE_SKIPPED: &str = "virtio: blk: write skipped (read-only)\n";
    /// `virtio`: a flush request succeeded.
    pub const VIRTIO_BLK_FLUSH_OK: &str = "virtio: blk: flush ok\n";
    /// `virtio`: the device did not offer `VIRTIO_BLK_F_FLUSH`.
    pub const VIRTIO_BLK_FLUSH_NOT_OFFERED: &str = "virtio: blk: flush not offered\n";
    /// `virtio`: the pattern read back equal.
    pub const VIRTIO_BLK_READBACK_OK: &str = "virtio: blk: readback ok\n";
    /// `virtio`: reading sector `capacity` completed with `VIRTIO_BLK_S_IOERR`.
    pub const VIRTIO_BLK_BOUNDS_OK: &str = "virtio: blk: bounds ok\n";
    /// `virtio` with `virtio.blk_swap=1`: swap the slot's backing now.
    pub const VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE: &str =
        "virtio: blk: waiting for config change\n";
    /// `virtio` with `virtio.blk_watch=1`: a disk came; the write, flush and readback follow.
    pub fn virtio_blk_watching(sectors: u64) -> String {
        format!("virtio: blk: watching capacity {sectors}\n")
    }
    /// `virtio` with `virtio.blk_watch=1`: the mailbox text changed and was answered.
    pub fn virtio_blk_mailbox_ack(text: &[u8]) -> String {
        format!(
            "virtio: blk: mailbox {} ack\n",
            crate::virtio::sector0_text(text)
        )
    }
    /// `virtio` with `virtio.blk_watch=1`: a configuration-change interrupt came while
    /// watching (capacity 0 ends the watch).
    pub fn virtio_blk_config_change(sectors: u64) -> String {
        format!("virtio: blk: config change capacity {sectors}\n")
    }
    /// `virtio` with `virtio.blk_watch=1`: present in every line the watch prints about a
    /// configuration change.
    pub const VIRTIO_BLK_CONFIG_CHANGE: &str = "virtio: blk: config change ";
    /// `virtio`: the network device has link (`VIRTIO_NET_F_STATUS`).
    pub const VIRTIO_NET_LINK_UP: &str = "virtio: net: link up\n";
    /// `virtio`: the three frames came back unchanged.
    pub const VIRTIO_NET_LOOPBACK_OK: &str = "virtio: net: loopback 3 ok\n";
    /// `virtio`: the guest -> host connection echoed the ping and was shut down.
    pub const VIRTIO_VSOCK_ECHO_OK: &str = "virtio: vsock: echo ok\n";
    /// `virtio`: the guest now accepts host connections on port 6000.
    pub const VIRTIO_VSOCK_LISTENING: &str = "virtio: vsock: listening 6000\n";
    /// `virtio`: two host connections were served.
    pub const VIRTIO_VSOCK_SERVED: &str = "virtio: vsock: served 2\n";

    /// `pvh32` and `long64`: the command line (`hvm_start_info.cmdline_paddr` or
    /// `boot_params.hdr.cmd_line_ptr`, at most 4095 bytes).
    pub fn cmdline(cmdline: &str) -> String {
        format!("cmdline: {cmdline}\n")
    }

    /// `pvh32`: number of PVH memory map entries (0 for a version 0 start_info).
    pub fn pvh32_memmap(entries: u32) -> String {
        format!("memmap: {entries} entries\n")
    }

    /// `long64`: memory map entries and usable RAM (type 1 entries) in KiB.
    pub fn long64_memmap(entries: u32, ram_kib: u64) -> String {
        format!("memmap: {entries} entries, {ram_kib} KiB\n")
    }

    /// `smp`: every enabled processor of the MP table came up (`cpus` counts the BSP).
    pub fn smp_up(cpus: usize) -> String {
        format!("smp: {cpus} cpus up\n")
    }

    /// `smp`: only `up` of the `cpus` enabled processors came up within about 1 s.
    pub fn smp_partial(up: usize, cpus: usize) -> String {
        format!("smp: only {up} of {cpus} cpus up\n")
    }

    /// `virtio`: one line per `virtio_mmio.device=` entry whose registers answered.
    pub fn virtio_mmio(base: u64, irq: u32, device_id: u32) -> String {
        format!("virtio: mmio {base:#x} irq {irq} device {device_id}\n")
    }

    /// `virtio`: a passed step, e.g. `("vsock", "echo")`.
    pub fn virtio_ok(dev: &str, step: &str) -> String {
        format!("virtio: {dev}: {step} ok\n")
    }

    /// `virtio`: start of a failed step's line (the reason follows).
    pub fn virtio_fail(dev: &str, step: &str) -> String {
        format!("virtio: {dev}: {step} FAIL ")
    }

    /// `virtio`: the number of failed steps, printed right before `virtio: done`.
    pub fn virtio_failures(n: u32) -> String {
        format!("virtio: failures {n}\n")
    }

    /// `virtio`: the accepted features of a device, lowest bit first, space separated (block:
    /// of SEG_MAX RO BLK_SIZE FLUSH VERSION_1; net: of MAC MRG_RXBUF STATUS VERSION_1).
    pub fn virtio_features(dev: &str, names: &[&str]) -> String {
        format!("virtio: {dev}: features {}\n", names.join(" "))
    }

    /// `virtio`: interrupts taken on the device's line during its test.
    pub fn virtio_interrupts(dev: &str, n: u32) -> String {
        format!("virtio: {dev}: interrupts {n}\n")
    }

    /// `virtio`: block device capacity in 512-byte sectors.
    pub fn virtio_blk_capacity(sectors: u64) -> String {
        format!("virtio: blk: capacity {sectors}\n")
    }

    /// `virtio`: the block device's GET_ID answer (up to the first NUL, at most 20 bytes).
    pub fn virtio_blk_id(serial: &str) -> String {
        format!("virtio: blk: id {serial}\n")
    }

    /// `virtio`: sector 0 as [`crate::virtio::sector0_text`] shows it.
    pub fn virtio_blk_sector0(sector0: &[u8]) -> String {
        format!(
            "virtio: blk: sector0 {}\n",
            crate::virtio::sector0_text(sector0)
        )
    }

    /// `virtio` with `virtio.blk_swap=1`: capacity and sector 0 after the config change
    /// (sector 0 is not read, and shows empty, when the capacity is 0).
    pub fn virtio_blk_swapped(sectors: u64, sector0: &[u8]) -> String {
        let text = if sectors == 0 {
            String::new()
        } else {
            crate::virtio::sector0_text(sector0)
        };
        format!("virtio: blk: swapped capacity {sectors} sector0 {text}\n")
    }

    /// `virtio`: the network device's MAC address.
    pub fn virtio_net_mac(mac: [u8; 6]) -> String {
        let [a, b, c, d, e, f] = mac;
        format!("virtio: net: mac {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}\n")
    }

    /// `virtio`: the vsock device's `guest_cid`.
    pub fn virtio_vsock_cid(cid: u64) -> String {
        format!("virtio: vsock: cid {cid}\n")
    }

    /// `virtio`: a served host connection ended (`cid`:`port` is the host side).
    pub fn virtio_vsock_closed(cid: u64, port: u32, echoed: usize) -> String {
        format!("virtio: vsock: closed {cid}:{port} echoed {echoed}\n")
    }
}

/// Whether `/dev/kvm` can be opened read-write by this process.
pub fn kvm_usable() -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))
}

/// Whether the environment demands KVM: under CI (`CI=true`; `.ci/run` sets it) and with
/// `SANDBOXER_REQUIRE_KVM=1`.
pub fn kvm_required() -> bool {
    std::env::var("SANDBOXER_REQUIRE_KVM").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Gate for tests that need `/dev/kvm`.
///
/// Returns from the test with a loud `SKIP` line when KVM is unusable, and panics instead under
/// CI (`CI=true` or `SANDBOXER_REQUIRE_KVM=1`), so a KVM CI run can never pass silently.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(why) = $crate::kvm_usable() {
            if $crate::kvm_required() {
                panic!("KVM is required (CI=true or SANDBOXER_REQUIRE_KVM=1) but {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use linux_loader::loader::KernelLoader;
    use linux_loader::loader::bzimage::BzImage;
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const EM_X86_64: u16 = 62;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    /// The smallest guest RAM the VMM is expected to give a test guest.
    const MIN_RAM: u64 = 16 << 20;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn usize_at(b: &[u8], at: usize) -> usize {
        usize::try_from(u64_at(b, at)).unwrap()
    }

    #[derive(Debug)]
    struct Phdr {
        kind: u32,
        flags: u32,
        offset: usize,
        paddr: u64,
        filesz: usize,
        memsz: u64,
    }

    struct ElfImage {
        bytes: Vec<u8>,
        entry: u64,
        phdrs: Vec<Phdr>,
    }

    impl ElfImage {
        fn read(guest: Guest) -> Self {
            let bytes = std::fs::read(guest.elf()).unwrap();
            assert_eq!(&bytes[..4], b"\x7fELF", "{guest:?}");
            assert_eq!(bytes[4], 2, "{guest:?}: ELFCLASS64");
            assert_eq!(bytes[5], 1, "{guest:?}: little endian");
            assert_eq!(u16_at(&bytes, 0x12), EM_X86_64, "{guest:?}: e_machine");
            let entry = u64_at(&bytes, 0x18);
            let phoff = usize_at(&bytes, 0x20);
            let phentsize = usize::from(u16_at(&bytes, 0x36));
            assert_eq!(phentsize, 56, "{guest:?}: e_phentsize");
            let phdrs = (0..usize::from(u16_at(&bytes, 0x38)))
                .map(|i| {
                    let ph = phoff + i * phentsize;
                    Phdr {
                        kind: u32_at(&bytes, ph),
                        flags: u32_at(&bytes, ph + 4),
                        offset: usize_at(&bytes, ph + 8),
                        paddr: u64_at(&bytes, ph + 24),
                        filesz: usize_at(&bytes, ph + 32),
                        memsz: u64_at(&bytes, ph + 40),
                    }
                })
                .collect();
            Self {
                bytes,
                entry,
                phdrs,
            }
        }

        fn segments(&self, kind: u32) -> Vec<&Phdr> {
            self.phdrs.iter().filter(|p| p.kind == kind).collect()
        }

        /// The PVH entry from the Xen note, walking every note of the PT_NOTE segment.
        fn pvh_entry(&self) -> Option<u64> {
            let note = self.segments(PT_NOTE)[0];
            let notes = &self.bytes[note.offset..note.offset + note.filesz];
            let mut at = 0;
            while at + 12 <= notes.len() {
                let namesz = u32_at(notes, at) as usize;
                let descsz = u32_at(notes, at + 4) as usize;
                let kind = u32_at(notes, at + 8);
                let name = &notes[at + 12..at + 12 + namesz];
                let desc_at = at + 12 + namesz.next_multiple_of(4);
                if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
                    assert!(descsz >= 4);
                    return Some(u64::from(u32_at(notes, desc_at)));
                }
                at = desc_at + descsz.next_multiple_of(4);
            }
            None
        }

        /// File bytes loaded at physical address `addr`.
        fn bytes_at(&self, addr: u64, len: usize) -> &[u8] {
            let seg = self
                .segments(PT_LOAD)
                .into_iter()
                .find(|p| p.paddr <= addr && addr + len as u64 <= p.paddr + p.filesz as u64)
                .expect("address in a PT_LOAD");
            let at = seg.offset + usize::try_from(addr - seg.paddr).unwrap();
            &self.bytes[at..at + len]
        }
    }

    fn guest_memory() -> GuestMemoryMmap<()> {
        let size = usize::try_from(MIN_RAM).unwrap();
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn agent_cmdline_adds_the_mode_and_keys() {
        assert_eq!(
            agent::cmdline("console=ttyS0", &[agent::QUIET, agent::EXIT_ON_SHUTDOWN]),
            "console=ttyS0 virtio.test=agent agent.quiet=1 agent.exit_on_shutdown=1"
        );
        assert_eq!(
            agent::request("sandboxer.agent.v1.Control", "Setup"),
            "agent: request sandboxer.agent.v1.Control/Setup\n"
        );
        assert_eq!(agent::counter_port(5005), "agent.counter_port=5005");
        assert_eq!(agent::counter_ms(100), "agent.counter_ms=100");
        let elf = std::fs::read(Guest::Virtio.elf()).unwrap();
        assert!(contains(&elf, &format!("{}=", agent::COUNTER_PORT)));
        assert!(contains(&elf, &format!("{}=", agent::COUNTER_MS)));
    }

    #[test]
    fn elfs_have_one_load_segment_a_pvh_note_and_the_right_entry() {
        for guest in Guest::ALL {
            let elf = ElfImage::read(guest);
            let loads = elf.segments(PT_LOAD);
            assert_eq!(loads.len(), 1, "{guest:?}: PT_LOADs {:?}", elf.phdrs);
            let load = loads[0];
            assert!(load.paddr >= LOAD_ADDR, "{guest:?}: loaded below 1 MiB");
            assert!(load.flags & 1 != 0, "{guest:?}: PT_LOAD not executable");
            let end = load.paddr + load.memsz;
            assert!(
                end <= LOAD_ADDR + (2 << 20),
                "{guest:?}: image ends at {end:#x}"
            );
            // linux-loader keeps the result of the *last* PT_NOTE it parses: only one.
            assert_eq!(elf.segments(PT_NOTE).len(), 1, "{guest:?}: PT_NOTEs");

            let pvh = elf
                .pvh_entry()
                .unwrap_or_else(|| panic!("{guest:?}: no Xen PVH note"));
            assert!(
                (load.paddr..load.paddr + load.filesz as u64).contains(&pvh),
                "{guest:?}: PVH entry {pvh:#x} outside the image"
            );
            if guest.has_linux64_entry() {
                assert_eq!(elf.entry, LINUX64_ENTRY, "{guest:?}: ELF entry");
                assert_ne!(
                    pvh, LINUX64_ENTRY,
                    "{guest:?}: PVH entry must be 32-bit code"
                );
                // The 64-bit entry starts with `cli; cld`.
                assert_eq!(elf.bytes_at(LINUX64_ENTRY, 2), [0xfa, 0xfc], "{guest:?}");
            } else {
                assert_eq!(elf.entry, pvh, "{guest:?}: ELF entry");
            }
        }
    }

    #[test]
    fn linux_loader_loads_every_elf_with_its_pvh_entry() {
        for guest in Guest::ALL {
            let elf = ElfImage::read(guest);
            let mem = guest_memory();
            let mut file = File::open(guest.elf()).unwrap();
            let res = Elf::load(&mem, None, &mut file, Some(GuestAddress(LOAD_ADDR))).unwrap();
            let pvh = elf.pvh_entry().unwrap();
            assert_eq!(
                res.pvh_boot_cap,
                PvhBootCapability::PvhEntryPresent(GuestAddress(pvh)),
                "{guest:?}"
            );
            assert_eq!(res.kernel_load, GuestAddress(elf.entry), "{guest:?}");
            assert!(res.kernel_end <= MIN_RAM, "{guest:?}");
            let mut loaded = [0u8; 16];
            mem.read_slice(&mut loaded, GuestAddress(pvh)).unwrap();
            assert_eq!(
                loaded,
                elf.bytes_at(pvh, 16),
                "{guest:?}: bytes at the PVH entry"
            );
        }
    }

    #[test]
    fn bzimage_header_and_payload() {
        let bz = std::fs::read(long64_bzimage()).unwrap();
        let elf = ElfImage::read(Guest::Long64);
        assert_eq!(u16_at(&bz, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&bz[0x202..0x206], b"HdrS");
        let version = u16_at(&bz, 0x206);
        assert!(version >= 0x020c, "protocol version {version:#x}");
        assert_eq!(bz[0x211] & 0x01, 0x01, "loadflags LOADED_HIGH");
        assert_eq!(u32_at(&bz, 0x214), 0x10_0000, "code32_start");
        assert_eq!(u16_at(&bz, 0x236) & 0x01, 0x01, "xloadflags XLF_KERNEL_64");
        let setup_sects = match bz[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let payload = &bz[(setup_sects + 1) * 512..];
        assert!(u32_at(&bz, 0x1f4) as usize * 16 >= payload.len(), "syssize");
        let load = elf.segments(PT_LOAD)[0];
        assert!(
            u32_at(&bz, 0x260) as u64 >= load.memsz,
            "init_size covers .bss"
        );
        // The payload is the flat image from 0x100000: the 64-bit entry at offset 0x200.
        assert_eq!(payload.len(), load.filesz);
        assert_eq!(payload, elf.bytes_at(LOAD_ADDR, load.filesz));
        assert_eq!(payload[0x200..0x202], [0xfa, 0xfc]);
        let name_at = 0x200 + usize::from(u16_at(&bz, 0x20e));
        assert!(bz[name_at..].starts_with(b"sandboxer test guest long64\0"));
    }

    #[test]
    fn linux_loader_loads_the_bzimage_at_1_mib() {
        let elf = ElfImage::read(Guest::Long64);
        let mem = guest_memory();
        let mut file = File::open(long64_bzimage()).unwrap();
        let res = BzImage::load(&mem, None, &mut file, Some(GuestAddress(LOAD_ADDR))).unwrap();
        assert_eq!(res.kernel_load, GuestAddress(LOAD_ADDR));
        let hdr = res.setup_header.expect("bzImage has a setup header");
        let (version, xloadflags) = (hdr.version, hdr.xloadflags);
        assert!(version >= 0x020c);
        assert_eq!(xloadflags & 1, 1);
        let mut entry = [0u8; 64];
        mem.read_slice(&mut entry, GuestAddress(LINUX64_ENTRY))
            .unwrap();
        assert_eq!(entry, elf.bytes_at(LINUX64_ENTRY, 64));
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    /// The `virtio` guest builds its lines from pieces: check the pieces, the command-line keys
    /// and the payloads the host side relies on are in its image.
    #[test]
    fn virtio_guest_has_its_keys_and_line_pieces() {
        use console::*;
        let elf = std::fs::read(Guest::Virtio.elf()).unwrap();
        let keys = [
            virtio::TEST_BLK,
            virtio::TEST_NET,
            virtio::TEST_VSOCK,
            virtio::TEST_ALL,
            virtio::BLK_SWAP,
            virtio::BLK_WATCH,
            virtio::BLK_ALL,
        ];
        for key in keys {
            let (name, value) = key.split_once('=').unwrap();
            assert!(contains(&elf, name), "{key}: key");
            assert!(contains(&elf, value), "{key}: value");
        }
        let pieces = [
            "virtio_mmio.device=",
            "virtio: mmio ",
            "virtio: failures ",
            VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE
                .trim_start_matches("virtio: blk")
                .trim_end(),
            ": swapped capacity ",
            ": watching capacity ",
            ": config change capacity ",
            ": mailbox ",
            " ack\n",
            "ack ",
            ": write skipped (read-only)",
            ": empty slot",
            "completed without an interrupt",
            ": flush not offered",
            "virtio: net: link up\n",
            "virtio: net: mac ",
            "loopback 3",
            "virtio: vsock: cid ",
            "virtio: vsock: listening ",
            "virtio: vsock: served ",
            "virtio: vsock: closed ",
            " echoed ",
        ];
        for piece in pieces {
            assert!(contains(&elf, piece), "virtio ELF lacks {piece:?}");
        }
        let ping = std::str::from_utf8(virtio::VSOCK_PING).unwrap();
        assert!(contains(&elf, ping));
        assert_eq!(
            VIRTIO_VSOCK_LISTENING,
            format!("virtio: vsock: listening {}\n", virtio::VSOCK_LISTEN_PORT)
        );
        assert_eq!(
            VIRTIO_VSOCK_SERVED,
            format!("virtio: vsock: served {}\n", virtio::VSOCK_SERVE_COUNT)
        );
    }

    #[test]
    fn virtio_host_side_facts() {
        let pattern = virtio::blk_pattern();
        assert_eq!(pattern.len(), virtio::BLK_PATTERN_LEN);
        assert_eq!(pattern[..8], 0x7669_7274_696f_0000u64.to_le_bytes());
        assert_eq!(pattern[4088..], 0x7669_7274_696f_01ffu64.to_le_bytes());
        assert_eq!(
            virtio::sector0_text(b"sandboxer-disk-A and more"),
            "sandboxer-disk-A"
        );
        assert_eq!(virtio::sector0_text(b"\0abc"), "");
        assert_eq!(virtio::vsock_echo_reply(b"Hi there 1!"), b"HI THERE 1!");
        assert!(
            virtio::NET_FRAME_LENS
                .iter()
                .all(|&l| (60..=1514).contains(&l))
        );
    }

    #[test]
    fn console_lines_are_the_guests_own() {
        use console::*;
        let cases: [(Guest, &[&str]); 6] = [
            (Guest::Pvh32, &[PVH32_HELLO, PVH32_BAD_MAGIC, PVH32_BYE]),
            (
                Guest::Long64,
                &[
                    LONG64_HELLO_PVH,
                    LONG64_HELLO_LINUX64,
                    MEMTEST_OK,
                    LONG64_BYE,
                ],
            ),
            (Guest::Smp, &[SMP_NO_MPTABLE]),
            (Guest::Reset, &[RESET_HELLO, RESET_STILL_ALIVE]),
            (Guest::Spin, &[SPIN_HELLO, SPIN_DOT]),
            (
                Guest::Virtio,
                &[VIRTIO_HELLO, VIRTIO_DONE, VIRTIO_FAIL, EXCEPTION],
            ),
        ];
        for (guest, lines) in cases {
            let bytes = std::fs::read(guest.elf()).unwrap();
            for line in lines {
                assert!(
                    bytes.windows(line.len()).any(|w| w == line.as_bytes()),
                    "{guest:?} does not contain {line:?}"
                );
            }
        }
        // "bad start_info magic" is a Display string of its own in long64.
        let long64 = std::fs::read(Guest::Long64.elf()).unwrap();
        let bad = LONG64_BAD_MAGIC.trim_start_matches("long64: ").trim_end();
        assert!(long64.windows(bad.len()).any(|w| w == bad.as_bytes()));
        assert_eq!(cmdline("a b"), "cmdline: a b\n");
        assert_eq!(virtio_ok("vsock", "echo"), VIRTIO_VSOCK_ECHO_OK);
        assert_eq!(virtio_ok("blk", "write"), VIRTIO_BLK_WRITE_OK);
        assert_eq!(virtio_ok("net", "loopback 3"), VIRTIO_NET_LOOPBACK_OK);
        assert_eq!(virtio_fail("blk", "bounds"), "virtio: blk: bounds FAIL ");
        assert_eq!(virtio_failures(0), VIRTIO_NO_FAILURES);
        assert_eq!(
            virtio_mmio(0xd000_1000, 5, 2),
            "virtio: mmio 0xd0001000 irq 5 device 2\n"
        );
        assert_eq!(
            virtio_features("blk", &["FLUSH", "VERSION_1"]),
            "virtio: blk: features FLUSH VERSION_1\n"
        );
        assert_eq!(
            virtio_net_mac([0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            "virtio: net: mac 52:54:00:12:34:ab\n"
        );
        assert_eq!(
            virtio_blk_sector0(b"hello\x01world\0junk"),
            "virtio: blk: sector0 hello.world\n"
        );
        assert_eq!(
            virtio_blk_swapped(8, b"0123456789abcdefXYZ"),
            "virtio: blk: swapped capacity 8 sector0 0123456789abcdef\n"
        );
        assert_eq!(
            virtio_blk_swapped(0, b"ignored"),
            "virtio: blk: swapped capacity 0 sector0 \n"
        );
        assert_eq!(long64_memmap(3, 16384), "memmap: 3 entries, 16384 KiB\n");
        assert_eq!(smp_up(2), "smp: 2 cpus up\n");
    }
}
