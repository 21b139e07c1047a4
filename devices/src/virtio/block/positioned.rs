// SPDX-License-Identifier: Apache-2.0
//! Positioned reads and writes between a file and guest memory, with no bounce buffer and no
//! shared file position: `pread`/`pwrite` on a volatile slice of guest memory.
//!
//! vm-memory's own `ReadVolatile for File` reads at the file's current position, which costs a
//! `lseek` per request and makes the position shared state. This is the only `unsafe` of the
//! block device: two libc calls whose buffers are guest-memory slices vm-memory validated.
#![allow(
    unsafe_code,
    reason = "pread/pwrite into guest memory need raw pointers; see the SAFETY comments"
)]

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// A file at an offset that advances with each read or write.
#[derive(Debug)]
pub(crate) struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    pub(crate) fn new(file: &'a File, offset: u64) -> Self {
        FileAt { file, offset }
    }

    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from(std::io::ErrorKind::InvalidInput))
        })
    }

    fn advance(&mut self, n: isize) -> Result<usize, VolatileMemoryError> {
        let n = usize::try_from(n)
            .map_err(|_| VolatileMemoryError::IOError(std::io::Error::last_os_error()))?;
        self.offset = self.offset.saturating_add(n as u64);
        Ok(n)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd is open for the life of `self.file`; `guard` keeps `buf.len()` bytes of
        // mapped, writable guest memory alive at `as_ptr()` (VolatileSlice's invariant), and
        // pread writes at most that many bytes there.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        // Whatever happened, the bytes may have changed.
        buf.bitmap().mark_dirty(0, buf.len());
        self.advance(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd is open for the life of `self.file`; `guard` keeps `buf.len()` bytes of
        // mapped guest memory alive at `as_ptr()`, and pwrite reads at most that many bytes.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(n)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn reads_and_writes_at_offsets_without_moving_the_file_position() {
        use std::io::{Seek, SeekFrom};
        let dir = std::env::temp_dir().join(format!("blk-positioned-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, (0..=255u8).collect::<Vec<_>>()).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        mem.read_exact_volatile_from(GuestAddress(0x10), &mut FileAt::new(&file, 100), 8)
            .unwrap();
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x10)).unwrap();
        assert_eq!(got, [100, 101, 102, 103, 104, 105, 106, 107]);

        mem.write_slice(&[0xaa; 4], GuestAddress(0x20)).unwrap();
        mem.write_all_volatile_to(GuestAddress(0x20), &mut FileAt::new(&file, 3), 4)
            .unwrap();
        assert_eq!(file.stream_position().unwrap(), 0);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], &[0, 1, 2, 0xaa, 0xaa, 0xaa, 0xaa, 7]);

        // Reading past the end of the file is an error, not a short success.
        file.seek(SeekFrom::Start(0)).unwrap();
        assert!(
            mem.read_exact_volatile_from(GuestAddress(0), &mut FileAt::new(&file, 250), 16)
                .is_err()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
