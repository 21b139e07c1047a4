// SPDX-License-Identifier: Apache-2.0
//! The message channel of a live upgrade's handover: frames between the old and the new daemon
//! over one connected unix stream socket, each carrying a JSON message, an opaque blob (a VM's
//! saved state) and file descriptors (`SCM_RIGHTS`).
//!
//! A frame on the stream is a 16-byte header (all little-endian: magic `u32` [`MAGIC`],
//! `json_len: u32`, `blob_len: u64`), then `json_len` bytes of JSON, then `blob_len` bytes of
//! blob. The descriptors ride on the header: the sender's first `sendmsg` of the frame carries
//! them, and the receiver reads the header (and only the header) with `recvmsg`.
//!
//! Why the receiver never reads past its frame: on a unix stream socket the kernel attaches the
//! descriptors to the first chunk (skb) of the `sendmsg` that carried them, and hands them to
//! whichever read first consumes a byte of that chunk. A read that overruns into the next frame
//! would take that frame's descriptors; a plain `read` (no control buffer) would even have the
//! kernel close them. Reading exactly `json_len + blob_len` bytes after the header keeps each
//! frame's descriptors with their own frame.
//!
//! `send` and `recv` are not cancel-safe: a frame abandoned halfway (its future dropped, or an
//! I/O error) leaves the stream out of step, so that direction of the [`Channel`] then answers
//! [`WireError::Broken`].

#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, RecvMsg, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The first field of every frame's header: "SBXH" as hex digits (so the bytes on the wire, in
/// little-endian order, read "HXBS").
pub const MAGIC: u32 = 0x5342_5848;
/// Most descriptors one frame may carry.
pub const MAX_FDS: usize = 64;
/// Most bytes of JSON one frame may carry: a sandbox's Task endpoint state comes with the stdio
/// bytes its streams had in flight (a window each, base64).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Most bytes of blob one frame may carry.
pub const MAX_BLOB: usize = 256 << 20;

/// Bytes of a frame's header: magic, JSON length, blob length.
const HEADER_LEN: usize = 16;
/// Control-message space for [`MAX_FDS`] descriptors: one more is reported as `MSG_CTRUNC`.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// Failure of a handover frame's send or receive.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed, or the peer closed it inside a frame (`UnexpectedEof`).
    #[error("Handover socket I/O failed")]
    Io(#[source] io::Error),
    /// The peer closed the socket at a frame boundary.
    #[error("Handover peer closed the socket")]
    Closed,
    /// A part of a frame is over its limit (sent, or announced by a received header).
    #[error("Handover frame's {what} of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Which part: "message" or "blob".
        what: &'static str,
        /// Its length.
        len: u64,
        /// Its limit.
        max: u64,
    },
    /// A frame has more descriptors than [`MAX_FDS`].
    #[error("Handover frame has {0} descriptors, over the limit of {MAX_FDS}")]
    TooManyFds(usize),
    /// The kernel dropped descriptors of a received frame (`MSG_CTRUNC`): more than [`MAX_FDS`]
    /// were sent, or this process ran out of descriptors (`RLIMIT_NOFILE`).
    #[error("Handover frame's descriptors were truncated")]
    FdsTruncated,
    /// A received header does not start with [`MAGIC`].
    #[error("Handover frame has bad magic {0:#010x}")]
    BadMagic(u32),
    /// An earlier frame in this direction was abandoned halfway, so the stream is out of step.
    #[error("Handover channel is out of step after an abandoned frame")]
    Broken,
    /// A received message is not the JSON of the expected type.
    #[error("Failed to decode a handover message")]
    Decode(#[source] serde_json::Error),
    /// A message to send could not be serialized.
    #[error("Failed to encode a handover message")]
    Encode(#[source] serde_json::Error),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// One received frame.
#[derive(Debug)]
pub struct Frame<T> {
    /// The message, decoded from the frame's JSON.
    pub message: T,
    /// The frame's blob (empty if none was sent).
    pub blob: Vec<u8>,
    /// The descriptors that came with the frame, close-on-exec set.
    pub fds: Vec<OwnedFd>,
}

/// One end of the handover socket.
#[derive(Debug)]
pub struct Channel {
    /// The connected unix stream socket.
    stream: UnixStream,
    /// A send started and did not finish: the peer sees a partial frame.
    send_pending: bool,
    /// A receive started and did not finish: the rest of a frame is still unread.
    recv_pending: bool,
}

impl Channel {
    /// Wraps a connected unix stream socket.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            send_pending: false,
            recv_pending: false,
        }
    }

    /// Sends `message` (serialized as JSON), an opaque `blob` (may be empty) and `fds` (at most
    /// [`MAX_FDS`]) as one frame. Limits are checked before anything is written.
    pub async fn send<T: Serialize>(
        &mut self,
        message: &T,
        blob: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), WireError> {
        if self.send_pending {
            return Err(WireError::Broken);
        }
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        let json = serde_json::to_vec(message).map_err(WireError::Encode)?;
        let json_len = checked_len("message", json.len(), MAX_MESSAGE)?;
        let blob_len = checked_len("blob", blob.len(), MAX_BLOB)?;
        let json_len =
            u32::try_from(json_len).map_err(|_| too_large("message", json_len, MAX_MESSAGE))?;
        let header = encode_header(json_len, blob_len);

        self.send_pending = true;
        let sent = self.send_first(&header, &json, blob, fds).await?;
        // The kernel took what fit in the socket buffer; the rest follows without descriptors.
        let mut skip = sent;
        for part in [header.as_slice(), json.as_slice(), blob] {
            let rest = part.get(skip..).unwrap_or_default();
            skip = skip.saturating_sub(part.len());
            if !rest.is_empty() {
                self.stream.write_all(rest).await?;
            }
        }
        self.send_pending = false;
        Ok(())
    }

    /// Writes as much of the frame as one `sendmsg` takes, with `fds` attached; returns the
    /// bytes written (at least one: the descriptors are then on their way).
    async fn send_first(
        &self,
        header: &[u8],
        json: &[u8],
        blob: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        let iov = [IoSlice::new(header), IoSlice::new(json), IoSlice::new(blob)];
        let mut space = [MaybeUninit::uninit(); CMSG_SPACE];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            // Cannot happen: `fds` is at most MAX_FDS and the space is sized for that.
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        let socket = self.stream.as_fd();
        self.stream
            .async_io(Interest::WRITABLE, || {
                retry_eintr(|| sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL))
            })
            .await
    }

    /// Receives one frame: the message, the blob and the descriptors that came with it. The
    /// header's magic and limits are checked before anything is allocated for the body.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Frame<T>, WireError> {
        if self.recv_pending {
            return Err(WireError::Broken);
        }
        self.recv_pending = true;
        let mut fds = Vec::new();
        let Some(header) = self.recv_header(&mut fds).await? else {
            self.recv_pending = false;
            return Err(WireError::Closed);
        };
        let (json_len, blob_len) = decode_header(header)?;
        let mut json = vec![0; json_len];
        self.stream.read_exact(&mut json).await?;
        let mut blob = vec![0; blob_len];
        self.stream.read_exact(&mut blob).await?;
        // The whole frame is read: the stream is in step even if the JSON is bad.
        self.recv_pending = false;
        let message = serde_json::from_slice(&json).map_err(WireError::Decode)?;
        Ok(Frame { message, blob, fds })
    }

    /// Reads exactly the header with `recvmsg`, collecting descriptors from every call into
    /// `fds`. `None` if the peer closed the socket before the first header byte.
    async fn recv_header(
        &self,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Option<[u8; HEADER_LEN]>, WireError> {
        let mut header = [0; HEADER_LEN];
        let mut filled = 0;
        let socket = self.stream.as_fd();
        while let Some(rest) = header.get_mut(filled..).filter(|rest| !rest.is_empty()) {
            let msg = self
                .stream
                .async_io(Interest::READABLE, || recv_part(socket, rest, fds))
                .await?;
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                return Err(WireError::FdsTruncated);
            }
            if fds.len() > MAX_FDS {
                return Err(WireError::TooManyFds(fds.len()));
            }
            if msg.bytes == 0 {
                if filled == 0 {
                    return Ok(None);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            filled = filled.saturating_add(msg.bytes);
        }
        Ok(Some(header))
    }
}

/// Both ends of a new handover socket, for tests.
pub fn pair() -> io::Result<(Channel, Channel)> {
    let (a, b) = UnixStream::pair()?;
    Ok((Channel::new(a), Channel::new(b)))
}

/// One `recvmsg` into `buf` (close-on-exec descriptors), moving the descriptors it brought into
/// `fds`.
fn recv_part(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<RecvMsg> {
    let mut space = [MaybeUninit::uninit(); CMSG_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = retry_eintr(|| {
        recvmsg(
            socket,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
    })?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    Ok(msg)
}

/// Runs a syscall until it is not interrupted by a signal; maps its error to `io::Error`
/// (`WouldBlock` tells tokio to wait for readiness again).
fn retry_eintr<R>(mut call: impl FnMut() -> Result<R, Errno>) -> io::Result<R> {
    loop {
        match call() {
            Err(Errno::INTR) => {}
            result => return result.map_err(io::Error::from),
        }
    }
}

/// The header of a frame with these lengths.
fn encode_header(json_len: u32, blob_len: u64) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    let fields = MAGIC
        .to_le_bytes()
        .into_iter()
        .chain(json_len.to_le_bytes())
        .chain(blob_len.to_le_bytes());
    for (byte, field) in header.iter_mut().zip(fields) {
        *byte = field;
    }
    header
}

/// The JSON and blob lengths of a received header, checked against the magic and the limits.
fn decode_header(header: [u8; HEADER_LEN]) -> Result<(usize, usize), WireError> {
    let [
        m0,
        m1,
        m2,
        m3,
        j0,
        j1,
        j2,
        j3,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = header;
    let magic = u32::from_le_bytes([m0, m1, m2, m3]);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let json_len = u64::from(u32::from_le_bytes([j0, j1, j2, j3]));
    let blob_len = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    Ok((
        announced_len("message", json_len, MAX_MESSAGE)?,
        announced_len("blob", blob_len, MAX_BLOB)?,
    ))
}

/// `len` as a `u64` if it is within `max`.
fn checked_len(what: &'static str, len: usize, max: usize) -> Result<u64, WireError> {
    if len > max {
        return Err(too_large(what, len, max));
    }
    u64::try_from(len).map_err(|_| too_large(what, len, max))
}

/// An announced `len` as a `usize` if it is within `max`.
fn announced_len(what: &'static str, len: u64, max: usize) -> Result<usize, WireError> {
    let max_u64 = u64::try_from(max).unwrap_or(u64::MAX);
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(WireError::TooLarge {
            what,
            len,
            max: max_u64,
        }),
    }
}

/// The [`WireError::TooLarge`] for a local length.
fn too_large(what: &'static str, len: impl TryInto<u64>, max: usize) -> WireError {
    WireError::TooLarge {
        what,
        len: len.try_into().unwrap_or(u64::MAX),
        max: u64::try_from(max).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        reason = "test code, panics are failures"
    )]

    use std::fs::File;
    use std::io::{Read, Write};
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use tokio::time::timeout;

    use super::*;

    /// A message like the handover's.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hello {
        id: String,
        vcpus: u32,
        tags: Vec<String>,
    }

    fn hello(id: &str) -> Hello {
        Hello {
            id: id.to_owned(),
            vcpus: 2,
            tags: vec!["a".into(), "b".into()],
        }
    }

    /// `n` pipes, each with a distinct byte already written: returns the read ends.
    fn marked_pipes(n: u8) -> Vec<OwnedFd> {
        (0..n)
            .map(|i| {
                let (reader, mut writer) = std::io::pipe().unwrap();
                writer.write_all(&[0xa0 + i]).unwrap();
                OwnedFd::from(reader)
            })
            .collect()
    }

    /// Checks the received fds are the pipes of [`marked_pipes`], in order, close-on-exec.
    fn check_marked(fds: Vec<OwnedFd>, n: u8) {
        assert_eq!(fds.len(), usize::from(n));
        for (i, fd) in fds.into_iter().enumerate() {
            let flags = rustix::io::fcntl_getfd(&fd).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
            let mut byte = [0];
            File::from(fd).read_exact(&mut byte).unwrap();
            assert_eq!(usize::from(byte[0]), 0xa0 + i);
        }
    }

    fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
        fds.iter().map(AsFd::as_fd).collect()
    }

    #[tokio::test]
    async fn round_trip_message_only() {
        let (mut a, mut b) = pair().unwrap();
        a.send(&hello("x"), &[], &[]).await.unwrap();
        let frame: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!(frame.message, hello("x"));
        assert!(frame.blob.is_empty());
        assert!(frame.fds.is_empty());
    }

    #[tokio::test]
    async fn large_blob_with_fds() {
        let (mut a, mut b) = pair().unwrap();
        let blob: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 251) as u8).collect();
        let pipes = marked_pipes(3);
        let fds = borrow(&pipes);
        let message = hello("big");
        let (sent, received) = tokio::join!(a.send(&message, &blob, &fds), b.recv::<Hello>());
        sent.unwrap();
        let frame = received.unwrap();
        assert_eq!(frame.message, hello("big"));
        assert!(frame.blob == blob, "blob differs");
        check_marked(frame.fds, 3);
    }

    #[tokio::test]
    async fn frames_in_a_row_keep_their_fds() {
        let (mut a, mut b) = pair().unwrap();
        let pipes = marked_pipes(2);
        let more = marked_pipes(1);
        // Queued back to back before any is read: the kernel must not hand one frame's fds to
        // another's read.
        a.send(&hello("0"), b"no fds", &[]).await.unwrap();
        a.send(&hello("1"), b"two", &borrow(&pipes)).await.unwrap();
        a.send(&hello("2"), &[], &borrow(&more)).await.unwrap();
        a.send(&hello("3"), &[], &[]).await.unwrap();
        b.send(&hello("back"), b"reply", &[]).await.unwrap();

        let f0: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!(
            (f0.message.id.as_str(), f0.blob.as_slice(), f0.fds.len()),
            ("0", &b"no fds"[..], 0)
        );
        let f1: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!(
            (f1.message.id.as_str(), f1.blob.as_slice()),
            ("1", &b"two"[..])
        );
        check_marked(f1.fds, 2);
        let f2: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!(f2.message.id, "2");
        check_marked(f2.fds, 1);
        let f3: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!((f3.message.id.as_str(), f3.fds.len()), ("3", 0));

        let back: Frame<Hello> = a.recv().await.unwrap();
        assert_eq!(
            (back.message.id.as_str(), back.blob.as_slice()),
            ("back", &b"reply"[..])
        );
    }

    #[tokio::test]
    async fn peer_close_at_boundary_is_closed() {
        let (mut a, mut b) = pair().unwrap();
        a.send(&hello("last"), &[], &[]).await.unwrap();
        drop(a);
        let last: Frame<Hello> = b.recv().await.unwrap();
        assert_eq!(last.message.id, "last");
        assert!(matches!(b.recv::<Hello>().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn peer_close_inside_frame_is_unexpected_eof() {
        let (mut a, mut b) = pair().unwrap();
        // A header announcing 10 bytes of JSON, then only 3 of them.
        a.stream.write_all(&encode_header(10, 0)).await.unwrap();
        a.stream.write_all(b"{\"a").await.unwrap();
        drop(a);
        let err = b.recv::<Hello>().await.unwrap_err();
        assert!(
            matches!(&err, WireError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        assert!(matches!(b.recv::<Hello>().await, Err(WireError::Broken)));
    }

    #[tokio::test]
    async fn oversized_header_fails_before_reading_body() {
        let (mut a, mut b) = pair().unwrap();
        let over = u32::try_from(MAX_MESSAGE).unwrap() + 1;
        // No body follows and `a` stays open: a receiver that tried to read it would hang.
        a.stream.write_all(&encode_header(over, 0)).await.unwrap();
        let err = timeout(Duration::from_secs(5), b.recv::<Hello>())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { what: "message", len, .. } if len == u64::from(over)),
            "{err:?}"
        );
        assert!(matches!(b.recv::<Hello>().await, Err(WireError::Broken)));

        let (mut a, mut b) = pair().unwrap();
        a.stream
            .write_all(&encode_header(0, u64::MAX))
            .await
            .unwrap();
        let err = timeout(Duration::from_secs(5), b.recv::<Hello>())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    what: "blob",
                    len: u64::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn oversized_send_writes_nothing() {
        let (mut a, mut b) = pair().unwrap();
        let blob = vec![0; MAX_BLOB + 1];
        let err = a.send(&hello("x"), &blob, &[]).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { what: "blob", .. }),
            "{err:?}"
        );
        // The channel is still in step.
        a.send(&hello("ok"), &[], &[]).await.unwrap();
        assert_eq!(b.recv::<Hello>().await.unwrap().message.id, "ok");
    }

    #[tokio::test]
    async fn too_many_fds_on_send() {
        let (mut a, _b) = pair().unwrap();
        let pipes = marked_pipes(1);
        let fds = vec![pipes[0].as_fd(); MAX_FDS + 1];
        let err = a.send(&hello("x"), &[], &fds).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooManyFds(n) if n == MAX_FDS + 1),
            "{err:?}"
        );
    }

    /// Sends a header and `{}` with `count` copies of one fd, skipping the sender's check.
    fn send_raw_fds(a: &Channel, count: usize) {
        let pipes = marked_pipes(1);
        let fds = vec![pipes[0].as_fd(); count];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(count))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let header = encode_header(2, 0);
        let iov = [IoSlice::new(&header), IoSlice::new(b"{}")];
        sendmsg(&a.stream, &iov, &mut control, SendFlags::empty()).unwrap();
    }

    #[tokio::test]
    async fn too_many_fds_on_the_wire() {
        // Just over: the control space has alignment slack, so the kernel delivers them all.
        let (a, mut b) = pair().unwrap();
        send_raw_fds(&a, MAX_FDS + 1);
        let err = b.recv::<Hello>().await.unwrap_err();
        assert!(
            matches!(err, WireError::TooManyFds(n) if n == MAX_FDS + 1),
            "{err:?}"
        );
        // Far over: the kernel truncates the control message.
        let (a, mut b) = pair().unwrap();
        send_raw_fds(&a, 2 * MAX_FDS);
        let err = b.recv::<Hello>().await.unwrap_err();
        assert!(matches!(err, WireError::FdsTruncated), "{err:?}");
    }

    #[tokio::test]
    async fn bad_magic() {
        let (mut a, mut b) = pair().unwrap();
        let mut header = encode_header(2, 0);
        header[0] ^= 0xff;
        a.stream.write_all(&header).await.unwrap();
        let err = b.recv::<Hello>().await.unwrap_err();
        assert!(
            matches!(err, WireError::BadMagic(m) if m == MAGIC ^ 0xff),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bad_json_keeps_the_channel_in_step() {
        let (mut a, mut b) = pair().unwrap();
        a.send(&"not a Hello", b"blob", &[]).await.unwrap();
        a.send(&hello("next"), &[], &[]).await.unwrap();
        assert!(matches!(b.recv::<Hello>().await, Err(WireError::Decode(_))));
        assert_eq!(b.recv::<Hello>().await.unwrap().message.id, "next");
    }

    #[test]
    fn header_layout() {
        let header = encode_header(0x0102_0304, 0x0506_0708_090a_0b0c);
        assert_eq!(&header[..4], b"HXBS");
        assert_eq!(header[4..8], [4, 3, 2, 1]);
        assert_eq!(header[8..], [0x0c, 0x0b, 0x0a, 9, 8, 7, 6, 5]);
        assert_eq!(
            decode_header(header).unwrap_err().to_string(),
            "Handover frame's message of 16909060 bytes is over the limit of 16777216"
        );
    }
}
