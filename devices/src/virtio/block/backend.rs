// SPDX-License-Identifier: Apache-2.0
//! Disk backends for virtio-blk: the [`DiskBackend`] trait and [`FileDisk`], a raw image file or
//! host block device accessed with positioned reads and writes.
//!
//! Discard and write-zeroes use `fallocate(2)` (`PUNCH_HOLE`, `ZERO_RANGE`), which Linux
//! implements for regular files on common filesystems and for block devices (as discard and
//! zero-out), through vmm-sys-util's safe wrapper.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmm_sys_util::fallocate::{FallocateMode, fallocate};
use vmm_sys_util::write_zeroes::WriteZeroesAt;

use super::BlockError;
use super::positioned;
use crate::GuestSlice;

/// Optional operations a backend implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCapabilities {
    /// [`DiskBackend::discard`] works.
    pub discard: bool,
    /// [`DiskBackend::write_zeroes`] works.
    pub write_zeroes: bool,
}

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes; the device checks them
/// against [`DiskBackend::len`] before calling.
pub trait DiskBackend: Send + Debug {
    /// Size in bytes. The device exposes `len / 512` sectors.
    fn len(&self) -> u64;

    /// Whether the disk has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Which optional operations work.
    fn capabilities(&self) -> DiskCapabilities {
        DiskCapabilities::default()
    }

    /// Deallocates `[offset, offset + len)`; its contents become unspecified.
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Zeroes `[offset, offset + len)`, deallocating it if `unmap` and possible.
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Fills the guest memory `dst` from `offset`, without a bounce buffer. `Ok(false)` means
    /// the backend cannot, and the caller copies through [`DiskBackend::read_at`].
    fn read_into_guest(&mut self, _offset: u64, _dst: GuestSlice<'_>) -> io::Result<bool> {
        Ok(false)
    }

    /// Writes all of the guest memory `src` at `offset`, without a bounce buffer. `Ok(false)`
    /// means the backend cannot, and the caller copies through [`DiskBackend::write_at`].
    fn write_from_guest(&mut self, _offset: u64, _src: GuestSlice<'_>) -> io::Result<bool> {
        Ok(false)
    }

    /// A second descriptor of the backend's file, for a live handover to another process
    /// (`None`: a backend that has no file and so cannot be handed over).
    fn try_clone_file(&self) -> Option<io::Result<File>> {
        None
    }
}

/// A slot's disk on its way to another process in a live handover: a second descriptor of its
/// file and what the guest knows of the disk. The process that rebuilds the VM puts it back
/// into the same slot ([`VirtioBlock::restore_disk`](super::VirtioBlock::restore_disk)), which
/// checks the file still has `sectors`.
#[derive(Debug)]
pub struct BlockFile {
    /// The disk image or block device.
    pub file: File,
    /// Whether the guest's writes to it fail (the disk's or the slot's read-only flag).
    pub read_only: bool,
    /// Its capacity in 512-byte sectors, as the guest read it.
    pub sectors: u64,
}

/// A raw disk image file or a host block device.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    len: u64,
    read_only: bool,
}

impl FileDisk {
    /// Opens `path` (read-only if `read_only`) and takes its current size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::OpenBackingFile(path.display().to_string(), e))?;
        Self::from_file(file, read_only)
    }

    /// Wraps an open file or block device. Seeking to the end gives the size of both (a block
    /// device's metadata length is 0).
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, BlockError> {
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(BlockError::BackingSize)?;
        Ok(FileDisk {
            file,
            len,
            read_only,
        })
    }
}

impl DiskBackend for FileDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    // Zero-copy: the kernel copies between the page cache and guest memory directly, with one
    // positioned syscall per buffer.
    fn read_into_guest(&mut self, offset: u64, dst: GuestSlice<'_>) -> io::Result<bool> {
        positioned::read_exact_at(&self.file, offset, dst)?;
        Ok(true)
    }

    fn write_from_guest(&mut self, offset: u64, src: GuestSlice<'_>) -> io::Result<bool> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        positioned::write_all_at(&self.file, offset, src)?;
        Ok(true)
    }

    fn try_clone_file(&self) -> Option<io::Result<File>> {
        Some(self.file.try_clone())
    }

    fn capabilities(&self) -> DiskCapabilities {
        DiskCapabilities {
            discard: !self.read_only,
            write_zeroes: !self.read_only,
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        discard_outcome(fallocate(
            &self.file,
            FallocateMode::PunchHole,
            true,
            offset,
            len,
        ))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        // A punched hole reads back as zeroes, so it satisfies write-zeroes when unmapping is
        // allowed; otherwise, or if the filesystem cannot punch, zero the range in place
        // (ZERO_RANGE, falling back to writing zeroes).
        if unmap && fallocate(&self.file, FallocateMode::PunchHole, true, offset, len).is_ok() {
            return Ok(());
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.file.write_all_zeroes_at(offset, len)
    }
}

/// What a hole punch's result means for a discard. Discard is a hint (virtio 1.2 §5.2.6.2: the
/// contents of a discarded range become unspecified), so a file whose filesystem cannot punch
/// holes keeps its data and the discard still succeeds; every other failure is the guest's I/O
/// error.
fn discard_outcome(punched: Result<(), vmm_sys_util::errno::Error>) -> io::Result<()> {
    match punched {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == libc::EOPNOTSUPP => Ok(()),
        Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn temp_disk(contents: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(contents).unwrap();
        f
    }

    #[test]
    fn file_disk_read_write_flush() {
        let t = temp_disk(&[7u8; 4096]);
        let mut d = FileDisk::open(t.as_path(), false).unwrap();
        assert_eq!(d.len(), 4096);
        assert!(!d.is_empty());
        let mut buf = [0u8; 512];
        d.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 512]);
        d.write_at(1024, &[1u8; 512]).unwrap();
        d.flush().unwrap();
        d.read_at(1024, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 512]);
        // Reading past the end fails instead of returning short data.
        d.read_at(4000, &mut buf).unwrap_err();
    }

    #[test]
    fn file_disk_read_only() {
        let t = temp_disk(&[7u8; 1024]);
        let mut d = FileDisk::open(t.as_path(), true).unwrap();
        assert_eq!(d.capabilities(), DiskCapabilities::default());
        d.write_at(0, &[0u8; 512]).unwrap_err();
        d.discard(0, 512).unwrap_err();
        d.write_zeroes(0, 512, true).unwrap_err();
    }

    #[test]
    fn file_disk_discard_and_write_zeroes() {
        let t = temp_disk(&[0xabu8; 16384]);
        let mut d = FileDisk::open(t.as_path(), false).unwrap();
        let caps = d.capabilities();
        assert!(caps.discard && caps.write_zeroes);
        let mut buf = [0xffu8; 4096];
        d.write_zeroes(4096, 4096, false).unwrap();
        d.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        d.write_zeroes(8192, 4096, true).unwrap();
        d.read_at(8192, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        // Discard succeeds (a filesystem that cannot punch holes keeps the data: a hint), keeps
        // the size, and leaves the range either punched (zeroes) or as it was, never garbage.
        d.discard(0, 4096).unwrap();
        assert_eq!(d.len(), 16384);
        assert_eq!(t.as_file().metadata().unwrap().len(), 16384);
        d.read_at(0, &mut buf).unwrap();
        assert!(
            buf == [0u8; 4096] || buf == [0xabu8; 4096],
            "discarded range holds neither zeroes nor the old data"
        );
        d.read_at(12288, &mut buf).unwrap();
        assert_eq!(buf, [0xabu8; 4096]);
        // Past the end of a regular file, punching is a no-op that succeeds.
        d.discard(16384, 4096).unwrap();
        assert_eq!(d.len(), 16384);
    }

    #[test]
    fn discard_errors_reach_the_guest_except_no_hole_punching() {
        use vmm_sys_util::errno::Error as Errno;
        discard_outcome(Ok(())).unwrap();
        // A filesystem without hole punching: the hint is dropped, the data stays.
        discard_outcome(Err(Errno::new(libc::EOPNOTSUPP))).unwrap();
        for errno in [libc::EIO, libc::EBADF, libc::ENOSPC, libc::EINVAL] {
            let err = discard_outcome(Err(Errno::new(errno))).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(errno));
        }
    }

    #[test]
    fn file_disk_discard_reports_a_refused_range() {
        // The guest sees a failed discard (device.rs maps it to an I/O error status): a range
        // beyond the largest file offset is refused, not dropped as a hint.
        let t = temp_disk(&[1u8; 4096]);
        let mut d = FileDisk::open(t.as_path(), false).unwrap();
        let err = d.discard(u64::MAX - 511, 512).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn file_disk_hands_over_a_descriptor_of_the_same_file() {
        let t = temp_disk(&[3u8; 1024]);
        let mut d = FileDisk::open(t.as_path(), false).unwrap();
        let dup = d.try_clone_file().unwrap().unwrap();
        // What one descriptor writes, the other reads: the same open file.
        d.write_at(512, &[9u8; 512]).unwrap();
        let mut buf = [0u8; 512];
        dup.read_exact_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [9u8; 512]);
        let mut again = FileDisk::from_file(dup, false).unwrap();
        assert_eq!(again.len(), 1024);
        again.write_at(0, &[4u8; 512]).unwrap();
        d.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [4u8; 512]);
    }

    #[test]
    fn open_missing_file_fails() {
        let err = FileDisk::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(matches!(err, BlockError::OpenBackingFile(..)));
    }
}
