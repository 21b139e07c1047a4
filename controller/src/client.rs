// SPDX-License-Identifier: Apache-2.0
//! Connecting a tonic client to a Sandbox API unix socket (for tests, tools and benchmarks).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel to the unix socket at `path`.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: every connection dials the socket.
    Endpoint::from_static("http://sandboxer.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// The containerd 2.x API client on `path`.
pub async fn v2_client(
    path: impl AsRef<Path>,
) -> Result<proto::v2::sandbox::controller_client::ControllerClient<Channel>, tonic::transport::Error>
{
    Ok(proto::v2::sandbox::controller_client::ControllerClient::new(connect(path).await?))
}

/// The seed API client on `path`.
pub async fn seed_client(
    path: impl AsRef<Path>,
) -> Result<
    proto::seed::sandbox::controller_client::ControllerClient<Channel>,
    tonic::transport::Error,
> {
    Ok(proto::seed::sandbox::controller_client::ControllerClient::new(connect(path).await?))
}
