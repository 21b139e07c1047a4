// SPDX-License-Identifier: Apache-2.0
//! Seed corpora: well-formed inputs for every target, built with [`Writer`] so that the fuzzer
//! starts from activated devices and successful requests instead of having to find them.

use std::fs;
use std::io;
use std::path::Path;

use crate::input::Writer;
use crate::layout::DATA_START;
use crate::{blk, mmio, net, queue};

/// Seeds of the `mmio_transport` target.
pub fn mmio_transport() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (kind, queues) in [(0u8, 1usize), (1, 1), (2, 2)] {
        let mut w = Writer::new();
        mmio::write_setup(&mut w, kind);
        mmio::write_init(&mut w, queues);
        mmio::write_process(&mut w);
        mmio::write_process(&mut w);
        seeds.push(w.bytes);
    }
    // The init sequence register by register (status writes only; the rest stays default).
    let mut w = Writer::new();
    mmio::write_setup(&mut w, 1);
    for v in [1u32, 3, 0xb, 0xf, 0] {
        mmio::write_reg(&mut w, mmio::REG_STATUS, v);
    }
    seeds.push(w.bytes);
    seeds
}

/// Seeds of the `virtio_blk` target.
pub fn virtio_blk() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let data = DATA_START;
    let mut w = Writer::new();
    blk::write_setup(&mut w, 2, u64::MAX, 6);
    blk::write_request(&mut w, 1, 3, &[(data, 2)], &[]); // write 2 sectors at 3
    blk::write_request(&mut w, 0, 3, &[(data + 0x1000, 1), (data + 0x2000, 1)], &[]); // read
    blk::write_request(&mut w, 2, 0, &[], &[]); // flush
    blk::write_request(&mut w, 3, 0, &[(data, 1)], &[]); // get id
    blk::write_request(&mut w, 4, 0, &[], &[(8, 4, 0)]); // discard
    blk::write_request(&mut w, 5, 0, &[], &[(16, 2, 1), (20, 1, 0)]); // write zeroes
    blk::write_process(&mut w);
    seeds.push(w.bytes);

    // Empty slot, then a backing is attached.
    let mut w = Writer::new();
    blk::write_setup(&mut w, 0, u64::MAX, 3);
    blk::write_request(&mut w, 0, 0, &[(data, 1)], &[]);
    blk::write_process(&mut w);
    w.u8(7).u8(0).u8(32).u8(0).bool(false); // attach 32 sectors
    blk::write_request(&mut w, 0, 31, &[(data, 1)], &[]);
    blk::write_process(&mut w);
    seeds.push(w.bytes);

    // Read-only slot.
    let mut w = Writer::new();
    blk::write_setup(&mut w, 4, u64::MAX, 2);
    blk::write_request(&mut w, 1, 0, &[(data, 1)], &[]);
    blk::write_request(&mut w, 0, 63, &[(data, 1)], &[]);
    blk::write_process(&mut w);
    seeds.push(w.bytes);
    seeds
}

/// Seeds of the `virtio_net_tx` target.
pub fn virtio_net_tx() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (vnet, mergeable) in [(false, true), (true, false), (false, false)] {
        let mask = if mergeable { u64::MAX } else { !(1u64 << 15) };
        let mut w = Writer::new();
        net::write_setup(&mut w, vnet, mask, 7);
        // Merging lets small buffers carry part of a frame; without it every buffer must fit
        // a whole frame.
        let small = if mergeable { 64 } else { 1600 };
        net::write_rx(&mut w, DATA_START + 0x1_0000, 1600);
        net::write_rx(&mut w, DATA_START + 0x2_0000, small);
        net::write_rx(&mut w, DATA_START + 0x2_0800, small);
        net::write_rx(&mut w, DATA_START + 0x3_0000, 1600);
        net::write_rx(&mut w, DATA_START + 0x4_0000, 1600);
        net::write_tx(&mut w, DATA_START, 74);
        net::write_inject(&mut w, 100, 0x5a);
        net::write_process(&mut w);
        net::write_tx(&mut w, DATA_START + 0x800, 1514);
        net::write_process(&mut w);
        seeds.push(w.bytes);
    }
    seeds
}

/// Seeds of the `queue` target.
pub fn queue() -> Vec<Vec<u8>> {
    let d = DATA_START;
    let mut seeds = Vec::new();
    let mut w = Writer::new();
    queue::write_chains(
        &mut w,
        &[
            &[(d, 16, false), (d + 0x100, 512, true), (d + 0x400, 1, true)],
            &[(d + 0x800, 100, false)],
            &[(d + 0x1000, 1024, true)],
            &[(d + 0x2000, 64, true), (d + 0x3000, 64, true)],
        ],
        200,
        &[1, 0, 2, 3],
    );
    seeds.push(w.bytes);
    let mut w = Writer::new();
    queue::write_chains(
        &mut w,
        &[
            &[(d + 0x1000, 64, true)],
            &[(d + 0x2000, 64, true)],
            &[(d + 0x3000, 64, true)],
        ],
        150,
        &[3, 3],
    );
    seeds.push(w.bytes);
    seeds
}

/// Writes every target's seeds under `dir/<target>/seed-<n>`.
pub fn write_all(dir: &Path) -> io::Result<()> {
    let all: [(&str, Vec<Vec<u8>>); 4] = [
        ("mmio_transport", mmio_transport()),
        ("virtio_blk", virtio_blk()),
        ("virtio_net_tx", virtio_net_tx()),
        ("queue", queue()),
    ];
    for (target, seeds) in all {
        let target_dir = dir.join(target);
        fs::create_dir_all(&target_dir)?;
        for (i, seed) in seeds.iter().enumerate() {
            fs::write(target_dir.join(format!("seed-{i}")), seed)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_seeds_activate_devices() {
        for (i, seed) in mmio_transport().iter().enumerate() {
            let report = mmio::run(seed).expect("seed rejected");
            if i < 3 {
                assert!(report.activated, "seed {i} did not activate: {report:?}");
                assert_eq!(report.status, 0xf, "seed {i}");
            } else {
                assert_eq!(report.status, 0, "seed {i}");
            }
        }
    }

    #[test]
    fn blk_seeds_complete_requests() {
        let seeds = virtio_blk();
        let r = blk::run(&seeds[0]).expect("seed rejected");
        assert_eq!(
            r,
            blk::Report {
                ok: 6,
                errors: 0,
                unsupported: 0,
                needs_reset: false
            }
        );
        let r = blk::run(&seeds[1]).expect("seed rejected");
        assert_eq!((r.ok, r.errors), (1, 1), "{r:?}");
        let r = blk::run(&seeds[2]).expect("seed rejected");
        assert_eq!((r.ok, r.errors), (1, 1), "{r:?}");
    }

    #[test]
    fn net_seeds_move_frames() {
        for (i, seed) in virtio_net_tx().iter().enumerate() {
            let r = net::run(seed).expect("seed rejected");
            assert_eq!(r.tx_frames, 2, "seed {i}: {r:?}");
            assert_eq!(r.rx_frames, 3, "seed {i}: {r:?}");
            assert!(!r.needs_reset);
        }
    }

    #[test]
    fn queue_seeds_walk_chains() {
        let seeds = queue();
        let r = queue::run(&seeds[0]).expect("seed rejected");
        assert_eq!(r.chains, 1, "{r:?}");
        assert_eq!(r.requests, 1, "{r:?}");
        let r = queue::run(&seeds[1]).expect("seed rejected");
        assert_eq!(r.delivered, 1, "{r:?}");
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap smoke test of every decoder on patterned inputs (the fuzzer does the rest).
        for seed in 0u32..200 {
            let data: Vec<u8> = (0..600u32)
                .map(|i| {
                    (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 13).to_le_bytes()[0]
                })
                .collect();
            let _ = mmio::run(&data);
            let _ = blk::run(&data);
            let _ = net::run(&data);
            let _ = queue::run(&data);
        }
    }
}
