// SPDX-License-Identifier: Apache-2.0
//! Legacy (non-virtio) devices: the 8250 serial console, the i8042 reset port and the boot timer.
