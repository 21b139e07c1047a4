// SPDX-License-Identifier: Apache-2.0
//! The few system calls the L1 init needs that std does not offer: mount, reboot, waiting for
//! any child (PID 1 reaps orphans), signalling a process group, and probing `/dev/kvm`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `KVM_GET_API_VERSION` (`_IO(0xAE, 0x00)`).
const KVM_GET_API_VERSION: libc::Ioctl = 0xae00;
/// `KVM_CREATE_VM` (`_IO(0xAE, 0x01)`).
const KVM_CREATE_VM: libc::Ioctl = 0xae01;
/// `KVM_CHECK_EXTENSION` (`_IO(0xAE, 0x03)`).
const KVM_CHECK_EXTENSION: libc::Ioctl = 0xae03;
/// `KVM_CAP_NR_VCPUS`.
const KVM_CAP_NR_VCPUS: libc::c_int = 9;
/// The only KVM API version there is.
pub const KVM_API_VERSION: i32 = 12;

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `mount(2)`.
pub fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = cstring(fstype)?;
    let data = data.map(cstring).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null for
    // `data`, which mount(2) accepts.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data_ptr,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flushes file systems and restarts the machine (`reboot=t` on the L1 command line makes that
/// a triple fault, and QEMU `-no-reboot` then exits). Returns only on failure.
pub fn restart() -> io::Error {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; it only returns on error.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// `waitpid(-1, WNOHANG)`: one ended child, if any. `Ok(None)` also when there is no child.
pub fn reap_any() -> io::Result<Option<(i32, ChildEnd)>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer for the duration of the call.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ECHILD) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if pid == 0 {
        return Ok(None);
    }
    let end = if libc::WIFSIGNALED(status) {
        ChildEnd::Signaled(libc::WTERMSIG(status))
    } else {
        ChildEnd::Exited(libc::WEXITSTATUS(status))
    };
    Ok(Some((pid, end)))
}

/// Sends `signal` to the process group `pgid`.
pub fn kill_group(pgid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `/dev/kvm` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmProbe {
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_NR_VCPUS)`: the recommended vCPU limit.
    pub nr_vcpus: i32,
}

/// Opens `/dev/kvm`, checks the API version and creates (and closes) one VM.
pub fn probe_kvm() -> io::Result<KvmProbe> {
    let kvm = File::options().read(true).write(true).open("/dev/kvm")?;
    let fd = kvm.as_raw_fd();
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer.
    let api_version = unsafe { libc::ioctl(fd, KVM_GET_API_VERSION, 0) };
    if api_version < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value and returns an integer.
    let nr_vcpus = unsafe { libc::ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS) };
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns a new fd or -1.
    let vm = unsafe { libc::ioctl(fd, KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `vm` is a file descriptor this function just received and owns.
    unsafe { libc::close(vm) };
    Ok(KvmProbe {
        api_version,
        nr_vcpus,
    })
}

/// Seconds since boot (`CLOCK_BOOTTIME`), for the log lines.
pub fn uptime_secs() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
