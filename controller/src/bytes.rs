// SPDX-License-Identifier: Apache-2.0
//! Bytes in JSON as base64 strings (`#[serde(with = "crate::bytes")]`), not arrays of numbers:
//! a live upgrade's handover carries stdio bytes a pod had in flight, up to a window per stream,
//! in its JSON messages (about 1.4 bytes a byte instead of up to 4).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serializer};

/// Writes `bytes` as one base64 string.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

/// Reads bytes written by [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    STANDARD
        .decode(text.as_bytes())
        .map_err(serde::de::Error::custom)
}

/// The same for a list of byte strings (`#[serde(with = "crate::bytes::list")]`).
pub mod list {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::ser::SerializeSeq as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes each of `list` as a base64 string.
    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for bytes in list {
            seq.serialize_element(&STANDARD.encode(bytes))?;
        }
        seq.end()
    }

    /// Reads a list written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| STANDARD.decode(text).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Held {
        #[serde(with = "crate::bytes")]
        one: Vec<u8>,
        #[serde(with = "crate::bytes::list")]
        many: Vec<Vec<u8>>,
    }

    #[test]
    fn bytes_go_as_base64_and_come_back() {
        let held = Held {
            one: (0..=255).collect(),
            many: vec![Vec::new(), b"\x00\xffabc".to_vec()],
        };
        let json = serde_json::to_string(&held).unwrap();
        assert!(json.contains(r#""many":["","AP9hYmM="]"#), "{json}");
        assert!(json.len() < 400, "{} bytes", json.len());
        assert_eq!(serde_json::from_str::<Held>(&json).unwrap(), held);
        let bad = r#"{"one":"not base64!","many":[]}"#;
        serde_json::from_str::<Held>(bad).unwrap_err();
    }
}
