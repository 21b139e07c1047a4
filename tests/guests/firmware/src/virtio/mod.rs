// SPDX-License-Identifier: Apache-2.0
//! A minimal virtio 1.x driver for the test guests: the virtio-mmio version 2 transport
//! (virtio 1.2 §4.2.2), split virtqueues (§2.7) and the block (§5.2), network (§5.1) and
//! socket (§5.10) devices, enough to exercise a VMM's devices for real.
//!
//! Devices are found on the kernel command line, as Linux finds them with
//! `VIRTIO_MMIO_CMDLINE_DEVICES`: `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (sizes and
//! addresses take a `0x` prefix and a K/M/G suffix, like Linux's `memparse`).
//!
//! Requests complete through interrupts: a driver notifies the queue (an MMIO write the VMM
//! turns into a KVM ioeventfd), then waits in `sti; hlt` (see [`crate::irq`]) until the used
//! ring moves, bounded by the LAPIC timer.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

use core::fmt;

/// Feature bit: the device complies with virtio 1.x (§6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device id of a network card (§5).
pub const DEVICE_ID_NET: u32 = 1;
/// Device id of a block device (§5).
pub const DEVICE_ID_BLK: u32 = 2;
/// Device id of a socket device (§5).
pub const DEVICE_ID_VSOCK: u32 = 19;
/// Devices read from the command line at most.
pub const MAX_DEVICES: usize = 8;
/// Default bound on one request (time spent waiting for it).
pub const REQUEST_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(5);

/// What went wrong talking to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    /// `MagicValue` is not "virt".
    NotVirtio(u32),
    /// `Version` is not 2 (1 is the legacy interface).
    Version(u32),
    /// `DeviceID` is not the expected device.
    WrongDevice(u32),
    /// The device does not offer a feature the driver needs.
    MissingFeature(&'static str),
    /// The device cleared `FEATURES_OK`: it rejected the feature set.
    FeaturesRejected,
    /// The device set `DEVICE_NEEDS_RESET`.
    NeedsReset,
    /// A queue the driver needs does not exist (`QueueNumMax` 0).
    NoQueue(u16),
    /// The DMA arena is exhausted.
    OutOfMemory,
    /// No free descriptors for the request.
    QueueFull,
    /// The device did not answer in time.
    Timeout,
    /// The device completed the request but sent no interrupt within the timeout.
    NoInterrupt,
    /// The device returned a descriptor id that was not in flight.
    BadUsed(u32),
    /// A buffer is too large for the driver's fixed buffers.
    TooLarge(usize),
    /// An interrupt line the guest cannot route.
    BadIrq(u32),
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotVirtio(magic) => write!(f, "bad magic {magic:#x}"),
            Self::Version(v) => write!(f, "mmio version {v} (want 2)"),
            Self::WrongDevice(id) => write!(f, "unexpected device id {id}"),
            Self::MissingFeature(name) => write!(f, "feature {name} not offered"),
            Self::FeaturesRejected => write!(f, "device rejected the features"),
            Self::NeedsReset => write!(f, "device needs reset"),
            Self::NoQueue(q) => write!(f, "queue {q} missing"),
            Self::OutOfMemory => write!(f, "out of DMA memory"),
            Self::QueueFull => write!(f, "queue full"),
            Self::Timeout => write!(f, "timeout"),
            Self::NoInterrupt => write!(f, "completed without an interrupt"),
            Self::BadUsed(id) => write!(f, "bad used id {id}"),
            Self::TooLarge(len) => write!(f, "buffer of {len} bytes too large"),
            Self::BadIrq(irq) => write!(f, "irq {irq} not routable"),
        }
    }
}

/// One `virtio_mmio.device=` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmioDevice {
    /// Size of the register window.
    pub size: u64,
    /// Base address of the register window.
    pub base: u64,
    /// Interrupt line (IOAPIC pin).
    pub irq: u32,
}

/// The space-separated words of a command line.
pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .filter(|w| !w.is_empty())
}

/// The value of the last `key=value` word, or `None` if there is none.
pub fn param<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    words(cmdline)
        .filter_map(|w| {
            let (k, v) = split_once(w, b'=')?;
            (k == key).then_some(v)
        })
        .last()
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = s.iter().position(|&b| b == sep)?;
    Some((s.get(..at)?, s.get(at.checked_add(1)?..)?))
}

/// Parses an unsigned number like Linux's `simple_strtoull` with base 0 (`0x` hex, decimal;
/// a leading 0 does not switch to octal here) followed by an optional K/M/G suffix when
/// `suffix` is set. The whole input must be used.
pub fn parse_number(s: &[u8], suffix: bool) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    let mut value: u64 = 0;
    let mut used = 0usize;
    for &b in digits {
        let Some(d) = char::from(b).to_digit(radix) else {
            break;
        };
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
        used = used.checked_add(1)?;
    }
    if used == 0 {
        return None;
    }
    let shift = match digits.get(used..)? {
        [] => 0,
        [b'k' | b'K'] if suffix => 10,
        [b'm' | b'M'] if suffix => 20,
        [b'g' | b'G'] if suffix => 30,
        _ => return None,
    };
    value.checked_mul(1u64.checked_shl(shift)?)
}

/// Parses the value of one `virtio_mmio.device=` word: `<size>@<base>:<irq>[:<id>]`.
pub fn parse_mmio_device(value: &[u8]) -> Option<MmioDevice> {
    let (size, rest) = split_once(value, b'@')?;
    let (base, rest) = split_once(rest, b':')?;
    let irq = match split_once(rest, b':') {
        Some((irq, _id)) => irq,
        None => rest,
    };
    Some(MmioDevice {
        size: parse_number(size, true)?,
        base: parse_number(base, true)?,
        irq: u32::try_from(parse_number(irq, false)?).ok()?,
    })
}

/// The command line's `virtio_mmio.device=` entries, in order, parsed as they are taken (a
/// caller that stops early does not pay for the rest). Malformed entries are skipped.
pub fn mmio_devices(cmdline: &[u8]) -> impl Iterator<Item = MmioDevice> + '_ {
    words(cmdline)
        .filter_map(|w| w.strip_prefix(b"virtio_mmio.device="))
        .filter_map(parse_mmio_device)
}
