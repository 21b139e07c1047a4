// SPDX-License-Identifier: Apache-2.0
//! The block device test (device id 2).
//!
//! Console, `<dev>` being `blk` for the first device and `blk<n>` for the n-th (n >= 1, only
//! with `virtio.blk_all=1`):
//! - `virtio: <dev>: features <names>` (accepted bits of SEG_MAX RO BLK_SIZE FLUSH VERSION_1)
//! - `virtio: <dev>: capacity <sectors>`; capacity 0 adds `virtio: <dev>: empty slot` and
//!   skips the write, flush, readback and sector0 steps
//! - `virtio: <dev>: id <serial>` (GET_ID, up to the first NUL)
//! - `virtio: <dev>: write ok`: 4 KiB of [`pattern`] at sectors 1..=8 (one 3-descriptor chain);
//!   `virtio: <dev>: write skipped (read-only)` with `VIRTIO_BLK_F_RO`
//! - `virtio: <dev>: flush ok` (`virtio: <dev>: flush not offered` without FLUSH)
//! - `virtio: <dev>: readback ok`: the 4 KiB read back equal
//! - `virtio: <dev>: sector0 <text>`: the first 16 bytes of sector 0 as text
//! - `virtio: <dev>: bounds ok`: reading sector `capacity` completed with IOERR
//!
//! Every request must complete with an interrupt (`... FAIL completed without an interrupt`).
//! - with `virtio.blk_swap=1`, first device only: `virtio: <dev>: waiting for config change`,
//!   then within 10 s a configuration-change interrupt and
//!   `virtio: <dev>: swapped capacity <sectors> sector0 <text>`
//! - with `virtio.blk_watch=1`, first device only (instead of the swap): the disk comes later
//!   and is watched, across a live handover of the VM. `virtio: <dev>: waiting for config
//!   change`, then within 10 s a configuration-change interrupt, `virtio: <dev>: watching
//!   capacity <sectors>` (at least 10), the write, flush and readback steps on the new disk,
//!   then every [`POLL`]: sector 0 is read (the host's mailbox); when its text changes, the
//!   pattern at sectors 1..=8 is read back again (`virtio: <dev>: watch FAIL ...` if it
//!   differs), `ack <text>` is written to sector [`ACK_SECTOR`] and flushed, and
//!   `virtio: <dev>: mailbox <text> ack` printed. A configuration-change interrupt prints
//!   `virtio: <dev>: config change capacity <sectors>`; capacity 0 (the disk was detached)
//!   ends the watch. Without a detach within [`WATCH_POLLS`] polls the watch fails.
//! - `virtio: <dev>: interrupts <n>`
//!
//! A failing step prints `virtio: <dev>: <step> FAIL <why>` instead of its line.

use core::fmt;

use firmware::dma::Arena;
use firmware::irq;
use firmware::virtio::DEVICE_ID_BLK;
use firmware::virtio::blk::{
    Blk, FEATURE_NAMES, ID_LEN, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use firmware::{println, virtio};

use crate::{Devices, Failure, FeatureNames, Report, Text};

/// First sector written.
const WRITE_SECTOR: u64 = 1;
/// Bytes written (sectors 1..=8).
const WRITE_LEN: usize = 4096;
/// Bytes of sector 0 shown.
const SECTOR0_TEXT: usize = 16;
/// Bound on the wait for a slot swap.
const SWAP_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(10);
/// How long a failed read of the watched disk waits for the detach's configuration change.
const DETACH_GRACE: core::time::Duration = core::time::Duration::from_secs(1);
/// Pause between two reads of the watched disk's mailbox (sector 0).
const POLL: core::time::Duration = core::time::Duration::from_millis(10);
/// Polls of the watched disk before the watch gives up on a detach (about 2 minutes).
const WATCH_POLLS: u32 = 12_000;
/// Sector the watch writes its answers to.
const ACK_SECTOR: u64 = 9;

/// The pattern written at sector 1: little-endian 64-bit word `i` of the 4 KiB is
/// `0x7669_7274_696f_0000 | i`.
fn pattern(word: usize) -> u64 {
    0x7669_7274_696f_0000 | word as u64
}

/// `blk` or `blk<n>`.
#[derive(Clone, Copy)]
struct Label(usize);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("blk"),
            n => write!(f, "blk{n}"),
        }
    }
}

fn status(result: Result<u8, virtio::VirtioError>) -> Result<(), Failure> {
    match result? {
        VIRTIO_BLK_S_OK => Ok(()),
        s => Err(Failure::Status(s)),
    }
}

/// Runs the test on the first block device (every one with `all`).
pub fn run(
    devices: &Devices,
    arena: &mut Arena,
    report: &mut Report,
    explicit: bool,
    swap: bool,
    watch: bool,
    all: bool,
) {
    let mut tested = 0;
    for (n, dev) in devices.of_type(DEVICE_ID_BLK).enumerate() {
        if n > 0 && !all {
            break;
        }
        let label = Label(n);
        match Blk::new(dev, arena) {
            Ok(mut blk) => {
                let after = match n {
                    0 if watch => After::Watch,
                    0 if swap => After::Swap,
                    _ => After::Nothing,
                };
                test(&mut blk, label, report, after)
            }
            Err(e) => report.fail(label, "init", e),
        }
        tested += 1;
    }
    if tested == 0 {
        if explicit {
            report.fail("blk", "probe", "no device");
        } else {
            println!("virtio: blk: not present");
        }
    }
}

/// What the test does after its steps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    /// `virtio.blk_swap=1`.
    Swap,
    /// `virtio.blk_watch=1`.
    Watch,
}

fn test(blk: &mut Blk, label: Label, report: &mut Report, after: After) {
    println!(
        "virtio: {label}: features {}",
        FeatureNames(blk.features(), &FEATURE_NAMES)
    );
    let capacity = blk.capacity();
    println!("virtio: {label}: capacity {capacity}");

    match status(blk.get_id()) {
        Ok(()) => {
            let id = blk.data.bytes().get(..ID_LEN).unwrap_or_default();
            println!("virtio: {label}: id {}", Text(id));
        }
        Err(why) => report.fail(label, "id", why),
    }

    if capacity == 0 {
        println!("virtio: {label}: empty slot");
    } else if blk.features() & VIRTIO_BLK_F_RO != 0 {
        println!("virtio: {label}: write skipped (read-only)");
    } else if capacity < WRITE_SECTOR + (WRITE_LEN / SECTOR_SIZE) as u64 {
        report.fail(label, "write", "disk smaller than 9 sectors");
    } else {
        write_flush_readback(blk, label, report);
    }

    if capacity != 0 {
        match status(blk.read(0, SECTOR_SIZE)) {
            Ok(()) => println!("virtio: {label}: sector0 {}", sector0(blk)),
            Err(why) => report.fail(label, "sector0", why),
        }
    }

    let bounds = match blk.read(capacity, SECTOR_SIZE) {
        Ok(VIRTIO_BLK_S_IOERR) => Ok(()),
        Ok(s) => Err(Failure::Status(s)),
        Err(e) => Err(e.into()),
    };
    report.check(label, "bounds", bounds);

    match after {
        After::Swap => wait_for_swap(blk, label, report),
        After::Watch => watch(blk, label, report),
        After::Nothing => {}
    }
    println!(
        "virtio: {label}: interrupts {}",
        blk.transport().interrupt_count()
    );
}

fn sector0(blk: &Blk) -> Text<'_> {
    Text(blk.data.bytes().get(..SECTOR0_TEXT).unwrap_or_default())
}

fn write_flush_readback(blk: &mut Blk, label: Label, report: &mut Report) {
    for (i, word) in blk.data.bytes_mut().chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern(i).to_le_bytes());
    }
    if let Err(why) = status(blk.write(WRITE_SECTOR, WRITE_LEN)) {
        return report.fail(label, "write", why);
    }
    report.ok(label, "write");

    if blk.features() & VIRTIO_BLK_F_FLUSH != 0 {
        report.check(label, "flush", status(blk.flush()));
    } else {
        println!("virtio: {label}: flush not offered");
    }

    report.check(label, "readback", read_back(blk));
}

/// Reads sectors 1..=8 and checks they hold the pattern.
fn read_back(blk: &mut Blk) -> Result<(), Failure> {
    blk.data.zero();
    status(blk.read(WRITE_SECTOR, WRITE_LEN))?;
    let bad = blk
        .data
        .bytes()
        .chunks_exact(8)
        .take(WRITE_LEN / 8)
        .enumerate()
        .position(|(i, word)| word != pattern(i).to_le_bytes());
    match bad {
        None => Ok(()),
        Some(_) => Err(Failure::Msg("data differs")),
    }
}

/// Waits for a disk, then serves the host's mailbox until the disk is detached (see the
/// module doc).
fn watch(blk: &mut Blk, label: Label, report: &mut Report) {
    blk.clear_config_changed();
    println!("virtio: {label}: waiting for config change");
    if !irq::wait_until(SWAP_TIMEOUT, || blk.config_changed()) {
        return report.fail(label, "watch", "no config change interrupt in 10 s");
    }
    blk.clear_config_changed();
    let capacity = blk.capacity();
    println!("virtio: {label}: watching capacity {capacity}");
    if capacity <= ACK_SECTOR {
        return report.fail(label, "watch", "disk smaller than 10 sectors");
    }
    write_flush_readback(blk, label, report);
    let mut seen = [0u8; SECTOR0_TEXT];
    for _ in 0..WATCH_POLLS {
        if blk.config_changed() {
            blk.clear_config_changed();
            let capacity = blk.capacity();
            println!("virtio: {label}: config change capacity {capacity}");
            if capacity == 0 {
                return;
            }
        }
        if let Err(why) = status(blk.read(0, SECTOR_SIZE)) {
            // A detach may land between the check above and this read: the read fails
            // (IOERR) and the configuration change is on its way.
            if irq::wait_until(DETACH_GRACE, || blk.config_changed()) && blk.capacity() == 0 {
                blk.clear_config_changed();
                println!("virtio: {label}: config change capacity 0");
                return;
            }
            return report.fail(label, "watch", why);
        }
        let text = blk.data.bytes().get(..SECTOR0_TEXT).unwrap_or_default();
        if text != seen {
            seen.copy_from_slice(text);
            if let Err(why) = answer(blk, &seen) {
                return report.fail(label, "watch", why);
            }
            println!("virtio: {label}: mailbox {} ack", Text(&seen));
        }
        irq::sleep(POLL);
    }
    report.fail(label, "watch", "no detach in time");
}

/// Checks the pattern is still there, then writes `ack <text>` to [`ACK_SECTOR`] and flushes.
fn answer(blk: &mut Blk, text: &[u8]) -> Result<(), Failure> {
    read_back(blk)?;
    blk.data.zero();
    let len = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let ack = blk.data.bytes_mut();
    let (prefix, rest) = ack.split_at_mut_checked(4).ok_or(Failure::Msg("buffer"))?;
    prefix.copy_from_slice(b"ack ");
    let body = rest.get_mut(..len).ok_or(Failure::Msg("buffer"))?;
    body.copy_from_slice(text.get(..len).unwrap_or_default());
    status(blk.write(ACK_SECTOR, SECTOR_SIZE))?;
    status(blk.flush())
}

fn wait_for_swap(blk: &mut Blk, label: Label, report: &mut Report) {
    blk.clear_config_changed();
    println!("virtio: {label}: waiting for config change");
    if !irq::wait_until(SWAP_TIMEOUT, || blk.config_changed()) {
        return report.fail(label, "swap", "no config change interrupt in 10 s");
    }
    let capacity = blk.capacity();
    if capacity == 0 {
        println!("virtio: {label}: swapped capacity 0 sector0 ");
        return;
    }
    match status(blk.read(0, SECTOR_SIZE)) {
        Ok(()) => println!(
            "virtio: {label}: swapped capacity {capacity} sector0 {}",
            sector0(blk)
        ),
        Err(why) => report.fail(label, "swap", why),
    }
}
