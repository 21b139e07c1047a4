// SPDX-License-Identifier: Apache-2.0
//! A Task endpoint's part in a live upgrade ([`crate::upgrade`]): the old process cuts it
//! ([`TaskCutter::cut`]: its connections stopped between frames, [`conn`](super::conn), and
//! what it knows of each container), the new process serves on from there
//! ([`TaskServer::adopt`](super::TaskServer::adopt): the same listening socket, the same
//! connections, the calls left unanswered asked again, the same containers with their slots
//! and images, the stdio copies and streams going on from where they stopped). A cut that
//! fails, or an upgrade that fails after it, is undone with [`TaskCutter::thaw`].

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::Mount;
use devices::sync::Recover;
use serde::{Deserialize, Serialize};

use super::conn::{Connections, with_resume_token};
use super::error::TaskError;
use super::rootfs::ImageCache;
use super::service::{Container, Endpoint, Entry, Prepared, Resources};
use super::stdio::{self, BridgeState, Bridges, ProxyState};

/// A mount of a prepared container.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MountState {
    kind: String,
    source: String,
    target: String,
    options: Vec<String>,
}

impl From<&Mount> for MountState {
    fn from(m: &Mount) -> Self {
        MountState {
            kind: m.type_.clone(),
            source: m.source.clone(),
            target: m.target.clone(),
            options: m.options.clone(),
        }
    }
}

impl From<MountState> for Mount {
    fn from(m: MountState) -> Self {
        let mut out = Mount::new();
        out.type_ = m.kind;
        out.source = m.source;
        out.target = m.target;
        out.options = m.options;
        out
    }
}

/// What a container holds on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResourcesState {
    slots: Vec<u32>,
    /// Each shared image: its lower chain and its file.
    images: Vec<(Vec<PathBuf>, PathBuf)>,
    work_dir: Option<PathBuf>,
}

impl From<&Resources> for ResourcesState {
    fn from(r: &Resources) -> Self {
        ResourcesState {
            slots: r.slots.clone(),
            images: r
                .cached
                .iter()
                .map(|c| (c.lowers().to_vec(), c.path.clone()))
                .collect(),
            work_dir: r.work_dir.clone(),
        }
    }
}

impl ResourcesState {
    fn adopt(self, images: &ImageCache) -> Resources {
        Resources {
            slots: self.slots,
            cached: self
                .images
                .into_iter()
                .map(|(lowers, path)| images.adopt(lowers, path))
                .collect(),
            work_dir: self.work_dir,
        }
    }
}

/// A container the endpoint knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ContainerState {
    /// Readied by the seed API, not created in the agent yet.
    Prepared {
        host_bundle: String,
        guest_bundle: String,
        mounts: Vec<MountState>,
        resources: ResourcesState,
    },
    /// Created in the agent.
    Ready {
        host_bundle: String,
        stdio: [String; 3],
        namespace: Option<String>,
        resources: ResourcesState,
    },
}

impl ContainerState {
    fn of(entry: &Entry) -> Option<Self> {
        match entry {
            Entry::Creating => None,
            Entry::Prepared(p) => Some(ContainerState::Prepared {
                host_bundle: p.host_bundle.clone(),
                guest_bundle: p.guest_bundle.clone(),
                mounts: p.mounts.iter().map(MountState::from).collect(),
                resources: ResourcesState::from(&p.resources),
            }),
            Entry::Ready(c) => Some(ContainerState::Ready {
                host_bundle: c.host_bundle.clone(),
                stdio: c.stdio.clone(),
                namespace: c.namespace.clone(),
                resources: ResourcesState::from(&c.resources),
            }),
        }
    }

    fn image_paths(&self) -> impl Iterator<Item = &PathBuf> {
        let (ContainerState::Prepared { resources, .. } | ContainerState::Ready { resources, .. }) =
            self;
        resources.images.iter().map(|(_, path)| path)
    }

    fn adopt(self, images: &ImageCache) -> Entry {
        match self {
            ContainerState::Prepared {
                host_bundle,
                guest_bundle,
                mounts,
                resources,
            } => Entry::Prepared(Prepared {
                host_bundle,
                guest_bundle,
                mounts: mounts.into_iter().map(Mount::from).collect(),
                resources: resources.adopt(images),
            }),
            ContainerState::Ready {
                host_bundle,
                stdio,
                namespace,
                resources,
            } => Entry::Ready(Container {
                host_bundle,
                stdio,
                namespace,
                resources: resources.adopt(images),
            }),
        }
    }
}

/// A cut endpoint's state, as the handover carries it (JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskState {
    containers: Vec<(String, ContainerState)>,
    /// Per cut connection, in descriptor order: the frames it left unanswered.
    #[serde(with = "crate::bytes::list")]
    connections: Vec<Vec<u8>>,
    /// Each FIFO stdio copy, where it stood, in descriptor order.
    bridges: Vec<BridgeState>,
    /// Each proxied stdio stream (`io_type = "streaming"`), where it stood; its request is
    /// among its connection's frames, with the state's token.
    #[serde(default)]
    streams: Vec<ProxyState>,
}

impl TaskState {
    /// The descriptors that go with it: the listening socket, one per connection, then one
    /// per stdio copy (its FIFO or file).
    pub fn fd_count(&self) -> usize {
        1 + self.connections.len() + self.bridges.len()
    }

    /// The shared images its containers hold (the new process's cache keeps them).
    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.containers
            .iter()
            .flat_map(|(_, c)| c.image_paths())
            .cloned()
            .collect()
    }

    /// Ids of the containers it holds.
    pub fn container_ids(&self) -> Vec<&str> {
        self.containers.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Ids of the stdio streams it hands over (`io_type = "streaming"`).
    pub fn stream_ids(&self) -> Vec<&str> {
        self.streams.iter().map(|s| s.id.as_str()).collect()
    }
}

/// A Task endpoint cut for a handover: its state and its sockets.
#[derive(Debug)]
pub struct TaskCut {
    /// What it knows.
    pub state: TaskState,
    /// The listening socket.
    pub listener: OwnedFd,
    /// Its connections, stopped between frames.
    pub connections: Vec<OwnedFd>,
    /// The FIFOs (or files) of its stdio copies, in `state.bridges` order.
    pub bridges: Vec<OwnedFd>,
}

impl TaskCut {
    /// Its state, and the descriptors to pass in the order [`TaskCut::from_parts`] takes them
    /// back.
    pub fn into_parts(self) -> (TaskState, Vec<OwnedFd>) {
        let fds = std::iter::once(self.listener)
            .chain(self.connections)
            .chain(self.bridges)
            .collect();
        (self.state, fds)
    }

    /// Puts a cut back together from its state and descriptors ([`TaskCut::into_parts`]).
    pub fn from_parts(state: TaskState, fds: Vec<OwnedFd>) -> Result<Self, TaskError> {
        if fds.len() != state.fd_count() {
            return Err(TaskError::Handover(format!(
                "{} descriptors for a Task endpoint with {} connections",
                fds.len(),
                state.connections.len()
            )));
        }
        let mut fds = fds.into_iter();
        let listener = fds
            .next()
            .ok_or_else(|| TaskError::Handover("no listening socket".into()))?;
        let connections = fds.by_ref().take(state.connections.len()).collect();
        Ok(TaskCut {
            state,
            listener,
            connections,
            bridges: fds.collect(),
        })
    }

    /// Its parts for a new endpoint: the containers (taking references on their images in
    /// `images`), the listening socket, and each connection with the frames it left
    /// unanswered.
    pub(super) fn adopt(self, images: &ImageCache) -> AdoptedParts {
        let TaskCut {
            state,
            listener,
            connections,
            bridges,
        } = self;
        AdoptedParts {
            streams: state.streams,
            bridges: state.bridges.into_iter().zip(bridges).collect(),
            containers: state
                .containers
                .into_iter()
                .map(|(id, c)| (id, c.adopt(images)))
                .collect(),
            listener,
            connections: connections.into_iter().zip(state.connections).collect(),
        }
    }
}

/// What a new endpoint is made of ([`TaskCut::adopt`]).
pub(super) struct AdoptedParts {
    pub(super) containers: Vec<(String, Entry)>,
    pub(super) listener: OwnedFd,
    pub(super) connections: Vec<(OwnedFd, Vec<u8>)>,
    /// Stdio copies to resume ([`stdio::resume`]).
    pub(super) bridges: Vec<(BridgeState, OwnedFd)>,
    /// Stdio streams whose replayed requests come with the connections.
    pub(super) streams: Vec<ProxyState>,
}

/// Stdio copies a cut stopped, with a second descriptor of each FIFO.
pub(super) type Held = Arc<Mutex<Vec<(BridgeState, OwnedFd)>>>;

/// Cuts one Task endpoint for a handover, or lets it go on; cheap to clone (the server runs on
/// meanwhile).
#[derive(Debug, Clone)]
pub struct TaskCutter {
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) conns: Arc<Connections>,
    pub(super) listener: Arc<OwnedFd>,
    /// The stdio copies a cut stopped (duplicates), for a thaw to resume them here.
    pub(super) held: Held,
}

impl TaskCutter {
    /// Stops the endpoint's connections between frames (waiting up to `within` for calls that
    /// change something) and takes down what it knows. The endpoint stays as it is: after a
    /// failed upgrade [`TaskCutter::thaw`] lets it go on.
    pub async fn cut(&self, within: Duration) -> Result<TaskCut, TaskError> {
        let deadline = Instant::now() + within;
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| TaskError::Handover(format!("cannot duplicate the socket: {e}")))?;
        let cut = self
            .conns
            .quiesce(within)
            .await
            .map_err(|e| TaskError::Handover(crate::error_chain(&e)))?;
        let containers: Result<Vec<_>, String> = self
            .endpoint
            .containers
            .lock()
            .recover()
            .iter()
            .map(|(id, entry)| {
                ContainerState::of(entry)
                    .map(|state| (id.clone(), state))
                    .ok_or_else(|| format!("container {id:?} is being created"))
            })
            .collect();
        let containers = match containers {
            Ok(c) => c,
            Err(why) => {
                self.thaw();
                return Err(TaskError::Handover(why));
            }
        };
        // Each stdio stream stops where the engine's side of it is exact, and its request
        // goes with its connection's, with the token of its state.
        let mut connections = Vec::with_capacity(cut.len());
        let mut unanswered = Vec::with_capacity(cut.len());
        let mut streams = Vec::new();
        for c in cut {
            let mut frames = c.unanswered;
            for s in c.streams {
                let frozen = self
                    .endpoint
                    .proxies
                    .freeze(&s.key, s.read, s.written, deadline)
                    .await
                    .and_then(|st| {
                        let frame = with_resume_token(&s.request, &st.token).ok_or_else(|| {
                            TaskError::Handover("a stdio stream's request is malformed".into())
                        })?;
                        Ok((st, frame))
                    });
                match frozen {
                    Ok((st, frame)) => {
                        frames.extend_from_slice(&frame);
                        streams.push(st);
                    }
                    Err(e) => {
                        self.thaw();
                        return Err(e);
                    }
                }
            }
            connections.push(c.socket);
            unanswered.push(frames);
        }
        // The stdio copies stop where their counters are exact; this process keeps a second
        // descriptor of each FIFO in case the upgrade fails.
        let copies: Vec<Bridges> = std::mem::take(&mut *self.endpoint.bridges.lock().recover());
        let mut stopped = Vec::new();
        for b in copies {
            stopped.extend(b.hand_over().await);
        }
        let mut held = Vec::with_capacity(stopped.len());
        for (state, fd) in &stopped {
            match fd.try_clone() {
                Ok(second) => held.push((state.clone(), second)),
                Err(e) => {
                    *self.held.lock().recover() = stopped;
                    self.thaw();
                    return Err(TaskError::Handover(format!(
                        "cannot duplicate a stdio FIFO: {e}"
                    )));
                }
            }
        }
        *self.held.lock().recover() = held;
        let (bridges, fifos) = stopped.into_iter().unzip();
        Ok(TaskCut {
            state: TaskState {
                containers,
                connections: unanswered,
                bridges,
                streams,
            },
            listener,
            connections,
            bridges: fifos,
        })
    }

    /// Undoes a cut: the connections go on, the socket accepts again, the stdio streams go on
    /// and the stdio copies resume (in the background: they reopen their agent streams).
    pub fn thaw(&self) {
        self.conns.thaw();
        self.endpoint.proxies.thaw();
        let held = std::mem::take(&mut *self.held.lock().recover());
        if held.is_empty() {
            return;
        }
        let endpoint = Arc::clone(&self.endpoint);
        tokio::spawn(async move { resume_bridges(&endpoint, held).await });
    }
}

/// Resumes stdio copies stopped by a cut, here or in the process the cut went to, and keeps
/// them in the endpoint.
pub(super) async fn resume_bridges(endpoint: &Endpoint, held: Vec<(BridgeState, OwnedFd)>) {
    match stdio::resume(&*endpoint.target, held).await {
        Ok(bridges) => endpoint.bridges.lock().recover().push(bridges),
        Err(e) => tracing::warn!("cannot resume the stdio copies: {}", e.chain()),
    }
}
