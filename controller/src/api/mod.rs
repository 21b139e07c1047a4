// SPDX-License-Identifier: Apache-2.0
//! Thin tonic adapters over [`crate::service::SandboxService`]: proto <-> domain conversion only.

pub mod admin;
pub mod seed;
pub mod v2;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::SystemTime;

use prost_types::Timestamp;

/// `SystemTime` -> protobuf `Timestamp`.
pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from(t)
}

/// A sorted map -> the generated `HashMap`.
pub(crate) fn to_hash_map(m: BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

/// A sorted map of counters -> the generated `HashMap`.
pub(crate) fn to_hash_map_u64(m: BTreeMap<String, u64>) -> HashMap<String, u64> {
    m.into_iter().collect()
}

/// The generated `HashMap` -> a sorted map.
pub(crate) fn to_btree_map<V>(m: HashMap<String, V>) -> BTreeMap<String, V> {
    m.into_iter().collect()
}
