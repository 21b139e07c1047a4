// SPDX-License-Identifier: Apache-2.0
//! The "newc" (SVR4, no CRC) cpio format that the Linux kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` + 13 fields of 8 hex digits), the name with
//! its NUL, zero padding to a multiple of 4, the data, and zero padding to a multiple of 4 again.
//! The archive ends with the entry `TRAILER!!!`; [`CpioWriter::finish`] also pads it to 512
//! bytes as GNU cpio does. Output is reproducible: inode numbers are assigned in order and every
//! mtime is 0 unless the caller asks otherwise.
//!
//! [`parse`] reads such an archive back (tests, `mkinitramfs --list`). It treats its input as
//! untrusted: checked arithmetic, no indexing, no panics.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::HashSet;
use std::io::{self, Read, Write};

/// Magic of a newc header.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Size of a newc header.
pub const HEADER_LEN: usize = 110;
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
/// The kernel refuses names longer than this (`PATH_MAX`, including the NUL).
pub const MAX_NAME_LEN: usize = 4096;

/// File type bits of `mode` (`S_IFMT`) and the types this module writes.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;
/// Block device.
pub const S_IFBLK: u32 = 0o060_000;
/// Permission bits including setuid, setgid and sticky.
pub const PERM_MASK: u32 = 0o7777;

/// Errors of the cpio writer and parser.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing the archive failed.
    #[error("Failed to write the archive")]
    Write(#[source] io::Error),
    /// Reading file contents from the caller's reader failed.
    #[error("Failed to read contents of {0}")]
    ReadContents(String, #[source] io::Error),
    /// The reader ended before the announced length.
    #[error("Contents of {path} ended after {got} of {want} bytes")]
    ShortContents {
        /// Entry name.
        path: String,
        /// Bytes announced.
        want: u64,
        /// Bytes read.
        got: u64,
    },
    /// The path is empty, absolute after normalisation, or has `.`/`..`/empty components or NUL.
    #[error("Invalid path {0:?}")]
    InvalidPath(String),
    /// The path is longer than the kernel accepts.
    #[error("Path too long ({0} bytes)")]
    PathTooLong(usize),
    /// The same path was added twice.
    #[error("Duplicate entry {0}")]
    Duplicate(String),
    /// The parent directory was not added before the entry (the kernel would skip it).
    #[error("Parent directory of {0} has not been added")]
    MissingParent(String),
    /// Mode has bits outside the permission bits.
    #[error("Invalid permission bits {0:#o}")]
    InvalidMode(u32),
    /// File contents larger than the 32-bit size field.
    #[error("File {0} is too large for newc ({1} bytes)")]
    TooLarge(String, u64),
    /// Too many entries for 32-bit inode numbers.
    #[error("Too many entries")]
    TooManyEntries,
    /// An earlier write or read failed, so the archive is incomplete.
    #[error("Writer is unusable after an earlier write error")]
    Poisoned,
    /// Parser: the input ended inside an entry.
    #[error("Archive truncated at offset {0}")]
    Truncated(usize),
    /// Parser: bad magic.
    #[error("Bad magic at offset {0}")]
    BadMagic(usize),
    /// Parser: a header field is not 8 hex digits.
    #[error("Bad header field {field} at offset {offset}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Offset of the entry.
        offset: usize,
    },
    /// Parser: the name is empty, not NUL-terminated or not UTF-8.
    #[error("Bad name at offset {0}")]
    BadName(usize),
    /// Parser: no trailer before the end of the input.
    #[error("Archive has no trailer")]
    NoTrailer,
    /// Parser: non-zero bytes after the trailer.
    #[error("Garbage after the trailer at offset {0}")]
    TrailingGarbage(usize),
}

/// Ownership, permissions and time of one entry. The default is root-owned, mode 0, mtime 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits (`PERM_MASK`); the file type is set by the `add_*` call.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds since the epoch); 0 keeps archives reproducible.
    pub mtime: u32,
}

impl Metadata {
    /// Root-owned entry with the given permission bits and mtime 0.
    pub fn new(mode: u32) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }
}

/// Kind of a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
}

/// All fields of one newc header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    devmajor: u32,
    devminor: u32,
    rdevmajor: u32,
    rdevminor: u32,
    namesize: u32,
    check: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let text = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.devmajor,
            self.devminor,
            self.rdevmajor,
            self.rdevminor,
            self.namesize,
            self.check,
        );
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(text.as_bytes());
        out
    }
}

/// Number of zero bytes that bring `len` to a multiple of 4.
fn pad4(len: u64) -> usize {
    // The result is in 0..=3, so the cast cannot truncate.
    (len.wrapping_neg() & 3) as usize
}

/// Strips leading `/`, then checks that the path is a plain relative path.
fn normalize(path: &str) -> Result<String, CpioError> {
    let rel = path.trim_start_matches('/');
    let bad = rel.is_empty()
        || rel.contains('\0')
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::InvalidPath(path.to_owned()));
    }
    // Name plus NUL must fit PATH_MAX.
    if rel.len() >= MAX_NAME_LEN {
        return Err(CpioError::PathTooLong(rel.len()));
    }
    Ok(rel.to_owned())
}

/// Writes a newc archive entry by entry. Parents must be added before their children, as the
/// kernel creates entries in archive order.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    paths: HashSet<String>,
    dirs: HashSet<String>,
    poisoned: bool,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            paths: HashSet::new(),
            dirs: HashSet::new(),
            poisoned: false,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str, meta: Metadata) -> Result<(), CpioError> {
        let name = self.claim(path, meta)?;
        self.write_entry(&name, S_IFDIR | meta.mode, 2, meta, (0, 0), &[])?;
        self.dirs.insert(name);
        Ok(())
    }

    /// Adds a regular file with the given contents.
    pub fn add_file(&mut self, path: &str, meta: Metadata, data: &[u8]) -> Result<(), CpioError> {
        let name = self.claim(path, meta)?;
        self.write_entry(&name, S_IFREG | meta.mode, 1, meta, (0, 0), data)
    }

    /// Adds a regular file of `len` bytes streamed from `reader` (large binaries).
    pub fn add_file_from_reader<R: Read>(
        &mut self,
        path: &str,
        meta: Metadata,
        len: u64,
        reader: R,
    ) -> Result<(), CpioError> {
        let name = self.claim(path, meta)?;
        let size = u32::try_from(len).map_err(|_| CpioError::TooLarge(name.clone(), len))?;
        self.write_header(&name, S_IFREG | meta.mode, 1, meta, (0, 0), size)?;
        let mut limited = reader.take(len);
        let copied = io::copy(&mut limited, &mut self.out).map_err(|e| {
            self.poisoned = true;
            CpioError::ReadContents(name.clone(), e)
        })?;
        self.written = self.written.saturating_add(copied);
        if copied != len {
            self.poisoned = true;
            return Err(CpioError::ShortContents {
                path: name,
                want: len,
                got: copied,
            });
        }
        self.pad()
    }

    /// Adds a symbolic link to `target` (stored as the link's data, without NUL).
    pub fn add_symlink(
        &mut self,
        path: &str,
        target: &str,
        meta: Metadata,
    ) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') || target.len() >= MAX_NAME_LEN {
            return Err(CpioError::InvalidPath(target.to_owned()));
        }
        let name = self.claim(path, meta)?;
        self.write_entry(
            &name,
            S_IFLNK | meta.mode,
            1,
            meta,
            (0, 0),
            target.as_bytes(),
        )
    }

    /// Adds a device node.
    pub fn add_device(
        &mut self,
        path: &str,
        kind: DeviceKind,
        major: u32,
        minor: u32,
        meta: Metadata,
    ) -> Result<(), CpioError> {
        let name = self.claim(path, meta)?;
        let ty = match kind {
            DeviceKind::Char => S_IFCHR,
            DeviceKind::Block => S_IFBLK,
        };
        self.write_entry(&name, ty | meta.mode, 1, meta, (major, minor), &[])
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes, flushes and returns the
    /// output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        if self.poisoned {
            return Err(CpioError::Poisoned);
        }
        let header = Header {
            nlink: 1,
            namesize: name_size(TRAILER)?,
            ..Header::default()
        };
        self.emit(&header.encode())?;
        self.emit(TRAILER.as_bytes())?;
        self.emit(&[0])?;
        self.pad()?;
        // GNU cpio pads the archive to 512-byte blocks; the kernel skips zeros between
        // archives, so concatenating padded archives still works.
        const BLOCK: [u8; 512] = [0; 512];
        let fill = usize::try_from(self.written.wrapping_neg() % 512).unwrap_or(0);
        self.emit(BLOCK.get(..fill).unwrap_or_default())?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }

    /// Validates a new path and its metadata; returns the normalised name.
    fn claim(&mut self, path: &str, meta: Metadata) -> Result<String, CpioError> {
        if self.poisoned {
            return Err(CpioError::Poisoned);
        }
        if meta.mode & !PERM_MASK != 0 {
            return Err(CpioError::InvalidMode(meta.mode));
        }
        let name = normalize(path)?;
        if self.paths.contains(&name) {
            return Err(CpioError::Duplicate(name));
        }
        if let Some((parent, _)) = name.rsplit_once('/')
            && !self.dirs.contains(parent)
        {
            return Err(CpioError::MissingParent(name));
        }
        self.paths.insert(name.clone());
        Ok(name)
    }

    fn write_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        meta: Metadata,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len())
            .map_err(|_| CpioError::TooLarge(name.to_owned(), data.len() as u64))?;
        self.write_header(name, mode, nlink, meta, rdev, size)?;
        self.emit(data)?;
        self.pad()
    }

    fn write_header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        meta: Metadata,
        rdev: (u32, u32),
        filesize: u32,
    ) -> Result<(), CpioError> {
        let ino = self.next_ino;
        self.next_ino = ino.checked_add(1).ok_or(CpioError::TooManyEntries)?;
        let header = Header {
            ino,
            mode,
            uid: meta.uid,
            gid: meta.gid,
            // Regular files with nlink >= 2 are treated as hard links by the kernel.
            nlink,
            mtime: meta.mtime,
            filesize,
            devmajor: 0,
            devminor: 0,
            rdevmajor: rdev.0,
            rdevminor: rdev.1,
            namesize: name_size(name)?,
            check: 0,
        };
        self.emit(&header.encode())?;
        self.emit(name.as_bytes())?;
        self.emit(&[0])?;
        self.pad()
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        const ZEROS: [u8; 3] = [0; 3];
        self.emit(ZEROS.get(..pad4(self.written)).unwrap_or_default())
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        if let Err(e) = self.out.write_all(bytes) {
            self.poisoned = true;
            return Err(CpioError::Write(e));
        }
        self.written = self.written.saturating_add(bytes.len() as u64);
        Ok(())
    }
}

/// `namesize` field: the name's length including its NUL.
fn name_size(name: &str) -> Result<u32, CpioError> {
    name.len()
        .checked_add(1)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(CpioError::PathTooLong(name.len()))
}

/// One entry read back by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name as stored (no leading `/`).
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// Full mode: type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time.
    pub mtime: u32,
    /// Device major number (device nodes).
    pub rdev_major: u32,
    /// Device minor number (device nodes).
    pub rdev_minor: u32,
    /// File contents or symlink target.
    pub data: Vec<u8>,
}

impl Entry {
    /// File type bits (`mode & S_IFMT`).
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }

    /// Permission bits.
    pub fn perm(&self) -> u32 {
        self.mode & PERM_MASK
    }
}

/// Reads 8 hex digits.
fn hex_field(
    bytes: &[u8],
    index: usize,
    offset: usize,
    field: &'static str,
) -> Result<u32, CpioError> {
    let bad = || CpioError::BadField { field, offset };
    let start = index
        .checked_mul(8)
        .and_then(|v| v.checked_add(6))
        .ok_or_else(bad)?;
    let end = start.checked_add(8).ok_or_else(bad)?;
    let digits = bytes.get(start..end).ok_or_else(bad)?;
    let text = std::str::from_utf8(digits).map_err(|_| bad())?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    u32::from_str_radix(text, 16).map_err(|_| bad())
}

fn align4(offset: usize) -> Option<usize> {
    offset.checked_add(3).map(|v| v & !3)
}

/// Parses a whole newc archive (one archive, as written by [`CpioWriter`]); the trailer is not
/// returned. Zero padding after the trailer is allowed, anything else is an error.
pub fn parse(input: &[u8]) -> Result<Vec<Entry>, CpioError> {
    const FIELDS: [&str; 13] = [
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "filesize",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    ];
    let mut entries = Vec::new();
    let mut offset = 0usize;
    loop {
        let header_end = offset
            .checked_add(HEADER_LEN)
            .ok_or(CpioError::Truncated(offset))?;
        let header = input
            .get(offset..header_end)
            .ok_or(CpioError::Truncated(offset))?;
        if header.get(..6) != Some(NEWC_MAGIC.as_slice()) {
            return Err(CpioError::BadMagic(offset));
        }
        let mut f = [0u32; 13];
        for (slot, (index, field)) in f.iter_mut().zip(FIELDS.iter().enumerate()) {
            *slot = hex_field(header, index, offset, field)?;
        }
        let [
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            filesize,
            _,
            _,
            rdev_major,
            rdev_minor,
            namesize,
            _,
        ] = f;
        let namesize = usize::try_from(namesize).map_err(|_| CpioError::BadName(offset))?;
        if namesize == 0 || namesize > MAX_NAME_LEN {
            return Err(CpioError::BadName(offset));
        }
        let name_end = header_end
            .checked_add(namesize)
            .ok_or(CpioError::Truncated(offset))?;
        let raw_name = input
            .get(header_end..name_end)
            .ok_or(CpioError::Truncated(offset))?;
        let (last, name_bytes) = raw_name.split_last().ok_or(CpioError::BadName(offset))?;
        if *last != 0 || name_bytes.contains(&0) {
            return Err(CpioError::BadName(offset));
        }
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| CpioError::BadName(offset))?
            .to_owned();
        let data_start = align4(name_end).ok_or(CpioError::Truncated(offset))?;
        let size = usize::try_from(filesize).map_err(|_| CpioError::Truncated(offset))?;
        let data_end = data_start
            .checked_add(size)
            .ok_or(CpioError::Truncated(offset))?;
        let data = input
            .get(data_start..data_end)
            .ok_or(CpioError::Truncated(offset))?;
        let next = align4(data_end).ok_or(CpioError::Truncated(offset))?;
        // Padding must exist (except possibly at the very end of the input for the trailer).
        if name == TRAILER {
            let rest = input.get(data_end..).unwrap_or_default();
            if let Some(pos) = rest.iter().position(|&b| b != 0) {
                return Err(CpioError::TrailingGarbage(data_end.saturating_add(pos)));
            }
            return Ok(entries);
        }
        if next > input.len() {
            return Err(CpioError::Truncated(offset));
        }
        entries.push(Entry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data: data.to_vec(),
        });
        offset = next;
        if offset >= input.len() {
            return Err(CpioError::NoTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        reason = "tests index known-good archives"
    )]

    use std::path::Path;
    use std::process::{Command, Stdio};

    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("dev", Metadata::new(0o755)).unwrap();
        w.add_dir("/etc", Metadata::new(0o755)).unwrap();
        w.add_file(
            "etc/hello",
            Metadata {
                mode: 0o640,
                uid: 1000,
                gid: 100,
                mtime: 0,
            },
            b"hello, world\n",
        )
        .unwrap();
        w.add_file("empty", Metadata::new(0o600), b"").unwrap();
        w.add_symlink("etc/link", "hello", Metadata::new(0o777))
            .unwrap();
        w.add_file("init", Metadata::new(0o755), &[0xAA; 4097])
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn header_layout_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        // Name "a": 110 + 2 = 112, already aligned; data 5 bytes -> 3 bytes of padding.
        w.add_file("a", Metadata::new(0o644), b"12345").unwrap();
        assert_eq!(w.bytes_written(), 112 + 8);
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        assert_eq!(&out[..6], b"070701");
        let header = std::str::from_utf8(&out[..110]).unwrap();
        // ino 1, mode 0100644, uid 0, gid 0, nlink 1, mtime 0, size 5, ..., namesize 2, check 0.
        let fields = [
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000005", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        ];
        assert_eq!(header, fields.concat());
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..117], b"12345");
        assert_eq!(&out[117..120], &[0, 0, 0]);
        // The trailer follows at an aligned offset.
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(&out[230..241], b"TRAILER!!!\0");
        assert!(out[241..].iter().all(|&b| b == 0));
    }

    #[test]
    fn name_padding_rule() {
        // Header + name must be padded to 4: name "ab" + NUL = 3 -> 113 -> pad to 116.
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("ab", Metadata::new(0o644), b"x").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[110..113], b"ab\0");
        assert_eq!(&out[113..116], &[0, 0, 0]);
        assert_eq!(out[116], b'x');
        assert_eq!(&out[117..120], &[0, 0, 0]);
        assert_eq!(&out[120..126], b"070701");
    }

    #[test]
    fn round_trip_through_parser() {
        let out = sample();
        let entries = parse(&out).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "etc", "etc/hello", "empty", "etc/link", "init"]
        );
        let hello = &entries[2];
        assert_eq!(hello.file_type(), S_IFREG);
        assert_eq!(hello.perm(), 0o640);
        assert_eq!(
            (hello.uid, hello.gid, hello.mtime, hello.nlink),
            (1000, 100, 0, 1)
        );
        assert_eq!(hello.data, b"hello, world\n");
        assert_eq!(entries[0].file_type(), S_IFDIR);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[4].file_type(), S_IFLNK);
        assert_eq!(entries[4].data, b"hello");
        assert_eq!(entries[5].data.len(), 4097);
        // Inode numbers are unique and in order.
        let inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn output_is_reproducible() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn device_nodes() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("dev", Metadata::new(0o755)).unwrap();
        w.add_device("dev/console", DeviceKind::Char, 5, 1, Metadata::new(0o600))
            .unwrap();
        w.add_device("dev/vda", DeviceKind::Block, 254, 0, Metadata::new(0o660))
            .unwrap();
        let entries = parse(&w.finish().unwrap()).unwrap();
        assert_eq!(entries[1].mode, S_IFCHR | 0o600);
        assert_eq!((entries[1].rdev_major, entries[1].rdev_minor), (5, 1));
        assert_eq!(entries[2].mode, S_IFBLK | 0o660);
        assert_eq!((entries[2].rdev_major, entries[2].rdev_minor), (254, 0));
        assert!(entries[1].data.is_empty());
    }

    #[test]
    fn streamed_file_equals_in_memory_file() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut a = CpioWriter::new(Vec::new());
        a.add_file("f", Metadata::new(0o755), &data).unwrap();
        let mut b = CpioWriter::new(Vec::new());
        b.add_file_from_reader("f", Metadata::new(0o755), data.len() as u64, &data[..])
            .unwrap();
        assert_eq!(a.finish().unwrap(), b.finish().unwrap());
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let err = w
            .add_file_from_reader("f", Metadata::new(0o644), 10, &b"abc"[..])
            .unwrap_err();
        assert!(matches!(
            err,
            CpioError::ShortContents {
                want: 10,
                got: 3,
                ..
            }
        ));
        assert!(matches!(w.finish(), Err(CpioError::Poisoned)));
    }

    #[test]
    fn rejects_bad_paths_and_order() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a//b", "./a", "a/../b", "a/.", "nul\0"] {
            assert!(
                matches!(
                    w.add_file(bad, Metadata::new(0o644), b""),
                    Err(CpioError::InvalidPath(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            w.add_file(&"x".repeat(MAX_NAME_LEN), Metadata::new(0o644), b""),
            Err(CpioError::PathTooLong(_))
        ));
        assert!(matches!(
            w.add_file("missing/file", Metadata::new(0o644), b""),
            Err(CpioError::MissingParent(_))
        ));
        w.add_file("f", Metadata::new(0o644), b"").unwrap();
        assert!(matches!(
            w.add_file("/f", Metadata::new(0o644), b""),
            Err(CpioError::Duplicate(_))
        ));
        // A file is not a directory.
        assert!(matches!(
            w.add_file("f/g", Metadata::new(0o644), b""),
            Err(CpioError::MissingParent(_))
        ));
        assert!(matches!(
            w.add_file("g", Metadata::new(0o100_644), b""),
            Err(CpioError::InvalidMode(_))
        ));
        assert!(matches!(
            w.add_symlink("l", "", Metadata::new(0o777)),
            Err(CpioError::InvalidPath(_))
        ));
        // Failed adds do not poison the writer.
        w.finish().unwrap();
    }

    #[test]
    fn parser_rejects_damage() {
        let good = sample();
        // Every strict prefix that cuts into the entries is an error (never a panic).
        let trailer_at = good
            .windows(10)
            .position(|w| w == TRAILER.as_bytes())
            .unwrap();
        for len in 0..trailer_at {
            if let Ok(entries) = parse(&good[..len]) {
                panic!("prefix {len} parsed: {entries:?}");
            }
        }
        let mut bad = good.clone();
        bad[0] = b'1';
        assert!(matches!(parse(&bad), Err(CpioError::BadMagic(0))));
        let mut bad = good.clone();
        bad[7] = b'g';
        assert!(matches!(
            parse(&bad),
            Err(CpioError::BadField { field: "ino", .. })
        ));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] = 1;
        assert!(matches!(parse(&bad), Err(CpioError::TrailingGarbage(_))));
        // A huge namesize or filesize must not overflow or allocate.
        let mut bad = good.clone();
        bad[94..102].copy_from_slice(b"ffffffff");
        assert!(matches!(parse(&bad), Err(CpioError::BadName(0))));
        let mut bad = good;
        bad[54..62].copy_from_slice(b"ffffffff");
        assert!(matches!(parse(&bad), Err(CpioError::Truncated(0))));
    }

    #[test]
    fn parser_survives_arbitrary_bytes() {
        // Deterministic pseudo-random mutations of a valid archive.
        let good = sample();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut buf = good.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let pos = usize::try_from(state % buf.len() as u64).unwrap();
                buf[pos] = state.to_le_bytes()[4];
            }
            let _ = parse(&buf);
        }
    }

    fn have_cpio() -> bool {
        Command::new("cpio")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn run_cpio(args: &[&str], dir: &Path, input: &[u8]) -> (String, String) {
        use std::io::Write as _;
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        (stdout, stderr)
    }

    /// Extracts the sample with GNU cpio and compares the tree (needs the `cpio` package).
    #[test]
    fn round_trip_through_gnu_cpio() {
        if !have_cpio() {
            crate::skip_without_tool(
                "round_trip_through_gnu_cpio",
                "`cpio` not installed (apt-get install cpio)",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, stderr) = run_cpio(
            &["-idv", "--no-absolute-filenames", "--quiet"],
            dir.path(),
            &sample(),
        );
        // -v lists every extracted name on stderr.
        for name in ["dev", "etc", "etc/hello", "empty", "etc/link", "init"] {
            assert!(stderr.lines().any(|l| l == name), "{name} not in {stderr}");
        }
        let root = dir.path();
        assert_eq!(
            std::fs::read(root.join("etc/hello")).unwrap(),
            b"hello, world\n"
        );
        assert_eq!(std::fs::read(root.join("init")).unwrap(), vec![0xAA; 4097]);
        assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
        assert_eq!(
            std::fs::read_link(root.join("etc/link")).unwrap(),
            Path::new("hello")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(root.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(std::fs::metadata(root.join("dev")).unwrap().is_dir());
    }

    /// Lists an archive with device nodes through GNU cpio (listing needs no privileges).
    #[test]
    fn device_nodes_listed_by_gnu_cpio() {
        if !have_cpio() {
            crate::skip_without_tool(
                "device_nodes_listed_by_gnu_cpio",
                "`cpio` not installed (apt-get install cpio)",
            );
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("dev", Metadata::new(0o755)).unwrap();
        w.add_device("dev/console", DeviceKind::Char, 5, 1, Metadata::new(0o600))
            .unwrap();
        w.add_device("dev/vda", DeviceKind::Block, 254, 3, Metadata::new(0o660))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (stdout, _) = run_cpio(&["-itv", "--quiet"], dir.path(), &w.finish().unwrap());
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{stdout}");
        assert!(lines[0].starts_with("drwxr-xr-x"), "{stdout}");
        assert!(lines[1].starts_with("crw-------"), "{stdout}");
        assert!(
            lines[1].contains("5,") && lines[1].ends_with("dev/console"),
            "{stdout}"
        );
        assert!(lines[2].starts_with("brw-rw----"), "{stdout}");
        assert!(
            lines[2].contains("254,") && lines[2].ends_with("dev/vda"),
            "{stdout}"
        );
    }
}
