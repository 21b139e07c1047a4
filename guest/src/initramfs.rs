// SPDX-License-Identifier: Apache-2.0
//! The agent initramfs: a static binary as `/init` plus the few directories and device nodes
//! (`/dev/console`, `/dev/null`) it needs before it has mounted anything. Optionally
//! gzip-compressed (the guest kernel enables `RD_GZIP`); uncompressed is the default because it
//! boots fastest.

use std::io::Write;

use flate2::Compression as GzLevel;
use flate2::GzBuilder;

use crate::cpio::{CpioError, CpioWriter, DeviceKind, Metadata};

/// Directories created at the root (mode 0755, except `/tmp`: 1777).
pub const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("mnt", 0o755),
];

/// Path of the init binary inside the archive.
pub const INIT_PATH: &str = "init";

/// Errors of the initramfs builder.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Writing the cpio archive failed.
    #[error("Failed to write the cpio archive")]
    Cpio(#[from] CpioError),
    /// The gzip stream could not be finished.
    #[error("Failed to compress the initramfs")]
    Compress(#[source] std::io::Error),
}

/// Compression of the archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Plain newc cpio (the default: no decompression at boot).
    #[default]
    None,
    /// gzip (needs `CONFIG_RD_GZIP` in the guest kernel).
    Gzip,
}

/// Writes the cpio archive (uncompressed) for `init` into `out`.
pub fn write_cpio<W: Write>(init: &[u8], out: W) -> Result<W, CpioError> {
    let mut w = CpioWriter::new(out);
    for (dir, mode) in DIRS {
        w.add_dir(dir, Metadata::new(*mode))?;
    }
    // The kernel opens /dev/console for init's stdio before init runs. The kernel's built-in
    // initramfs usually provides it, but do not depend on that.
    w.add_device("dev/console", DeviceKind::Char, 5, 1, Metadata::new(0o600))?;
    // If the console cannot be opened, init starts with fds 0-2 closed and the Rust runtime
    // reopens them on /dev/null (aborting if it is missing).
    w.add_device("dev/null", DeviceKind::Char, 1, 3, Metadata::new(0o666))?;
    w.add_file(INIT_PATH, Metadata::new(0o755), init)?;
    w.finish()
}

/// Builds the initramfs for `init` in memory.
pub fn build(init: &[u8], compression: Compression) -> Result<Vec<u8>, InitramfsError> {
    match compression {
        Compression::None => Ok(write_cpio(init, Vec::new())?),
        Compression::Gzip => {
            // mtime 0 and no file name in the gzip header keep the output reproducible.
            let gz = GzBuilder::new().mtime(0).write(Vec::new(), GzLevel::best());
            let gz = write_cpio(init, gz)?;
            gz.finish().map_err(InitramfsError::Compress)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::cpio::{S_IFCHR, S_IFDIR, S_IFREG, parse};

    #[test]
    fn layout() {
        let image = build(b"\x7fELF-fake", Compression::None).unwrap();
        let entries = parse(&image).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "run",
                "tmp",
                "mnt",
                "dev/console",
                "dev/null",
                "init"
            ]
        );
        for e in &entries[..6] {
            assert_eq!(e.file_type(), S_IFDIR, "{}", e.name);
        }
        assert_eq!(entries[4].perm(), 0o1777);
        assert_eq!(entries[6].file_type(), S_IFCHR);
        assert_eq!((entries[6].rdev_major, entries[6].rdev_minor), (5, 1));
        assert_eq!(entries[7].mode, S_IFCHR | 0o666);
        assert_eq!((entries[7].rdev_major, entries[7].rdev_minor), (1, 3));
        let init = &entries[8];
        assert_eq!(init.file_type(), S_IFREG);
        assert_eq!(init.perm(), 0o755);
        assert_eq!(init.data, b"\x7fELF-fake");
        assert!(
            entries
                .iter()
                .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0)
        );
    }

    #[test]
    fn gzip_round_trip_and_reproducible() {
        let plain = build(b"payload", Compression::None).unwrap();
        let gz = build(b"payload", Compression::Gzip).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        // gzip header mtime (bytes 4..8) is zero.
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(unpacked, plain);
        assert_eq!(gz, build(b"payload", Compression::Gzip).unwrap());
    }
}
