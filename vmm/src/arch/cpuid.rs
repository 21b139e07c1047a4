// SPDX-License-Identifier: Apache-2.0
//! Per-vCPU CPUID: the host's `KVM_GET_SUPPORTED_CPUID` list, patched with this vCPU's APIC id
//! and the VM's topology.
//!
//! The topology presented is one package with `num_cpus` cores and one thread per core; the
//! APIC id (and x2APIC id) of vCPU `n` is `n`, as KVM assigns it. Everything is a pure function
//! over a [`CpuId`], so it is tested without KVM.
//!
//! Sources for the leaf layouts: Intel SDM vol. 2A "CPUID" (leaves 1, 4, 6, 0xB, 0x1F) and the
//! AMD64 APM vol. 3 appendix E (leaves 0x8000_0001, 0x8000_0008, 0x8000_001D, 0x8000_001E).
//! The KVM paravirtual leaves (0x4000_0000..) are passed through untouched.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use super::ArchError;

/// Leaf 0: vendor string and highest basic leaf.
pub const LEAF_VENDOR: u32 = 0;
/// Leaf 1: version and feature information.
pub const LEAF_FEATURES: u32 = 1;
/// Leaf 4: deterministic cache parameters (Intel).
pub const LEAF_CACHE_PARAMS: u32 = 4;
/// Leaf 6: thermal and power management.
pub const LEAF_THERMAL_POWER: u32 = 6;
/// Leaf 0xB: extended topology enumeration.
pub const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: V2 extended topology enumeration (Intel).
pub const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0001: extended features.
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Leaf 0x8000_0008: address sizes and (AMD) core count.
pub const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000_001D: cache topology (AMD).
pub const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
/// Leaf 0x8000_001E: extended APIC id, core and node ids (AMD).
pub const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT, "EBX bits 23:16 is valid, more than one logical processor per package".
pub const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), leaf 1 EBX bits 15:8.
pub const CLFLUSH_LINE_QWORDS: u32 = 8;
/// Leaf 6 EAX: APIC timer always running (ARAT), the one power bit a guest may rely on.
pub const EAX_ARAT: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX: CmpLegacy, "leaf 1 EBX bits 23:16 counts cores" (AMD).
pub const ECX_CMP_LEGACY: u32 = 1 << 1;
/// Level type in leaf 0xB/0x1F ECX bits 15:8: SMT.
pub const LEVEL_TYPE_SMT: u32 = 1;
/// Level type in leaf 0xB/0x1F ECX bits 15:8: core.
pub const LEVEL_TYPE_CORE: u32 = 2;

/// The CPU vendor as the host's CPUID leaf 0 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`, or Hygon (`HygonGenuine`, AMD's topology leaves).
    Amd,
    /// Anything else: only the vendor-neutral leaves are patched.
    Other,
}

/// The vendor named in leaf 0 (EBX, EDX, ECX spell it).
pub fn vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = find(cpuid.as_slice(), LEAF_VENDOR, 0) else {
        return CpuVendor::Other;
    };
    let mut name = [0u8; 12];
    for (chunk, reg) in name
        .chunks_exact_mut(4)
        .zip([leaf0.ebx, leaf0.edx, leaf0.ecx])
    {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    match &name {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// The number of low APIC-id bits that number the cores: ceil(log2(num_cpus)).
pub fn core_id_bits(num_cpus: u8) -> u32 {
    u32::from(num_cpus).next_power_of_two().trailing_zeros()
}

/// Patches `cpuid` (a copy of the supported list) for vCPU `vcpu_id` of `num_cpus`.
///
/// The caller validates `1 <= num_cpus` and `vcpu_id < num_cpus`; other values still give a
/// well-formed (if odd) list.
pub fn patch_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_cpus: u8) -> Result<(), ArchError> {
    let vendor = vendor(cpuid);
    let num_cpus = num_cpus.max(1);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => patch_leaf1(entry, vcpu_id, num_cpus),
            LEAF_CACHE_PARAMS if vendor == CpuVendor::Intel => {
                patch_cache_sharing(entry, num_cpus);
                // Cores per package - 1 in EAX[31:26].
                let cores = u32::from(num_cpus - 1) & 0x3f;
                if entry.eax & 0x1f != 0 {
                    entry.eax = (entry.eax & 0x03ff_ffff) | cores << 26;
                }
            }
            LEAF_THERMAL_POWER => {
                // No power management, frequency or thermal interfaces exist in the guest.
                entry.eax &= EAX_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_FEATURES if vendor == CpuVendor::Amd => {
                if num_cpus > 1 {
                    entry.ecx |= ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES if vendor == CpuVendor::Amd => {
                // ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdCoreIdSize.
                entry.ecx =
                    (entry.ecx & !0xf0ff) | core_id_bits(num_cpus) << 12 | u32::from(num_cpus - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY if vendor == CpuVendor::Amd => {
                patch_cache_sharing(entry, num_cpus);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == CpuVendor::Amd => {
                entry.eax = u32::from(vcpu_id); // extended APIC id
                entry.ebx = u32::from(vcpu_id); // core id; EBX[15:8] threads per core - 1 = 0
                entry.ecx = 0; // node 0, one node per package
                entry.edx = 0;
            }
            _ => {}
        }
    }
    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2] {
        // Only rebuild what KVM offers: a leaf the host lacks stays absent.
        if cpuid.as_slice().iter().any(|e| e.function == leaf) {
            cpuid.retain(|e| e.function != leaf);
            for entry in topology_entries(leaf, vcpu_id, num_cpus) {
                cpuid.push(entry).map_err(ArchError::CpuidEntries)?;
            }
        }
    }
    Ok(())
}

/// Leaf 1: initial APIC id, logical processor count, CLFLUSH size, hypervisor and HTT bits.
fn patch_leaf1(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, num_cpus: u8) {
    entry.ebx = (entry.ebx & 0xff)
        | CLFLUSH_LINE_QWORDS << 8
        | u32::from(num_cpus) << 16
        | u32::from(vcpu_id) << 24;
    entry.ecx |= ECX_HYPERVISOR;
    if num_cpus > 1 {
        entry.edx |= EDX_HTT;
    } else {
        entry.edx &= !EDX_HTT;
    }
}

/// Leaf 4 / 0x8000_001D EAX bits 25:14: logical processors sharing this cache - 1. With one
/// thread per core, L1 and L2 are private and L3 is shared by the whole package.
fn patch_cache_sharing(entry: &mut kvm_cpuid_entry2, num_cpus: u8) {
    let cache_type = entry.eax & 0x1f;
    if cache_type == 0 {
        // "No more caches": the other fields are not defined.
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 {
        u32::from(num_cpus - 1)
    } else {
        0
    };
    entry.eax = (entry.eax & !(0xfff << 14)) | sharing << 14;
}

/// Leaf 0xB / 0x1F: SMT level (one thread), core level (`num_cpus` cores), then the
/// terminating invalid level. EDX is the x2APIC id on every subleaf.
pub fn topology_entries(leaf: u32, vcpu_id: u8, num_cpus: u8) -> [kvm_cpuid_entry2; 3] {
    let x2apic_id = u32::from(vcpu_id);
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: index | level_type << 8,
        edx: x2apic_id,
        ..Default::default()
    };
    [
        // EAX[4:0]: shift right of the x2APIC id to get the next level's id.
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        entry(
            1,
            core_id_bits(num_cpus),
            u32::from(num_cpus),
            LEVEL_TYPE_CORE,
        ),
        entry(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let reg = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        e(0, 0, max, reg(0), reg(8), reg(4))
    }

    const KVM_SIG: (u32, u32, u32) = (0x4b4d_564b, 0x564b_4d56, 0x4d);

    /// Shaped like this host's KVM_GET_SUPPORTED_CPUID (an AMD Zen 3 under kvm_pvm).
    fn amd_supported() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD", 0xd),
            e(1, 0, 0xa0_0f11, 0x2_0800, 0x8120_2000, 0x078b_fbff),
            e(4, 0, 0, 0, 0, 0),
            e(6, 0, 0x4, 0x1, 0x9, 0x2),
            kvm_cpuid_entry2 {
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..e(0xb, 0, 0, 0, 0, 0)
            },
            e(0x4000_0000, 0, 0x4000_0001, KVM_SIG.0, KVM_SIG.1, KVM_SIG.2),
            e(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
            e(
                0x8000_0001,
                0,
                0xa0_0f11,
                0x4000_0000,
                0x40_0393,
                0x23d3_fbff,
            ),
            e(0x8000_0008, 0, 0x3030, 0x1000_0005, 0x7001, 0),
            e(0x8000_001d, 0, 0x121, 0x1c0_003f, 0x3f, 0),
            e(0x8000_001d, 1, 0x122, 0x1c0_003f, 0x3f, 0),
            e(0x8000_001d, 2, 0x143, 0x1c0_003f, 0x3ff, 2),
            e(0x8000_001d, 3, 0x4163, 0x3c0_003f, 0x7fff, 1),
            e(0x8000_001d, 4, 0, 0, 0, 0),
            e(0x8000_001e, 0, 0, 0, 0, 0),
        ])
        .unwrap()
    }

    /// Shaped like an Intel host's list (values from a Skylake-SP).
    fn intel_supported() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"GenuineIntel", 0x1f),
            e(1, 0, 0x5_0654, 0x0010_0800, 0xfffa_3223, 0x0f8b_fbff),
            e(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            e(4, 1, 0x1c00_4122, 0x01c0_003f, 0x3f, 0),
            e(4, 2, 0x1c00_4143, 0x03c0_003f, 0x3ff, 0),
            e(4, 3, 0x1c03_c163, 0x0280_003f, 0x6fff, 4),
            e(4, 4, 0, 0, 0, 0),
            e(6, 0, 0x77, 0x2, 0x9, 0),
            e(0xb, 0, 1, 2, 0x100, 0x21),
            e(0xb, 1, 5, 0x20, 0x201, 0x21),
            e(0x1f, 0, 1, 2, 0x100, 0x21),
            e(0x4000_0000, 0, 0x4000_0001, KVM_SIG.0, KVM_SIG.1, KVM_SIG.2),
            e(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
            e(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
            e(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(c.as_slice(), function, index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    #[test]
    fn vendor_is_read_from_leaf0() {
        assert_eq!(vendor(&amd_supported()), CpuVendor::Amd);
        assert_eq!(vendor(&intel_supported()), CpuVendor::Intel);
        let hygon = CpuId::from_entries(&[vendor_leaf(b"HygonGenuine", 0xd)]).unwrap();
        assert_eq!(vendor(&hygon), CpuVendor::Amd);
        let odd = CpuId::from_entries(&[vendor_leaf(b"CentaurHauls", 0xd)]).unwrap();
        assert_eq!(vendor(&odd), CpuVendor::Other);
        assert_eq!(vendor(&CpuId::new(0).unwrap()), CpuVendor::Other);
    }

    #[test]
    fn leaf1_carries_apic_id_count_clflush_and_flags() {
        for supported in [amd_supported(), intel_supported()] {
            let mut c = supported.clone();
            patch_cpuid(&mut c, 3, 4).unwrap();
            let l1 = get(&c, 1, 0);
            let orig = get(&supported, 1, 0);
            assert_eq!(l1.ebx >> 24, 3, "initial APIC id");
            assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
            assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH 64 bytes");
            assert_eq!(l1.ebx & 0xff, orig.ebx & 0xff, "brand index kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            assert_eq!(l1.eax, orig.eax);
            assert_eq!(l1.ecx | ECX_HYPERVISOR, orig.ecx | ECX_HYPERVISOR);

            let mut one = supported.clone();
            patch_cpuid(&mut one, 0, 1).unwrap();
            let l1 = get(&one, 1, 0);
            assert_eq!(l1.ebx >> 16, 1);
            assert_eq!(l1.edx & EDX_HTT, 0, "no HTT for one CPU");
        }
    }

    #[test]
    fn extended_topology_has_smt_and_core_levels() {
        for (n, id, shift) in [
            (1u8, 0u8, 0u32),
            (2, 1, 1),
            (3, 2, 2),
            (8, 5, 3),
            (32, 31, 5),
        ] {
            let mut c = amd_supported();
            patch_cpuid(&mut c, id, n).unwrap();
            let leaves: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0xb).collect();
            assert_eq!(leaves.len(), 3);
            let smt = get(&c, 0xb, 0);
            assert_eq!(
                (smt.eax & 0x1f, smt.ebx, smt.ecx, smt.edx),
                (0, 1, 0x100, u32::from(id))
            );
            let core = get(&c, 0xb, 1);
            assert_eq!(
                (core.eax & 0x1f, core.ebx, core.ecx, core.edx),
                (shift, u32::from(n), 0x201, u32::from(id))
            );
            let end = get(&c, 0xb, 2);
            assert_eq!(
                (end.eax, end.ebx, end.ecx & 0xff00, end.ecx & 0xff),
                (0, 0, 0, 2)
            );
            for l in leaves {
                assert_eq!(
                    l.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                );
            }
            // Every APIC id fits in the core-level shift.
            assert!(u32::from(n - 1) >> shift == 0);
            // No 0x1F invented where the host has none.
            assert!(c.as_slice().iter().all(|e| e.function != 0x1f));
        }
    }

    #[test]
    fn intel_leaf_0x1f_is_rebuilt_like_0xb() {
        let mut c = intel_supported();
        patch_cpuid(&mut c, 1, 2).unwrap();
        for leaf in [0xb, 0x1f] {
            assert_eq!(
                c.as_slice().iter().filter(|e| e.function == leaf).count(),
                3
            );
            let core = get(&c, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        }
    }

    #[test]
    fn intel_leaf4_reports_cores_and_sharing() {
        let mut c = intel_supported();
        patch_cpuid(&mut c, 0, 6).unwrap();
        for index in 0..4 {
            let l = get(&c, 4, index);
            let orig = get(&intel_supported(), 4, index);
            assert_eq!(l.eax >> 26, 5, "cores per package - 1 (subleaf {index})");
            let level = (l.eax >> 5) & 7;
            let sharing = (l.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level == 3 { 5 } else { 0 }, "subleaf {index}");
            assert_eq!(l.eax & 0x3fff, orig.eax & 0x3fff, "type/level kept");
            assert_eq!((l.ebx, l.ecx, l.edx), (orig.ebx, orig.ecx, orig.edx));
        }
        assert_eq!(get(&c, 4, 4).eax, 0, "terminator untouched");
        // Intel gets no AMD leaves patched.
        assert_eq!(get(&c, 0x8000_0008, 0).ecx, 0);
        assert_eq!(get(&c, 0x8000_0001, 0).ecx, 0x121);
    }

    #[test]
    fn amd_topology_leaves() {
        let mut c = amd_supported();
        patch_cpuid(&mut c, 2, 3).unwrap();
        let sizes = get(&c, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 2, "NC = cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 2, "APIC id core bits");
        assert_eq!(sizes.eax, 0x3030, "address sizes kept");
        let ext = get(&c, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (2, 2, 0, 0));
        assert_ne!(get(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        for index in 0..4 {
            let l = get(&c, 0x8000_001d, index);
            let level = (l.eax >> 5) & 7;
            let sharing = (l.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level == 3 { 2 } else { 0 }, "subleaf {index}");
            assert_eq!(
                l.eax & 0x3fff,
                get(&amd_supported(), 0x8000_001d, index).eax & 0x3fff
            );
        }
        // AMD leaf 4 is reserved: left as KVM gave it.
        assert_eq!(get(&c, 4, 0).eax, 0);

        let mut one = amd_supported();
        patch_cpuid(&mut one, 0, 1).unwrap();
        assert_eq!(get(&one, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(&one, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn leaf6_is_sanitised_and_kvm_leaves_kept() {
        for supported in [amd_supported(), intel_supported()] {
            let mut c = supported.clone();
            patch_cpuid(&mut c, 0, 2).unwrap();
            let l6 = get(&c, 6, 0);
            assert_eq!((l6.eax, l6.ebx, l6.ecx, l6.edx), (EAX_ARAT, 0, 0, 0));
            for function in [0x4000_0000, 0x4000_0001] {
                let (a, b) = (get(&c, function, 0), get(&supported, function, 0));
                assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (b.eax, b.ebx, b.ecx, b.edx));
            }
            assert_eq!(
                c.as_slice().len(),
                supported.as_slice().len() + 3
                    - supported
                        .as_slice()
                        .iter()
                        .filter(|e| e.function == 0xb)
                        .count()
                    + if vendor(&supported) == CpuVendor::Intel {
                        2
                    } else {
                        0
                    },
                "only the topology leaves change count"
            );
        }
    }

    #[test]
    fn core_id_bits_is_ceil_log2() {
        let got: Vec<u32> = [1u8, 2, 3, 4, 5, 8, 9, 32]
            .iter()
            .map(|n| core_id_bits(*n))
            .collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4, 5]);
    }

    #[test]
    fn full_list_reports_error() {
        // A list already at KVM's limit cannot take the extra topology subleaves.
        let mut entries = vec![e(0xb, 0, 0, 0, 0, 0)];
        entries.resize(
            kvm_bindings::KVM_MAX_CPUID_ENTRIES,
            e(0x8000_0002, 0, 0, 0, 0, 0),
        );
        let mut c = CpuId::from_entries(&entries).unwrap();
        assert!(matches!(
            patch_cpuid(&mut c, 0, 1),
            Err(ArchError::CpuidEntries(_))
        ));
    }
}
