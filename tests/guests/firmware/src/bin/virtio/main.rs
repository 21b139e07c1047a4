// SPDX-License-Identifier: Apache-2.0
//! `virtio`: drives the virtio-mmio devices named on the command line with the firmware's
//! minimal virtio 1.x driver (modern mmio transport, split virtqueues, interrupts through the
//! IOAPIC) and prints one line per step, so host tests can check a VMM's ioeventfd/irqfd
//! wiring, transport and devices for real.
//!
//! Command line: `virtio_mmio.device=<size>@<base>:<irq>` entries (appended by the VMM) and
//! - `virtio.test=blk|net|vsock|all` (a comma-separated list works too; default `all`, which
//!   skips device types that are absent instead of failing), or `virtio.test=agent`: behave
//!   like the guest agent on the wire, forever (see `agent.rs`; `agent.counter_port=<port>`
//!   adds a liveness counter, see `counter.rs`), or `virtio.test=hostile`:
//!   attack the devices, forever (`hostile.case=<case>`, see `hostile.rs`),
//! - `virtio.blk_swap=1`: after its steps, wait for a slot swap on the first block device,
//! - `virtio.blk_watch=1`: after its steps, wait for a disk in the first block device and
//!   answer the host through it until it is detached (see `blk.rs`),
//! - `virtio.blk_all=1`: test every block device, not just the first.
//!
//! Console: `virtio: hello`, boot-timer write, `virtio: mmio <base> irq <irq> device <id>` per
//! entry, then each test's lines (see `blk.rs`, `net.rs`, `vsock.rs`): a step prints
//! `virtio: <dev>: <step> ok` or `virtio: <dev>: <step> FAIL <why>`. The end is
//! `virtio: failures <n>`, `virtio: done`, triple fault. A CPU exception prints
//! `EXCEPTION: ...` and triple faults.
#![no_std]
#![no_main]

mod agent;
mod blk;
mod counter;
mod hostile;
mod net;
mod vsock;

use core::fmt;

use firmware::dma::Arena;
use firmware::virtio::mmio::Transport;
use firmware::virtio::{self, MAX_DEVICES, MmioDevice, VirtioError};
use firmware::{Boot, exit, irq, println};

firmware::guest_main!(main);

/// Largest command line (layout::CMDLINE_MAX_SIZE).
const CMDLINE_MAX: usize = 4096;
/// Memory taken after the image: 2 MiB for DMA and the agent's `agent.dirty_kib` buffer.
const ARENA_MAX: u64 = (2 << 20) + (64 << 20);

/// Why a step failed.
#[derive(Debug, Clone, Copy)]
pub enum Failure {
    /// The driver or device failed.
    Virtio(VirtioError),
    /// A request completed with this status byte.
    Status(u8),
    /// A packet with an unexpected operation arrived.
    UnexpectedOp(u16),
    /// The driver or device failed during a named stage of a step.
    During(&'static str, VirtioError),
    /// Anything else.
    Msg(&'static str),
}

impl From<VirtioError> for Failure {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "{e}"),
            Self::Status(s) => write!(f, "status {s}"),
            Self::UnexpectedOp(op) => write!(f, "unexpected op {op}"),
            Self::During(stage, e) => write!(f, "{stage}: {e}"),
            Self::Msg(m) => f.write_str(m),
        }
    }
}

/// Counts failed steps and prints the step lines.
#[derive(Debug, Default)]
pub struct Report {
    failures: u32,
}

impl Report {
    /// `virtio: <dev>: <step> ok`.
    pub fn ok(&mut self, dev: impl fmt::Display, step: &str) {
        println!("virtio: {dev}: {step} ok");
    }

    /// `virtio: <dev>: <step> FAIL <why>`.
    pub fn fail(&mut self, dev: impl fmt::Display, step: &str, why: impl fmt::Display) {
        println!("virtio: {dev}: {step} FAIL {why}");
        self.failures += 1;
    }

    /// Prints ok or FAIL for a step's result.
    pub fn check(&mut self, dev: impl fmt::Display, step: &str, result: Result<(), Failure>) {
        match result {
            Ok(()) => self.ok(dev, step),
            Err(why) => self.fail(dev, step, why),
        }
    }
}

/// Bytes shown as text: up to the first NUL, bytes outside printable ASCII as `.`.
#[derive(Debug)]
pub struct Text<'a>(pub &'a [u8]);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            let c = if (0x20..0x7f).contains(&b) { b } else { b'.' };
            fmt::Write::write_char(f, char::from(c))?;
        }
        Ok(())
    }
}

/// Feature names of `features` from a driver's name table, space separated.
#[derive(Debug)]
pub struct FeatureNames<'a>(pub u64, pub &'a [(u64, &'a str)]);

impl fmt::Display for FeatureNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for &(bit, name) in self.1 {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// The devices found on the command line, with their device ids (0: absent or broken).
#[derive(Debug)]
pub struct Devices {
    list: [MmioDevice; MAX_DEVICES],
    ids: [u32; MAX_DEVICES],
    count: usize,
}

impl Devices {
    /// The devices of type `id`, in command-line order.
    pub fn of_type(&self, id: u32) -> impl Iterator<Item = &MmioDevice> + '_ {
        self.list
            .iter()
            .zip(self.ids.iter())
            .take(self.count)
            .filter(move |&(_, &i)| i == id)
            .map(|(d, _)| d)
    }
}

/// Which tests run.
#[derive(Debug, Clone, Copy, Default)]
struct Selection {
    blk: bool,
    net: bool,
    vsock: bool,
    /// The agent mode (nothing else runs).
    agent: bool,
    /// The hostile mode (nothing else runs).
    hostile: bool,
    /// Named explicitly: an absent device is a failure.
    explicit: bool,
}

impl Selection {
    fn parse(cmdline: &[u8], report: &mut Report) -> Self {
        let Some(value) = virtio::param(cmdline, b"virtio.test") else {
            return Self {
                blk: true,
                net: true,
                vsock: true,
                agent: false,
                hostile: false,
                explicit: false,
            };
        };
        let mut sel = Self {
            explicit: true,
            ..Self::default()
        };
        for name in value.split(|&b| b == b',') {
            match name {
                b"blk" => sel.blk = true,
                b"net" => sel.net = true,
                b"vsock" => sel.vsock = true,
                b"agent" => sel.agent = true,
                b"hostile" => sel.hostile = true,
                b"all" => {
                    sel = Self {
                        blk: true,
                        net: true,
                        vsock: true,
                        agent: false,
                        hostile: false,
                        explicit: false,
                    }
                }
                other => report.fail("cmdline", "virtio.test", Text(other)),
            }
        }
        sel
    }
}

fn main(boot: &Boot) -> ! {
    println!("virtio: hello");
    exit::signal_boot_timer();
    let mut report = Report::default();
    run(boot, &mut report);
    if irq::unexpected() != 0 {
        println!("virtio: unexpected interrupts {}", irq::unexpected());
    }
    println!("virtio: failures {}", report.failures);
    println!("virtio: done");
    exit::triple_fault()
}

fn run(boot: &Boot, report: &mut Report) {
    let info = match boot.info() {
        Ok(info) => info,
        Err(e) => return report.fail("boot", "info", e),
    };
    let mut buf = [0u8; CMDLINE_MAX];
    let len = info.cmdline.copy_into(&mut buf);
    let cmdline = buf.get(..len).unwrap_or_default();
    let selection = Selection::parse(cmdline, report);
    // Every scan of the command line costs (each guest instruction is emulated on the
    // project's `kvm_pvm` host): the agent mode skips the block test's keys.
    let flag =
        |key: &[u8]| !selection.agent && virtio::param(cmdline, key) == Some(b"1".as_slice());
    let (blk_swap, blk_all) = (flag(b"virtio.blk_swap"), flag(b"virtio.blk_all"));
    let blk_watch = flag(b"virtio.blk_watch");

    if let Err(e) = irq::init() {
        return report.fail("irq", "init", e);
    }
    let Some(mut arena) = Arena::after_image(&info.memmap, ARENA_MAX) else {
        return report.fail("dma", "arena", "no free RAM after the image");
    };

    let mut devices = Devices {
        list: [MmioDevice::default(); MAX_DEVICES],
        ids: [0; MAX_DEVICES],
        count: 0,
    };
    // Parsed and probed one at a time: the agent mode stops at the first socket device (the
    // sandboxer puts it first), and every command-line byte scanned costs guest instructions.
    let slots = devices.list.iter_mut().zip(devices.ids.iter_mut());
    for ((slot, id), dev) in slots.zip(virtio::mmio_devices(cmdline)) {
        *slot = dev;
        devices.count += 1;
        match Transport::probe(&dev) {
            Ok(t) => {
                *id = t.device_id();
                // The agent mode stays quiet (each console byte is a VM exit).
                if selection.agent {
                    if *id == virtio::DEVICE_ID_VSOCK {
                        break;
                    }
                    continue;
                }
                println!(
                    "virtio: mmio {:#x} irq {} device {}",
                    dev.base,
                    dev.irq,
                    t.device_id()
                );
            }
            Err(e) => report.fail(format_args!("mmio {:#x}", dev.base), "probe", e),
        }
    }

    if selection.agent {
        agent::run(cmdline, &devices, &mut arena);
    }
    if selection.hostile {
        hostile::run(cmdline, &devices, &mut arena);
    }
    if selection.blk {
        blk::run(
            &devices,
            &mut arena,
            report,
            selection.explicit,
            blk_swap,
            blk_watch,
            blk_all,
        );
    }
    if selection.net {
        net::run(&devices, &mut arena, report, selection.explicit);
    }
    if selection.vsock {
        vsock::run(&devices, &mut arena, report, selection.explicit);
    }
}
