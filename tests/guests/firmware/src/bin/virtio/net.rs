// SPDX-License-Identifier: Apache-2.0
//! The network test (device id 1), first network device only. The host gives it a loopback
//! backend that returns every frame sent.
//!
//! Console:
//! - `virtio: net: features <names>` (accepted bits of MAC MRG_RXBUF STATUS VERSION_1)
//! - `virtio: net: mac <aa:bb:cc:dd:ee:ff>`
//! - `virtio: net: link up|down|unknown` (unknown: no `VIRTIO_NET_F_STATUS`)
//! - `virtio: net: loopback 3 ok`: three frames of [`FRAME_LENS`] bytes (Ethernet header
//!   included, after the 12-byte `virtio_net_hdr_v1`) each came back unchanged; frames that do
//!   not match are skipped (at most [`MAX_STRAYS`] per frame)
//! - `virtio: net: interrupts <n>`

use core::fmt;

use firmware::dma::Arena;
use firmware::println;
use firmware::virtio::DEVICE_ID_NET;
use firmware::virtio::net::{
    FEATURE_NAMES, NET_HDR_LEN, NUM_BUFFERS_OFFSET, Net, VIRTIO_NET_F_MRG_RXBUF,
};

use crate::{Devices, Failure, FeatureNames, Report};

/// Frame lengths sent, Ethernet header included.
pub const FRAME_LENS: [usize; 3] = [60, 1000, 1514];
/// Non-matching frames tolerated while waiting for one echo.
const MAX_STRAYS: u32 = 8;
/// EtherType of the test frames (IEEE 802 local experimental).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Source and destination address when the device has no MAC.
const FALLBACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Start of every test frame's payload; the frame number follows.
const TAG: &[u8] = b"sandboxer virtio-net frame ";

struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Fills `frame` as test frame `n` to and from `mac`: Ethernet header, [`TAG`], the frame
/// number's last digit, then bytes `i * 7 + n` (`i` counting from the frame's start).
fn fill_frame(frame: &mut [u8], n: usize, mac: &[u8; 6]) {
    let digit = [b'0' + (n % 10).to_le_bytes()[0]];
    let head = mac
        .iter()
        .chain(mac)
        .chain(&ETHERTYPE)
        .chain(TAG)
        .chain(&digit);
    let mut len = 0;
    for (dst, src) in frame.iter_mut().zip(head) {
        *dst = *src;
        len += 1;
    }
    for (i, b) in frame.iter_mut().enumerate().skip(len) {
        *b = i.wrapping_mul(7).wrapping_add(n).to_le_bytes()[0];
    }
}

/// Runs the test on the first network device.
pub fn run(devices: &Devices, arena: &mut Arena, report: &mut Report, explicit: bool) {
    let Some(dev) = devices.of_type(DEVICE_ID_NET).next() else {
        if explicit {
            report.fail("net", "probe", "no device");
        } else {
            println!("virtio: net: not present");
        }
        return;
    };
    let mut net = match Net::new(dev, arena) {
        Ok(net) => net,
        Err(e) => return report.fail("net", "init", e),
    };
    println!(
        "virtio: net: features {}",
        FeatureNames(net.features(), &FEATURE_NAMES)
    );
    let mac = match net.mac() {
        Some(mac) => {
            println!("virtio: net: mac {}", Mac(mac));
            mac
        }
        None => {
            report.fail("net", "mac", "not offered");
            FALLBACK_MAC
        }
    };
    match net.link_up() {
        Some(true) => println!("virtio: net: link up"),
        Some(false) => println!("virtio: net: link down"),
        None => println!("virtio: net: link unknown"),
    }
    let failed = FRAME_LENS
        .iter()
        .enumerate()
        .find_map(|(n, &len)| loopback(&mut net, n, len, &mac).err().map(|why| (len, why)));
    match failed {
        None => report.ok("net", "loopback 3"),
        Some((len, why)) => report.fail(
            "net",
            "loopback",
            format_args!("frame of {len} bytes: {why}"),
        ),
    }
    println!(
        "virtio: net: interrupts {}",
        net.transport().interrupt_count()
    );
}

/// Sends frame `n` of `len` bytes and waits for it to come back.
fn loopback(net: &mut Net, n: usize, len: usize, mac: &[u8; 6]) -> Result<(), Failure> {
    let frame = net
        .tx_frame_mut()
        .get_mut(..len)
        .ok_or(Failure::Msg("frame too large"))?;
    fill_frame(frame, n, mac);
    net.send(len)?;
    let merged = net.features() & VIRTIO_NET_F_MRG_RXBUF != 0;
    for _ in 0..=MAX_STRAYS {
        let matched = net.recv(|buf, sent| {
            let buffers = buf
                .get(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2)
                .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            buf.get(NET_HDR_LEN..) == Some(sent) && (!merged || buffers == 1)
        })?;
        if matched {
            return Ok(());
        }
    }
    Err(Failure::Msg("frame did not come back"))
}
