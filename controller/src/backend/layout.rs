// SPDX-License-Identifier: Apache-2.0
//! What a sandbox VM of a [`VmSpec`] is built from, booted or as a template: the VMM
//! configuration (kernel, initramfs, command line, size, seccomp) and the device layout every
//! such VM has (one vsock device first, then the empty block slots).

use std::path::Path;

use super::agent::READY_PORT;
use super::{BackendError, VmSpec};

/// The guest's context id on its vsock device (the first one a guest may have).
pub const GUEST_CID: u64 = 3;

/// Serial (virtio-blk `GET_ID`) of block slot `n`; the agent finds the slot's device by it.
pub fn slot_serial(n: u32) -> String {
    format!("sbx-slot-{n}")
}

/// Checks `spec`'s kernel and initramfs exist: a missing file is a configuration error, also
/// where KVM is unusable.
pub(super) fn vm_config_files(spec: &VmSpec) -> Result<(), BackendError> {
    let missing =
        |file: &Path| BackendError::Config(format!("{} is not a file", file.display()).into());
    if spec.kernel.as_os_str().is_empty() {
        return Err(BackendError::Config(
            "no guest kernel: set vm.kernel (this sandboxer embeds none; `tools/devtool dist` \
             builds one that does)"
                .into(),
        ));
    }
    if !spec.kernel.is_file() {
        return Err(missing(&spec.kernel));
    }
    let Some(initramfs) = spec.initramfs.as_ref() else {
        return Err(BackendError::Config(
            "no agent initramfs: set vm.initramfs (this sandboxer embeds none; `tools/devtool \
             dist` builds one that does)"
                .into(),
        ));
    };
    if !initramfs.is_file() {
        return Err(missing(initramfs));
    }
    Ok(())
}

/// The VMM's configuration for `spec`: the vsock device first (small guests only look at the
/// first few devices), then the empty block slots, then the pod's NICs.
pub(super) fn vm_config(spec: &VmSpec) -> Result<vmm::VmConfig, BackendError> {
    vm_config_files(spec)?;
    let mut config = vmm::VmConfig::new(&spec.kernel);
    config.initramfs.clone_from(&spec.initramfs);
    config.cmdline = format!("{} sandboxer.ready_port={READY_PORT}", spec.cmdline);
    config.vcpus = spec.vcpus;
    config.mem_mib = spec.mem_mib;
    config.seccomp = spec.seccomp;
    config.console = vmm::ConsoleConfig {
        log_path: spec.console_log.clone(),
        log_max_bytes: spec.console_log_max_bytes,
        stdout: false,
    };
    config.devices.push(vmm::DeviceConfig::Vsock {
        guest_cid: GUEST_CID,
        uds_path: spec.vsock_uds.clone(),
        uds_listener: None,
    });
    config.devices.extend((0..spec.blk_slots).map(empty_slot));
    // The pod's NICs, after the slots (their taps are open in the pod's netns already).
    config.devices.extend(spec.nics.take());
    Ok(config)
}

/// Empty block slot `n`.
pub(super) fn empty_slot(n: u32) -> vmm::DeviceConfig {
    vmm::DeviceConfig::Block(devices::virtio::block::BlockConfig {
        id: slot_serial(n),
        path: None,
        read_only: false,
    })
}
