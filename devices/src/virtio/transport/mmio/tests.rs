// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport against a [`DummyDevice`](crate::test_utils::DummyDevice).
#![allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]

use super::*;
use crate::test_utils::{DummyDevice, RecordingInterrupt, single_region_mem};

const MEM_SIZE: usize = 0x10_0000;

struct Harness {
    t: MmioTransport,
    dev: Arc<Mutex<DummyDevice>>,
    irq: Arc<RecordingInterrupt>,
}

fn harness_with(dev: DummyDevice) -> Harness {
    let dev = Arc::new(Mutex::new(dev));
    let irq = Arc::new(RecordingInterrupt::new());
    let t = MmioTransport::new(single_region_mem(MEM_SIZE), dev.clone(), irq.clone());
    Harness { t, dev, irq }
}

fn harness() -> Harness {
    harness_with(DummyDevice::new(2, &[16, 32]))
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn set_status(t: &mut MmioTransport, v: u32) {
    wr(t, STATUS, v);
}

fn ack_features(t: &mut MmioTransport, features: u64) {
    wr(t, DRIVER_FEATURES_SEL, 0);
    wr(t, DRIVER_FEATURES, low_u32(features));
    wr(t, DRIVER_FEATURES_SEL, 1);
    wr(t, DRIVER_FEATURES, high_u32(features));
}

/// Drives the transport to FEATURES_OK accepting all offered features.
fn to_features_ok(h: &mut Harness) {
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    let f = h.dev.lock().unwrap().avail_features;
    ack_features(&mut h.t, f);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Sets up queue `i` with `size` entries at a distinct, valid location.
fn setup_queue(t: &mut MmioTransport, i: u32, size: u32) {
    let base = 0x1_0000 + u64::from(i) * 0x1_0000;
    wr(t, QUEUE_SEL, i);
    wr(t, QUEUE_NUM, size);
    wr(t, QUEUE_DESC_LOW, low_u32(base));
    wr(t, QUEUE_DESC_HIGH, 0);
    wr(t, QUEUE_DRIVER_LOW, low_u32(base + 0x4000));
    wr(t, QUEUE_DRIVER_HIGH, 0);
    wr(t, QUEUE_DEVICE_LOW, low_u32(base + 0x8000));
    wr(t, QUEUE_DEVICE_HIGH, 0);
    wr(t, QUEUE_READY, 1);
}

fn to_driver_ok(h: &mut Harness) {
    to_features_ok(h);
    let n = h.dev.lock().unwrap().queue_max_sizes.len();
    for i in 0..n {
        setup_queue(&mut h.t, u32::try_from(i).unwrap(), 16);
    }
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn identification_registers() {
    let mut h = harness();
    assert_eq!(rd(&mut h.t, MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut h.t, VERSION), 2);
    assert_eq!(rd(&mut h.t, DEVICE_ID), 2);
    assert_eq!(rd(&mut h.t, VENDOR_ID), 0);
    assert_eq!(h.t.device_type(), 2);
    assert_eq!(rd(&mut h.t, SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut h.t, SHM_LEN_HIGH), u32::MAX);
    // Write-only and unknown registers read as zero.
    assert_eq!(rd(&mut h.t, QUEUE_NOTIFY), 0);
    assert_eq!(rd(&mut h.t, 0x0f0), 0);
}

#[test]
fn feature_paging() {
    let mut h = harness();
    h.dev.lock().unwrap().avail_features = VIRTIO_F_VERSION_1 | 0x8000_0001;
    wr(&mut h.t, DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 0x8000_0001);
    wr(&mut h.t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 1);
    wr(&mut h.t, DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 0);
    wr(&mut h.t, DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(rd(&mut h.t, DEVICE_FEATURES), 0);

    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    ack_features(&mut h.t, VIRTIO_F_VERSION_1 | 1);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.dev.lock().unwrap().acked_features, VIRTIO_F_VERSION_1 | 1);

    // Frozen after FEATURES_OK.
    wr(&mut h.t, DRIVER_FEATURES_SEL, 0);
    wr(&mut h.t, DRIVER_FEATURES, 0x8000_0001);
    assert_eq!(h.t.driver_features, VIRTIO_F_VERSION_1 | 1);
}

#[test]
fn features_written_before_driver_are_ignored() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    ack_features(&mut h.t, VIRTIO_F_VERSION_1);
    assert_eq!(h.t.driver_features, 0);
}

#[test]
fn features_ok_refused_for_unoffered_feature() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    ack_features(&mut h.t, VIRTIO_F_VERSION_1 | (1 << 5));
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(h.dev.lock().unwrap().acked_features, 0);
    // The driver gives up.
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER | FAILED);
}

#[test]
fn features_ok_refused_for_high_selector_bits() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    ack_features(&mut h.t, VIRTIO_F_VERSION_1);
    wr(&mut h.t, DRIVER_FEATURES_SEL, 2);
    wr(&mut h.t, DRIVER_FEATURES, 0); // zero is harmless
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);

    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    ack_features(&mut h.t, VIRTIO_F_VERSION_1);
    wr(&mut h.t, DRIVER_FEATURES_SEL, 2);
    wr(&mut h.t, DRIVER_FEATURES, 1);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn features_ok_refused_without_version_1() {
    let mut h = harness();
    h.dev.lock().unwrap().avail_features = VIRTIO_F_VERSION_1 | 1;
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    ack_features(&mut h.t, 1);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER);
}

/// Every status value reachable by the driver, against every value it could write.
#[test]
fn status_transition_table_is_exhaustive() {
    let reachable = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ];
    let mut states: Vec<u32> = reachable.to_vec();
    states.extend(reachable.iter().map(|s| s | FAILED));
    for &from in &states {
        for to in 1..=0xffu32 {
            let to = to & !DEVICE_NEEDS_RESET;
            if to == 0 {
                continue;
            }
            let mut h = harness();
            // Reach `from` through the legal path.
            let mut path = reachable
                .iter()
                .copied()
                .filter(|s| *s != 0 && s & !(from & !FAILED) == 0)
                .collect::<Vec<_>>();
            path.sort_unstable();
            for s in path {
                if s & FEATURES_OK != 0 && h.t.status & FEATURES_OK == 0 {
                    let f = h.dev.lock().unwrap().avail_features;
                    ack_features(&mut h.t, f);
                }
                if s & DRIVER_OK != 0 && h.t.status & DRIVER_OK == 0 {
                    for i in 0..2 {
                        setup_queue(&mut h.t, i, 16);
                    }
                }
                set_status(&mut h.t, s);
            }
            if from & FAILED != 0 {
                set_status(&mut h.t, from);
            }
            assert_eq!(h.t.status, from, "could not reach {from:#x}");

            if to & FEATURES_OK != 0 && from & FEATURES_OK == 0 {
                let f = h.dev.lock().unwrap().avail_features;
                ack_features(&mut h.t, f);
            }
            if to & DRIVER_OK != 0 && from & DRIVER_OK == 0 && from & FEATURES_OK != 0 {
                for i in 0..2 {
                    setup_queue(&mut h.t, i, 16);
                }
            }
            set_status(&mut h.t, to);
            let expected_legal = to == from
                || (from & FAILED == 0 && to == from | FAILED)
                || STATUS_TRANSITIONS.contains(&(from, to));
            if expected_legal {
                assert_eq!(h.t.status, to, "{from:#x} -> {to:#x} should be allowed");
            } else {
                assert_eq!(h.t.status, from, "{from:#x} -> {to:#x} should be refused");
            }
        }
    }
}

#[test]
fn legal_init_sequence_activates_once() {
    let mut h = harness();
    to_driver_ok(&mut h);
    assert_eq!(
        rd(&mut h.t, STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.activations, 1);
    assert_eq!(dev.queues.len(), 2);
    assert!(dev.queues.iter().all(|q| q.ready() && q.size() == 16));
    assert_eq!(dev.queues[1].desc_table(), 0x2_0000);
    assert_eq!(dev.queues[1].avail_ring(), 0x2_4000);
    assert_eq!(dev.queues[1].used_ring(), 0x2_8000);
}

#[test]
fn status_cannot_skip_or_clear_bits() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    set_status(&mut h.t, ACKNOWLEDGE);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(h.dev.lock().unwrap().activations, 0);
}

#[test]
fn failed_then_only_reset() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | FAILED);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE | FAILED);
    set_status(&mut h.t, 0);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    set_status(&mut h.t, ACKNOWLEDGE);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE);
}

#[test]
fn needs_reset_bit_from_driver_is_ignored() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE | DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE);
}

#[test]
fn reset_restores_initial_state() {
    let mut h = harness();
    to_driver_ok(&mut h);
    h.irq.trigger(InterruptKind::Queue).unwrap();
    wr(&mut h.t, DEVICE_FEATURES_SEL, 1);
    wr(&mut h.t, QUEUE_SEL, 1);
    assert_ne!(rd(&mut h.t, INTERRUPT_STATUS), 0);

    set_status(&mut h.t, 0);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 0);
    assert_eq!(h.t.queue_sel, 0);
    assert_eq!(h.t.device_features_sel, 0);
    assert_eq!(h.t.driver_features, 0);
    for i in 0..2 {
        wr(&mut h.t, QUEUE_SEL, i);
        assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
    }
    {
        let dev = h.dev.lock().unwrap();
        assert_eq!(dev.resets, 1);
        assert!(!dev.activated);
    }
    // The device can be driven again from scratch.
    to_driver_ok(&mut h);
    assert_eq!(h.dev.lock().unwrap().activations, 2);
}

#[test]
fn failed_device_reset_keeps_status() {
    let mut h = harness();
    to_driver_ok(&mut h);
    h.dev.lock().unwrap().fail_reset = true;
    set_status(&mut h.t, 0);
    assert_eq!(
        rd(&mut h.t, STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET
    );
}

#[test]
fn queue_num_max_and_missing_queues() {
    let mut h = harness();
    wr(&mut h.t, QUEUE_SEL, 0);
    assert_eq!(rd(&mut h.t, QUEUE_NUM_MAX), 16);
    wr(&mut h.t, QUEUE_SEL, 1);
    assert_eq!(rd(&mut h.t, QUEUE_NUM_MAX), 32);
    wr(&mut h.t, QUEUE_SEL, 2);
    assert_eq!(rd(&mut h.t, QUEUE_NUM_MAX), 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
    to_features_ok(&mut h);
    // Setting up a queue that does not exist does nothing.
    setup_queue(&mut h.t, 7, 16);
    wr(&mut h.t, QUEUE_SEL, 7);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
}

#[test]
fn queue_setup_only_between_features_ok_and_driver_ok() {
    let mut h = harness();
    set_status(&mut h.t, ACKNOWLEDGE);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER);
    setup_queue(&mut h.t, 0, 16);
    wr(&mut h.t, QUEUE_SEL, 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
    assert_eq!(h.t.queues[0].desc, 0);

    let mut h = harness();
    to_driver_ok(&mut h);
    wr(&mut h.t, QUEUE_SEL, 0);
    wr(&mut h.t, QUEUE_NUM, 8);
    assert_eq!(h.t.queues[0].size, 16);
    // Disabling a queue of a live device is ignored too.
    wr(&mut h.t, QUEUE_READY, 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 1);
}

#[test]
fn ready_queue_is_frozen_until_disabled() {
    let mut h = harness();
    to_features_ok(&mut h);
    setup_queue(&mut h.t, 0, 16);
    wr(&mut h.t, QUEUE_SEL, 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 1);
    wr(&mut h.t, QUEUE_NUM, 8);
    wr(&mut h.t, QUEUE_DESC_LOW, 0x5000);
    assert_eq!(h.t.queues[0].size, 16);
    assert_eq!(h.t.queues[0].desc, 0x1_0000);
    wr(&mut h.t, QUEUE_READY, 0);
    assert_eq!(rd(&mut h.t, QUEUE_READY), 0);
    wr(&mut h.t, QUEUE_NUM, 8);
    assert_eq!(h.t.queues[0].size, 8);
}

fn ready_after(f: impl FnOnce(&mut MmioTransport)) -> u32 {
    let mut h = harness();
    to_features_ok(&mut h);
    setup_queue(&mut h.t, 0, 16);
    wr(&mut h.t, QUEUE_READY, 0);
    f(&mut h.t);
    wr(&mut h.t, QUEUE_READY, 1);
    rd(&mut h.t, QUEUE_READY)
}

#[test]
fn queue_size_checks() {
    assert_eq!(ready_after(|_| {}), 1);
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 1)), 1);
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 8)), 1);
    // Larger than QueueNumMax (16).
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 32)), 0);
    // Not a power of two (split ring, §2.7).
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 12)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 0)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_NUM, 0x1_0010)), 0);
}

#[test]
fn queue_alignment_checks() {
    assert_eq!(ready_after(|t| wr(t, QUEUE_DESC_LOW, 0x1_0008)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DRIVER_LOW, 0x1_4001)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DEVICE_LOW, 0x1_8002)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DEVICE_LOW, 0x1_8004)), 1);
}

#[test]
fn queue_range_checks() {
    // Past the end of guest memory.
    assert_eq!(ready_after(|t| wr(t, QUEUE_DESC_HIGH, 1)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DRIVER_HIGH, 0x10)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DEVICE_HIGH, 0xffff_ffff)), 0);
    // Straddling the end of guest memory.
    let end = u32::try_from(MEM_SIZE).unwrap();
    assert_eq!(ready_after(|t| wr(t, QUEUE_DESC_LOW, end - 0x80)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DEVICE_LOW, end - 0x80)), 0);
    assert_eq!(ready_after(|t| wr(t, QUEUE_DEVICE_LOW, end - 0x88)), 1);
    // An available ring at 0 cannot be used by virtio-queue.
    assert_eq!(ready_after(|t| wr(t, QUEUE_DRIVER_LOW, 0)), 0);
}

#[test]
fn driver_ok_without_ready_queues_needs_reset() {
    let mut h = harness();
    to_features_ok(&mut h);
    setup_queue(&mut h.t, 0, 16);
    set_status(&mut h.t, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        rd(&mut h.t, STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET
    );
    assert_eq!(h.dev.lock().unwrap().activations, 0);
    assert_eq!(h.irq.count(InterruptKind::Config), 1);
    assert_eq!(rd(&mut h.t, CONFIG_GENERATION), 1);
    set_status(&mut h.t, 0);
    assert_eq!(rd(&mut h.t, STATUS), 0);
}

#[test]
fn failed_activation_needs_reset() {
    let mut h = harness();
    h.dev.lock().unwrap().fail_activate = true;
    to_driver_ok(&mut h);
    assert_ne!(rd(&mut h.t, STATUS) & DEVICE_NEEDS_RESET, 0);
    assert_eq!(h.irq.count(InterruptKind::Config), 1);
}

#[test]
fn device_needs_reset_is_reported() {
    let mut h = harness();
    to_driver_ok(&mut h);
    h.dev.lock().unwrap().needs_reset = true;
    assert_eq!(
        rd(&mut h.t, STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET
    );
    set_status(&mut h.t, 0);
    assert_eq!(rd(&mut h.t, STATUS), 0);
}

#[test]
fn event_idx_is_applied_to_queues() {
    let mut h = harness();
    h.dev.lock().unwrap().avail_features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    to_driver_ok(&mut h);
    assert!(
        h.dev
            .lock()
            .unwrap()
            .queues
            .iter()
            .all(|q| q.event_idx_enabled())
    );
}

#[test]
fn interrupt_status_and_ack() {
    let mut h = harness();
    h.irq.trigger(InterruptKind::Queue).unwrap();
    h.irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 3);
    wr(&mut h.t, INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 2);
    wr(&mut h.t, INTERRUPT_ACK, 2);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 0);
}

#[test]
fn config_generation_counts_config_interrupts() {
    let mut h = harness();
    to_driver_ok(&mut h);
    assert_eq!(rd(&mut h.t, CONFIG_GENERATION), 0);
    let irq = h.dev.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue).unwrap();
    assert_eq!(rd(&mut h.t, CONFIG_GENERATION), 0);
    irq.trigger(InterruptKind::Config).unwrap();
    irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(rd(&mut h.t, CONFIG_GENERATION), 2);
    assert_eq!(rd(&mut h.t, INTERRUPT_STATUS), 3);
}

#[test]
fn config_space_access_sizes() {
    let mut h = harness();
    h.dev.lock().unwrap().config = (0u8..16).collect();
    let mut b1 = [0u8; 1];
    h.t.read(0x103, &mut b1);
    assert_eq!(b1, [3]);
    let mut b2 = [0u8; 2];
    h.t.read(0x104, &mut b2);
    assert_eq!(b2, [4, 5]);
    let mut b8 = [0u8; 8];
    h.t.read(0x108, &mut b8);
    assert_eq!(b8, [8, 9, 10, 11, 12, 13, 14, 15]);
    let mut b3 = [0xffu8; 3];
    h.t.read(0x100, &mut b3);
    assert_eq!(b3, [0, 0, 0]);
    h.t.write(0x100, &[0xaa, 0xbb]);
    assert_eq!(&h.dev.lock().unwrap().config[..2], &[0xaa, 0xbb]);
    h.t.write(0x100, &[1, 2, 3]);
    assert_eq!(&h.dev.lock().unwrap().config[..3], &[0xaa, 0xbb, 2]);
}

#[test]
fn register_access_must_be_4_bytes_aligned() {
    let mut h = harness();
    let mut b2 = [0xffu8; 2];
    h.t.read(MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    h.t.read(MAGIC_VALUE, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    h.t.read(MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    let mut empty: [u8; 0] = [];
    h.t.read(STATUS, &mut empty);
    h.t.write(STATUS, &[1]);
    h.t.write(STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    h.t.write(STATUS + 2, &[1, 0, 0, 0]);
    h.t.write(STATUS, &[]);
    assert_eq!(rd(&mut h.t, STATUS), 0);
    h.t.write(STATUS, &[1, 0, 0, 0]);
    assert_eq!(rd(&mut h.t, STATUS), ACKNOWLEDGE);
    // Far out of the window: harmless.
    h.t.write(u64::MAX - 3, &[1, 0, 0, 0]);
    h.t.read(u64::MAX, &mut b4);
}

#[test]
fn notify_register_reaches_the_device() {
    let mut h = harness();
    wr(&mut h.t, QUEUE_NOTIFY, 1);
    wr(&mut h.t, QUEUE_NOTIFY, 0);
    // Missing queue: ignored.
    wr(&mut h.t, QUEUE_NOTIFY, 9);
    wr(&mut h.t, QUEUE_NOTIFY, u32::MAX);
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.notified, vec![1, 0]);
    // The default: the one notify EventFd, as an ioeventfd would have signalled it.
    assert_eq!(dev.notify_evt.as_ref().unwrap().read().unwrap(), 2);
}

#[test]
fn a_device_without_notify_eventfd_still_hears_notifications() {
    let mut h = harness();
    h.dev.lock().unwrap().notify_evt = None;
    wr(&mut h.t, QUEUE_NOTIFY, 1);
    assert_eq!(h.dev.lock().unwrap().notified, vec![1]);
}

/// A transport for a fresh device like `h`'s, restored from `state`.
fn restored(state: &MmioState) -> (Result<MmioTransport, RestoreError>, Harness) {
    let dev = Arc::new(Mutex::new(DummyDevice::new(2, &[16, 32])));
    let irq = Arc::new(RecordingInterrupt::new());
    let t = MmioTransport::restore(single_region_mem(MEM_SIZE), dev.clone(), irq.clone(), state);
    let placeholder = MmioTransport::new(single_region_mem(MEM_SIZE), dev.clone(), irq.clone());
    (
        t,
        Harness {
            t: placeholder,
            dev,
            irq,
        },
    )
}

#[test]
fn a_live_device_comes_back_where_its_snapshot_left_it() {
    let mut h = harness();
    to_driver_ok(&mut h);
    // The device moved on: positions the driver and the device agreed on.
    {
        let mut dev = h.dev.lock().unwrap();
        dev.queues[0].set_next_avail(5);
        dev.queues[0].set_next_used(4);
        dev.queues[1].set_next_avail(9);
        dev.queues[1].set_next_used(9);
    }
    // Interrupts as the device raises them (through the transport's generation counter).
    let irq = h.dev.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Queue).unwrap();
    irq.trigger(InterruptKind::Config).unwrap();
    wr(&mut h.t, QUEUE_SEL, 1);
    let state = h.t.state();
    assert_eq!(state.positions, [(5, 4), (9, 9)]);
    assert_eq!(state.interrupt_status, 3);
    assert_eq!(state.config_generation, 1);

    let (t, r) = restored(&state);
    let mut t = t.unwrap();
    let dev = r.dev.lock().unwrap();
    assert_eq!((dev.activations, dev.restores), (1, 1));
    assert_eq!(dev.acked_features, h.dev.lock().unwrap().acked_features);
    assert_eq!(dev.queue_positions(), [(5, 4), (9, 9)]);
    drop(dev);
    // Every register the driver can read is what it was.
    for reg in [
        STATUS,
        INTERRUPT_STATUS,
        CONFIG_GENERATION,
        QUEUE_NUM_MAX,
        QUEUE_READY,
    ] {
        assert_eq!(rd(&mut t, reg), rd(&mut h.t, reg), "register {reg:#x}");
    }
    assert_eq!(t.state(), state);
    // The restored device goes on: the driver acknowledges, resets, starts again.
    wr(&mut t, INTERRUPT_ACK, 3);
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), 0);
    set_status(&mut t, 0);
    assert_eq!(r.dev.lock().unwrap().resets, 1);
}

#[test]
fn a_device_not_yet_live_is_restored_without_activation() {
    let mut h = harness();
    to_features_ok(&mut h);
    setup_queue(&mut h.t, 0, 16);
    let state = h.t.state();
    assert!(state.positions.is_empty());
    let (t, r) = restored(&state);
    let mut t = t.unwrap();
    assert_eq!(r.dev.lock().unwrap().activations, 0);
    assert_eq!(
        r.dev.lock().unwrap().acked_features,
        h.dev.lock().unwrap().acked_features
    );
    // The driver finishes its setup on the restored transport.
    setup_queue(&mut t, 1, 16);
    set_status(&mut t, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(r.dev.lock().unwrap().activations, 1);
    assert_eq!(r.dev.lock().unwrap().restores, 0);
}

#[test]
fn a_snapshot_of_another_device_is_refused() {
    let mut h = harness();
    to_driver_ok(&mut h);
    let mut state = h.t.state();
    state.device_type = 19;
    assert!(matches!(
        restored(&state).0,
        Err(RestoreError::DeviceType {
            saved: 19,
            device: 2
        })
    ));
    let mut state = h.t.state();
    state.queues.pop();
    assert!(matches!(
        restored(&state).0,
        Err(RestoreError::QueueCount { .. })
    ));
    let mut state = h.t.state();
    state.queues[1].desc = 0x3; // misaligned
    assert!(matches!(restored(&state).0, Err(RestoreError::Queue(1, _))));
}
