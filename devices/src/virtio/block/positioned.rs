// SPDX-License-Identifier: Apache-2.0
//! Positioned reads and writes between a file and guest memory, with no bounce buffer and no
//! shared file position: `pread`/`pwrite` on a volatile slice of guest memory.
//!
//! vm-memory's own `ReadVolatile for File` reads at the file's current position, which costs a
//! `lseek` per request and makes the position shared state; its generic `read_exact` loop also
//! costs more than the block hot path can afford. This is the only `unsafe` of the block device:
//! two libc calls whose buffers are guest-memory slices vm-memory validated.
#![allow(
    unsafe_code,
    reason = "pread/pwrite into guest memory need raw pointers; see the SAFETY comments"
)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;

use crate::GuestSlice;

/// Fills `buf` from `file` at `offset` with positioned reads (retried on `EINTR` and short
/// reads); reading past the end of the file is an `UnexpectedEof` error.
pub(crate) fn read_exact_at(file: &File, offset: u64, buf: GuestSlice<'_>) -> io::Result<()> {
    let len = buf.len();
    // Marked first: a read that fails half way has written some of it.
    buf.bitmap().mark_dirty(0, len);
    let mut done = 0usize;
    let guard = buf.ptr_guard_mut();
    while done < len {
        let pos = offset
            .checked_add(done as u64)
            .and_then(|p| libc::off_t::try_from(p).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let dst = guard.as_ptr().wrapping_add(done);
        // SAFETY: the fd is open for the life of `file`; `guard` keeps `len` bytes of mapped,
        // writable guest memory alive at `guard.as_ptr()` (VolatileSlice's invariant), `done <
        // len`, so `dst` points inside it and pread writes at most `len - done` bytes there.
        let n = unsafe { libc::pread(file.as_raw_fd(), dst.cast(), len.saturating_sub(done), pos) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done = done.saturating_add(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes all of `buf` to `file` at `offset` with positioned writes (retried on `EINTR` and
/// short writes).
pub(crate) fn write_all_at(file: &File, offset: u64, buf: GuestSlice<'_>) -> io::Result<()> {
    let len = buf.len();
    let mut done = 0usize;
    let guard = buf.ptr_guard();
    while done < len {
        let pos = offset
            .checked_add(done as u64)
            .and_then(|p| libc::off_t::try_from(p).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let src = guard.as_ptr().wrapping_add(done);
        // SAFETY: the fd is open for the life of `file`; `guard` keeps `len` bytes of mapped
        // guest memory alive at `guard.as_ptr()`, `done < len`, so `src` points inside it and
        // pwrite reads at most `len - done` bytes from there.
        let n =
            unsafe { libc::pwrite(file.as_raw_fd(), src.cast(), len.saturating_sub(done), pos) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done = done.saturating_add(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        read_exact_at(&file, 100, mem.get_slice(GuestAddress(0x10), 8).unwrap()).unwrap();
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x10)).unwrap();
        assert_eq!(got, [100, 101, 102, 103, 104, 105, 106, 107]);

        mem.write_slice(&[0xaa; 4], GuestAddress(0x20)).unwrap();
        write_all_at(&file, 3, mem.get_slice(GuestAddress(0x20), 4).unwrap()).unwrap();
        assert_eq!(file.stream_position().unwrap(), 0);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], &[0, 1, 2, 0xaa, 0xaa, 0xaa, 0xaa, 7]);

        // Reading past the end of the file is an error, not a short success.
        file.seek(SeekFrom::Start(0)).unwrap();
        let err =
            read_exact_at(&file, 250, mem.get_slice(GuestAddress(0), 16).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Offsets beyond off_t are rejected before any syscall.
        let err =
            read_exact_at(&file, u64::MAX, mem.get_slice(GuestAddress(0), 1).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A read-only descriptor cannot be written.
        let ro = std::fs::File::open(&path).unwrap();
        write_all_at(&ro, 0, mem.get_slice(GuestAddress(0), 1).unwrap()).unwrap_err();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
