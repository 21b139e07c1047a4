// SPDX-License-Identifier: Apache-2.0
//! The byte-level input format shared by every target: fixed-width little-endian fields read
//! from an `arbitrary::Unstructured` (missing bytes read as zero, so every input decodes), and
//! the matching writer for seeds.

use arbitrary::Unstructured;

/// Reads fields from fuzzer input.
#[derive(Debug)]
pub struct Reader<'a> {
    u: Unstructured<'a>,
}

impl<'a> Reader<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader {
            u: Unstructured::new(data),
        }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    fn fill<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        // fill_buffer pads with zeroes when the input runs out; it never fails.
        let _ = self.u.fill_buffer(&mut b);
        b
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.fill::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fill())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fill())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fill())
    }

    /// A boolean (low bit of a byte).
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// True for about 3% of bytes: the knob for invalid values.
    pub fn rarely(&mut self) -> bool {
        self.u8() < RARELY_BELOW
    }

    /// Up to `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = usize::from(self.u16()) % (max + 1);
        let mut v = vec![0u8; len];
        let _ = self.u.fill_buffer(&mut v);
        v
    }
}

/// Bytes below this make [`Reader::rarely`] true.
const RARELY_BELOW: u8 = 8;

/// Writes fields in the format [`Reader`] reads.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded input.
    pub bytes: Vec<u8>,
}

impl Writer {
    /// An empty input.
    pub fn new() -> Self {
        Self::default()
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A boolean.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// A [`Reader::rarely`] draw with the given outcome.
    pub fn rarely(&mut self, v: bool) -> &mut Self {
        self.u8(if v { 0 } else { 0xff })
    }

    /// Bytes as [`Reader::bytes`] reads them (`data.len()` must fit the reader's `max`).
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.u16(u16::try_from(data.len()).expect("seed field too long"));
        self.bytes.extend_from_slice(data);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut w = Writer::new();
        w.u8(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX - 1)
            .bool(true)
            .rarely(true)
            .rarely(false)
            .bytes(&[1, 2, 3]);
        let mut r = Reader::new(&w.bytes);
        assert_eq!(r.u8(), 7);
        assert_eq!(r.u16(), 0x1234);
        assert_eq!(r.u32(), 0xdead_beef);
        assert_eq!(r.u64(), u64::MAX - 1);
        assert!(r.bool());
        assert!(r.rarely());
        assert!(!r.rarely());
        assert_eq!(r.bytes(16), vec![1, 2, 3]);
        assert!(r.is_empty());
        // Past the end everything reads as zero.
        assert_eq!(r.u64(), 0);
    }
}
