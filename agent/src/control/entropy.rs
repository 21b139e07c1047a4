// SPDX-License-Identifier: Apache-2.0
//! Fresh entropy from the host, for a VM that may be a clone.
//!
//! A VM cloned from a template starts with the template's kernel RNG state: until its CRNG
//! reseeds (a minute or more later), two clones would read the same bytes from `/dev/urandom`.
//! Setup carries random bytes from the host; [`add_and_reseed`] credits them to the input pool
//! (`RNDADDENTROPY`) and forces a CRNG reseed from it (`RNDRESEEDCRNG`), before the pod runs
//! anything. Both ioctls need `CAP_SYS_ADMIN` (the agent is PID 1 as root).
#![allow(
    unsafe_code,
    reason = "RNDADDENTROPY and RNDRESEEDCRNG have no safe wrapper; two documented ioctls"
)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`. `libc::Ioctl` is the request type of the libc
/// the agent links (`c_ulong` with glibc, `c_int` with musl, the guest's); both values fit both.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
/// Most bytes accepted at once (the kernel takes any size; more is pointless).
pub const MAX_ENTROPY: usize = 512;

/// `struct rand_pool_info` with its buffer: entropy in bits, buffer size in bytes, the bytes.
fn pool_info(bytes: &[u8]) -> Vec<u8> {
    let len = bytes.len().min(MAX_ENTROPY);
    let bytes = bytes.get(..len).unwrap_or_default();
    let bits = i32::try_from(len.saturating_mul(8)).unwrap_or(i32::MAX);
    let size = i32::try_from(len).unwrap_or(i32::MAX);
    let mut info = Vec::with_capacity(8 + len.next_multiple_of(4));
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(bytes);
    // The kernel's `buf` is an array of u32: pad to whole words.
    info.resize(8 + len.next_multiple_of(4), 0);
    info
}

/// Credits `bytes` to the kernel's input pool through `device` (`/dev/random`) and reseeds the
/// CRNG from it.
pub fn add_and_reseed(device: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(device)?;
    let info = pool_info(bytes);
    // SAFETY: `info` is a `struct rand_pool_info` laid out as the kernel reads it (two ints,
    // then `buf_size` bytes, padded to u32), alive for the call; the kernel reads no more than
    // `8 + buf_size` bytes of it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_info_is_what_the_kernel_reads() {
        let info = pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 8 + 8);
        assert_eq!(i32::from_ne_bytes(info[..4].try_into().unwrap()), 40);
        assert_eq!(i32::from_ne_bytes(info[4..8].try_into().unwrap()), 5);
        assert_eq!(&info[8..13], &[1, 2, 3, 4, 5]);
        let big = pool_info(&[7; 4096]);
        assert_eq!(big.len(), 8 + MAX_ENTROPY);
    }

    #[test]
    fn a_device_that_is_no_rng_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = add_and_reseed(f.path(), &[1; 32]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }
}
