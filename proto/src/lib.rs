// SPDX-License-Identifier: Apache-2.0
//! Generated protocol code for the sandbox APIs, and [`id`]: the one rule both ends of them
//! apply to the ids they carry. No other logic lives here.
//!
//! - [`v2`]: the containerd 2.x sandbox `Controller` (nine RPCs) and the `containerd.types` it
//!   uses. iSulad >= 2.1.6 speaks it too.
//! - [`seed`]: the ten-RPC `Controller` of the seed document (iSulad <= 2.1.5, Kuasar < 1.0).
//!   Same package and service names as [`v2`], different field numbers, so it is a separate
//!   module tree and is served on its own socket.
//! - [`cri`]: a subset of the CRI `runtime.v1` API: the `PodSandboxConfig` that `Create`'s
//!   `options` carries, and the `RuntimeService` and `ImageService` calls the end-to-end tests
//!   make against containerd's CRI socket.
//!
//! - [`admin`]: the daemon's own operator service (`sandboxer ps`, `inspect`, `console`).
//!
//! - [`agent`] (feature `ttrpc`): the agent's own ttrpc `Control` service
//!   (`sandboxer.agent.v1`) and containerd's `Streaming` service (stdio streams),
//!   rust-protobuf messages with async servers and clients; [`stream`]: the constants both
//!   ends of a stdio stream agree on (window, message size, type URLs of the resume messages).
//!
//! The gRPC sets (feature `grpc`, the default) have tonic servers and clients; each message implements `prost::Name`, so
//! `prost_types::Any::from_msg` gives it its full type URL.
#![forbid(unsafe_code)]

pub mod id;
pub mod stream;

/// The containerd 2.x sandbox API.
#[cfg(feature = "grpc")]
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    clippy::unwrap_used,
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
#[cfg(feature = "grpc")]
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    clippy::unwrap_used,
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

/// A subset of the CRI `runtime.v1` API: `PodSandboxConfig` and the RuntimeService and
/// ImageService calls the end-to-end tests make.
#[cfg(feature = "grpc")]
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    clippy::unwrap_used,
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

/// The daemon's operator service (`sandboxer.admin.v1.Admin`: `sandboxer ps`, `inspect`,
/// `console`), served on the containerd API socket.
#[cfg(feature = "grpc")]
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    clippy::unwrap_used,
    reason = "generated code; the .proto files document the fields"
)]
pub mod admin {
    /// `sandboxer.admin.v1`.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/admin/sandboxer.admin.v1.rs"));
    }
}

#[cfg(feature = "grpc")]
pub use prost;
#[cfg(feature = "grpc")]
pub use prost_types;
#[cfg(feature = "grpc")]
pub use tonic;

/// The agent's ttrpc services.
#[cfg(feature = "ttrpc")]
#[allow(
    missing_docs,
    missing_debug_implementations,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    clippy::unwrap_used,
    reason = "generated code; the .proto files document the fields"
)]
pub mod agent {
    /// `sandboxer.agent.v1`: messages of the `Control` service.
    pub mod control {
        include!(concat!(env!("OUT_DIR"), "/agent/control.rs"));
    }
    /// `sandboxer.agent.v1.Control`: async ttrpc server and client.
    pub mod control_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent/control_ttrpc.rs"));
    }
    /// `containerd.services.streaming.v1`: `StreamInit`, the first message of a stream.
    pub mod streaming {
        include!(concat!(env!("OUT_DIR"), "/agent/streaming.rs"));
    }
    /// `containerd.services.streaming.v1.Streaming`: async ttrpc server and client.
    pub mod streaming_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent/streaming_ttrpc.rs"));
    }
    /// `containerd.types.transfer`: `Data` and `WindowUpdate`, carried in a stream.
    pub mod stream_data {
        include!(concat!(env!("OUT_DIR"), "/agent/stream_data.rs"));
    }
    /// `sandboxer.agent.v1`: `StreamResume` and `StreamResumed`, resuming a stream on a new
    /// connection (see [`crate::stream`]).
    pub mod stream_resume {
        include!(concat!(env!("OUT_DIR"), "/agent/stream_resume.rs"));
    }
}

#[cfg(feature = "ttrpc")]
pub use {protobuf, ttrpc};
