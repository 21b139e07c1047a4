// SPDX-License-Identifier: Apache-2.0
//! User input for a VM (`VmConfig`) and its validation.
//!
//! Validation happens before any KVM resource exists: the files are opened and their formats and
//! sizes checked against the requested memory, so a bad config leaves nothing behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

pub use crate::arch::MAX_VCPUS;
use crate::arch::layout::{CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START};
use crate::device_manager::DeviceConfig;
use crate::seccomp::SeccompPolicy;

/// Longest `virtio_mmio.device=4K@0x........:NN` entry the VMM appends per device.
const DEVICE_CMDLINE_ENTRY_MAX: usize = 48;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 8;
/// The default kernel command line pieces every guest gets.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 nomodule";

/// Where the guest console goes.
#[derive(Debug, Default)]
pub struct ConsoleConfig {
    /// Append console output to this file.
    pub log_path: Option<PathBuf>,
    /// Bytes the log file may hold; past them it starts again with the newest output
    /// (`devices::legacy::ConsoleSink::with_log_limit`). `None`: no limit.
    pub log_max_bytes: Option<u64>,
    /// Also copy console output to this process's stdout (the command-line front end).
    pub stdout: bool,
}

/// A VM to build and run.
#[derive(Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`], and no more than KVM allows).
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Kernel image: an ELF `vmlinux` (PVH entry or 64-bit entry) or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initramfs, handed to the kernel as the PVH module or the Linux ramdisk.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; device entries (`virtio_mmio.device=`) are appended by the VMM.
    pub cmdline: String,
    /// Console output.
    pub console: ConsoleConfig,
    /// Virtio devices, in slot order (blk slots are numbered among blk devices from 0).
    pub devices: Vec<DeviceConfig>,
    /// How the VM's vCPU and VMM threads are confined (`crate::seccomp`).
    pub seccomp: SeccompPolicy,
    /// The guest memory, made by the caller: a memfd of `mem_mib` MiB
    /// ([`crate::guest_memfd`]), e.g. one whose pages another process allocated so
    /// that they are charged to a memory cgroup of the sandbox's. `None`: the VMM makes it (or
    /// takes a pooled shell's).
    pub memory: Option<std::sync::Arc<File>>,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            kernel: kernel.into(),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            console: ConsoleConfig::default(),
            devices: Vec::new(),
            seccomp: SeccompPolicy::default(),
            memory: None,
        }
    }
}

/// Why a config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `vcpus` is 0.
    #[error("vcpus must be at least 1")]
    NoVcpus,
    /// `vcpus` exceeds what the VMM or KVM supports.
    #[error("vcpus is {requested}, but at most {max} are supported")]
    TooManyVcpus {
        /// Requested count.
        requested: u8,
        /// Supported maximum.
        max: usize,
    },
    /// The guest memory given ([`VmConfig::memory`]) does not fit `mem_mib`.
    #[error("Guest memory: {0}")]
    Memory(String),
    /// `mem_mib` is below [`MIN_MEM_MIB`].
    #[error("mem_mib is {0}, but at least {MIN_MEM_MIB} MiB are needed")]
    MemoryTooSmall(u32),
    /// `mem_mib` exceeds the host's memory.
    #[error("mem_mib is {requested}, more than the host's {host_mib} MiB of RAM")]
    MemoryTooLarge {
        /// Requested MiB.
        requested: u32,
        /// Host RAM in MiB.
        host_mib: u64,
    },
    /// The kernel file cannot be opened.
    #[error("Cannot open kernel {path:?}")]
    OpenKernel {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file cannot be read.
    #[error("Cannot read kernel {path:?}")]
    ReadKernel {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("Kernel {0:?} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    /// The kernel's ELF headers are malformed.
    #[error("Kernel {path:?} has a malformed ELF header: {why}")]
    BadElf {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "Kernel needs guest memory up to {end:#x}, but RAM below the MMIO gap ends at {ram_end:#x}"
    )]
    KernelTooLarge {
        /// End of the kernel's highest segment.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The initramfs cannot be opened.
    #[error("Cannot open initramfs {path:?}")]
    OpenInitramfs {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error(
        "Initramfs of {size} bytes does not fit in guest RAM above the kernel (free: {free} bytes)"
    )]
    InitramfsTooLarge {
        /// Initramfs size.
        size: u64,
        /// Free bytes available.
        free: u64,
    },
    /// The command line is too long or contains a NUL byte.
    #[error("Kernel command line is invalid: {0}")]
    BadCmdline(&'static str),
}

/// The kernel formats the loader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux` (booted through its PVH note when present).
    Elf,
    /// A `bzImage` (booted through the 64-bit Linux boot protocol).
    BzImage,
}

/// A config that passed validation, with its files open.
#[derive(Debug)]
pub struct ValidatedConfig {
    pub(crate) vcpus: u8,
    pub(crate) mem_bytes: u64,
    pub(crate) kernel: File,
    pub(crate) kernel_format: KernelFormat,
    pub(crate) kernel_end: u64,
    pub(crate) initramfs: Option<(File, u64)>,
    pub(crate) cmdline: String,
    pub(crate) console: ConsoleConfig,
    pub(crate) devices: Vec<DeviceConfig>,
    pub(crate) seccomp: SeccompPolicy,
    pub(crate) memory: Option<std::sync::Arc<File>>,
}

impl ValidatedConfig {
    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The kernel's format.
    pub fn kernel_format(&self) -> KernelFormat {
        self.kernel_format
    }
}

/// Host RAM in MiB, from /proc/meminfo.
fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl VmConfig {
    /// Checks everything that can be checked without KVM; `kvm_max_vcpus` is KVM's limit.
    pub fn validate(self, kvm_max_vcpus: usize) -> Result<ValidatedConfig, ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let max = usize::from(MAX_VCPUS).min(kvm_max_vcpus);
        if usize::from(self.vcpus) > max {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max,
            });
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if let Some(host_mib) = host_mem_mib()
            && u64::from(self.mem_mib) > host_mib
        {
            return Err(ConfigError::MemoryTooLarge {
                requested: self.mem_mib,
                host_mib,
            });
        }
        let mem_bytes = u64::from(self.mem_mib) << 20;
        let low_ram_end = mem_bytes.min(MMIO_GAP_START);
        if let Some(memory) = &self.memory {
            let len = memory
                .metadata()
                .map_err(|e| ConfigError::Memory(e.to_string()))?
                .len();
            if len != mem_bytes {
                return Err(ConfigError::Memory(format!(
                    "the memory given is {len} bytes long, not mem_mib's {mem_bytes}"
                )));
            }
        }

        if self.cmdline.contains('\0') {
            return Err(ConfigError::BadCmdline("contains a NUL byte"));
        }
        // Leave room for the device entries the VMM appends and the NUL.
        let device_entries = self.devices.len() * DEVICE_CMDLINE_ENTRY_MAX;
        if self.cmdline.len() + device_entries + 1 > CMDLINE_MAX_SIZE {
            return Err(ConfigError::BadCmdline(
                "too long once the device entries are appended (4 KiB in all)",
            ));
        }

        let mut kernel = File::open(&self.kernel).map_err(|source| ConfigError::OpenKernel {
            path: self.kernel.clone(),
            source,
        })?;
        let (kernel_format, kernel_end) = probe_kernel(&mut kernel, &self.kernel)?;
        if kernel_end > low_ram_end {
            return Err(ConfigError::KernelTooLarge {
                end: kernel_end,
                ram_end: low_ram_end,
            });
        }

        let initramfs = match &self.initramfs {
            None => None,
            Some(path) => {
                let file = File::open(path).map_err(|source| ConfigError::OpenInitramfs {
                    path: path.clone(),
                    source,
                })?;
                let size = file
                    .metadata()
                    .map_err(|source| ConfigError::OpenInitramfs {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                let free = low_ram_end.saturating_sub(page_align_up(kernel_end));
                if size > free {
                    return Err(ConfigError::InitramfsTooLarge { size, free });
                }
                Some((file, size))
            }
        };

        Ok(ValidatedConfig {
            vcpus: self.vcpus,
            mem_bytes,
            kernel,
            kernel_format,
            kernel_end,
            initramfs,
            cmdline: self.cmdline,
            console: self.console,
            devices: self.devices,
            seccomp: self.seccomp,
            memory: self.memory,
        })
    }
}

pub(crate) fn page_align_up(addr: u64) -> u64 {
    addr.saturating_add(0xfff) & !0xfff
}

fn read_at(
    file: &mut File,
    path: &std::path::Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, ConfigError> {
    let err = |source| ConfigError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    file.seek(SeekFrom::Start(offset)).map_err(err)?;
    let mut done = 0;
    while done < buf.len() {
        let n = file.read(&mut buf[done..]).map_err(err)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

/// Identifies the kernel's format and the highest guest address it occupies once loaded.
fn probe_kernel(
    file: &mut File,
    path: &std::path::Path,
) -> Result<(KernelFormat, u64), ConfigError> {
    let len = file
        .metadata()
        .map_err(|source| ConfigError::ReadKernel {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut ehdr = [0u8; 64];
    let got = read_at(file, path, 0, &mut ehdr)?;
    if got >= 4 && ehdr[..4] == *b"\x7fELF" {
        let bad = |why| ConfigError::BadElf {
            path: path.to_path_buf(),
            why,
        };
        if got < 64 || ehdr[4] != 2 {
            return Err(bad("not a 64-bit ELF"));
        }
        let phoff = le_u64(&ehdr, 32);
        let phentsize = u64::from(le_u16(&ehdr, 54));
        let phnum = u64::from(le_u16(&ehdr, 56));
        if phentsize != 56 || phnum == 0 || phnum > 64 {
            return Err(bad("unexpected program header table"));
        }
        let table_len = phentsize * phnum;
        if phoff.checked_add(table_len).is_none_or(|end| end > len) {
            return Err(bad("program headers lie outside the file"));
        }
        let mut table = vec![0u8; usize::try_from(table_len).map_err(|_| bad("huge table"))?];
        read_at(file, path, phoff, &mut table)?;
        let mut end = 0u64;
        for ph in table.chunks_exact(56) {
            // PT_LOAD
            if le_u32(ph, 0) != 1 {
                continue;
            }
            let paddr = le_u64(ph, 24);
            let memsz = le_u64(ph, 40);
            if paddr < HIMEM_START {
                return Err(bad("a segment loads below 1 MiB"));
            }
            let seg_end = paddr
                .checked_add(memsz)
                .ok_or_else(|| bad("segment end overflows"))?;
            end = end.max(seg_end);
        }
        if end == 0 {
            return Err(bad("no loadable segment"));
        }
        return Ok((KernelFormat::Elf, end));
    }
    let mut hdr = [0u8; 0x270];
    let got = read_at(file, path, 0, &mut hdr)?;
    // Linux boot protocol: "HdrS" at 0x202, boot flag 0xaa55 at 0x1fe.
    if got == hdr.len() && le_u32(&hdr, 0x202) == 0x5372_6448 && le_u16(&hdr, 0x1fe) == 0xaa55 {
        let setup_sects = u64::from(match hdr[0x1f1] {
            0 => 4,
            n => n,
        });
        let payload = len.saturating_sub((setup_sects + 1) * 512);
        // The kernel decompresses in place up to init_size (boot protocol >= 2.10).
        let init_size = u64::from(le_u32(&hdr, 0x260));
        let end = HIMEM_START + payload.max(init_size);
        return Ok((KernelFormat::BzImage, end));
    }
    Err(ConfigError::UnknownKernelFormat(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_file(name: &str, data: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(data).unwrap();
        path
    }

    fn elf_with_segment(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        f
    }

    #[test]
    fn rejects_bad_counts_and_sizes_before_touching_files() {
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.vcpus = 0;
        assert!(matches!(cfg.validate(255), Err(ConfigError::NoVcpus)));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.vcpus = 200;
        assert!(matches!(
            cfg.validate(255),
            Err(ConfigError::TooManyVcpus { requested: 200, .. })
        ));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.vcpus = 4;
        assert!(matches!(
            cfg.validate(2),
            Err(ConfigError::TooManyVcpus { max: 2, .. })
        ));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.mem_mib = 1;
        assert!(matches!(
            cfg.validate(255),
            Err(ConfigError::MemoryTooSmall(1))
        ));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.mem_mib = u32::MAX;
        assert!(matches!(
            cfg.validate(255),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.cmdline = "a\0b".into();
        assert!(matches!(cfg.validate(255), Err(ConfigError::BadCmdline(_))));
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.cmdline = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(cfg.validate(255), Err(ConfigError::BadCmdline(_))));
    }

    #[test]
    fn missing_and_unknown_kernels_are_named() {
        let err = VmConfig::new("/nonexistent/vmlinux")
            .validate(255)
            .unwrap_err();
        assert!(matches!(err, ConfigError::OpenKernel { .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
        let path = temp_file("garbage", &[0x42; 4096]);
        let err = VmConfig::new(&path).validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKernelFormat(_)), "{err}");
        let path = temp_file("empty", &[]);
        let err = VmConfig::new(&path).validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKernelFormat(_)), "{err}");
    }

    #[test]
    fn elf_must_fit_in_low_ram() {
        let path = temp_file("fits.elf", &elf_with_segment(HIMEM_START, 0x1000));
        let ok = VmConfig::new(&path).validate(255).unwrap();
        assert_eq!(ok.kernel_format(), KernelFormat::Elf);
        assert_eq!(ok.kernel_end, HIMEM_START + 0x1000);

        let path = temp_file("big.elf", &elf_with_segment(HIMEM_START, 200 << 20));
        let err = VmConfig::new(&path).validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::KernelTooLarge { .. }), "{err}");

        let path = temp_file("low.elf", &elf_with_segment(0x1000, 0x1000));
        let err = VmConfig::new(&path).validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::BadElf { .. }), "{err}");

        let mut truncated = elf_with_segment(HIMEM_START, 0x1000);
        truncated.truncate(80);
        let path = temp_file("truncated.elf", &truncated);
        let err = VmConfig::new(&path).validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::BadElf { .. }), "{err}");
    }

    #[test]
    fn initramfs_must_fit() {
        let kernel = temp_file("k.elf", &elf_with_segment(HIMEM_START, 0x1000));
        let mut cfg = VmConfig::new(&kernel);
        cfg.mem_mib = MIN_MEM_MIB;
        cfg.initramfs = Some(temp_file("big.cpio", &vec![0u8; 9 << 20]));
        let err = cfg.validate(255).unwrap_err();
        assert!(
            matches!(err, ConfigError::InitramfsTooLarge { .. }),
            "{err}"
        );
        let mut cfg = VmConfig::new(&kernel);
        cfg.initramfs = Some("/nonexistent/initrd".into());
        let err = cfg.validate(255).unwrap_err();
        assert!(matches!(err, ConfigError::OpenInitramfs { .. }), "{err}");
    }
}
