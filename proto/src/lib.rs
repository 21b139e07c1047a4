// SPDX-License-Identifier: Apache-2.0
//! Generated protocol code for the sandbox APIs. No logic lives here.
//!
//! - [`v2`]: the containerd 2.x sandbox `Controller` (nine RPCs) and the `containerd.types` it
//!   uses. iSulad >= 2.1.6 speaks it too.
//! - [`seed`]: the ten-RPC `Controller` of the seed document (iSulad <= 2.1.5, Kuasar < 1.0).
//!   Same package and service names as [`v2`], different field numbers, so it is a separate
//!   module tree and is served on its own socket.
//! - [`cri`]: the part of the CRI `runtime.v1` API that `Create`'s `options` carries
//!   (`PodSandboxConfig`).
//!
//! Every set has tonic servers and clients; each message implements `prost::Name`, so
//! `prost_types::Any::from_msg` gives it its full type URL.
#![forbid(unsafe_code)]

/// The containerd 2.x sandbox API.
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code; the .proto files document the fields"
)]
pub mod v2 {
    /// Protobuf packages under `containerd`.
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/v2/containerd.types.rs"));
        }
        /// `containerd.services`.
        pub mod services {
            /// `containerd.services.sandbox`.
            pub mod sandbox {
                /// `containerd.services.sandbox.v1`.
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/v2/containerd.services.sandbox.v1.rs"
                    ));
                }
            }
        }
    }
    pub use containerd::services::sandbox::v1 as sandbox;
    pub use containerd::types;
}

/// The seed / iSulad <= 2.1.5 / Kuasar < 1.0 sandbox API.
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code; the .proto files document the fields"
)]
pub mod seed {
    /// Protobuf packages under `containerd`.
    pub mod containerd {
        /// `containerd.types` (seed numbering).
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/seed/containerd.types.rs"));
        }
        /// `containerd.services`.
        pub mod services {
            /// `containerd.services.sandbox`.
            pub mod sandbox {
                /// `containerd.services.sandbox.v1` (seed numbering).
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/seed/containerd.services.sandbox.v1.rs"
                    ));
                }
            }
        }
    }
    pub use containerd::services::sandbox::v1 as sandbox;
    pub use containerd::types;
}

/// The CRI messages the sandboxer reads.
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code; the .proto files document the fields"
)]
pub mod cri {
    /// `runtime`.
    pub mod runtime {
        /// `runtime.v1`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/cri/runtime.v1.rs"));
        }
    }
    pub use runtime::v1;
}

pub use prost;
pub use prost_types;
pub use tonic;
