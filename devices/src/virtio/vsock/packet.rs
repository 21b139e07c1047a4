// SPDX-License-Identifier: Apache-2.0
//! Vsock packets on the virtqueues (virtio 1.2 §5.10.6): the `virtio_vsock_hdr` layout and the
//! copy of a packet out of a TX chain or into an RX chain.
//!
//! Guest input is hostile: the header is copied out of guest memory once into a
//! [`VsockHeader`] and every later decision uses that copy. Chains may be split anywhere
//! (header and data across any number of descriptors, Linux >= 6.2 puts both in one), so the
//! transfer goes through the queue layer's [`ChainBuffers`], which address a chain's bytes by
//! logical offset and bound every access to the descriptors' own ranges. A TX packet uses only
//! the chain's device-readable part, an RX buffer only its device-writable part.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::defs::{MAX_PKT_DATA_SIZE, PKT_HEADER_SIZE};
use crate::virtio::queue::{ChainBuffers, ChainError, GuestView};

/// [`PKT_HEADER_SIZE`] as a `u32` (used lengths) and a `u64` (logical chain offsets).
const PKT_HEADER_LEN: u32 = 44;
const _: () = assert!(PKT_HEADER_LEN as usize == PKT_HEADER_SIZE);
const PKT_HEADER_OFFSET: u64 = PKT_HEADER_LEN as u64;

/// A parsed `virtio_vsock_hdr` (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Length of the data that follows the header.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// Sender's total receive buffer space for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, modulo 2^32.
    pub fwd_cnt: u32,
}

/// Takes the next `N` bytes of `rest`; only called with lengths that sum to the header size.
fn take<const N: usize>(rest: &mut &[u8]) -> [u8; N] {
    match rest.split_first_chunk::<N>() {
        Some((head, tail)) => {
            *rest = tail;
            *head
        }
        None => [0; N],
    }
}

/// Writes `bytes` at the front of `rest` and advances it.
fn put<const N: usize>(rest: &mut &mut [u8], bytes: [u8; N]) {
    if let Some((head, tail)) = std::mem::take(rest).split_first_chunk_mut::<N>() {
        *head = bytes;
        *rest = tail;
    }
}

impl VsockHeader {
    /// Decodes a header from its wire form.
    pub fn from_bytes(raw: &[u8; PKT_HEADER_SIZE]) -> Self {
        let mut rest: &[u8] = raw;
        VsockHeader {
            src_cid: u64::from_le_bytes(take(&mut rest)),
            dst_cid: u64::from_le_bytes(take(&mut rest)),
            src_port: u32::from_le_bytes(take(&mut rest)),
            dst_port: u32::from_le_bytes(take(&mut rest)),
            len: u32::from_le_bytes(take(&mut rest)),
            type_: u16::from_le_bytes(take(&mut rest)),
            op: u16::from_le_bytes(take(&mut rest)),
            flags: u32::from_le_bytes(take(&mut rest)),
            buf_alloc: u32::from_le_bytes(take(&mut rest)),
            fwd_cnt: u32::from_le_bytes(take(&mut rest)),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut out = [0u8; PKT_HEADER_SIZE];
        let mut rest: &mut [u8] = &mut out;
        put(&mut rest, self.src_cid.to_le_bytes());
        put(&mut rest, self.dst_cid.to_le_bytes());
        put(&mut rest, self.src_port.to_le_bytes());
        put(&mut rest, self.dst_port.to_le_bytes());
        put(&mut rest, self.len.to_le_bytes());
        put(&mut rest, self.type_.to_le_bytes());
        put(&mut rest, self.op.to_le_bytes());
        put(&mut rest, self.flags.to_le_bytes());
        put(&mut rest, self.buf_alloc.to_le_bytes());
        put(&mut rest, self.fwd_cnt.to_le_bytes());
        out
    }
}

/// Why a chain could not be used as a vsock packet.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's buffers are not valid guest memory, or the chain is malformed.
    #[error("Invalid descriptor chain")]
    InvalidChain(#[source] ChainError),
    /// The readable part of a TX chain is shorter than a header.
    #[error("TX chain holds {0} readable bytes, less than a header")]
    HeaderTooShort(usize),
    /// The header's `len` exceeds the largest payload the device accepts.
    #[error("Packet data length {0} exceeds the maximum")]
    DataTooLong(u32),
    /// The header's `len` exceeds the readable bytes that follow the header.
    #[error("Packet data length {len} exceeds the {available} bytes in the chain")]
    DataTooShort {
        /// Length claimed by the header.
        len: u32,
        /// Readable bytes after the header.
        available: usize,
    },
    /// The writable part of an RX chain is shorter than a header.
    #[error("RX chain holds {0} writable bytes, less than a header")]
    RxBufferTooSmall(usize),
    /// More data than the RX buffer can carry.
    #[error("{len} bytes of data do not fit an RX buffer for {capacity}")]
    RxDataTooLong {
        /// Bytes of data.
        len: usize,
        /// The buffer's data capacity.
        capacity: usize,
    },
    /// Copying from or to guest memory failed.
    #[error("Failed to access the packet buffers")]
    Memory(#[source] ChainError),
}

/// Grows a packet buffer to hold `len` bytes (`len` at most [`MAX_PKT_DATA_SIZE`]): to the next
/// power of two, so a device whose packets stay small never holds more than they need (an
/// idle VM's device holds a page or so, not the 64 KiB a packet may reach).
pub fn grow(buffer: &mut Vec<u8>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len.next_power_of_two().min(MAX_PKT_DATA_SIZE), 0);
    }
}

/// Bytes of a chain length, saturating (a chain holds at most 4 GiB).
fn bytes(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// Reads a TX packet from a gathered chain: the header, then `len` bytes of data into the front
/// of `data`, which grows to hold them if it must (to the next power of two, at most
/// [`MAX_PKT_DATA_SIZE`]: a packet may not be longer) and never shrinks.
///
/// Returns the header and the data length.
pub fn read_tx_packet(
    view: &GuestView<'_>,
    chain: &ChainBuffers,
    data: &mut Vec<u8>,
) -> Result<(VsockHeader, usize), PacketError> {
    chain
        .check_readable_in_memory()
        .map_err(PacketError::InvalidChain)?;
    let available = bytes(chain.readable_len());
    if available < PKT_HEADER_SIZE {
        return Err(PacketError::HeaderTooShort(available));
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    chain
        .read_at_in(view, 0, &mut raw)
        .map_err(PacketError::Memory)?;
    let header = VsockHeader::from_bytes(&raw);

    let len = header.len;
    let len_usize = usize::try_from(len).map_err(|_| PacketError::DataTooLong(len))?;
    if len_usize > MAX_PKT_DATA_SIZE {
        return Err(PacketError::DataTooLong(len));
    }
    let after_header = available.saturating_sub(PKT_HEADER_SIZE);
    if after_header < len_usize {
        return Err(PacketError::DataTooShort {
            len,
            available: after_header,
        });
    }
    grow(data, len_usize);
    let buf = data
        .get_mut(..len_usize)
        .ok_or(PacketError::DataTooLong(len))?;
    chain
        .read_at_in(view, PKT_HEADER_OFFSET, buf)
        .map_err(PacketError::Memory)?;
    Ok((header, len_usize))
}

/// The writable buffers of one gathered RX chain, ready to receive a packet.
#[derive(Debug)]
pub struct RxBuffer<'c, 'a> {
    view: GuestView<'a>,
    chain: &'c ChainBuffers,
}

impl<'c, 'a> RxBuffer<'c, 'a> {
    /// Takes the writable buffers of `chain`; fails if they cannot hold a header.
    pub fn new(view: &GuestView<'a>, chain: &'c ChainBuffers) -> Result<Self, PacketError> {
        chain
            .check_writable_in_memory()
            .map_err(PacketError::InvalidChain)?;
        let available = bytes(chain.writable_len());
        if available < PKT_HEADER_SIZE {
            return Err(PacketError::RxBufferTooSmall(available));
        }
        Ok(RxBuffer { view: *view, chain })
    }

    /// Largest payload this buffer can carry (bounded by [`MAX_PKT_DATA_SIZE`]).
    pub fn data_capacity(&self) -> usize {
        bytes(self.chain.writable_len())
            .saturating_sub(PKT_HEADER_SIZE)
            .min(MAX_PKT_DATA_SIZE)
    }

    /// Writes `header` (with `len` set to the data length) and `data`; returns the number of
    /// bytes written, for the used ring.
    pub fn write_packet(self, header: &VsockHeader, data: &[u8]) -> Result<u32, PacketError> {
        let capacity = self.data_capacity();
        if data.len() > capacity {
            return Err(PacketError::RxDataTooLong {
                len: data.len(),
                capacity,
            });
        }
        let len = u32::try_from(data.len()).map_err(|_| PacketError::RxDataTooLong {
            len: data.len(),
            capacity,
        })?;
        let header = VsockHeader { len, ..*header };
        self.chain
            .write_at_in(&self.view, 0, &header.to_bytes())
            .map_err(PacketError::Memory)?;
        self.chain
            .write_at_in(&self.view, PKT_HEADER_OFFSET, data)
            .map_err(PacketError::Memory)?;
        // `len` is at most 64 KiB (the capacity bound): no saturation happens.
        Ok(len.saturating_add(PKT_HEADER_LEN))
    }
}

#[cfg(test)]
#[expect(clippy::indexing_slicing, reason = "test code")]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::vsock::defs::{OP_RW, TYPE_STREAM};
    use crate::virtio::vsock::test_utils::{TestMem, hdr};

    fn sample_header() -> VsockHeader {
        VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 0x3333_4444,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0xdead_beef,
            buf_alloc: 0x10000,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = sample_header();
        let raw = h.to_bytes();
        assert_eq!(VsockHeader::from_bytes(&raw), h);
        // Field offsets from the virtio spec: len at 24, type at 28, op at 30, fwd_cnt at 40.
        assert_eq!(&raw[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&raw[24..28], &5u32.to_le_bytes());
        assert_eq!(&raw[28..30], &TYPE_STREAM.to_le_bytes());
        assert_eq!(&raw[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&raw[32..36], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&raw[40..44], &77u32.to_le_bytes());
    }

    #[test]
    fn tx_header_and_data_in_one_descriptor() {
        let t = TestMem::new();
        let h = sample_header();
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        let chain = t.readable_chain(&[&bytes]);
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        let (got, n) = read_tx_packet(&t.view(), &chain, &mut scratch).expect("valid packet");
        assert_eq!(got, h);
        assert_eq!(&scratch[..n], b"hello");
    }

    #[test]
    fn tx_header_split_across_descriptors() {
        let t = TestMem::new();
        let h = sample_header();
        let raw = h.to_bytes();
        let chain = t.readable_chain(&[&raw[..10], &raw[10..], b"he", b"llo"]);
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        let (got, n) = read_tx_packet(&t.view(), &chain, &mut scratch).expect("valid packet");
        assert_eq!(got, h);
        assert_eq!(&scratch[..n], b"hello");
    }

    #[test]
    fn tx_rejects_short_header_and_zero_length_chain() {
        let t = TestMem::new();
        let raw = sample_header().to_bytes();
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        let chain = t.readable_chain(&[&raw[..43]]);
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::HeaderTooShort(43))
        ));
        let chain = t.readable_chain(&[&[]]);
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::HeaderTooShort(0))
        ));
    }

    #[test]
    fn tx_rejects_len_beyond_chain_and_maximum() {
        let t = TestMem::new();
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        let h = VsockHeader {
            len: 100,
            ..sample_header()
        };
        let chain = t.readable_chain(&[&h.to_bytes(), &[0u8; 99]]);
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::DataTooShort {
                len: 100,
                available: 99
            })
        ));
        let h = VsockHeader {
            len: u32::MAX,
            ..sample_header()
        };
        let chain = t.readable_chain(&[&h.to_bytes()]);
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::DataTooLong(u32::MAX))
        ));
        let over = u32::try_from(MAX_PKT_DATA_SIZE + 1).unwrap();
        let h = VsockHeader {
            len: over,
            ..sample_header()
        };
        let chain = t.readable_chain(&[&h.to_bytes(), &vec![0u8; MAX_PKT_DATA_SIZE + 1]]);
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::DataTooLong(l)) if l == over
        ));
    }

    #[test]
    fn tx_ignores_writable_descriptors() {
        let t = TestMem::new();
        // Only a writable descriptor: nothing readable.
        let chain = t.writable_chain(&[100]);
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        assert!(matches!(
            read_tx_packet(&t.view(), &chain.0, &mut scratch),
            Err(PacketError::HeaderTooShort(0))
        ));
    }

    #[test]
    fn tx_rejects_buffer_outside_guest_memory() {
        let t = TestMem::new();
        let chain = t.raw_chain(&[(0xffff_ffff_0000, 64, false)]);
        let mut scratch = vec![0u8; MAX_PKT_DATA_SIZE];
        assert!(matches!(
            read_tx_packet(&t.view(), &chain, &mut scratch),
            Err(PacketError::InvalidChain(_))
        ));
    }

    #[test]
    fn rx_writes_header_and_data() {
        let t = TestMem::new();
        let (chain, addrs) = t.writable_chain(&[20, 30, 100]);
        let buf = RxBuffer::new(&t.view(), &chain).expect("big enough");
        assert_eq!(buf.data_capacity(), 150 - PKT_HEADER_SIZE);
        let h = hdr(3, 1000, 2000, OP_RW);
        let used = buf.write_packet(&h, b"0123456789").expect("fits");
        assert_eq!(used, 54);
        let mut out = [0u8; 150];
        let mut off = 0;
        for (addr, len) in addrs {
            t.mem
                .read_slice(&mut out[off..off + len], GuestAddress(addr))
                .unwrap();
            off += len;
        }
        let raw: [u8; PKT_HEADER_SIZE] = out[..PKT_HEADER_SIZE].try_into().unwrap();
        let got = VsockHeader::from_bytes(&raw);
        assert_eq!(got, VsockHeader { len: 10, ..h });
        assert_eq!(&out[44..54], b"0123456789");
    }

    #[test]
    fn rx_rejects_small_or_readonly_buffers() {
        let t = TestMem::new();
        let (chain, _) = t.writable_chain(&[43]);
        assert!(matches!(
            RxBuffer::new(&t.view(), &chain),
            Err(PacketError::RxBufferTooSmall(43))
        ));
        let chain = t.readable_chain(&[&[0u8; 100]]);
        assert!(matches!(
            RxBuffer::new(&t.view(), &chain),
            Err(PacketError::RxBufferTooSmall(0))
        ));
        let (chain, _) = t.writable_chain(&[50]);
        let buf = RxBuffer::new(&t.view(), &chain).unwrap();
        buf.write_packet(&hdr(3, 1, 2, OP_RW), &[0u8; 7])
            .unwrap_err();
    }

    #[test]
    fn rx_capacity_is_capped() {
        let t = TestMem::new();
        let (chain, _) = t.writable_chain(&[200_000]);
        let buf = RxBuffer::new(&t.view(), &chain).unwrap();
        assert_eq!(buf.data_capacity(), MAX_PKT_DATA_SIZE);
    }
}
