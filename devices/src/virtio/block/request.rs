// SPDX-License-Identifier: Apache-2.0
//! virtio-blk request parsing (virtio 1.2 §5.2.6): pure functions over a descriptor chain.
//!
//! A request is a 16-byte device-readable header (`type`, `reserved`, `sector`), the data, and
//! a one-byte device-writable status at the very end. Nothing here assumes how the driver split
//! this across descriptors (§2.7.4). Every header field and every discard segment is read from
//! guest memory exactly once, into the returned [`Request`], so later guest writes cannot change
//! a request after it was checked.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::borrow::Borrow;

use vm_memory::GuestAddress;

use super::defs::{
    DISCARD_SEGMENT_SIZE, MAX_DISCARD_SEGMENTS, REQUEST_HEADER_SIZE, SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::virtio::queue::{ChainBuffers, ChainError, GuestView, RingPass};

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the device-writable data buffers.
    In,
    /// Write the device-readable data buffers to sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// Return the device serial.
    GetId,
    /// Discard ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Any other type; completed with `UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// One discard or write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: unmap, for write zeroes only).
    pub flags: u32,
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain itself is unusable.
    #[error("Invalid descriptor chain")]
    Chain(#[source] ChainError),
    /// No device-writable byte for the status.
    #[error("Request has no status byte")]
    MissingStatus,
    /// The device-readable part is shorter than the header.
    #[error("Request header is {0} bytes, expected 16")]
    HeaderTooShort(u32),
    /// Device-readable data where only device-writable data belongs (or the reverse).
    #[error("Data buffers of {0:?} request have the wrong direction")]
    WrongDirection(RequestType),
    /// `IN`/`OUT` data whose length is not a whole number of sectors.
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u32),
    /// A discard/write-zeroes payload that is not a list of 1..=32 segments.
    #[error("Invalid discard/write-zeroes payload of {0} bytes")]
    BadSegments(u32),
    /// Unknown request type.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
}

/// A chain that is not a valid request, and where (if anywhere) its status byte can be written.
#[derive(Debug)]
pub struct BadRequest {
    /// What is wrong.
    pub error: RequestError,
    /// The status byte, if the chain has a usable one.
    pub status: Option<GuestAddress>,
}

impl BadRequest {
    /// A chain that could not be gathered: there is no trustworthy status byte.
    pub fn chain(error: ChainError) -> Self {
        BadRequest {
            error: RequestError::Chain(error),
            status: None,
        }
    }

    /// The status to complete the request with: `UNSUPP` for an unknown type, `IOERR` otherwise.
    pub fn status_code(&self) -> u8 {
        match self.error {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A parsed, structurally valid virtio-blk request. It owns its buffers
/// (`B` = [`ChainBuffers`], from [`Request::parse`]) or borrows them (`B` = `&ChainBuffers`,
/// from [`Request::parse_buffers`], the device's allocation- and copy-free path).
#[derive(Debug)]
pub struct Request<B = ChainBuffers> {
    /// The operation.
    pub request_type: RequestType,
    /// First sector (`IN`/`OUT`), as the driver sent it (range checks happen at execution,
    /// against the capacity of the moment).
    pub sector: u64,
    /// Bytes of data: read or written for `IN`/`OUT`, the buffer size for `GET_ID`.
    pub data_len: u32,
    /// Discard / write-zeroes ranges.
    pub segments: Vec<DiscardSegment>,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    bufs: B,
}

impl Request {
    /// Parses the request in the chain at `head` of `ring`, accepting at most `max_descs`
    /// descriptors.
    pub fn parse(
        ring: &RingPass<'_, '_>,
        head: u16,
        max_descs: usize,
    ) -> Result<Request, BadRequest> {
        let mut bufs = ChainBuffers::default();
        ring.chain_into(head, max_descs, &mut bufs)
            .map_err(BadRequest::chain)?;
        let req = Request::parse_buffers(&bufs, ring.view())?;
        Ok(Request {
            request_type: req.request_type,
            sector: req.sector,
            data_len: req.data_len,
            segments: req.segments,
            status: req.status,
            bufs,
        })
    }
}

impl<'b> Request<&'b ChainBuffers> {
    /// Parses a request from a gathered chain (the device's path: see
    /// [`ChainBuffers::walk_into`]); `view` is the guest memory the chain was gathered from.
    #[inline]
    pub fn parse_buffers(bufs: &'b ChainBuffers, view: &GuestView<'_>) -> Result<Self, BadRequest> {
        let Some(status) = bufs.last_writable_byte_in(view) else {
            return Err(BadRequest {
                error: RequestError::MissingStatus,
                status: None,
            });
        };
        let bad = |error| BadRequest {
            error,
            status: Some(status),
        };
        bufs.check_in_memory()
            .map_err(|e| bad(RequestError::Chain(e)))?;

        let readable = bufs.readable_len();
        // The status byte is the last writable byte; everything before it is data.
        let writable_data = bufs.writable_len().saturating_sub(1);
        if readable < REQUEST_HEADER_SIZE {
            return Err(bad(RequestError::HeaderTooShort(readable)));
        }
        // The header is almost always the whole first descriptor: read it in one access.
        let header = match bufs.readable().first() {
            Some(first) if first.len >= REQUEST_HEADER_SIZE => view
                .read_obj::<[u8; REQUEST_HEADER_SIZE as usize]>(first.addr)
                .map_err(|e| bad(RequestError::Chain(ChainError::Memory(e))))?,
            _ => {
                let mut header = [0u8; REQUEST_HEADER_SIZE as usize];
                bufs.read_at_in(view, 0, &mut header)
                    .map_err(|e| bad(RequestError::Chain(e)))?;
                header
            }
        };
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let request_type = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let readable_data = readable.saturating_sub(REQUEST_HEADER_SIZE);

        let mut segments = Vec::new();
        let data_len = match request_type {
            RequestType::In | RequestType::GetId => {
                if readable_data != 0 {
                    return Err(bad(RequestError::WrongDirection(request_type)));
                }
                writable_data
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                if writable_data != 0 {
                    return Err(bad(RequestError::WrongDirection(request_type)));
                }
                readable_data
            }
            RequestType::Flush => 0,
            RequestType::Unsupported(t) => return Err(bad(RequestError::Unsupported(t))),
        };
        match request_type {
            RequestType::In | RequestType::Out
                if !u64::from(data_len).is_multiple_of(SECTOR_SIZE) =>
            {
                return Err(bad(RequestError::UnalignedLength(data_len)));
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                segments = read_segments(bufs, view, data_len).map_err(bad)?;
            }
            _ => {}
        }
        Ok(Request {
            request_type,
            sector,
            data_len,
            segments,
            status,
            bufs,
        })
    }
}

impl<B: Borrow<ChainBuffers>> Request<B> {
    /// The chain's buffers: data of `OUT` starts at readable offset 16, data of `IN`/`GET_ID`
    /// at writable offset 0.
    pub fn buffers(&self) -> &ChainBuffers {
        self.bufs.borrow()
    }
}

/// Reads the discard / write-zeroes segments that follow the header.
fn read_segments(
    bufs: &ChainBuffers,
    view: &GuestView<'_>,
    data_len: u32,
) -> Result<Vec<DiscardSegment>, RequestError> {
    let count = data_len / DISCARD_SEGMENT_SIZE;
    if !data_len.is_multiple_of(DISCARD_SEGMENT_SIZE) || count == 0 || count > MAX_DISCARD_SEGMENTS
    {
        return Err(RequestError::BadSegments(data_len));
    }
    let mut segments = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut offset = u64::from(REQUEST_HEADER_SIZE);
    for _ in 0..count {
        let mut raw = [0u8; DISCARD_SEGMENT_SIZE as usize];
        bufs.read_at_in(view, offset, &mut raw)
            .map_err(RequestError::Chain)?;
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = raw;
        segments.push(DiscardSegment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        });
        offset = offset.saturating_add(u64::from(DISCARD_SEGMENT_SIZE));
    }
    Ok(segments)
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]
mod tests {
    use crate::GuestMemoryMmap;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::Bytes;

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};

    const W: bool = true;
    const R: bool = false;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMemoryMmap {
        single_region_mem(0x40_0000)
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn parse(mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> Result<Request, BadRequest> {
        parse_max(mem, descs, 64)
    }

    fn parse_max(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        max: usize,
    ) -> Result<Request, BadRequest> {
        let q = TestQueue::new(mem, GuestAddress(0), 256);
        q.add_chain(descs);
        let mut queue = q.queue();
        let mut ring = RingPass::new(&mut queue, GuestView::new(mem)).unwrap();
        let head = ring.pop().unwrap().unwrap();
        Request::parse(&ring, head, max)
    }

    #[test]
    fn parses_read() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 5);
        let r = parse(&m, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.request_type, RequestType::In);
        assert_eq!(r.sector, 5);
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(STATUS));
    }

    #[test]
    fn parses_write_with_any_framing() {
        let m = mem();
        // Header, data and status all in one readable + one writable descriptor, data split
        // across two descriptors and the header split too.
        header(&m, VIRTIO_BLK_T_OUT, 9);
        let r = parse(&m, &[(HDR, 16 + 512, R), (STATUS, 1, W)]).unwrap();
        assert_eq!(
            (r.request_type, r.sector, r.data_len),
            (RequestType::Out, 9, 512)
        );
        let r = parse(
            &m,
            &[
                (HDR, 4, R),
                (HDR + 4, 12, R),
                (DATA, 1000, R),
                (DATA + 1000, 24, R),
                (STATUS, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.request_type, r.sector, r.data_len),
            (RequestType::Out, 9, 1024)
        );
        // The status is the last byte of a larger writable buffer.
        header(&m, VIRTIO_BLK_T_IN, 1);
        let r = parse(&m, &[(HDR, 16, R), (DATA, 513, W)]).unwrap();
        assert_eq!(r.data_len, 512);
        assert_eq!(r.status, GuestAddress(DATA + 512));
    }

    #[test]
    fn parses_flush_get_id_discard() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.request_type, RequestType::Flush);

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(&m, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]).unwrap();
        assert_eq!((r.request_type, r.data_len), (RequestType::GetId, 20));

        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        m.write_obj(100u64, GuestAddress(DATA)).unwrap();
        m.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
        m.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
        m.write_obj(200u64, GuestAddress(DATA + 16)).unwrap();
        m.write_obj(1u32, GuestAddress(DATA + 24)).unwrap();
        m.write_obj(1u32, GuestAddress(DATA + 28)).unwrap();
        let r = parse(&m, &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]).unwrap();
        assert_eq!(r.request_type, RequestType::Discard);
        assert_eq!(
            r.segments,
            vec![
                DiscardSegment {
                    sector: 100,
                    num_sectors: 8,
                    flags: 0
                },
                DiscardSegment {
                    sector: 200,
                    num_sectors: 1,
                    flags: 1
                },
            ]
        );
    }

    fn err(r: Result<Request, BadRequest>) -> BadRequest {
        r.expect_err("request should be rejected")
    }

    #[test]
    fn missing_status() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, R)]));
        assert!(matches!(e.error, RequestError::MissingStatus));
        assert_eq!(e.status, None);
        // A zero-length writable descriptor is not a status byte either.
        let e = err(parse(&m, &[(HDR, 16, R), (STATUS, 0, W)]));
        assert!(matches!(e.error, RequestError::MissingStatus));
        // Status outside guest memory.
        let e = err(parse(&m, &[(HDR, 16, R), (0x1_0000_0000, 1, W)]));
        assert!(matches!(e.error, RequestError::MissingStatus));
    }

    #[test]
    fn header_too_short() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 15, R), (STATUS, 1, W)]));
        assert!(matches!(e.error, RequestError::HeaderTooShort(15)));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        assert_eq!(e.status_code(), VIRTIO_BLK_S_IOERR);
        let e = err(parse(&m, &[(STATUS, 1, W)]));
        assert!(matches!(e.error, RequestError::HeaderTooShort(0)));
    }

    #[test]
    fn wrong_direction() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]));
        assert!(matches!(
            e.error,
            RequestError::WrongDirection(RequestType::In)
        ));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]));
        assert!(matches!(
            e.error,
            RequestError::WrongDirection(RequestType::Out)
        ));
        // Readable after writable breaks §2.7.4.2; there is no trustworthy status byte.
        let e = err(parse(&m, &[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R)]));
        assert!(matches!(
            e.error,
            RequestError::Chain(ChainError::ReadableAfterWritable)
        ));
        assert_eq!(e.status, None);
    }

    #[test]
    fn unaligned_data() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (DATA, 511, R), (STATUS, 1, W)]));
        assert!(matches!(e.error, RequestError::UnalignedLength(511)));
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]));
        assert!(matches!(e.error, RequestError::UnalignedLength(100)));
    }

    #[test]
    fn unsupported_type() {
        let m = mem();
        header(&m, 10, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]));
        assert!(matches!(e.error, RequestError::Unsupported(10)));
        assert_eq!(e.status_code(), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn bad_discard_payloads() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        for len in [0u32, 15, 17, 16 * 33] {
            let e = err(parse(&m, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]));
            assert!(matches!(e.error, RequestError::BadSegments(_)), "len {len}");
        }
    }

    #[test]
    fn too_many_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((0..10).map(|i| (DATA + i * 512, 512, R)));
        descs.push((STATUS, 1, W));
        parse_max(&m, &descs, 12).unwrap();
        let e = err(parse_max(&m, &descs, 11));
        assert!(matches!(
            e.error,
            RequestError::Chain(ChainError::TooManyDescriptors(11))
        ));
    }

    #[test]
    fn out_of_range_buffers() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = err(parse(
            &m,
            &[(HDR, 16, R), (0x3f_ff00, 512, R), (STATUS, 1, W)],
        ));
        assert!(matches!(
            e.error,
            RequestError::Chain(ChainError::OutOfRange { .. })
        ));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        let e = err(parse(&m, &[(u64::MAX - 4, 16, R), (STATUS, 1, W)]));
        assert!(matches!(
            e.error,
            RequestError::Chain(ChainError::OutOfRange { .. })
        ));
    }

    #[test]
    fn descriptor_loop_is_cut_by_ttl() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        // Descriptor 0 -> 1 -> 0 -> ...
        q.write_desc(0, HDR, 16, VRING_DESC_F_NEXT as u16, 1);
        q.write_desc(1, DATA, 512, VRING_DESC_F_NEXT as u16, 0);
        q.push_avail(0);
        let mut queue = q.queue();
        let mut ring = RingPass::new(&mut queue, GuestView::new(&m)).unwrap();
        let chain = ring.pop().unwrap().unwrap();
        // The chain ends after 16 descriptors (the queue size) and has no status.
        let e = err(Request::parse(&ring, chain, 1024));
        assert!(matches!(e.error, RequestError::MissingStatus));
        let chain_limited = {
            q.push_avail(0);
            ring.pop().unwrap().unwrap()
        };
        let e = err(Request::parse(&ring, chain_limited, 8));
        assert!(matches!(
            e.error,
            RequestError::Chain(ChainError::TooManyDescriptors(8))
        ));
    }

    proptest! {
        /// Arbitrary descriptor layouts never panic, and any accepted request is consistent
        /// with the descriptors it came from.
        #[test]
        fn parse_never_panics(
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in any::<u64>(),
            descs in prop::collection::vec(
                (prop_oneof![Just(HDR), Just(DATA), Just(STATUS), any::<u64>()],
                 prop_oneof![Just(1u32), Just(16), Just(512), 0u32..4096, any::<u32>()],
                 any::<bool>()),
                1..12,
            ),
        ) {
            let m = mem();
            header(&m, t, sector);
            match parse(&m, &descs) {
                Ok(r) => {
                    prop_assert!(r.buffers().readable_len() >= 16);
                    prop_assert!(r.buffers().writable_len() >= 1);
                    if matches!(r.request_type, RequestType::In | RequestType::Out) {
                        prop_assert_eq!(r.data_len % 512, 0);
                    }
                    if descs[0].0 == HDR && descs[0].1 >= 16 && !descs[0].2 {
                        prop_assert_eq!(r.sector, sector);
                    }
                }
                Err(e) => {
                    let _ = e.status_code();
                }
            }
        }
    }
}
