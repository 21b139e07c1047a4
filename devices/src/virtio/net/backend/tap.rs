// SPDX-License-Identifier: Apache-2.0
//! A Linux TAP device opened through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! so frames carry a 12-byte `virtio_net_hdr_v1` (`TUNSETVNETHDRSZ`) and the guest's checksum
//! and segmentation offloads pass straight through (`TUNSETOFFLOAD`).
#![allow(
    unsafe_code,
    reason = "the TUN ioctls have no safe wrapper; each call is a single documented ioctl"
)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_char, c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use super::NetBackend;
use crate::virtio::net::defs::NET_HDR_LEN;

const TUNTAP: c_uint = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);
ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, c_int);

/// Maximum interface name length, without the terminating NUL.
const IFNAMSIZ: usize = 16;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL.
    #[error("Invalid interface name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("Failed to open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed (no such device, no permission, or it is busy).
    #[error("Failed to create or attach TAP interface {0}")]
    SetIff(String, #[source] io::Error),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("Failed to set the vnet header size")]
    SetVnetHdrSize(#[source] io::Error),
}

/// A TAP interface with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    if_name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP interface `if_name` in the calling thread's network
    /// namespace. The fd is non-blocking and close-on-exec.
    pub fn open(if_name: &str) -> Result<Tap, TapError> {
        let name = if_name.as_bytes();
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(&0) {
            return Err(TapError::InvalidName(if_name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;

        let mut ifr_name: [c_char; IFNAMSIZ] = [0; IFNAMSIZ];
        for (dst, src) in ifr_name.iter_mut().zip(name) {
            *dst = c_char::from_ne_bytes([*src]);
        }
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let mut ifreq = libc::ifreq {
            ifr_name,
            ifr_ifru: libc::__c_anonymous_ifr_ifru {
                ifru_flags: c_short::try_from(flags)
                    .map_err(|_| TapError::InvalidName(if_name.to_string()))?,
            },
        };
        // SAFETY: `file` is an open /dev/net/tun fd; TUNSETIFF reads and writes one `ifreq`,
        // which `ifreq` is, fully initialized and exclusively borrowed for the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifreq) };
        if ret < 0 {
            return Err(TapError::SetIff(
                if_name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        let hdr_len = c_int::try_from(NET_HDR_LEN).unwrap_or(12);
        // SAFETY: `file` is a TAP fd after TUNSETIFF; TUNSETVNETHDRSZ reads one `c_int`, which
        // `hdr_len` is and outlives the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize(io::Error::last_os_error()));
        }
        let name_bytes: Vec<u8> = ifreq
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| c.to_ne_bytes()[0])
            .collect();
        Ok(Tap {
            file,
            if_name: String::from_utf8_lossy(&name_bytes).into_owned(),
        })
    }

    /// A TAP queue another process opened and passed on (a live handover): `file` is its
    /// descriptor, `if_name` the interface's name. The queue keeps the settings it had.
    pub fn from_file(file: File, if_name: &str) -> Tap {
        Tap {
            file,
            if_name: if_name.to_string(),
        }
    }

    /// The interface name the kernel gave (the requested one unless it held a `%d` pattern).
    pub fn if_name(&self) -> &str {
        &self.if_name
    }

    /// The vnet header size the kernel uses for this queue.
    pub fn vnet_hdr_size(&self) -> io::Result<usize> {
        let mut size: c_int = 0;
        // SAFETY: `self.file` is a TAP fd; TUNGETVNETHDRSZ writes one `c_int` into `size`,
        // which is exclusively borrowed for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNGETVNETHDRSZ(), &mut size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn try_clone_file(&self) -> Option<io::Result<File>> {
        Some(self.file.try_clone())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A TAP write takes a whole frame or nothing.
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        Ok(())
    }

    fn has_vnet_hdr(&self) -> bool {
        true
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: `self.file` is a TAP fd; TUNSETOFFLOAD takes its argument by value and
        // touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(Tap::open(name), Err(TapError::InvalidName(_))));
        }
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun: runs for real where it can, and says so loudly
    /// where it cannot. Under CI (`CI=true`, or `SANDBOXER_REQUIRE_TAP=1`) that is a failure.
    #[test]
    fn tap_with_vnet_header_and_offloads() {
        let tap = match Tap::open("sbxtest%d") {
            Ok(tap) => tap,
            Err(e) => {
                let required = std::env::var("CI").is_ok_and(|v| v == "true")
                    || std::env::var("SANDBOXER_REQUIRE_TAP").is_ok_and(|v| v == "1");
                assert!(
                    !required,
                    "cannot create a tap: {e} (required: CI=true or SANDBOXER_REQUIRE_TAP=1)"
                );
                eprintln!("SKIP tap_with_vnet_header_and_offloads: cannot create a tap: {e}");
                return;
            }
        };
        let mut tap = tap;
        assert!(tap.if_name().starts_with("sbxtest"), "{}", tap.if_name());
        assert_eq!(tap.vnet_hdr_size().unwrap(), NET_HDR_LEN);
        assert!(tap.has_vnet_hdr());
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // The interface is down: nothing to read, and the fd does not block.
        let mut buf = [0u8; 64];
        let err = tap.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // TSO without checksum offload is refused by the kernel.
        tap.set_offload(libc::TUN_F_TSO4).unwrap_err();
    }
}
