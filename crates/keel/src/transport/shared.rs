//! A TCP stream that a fan-out may write to while its connection's task is idle
//! (write-through), and the handle the fan-out writes with.
//!
//! Why it exists: queueing a frame and waking the task that owns the socket costs
//! a broadcast more, per subscriber, than the write itself (the task's header,
//! the run queue, the driver's poll; see `docs/benchmarks.md`). When a
//! subscriber's task has nothing to write and nothing queued, the fan-out writes
//! the frame itself, with one non-waiting `send`, and the task is not woken at
//! all. Whether it may is decided under the send queue's lock (`queue`): the task
//! offers the [`Writer`] there when it goes idle and takes it back before it writes
//! anything of its own, so the two never write at once and frames keep their order.
//!
//! Only sockets answered by Keel's [`Listener`](crate::Listener) without hyper
//! (plain TCP, no extension) have one. It must not wait, buffer or frame: it
//! writes bytes it is given, as far as the kernel takes them at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The stream under a plain WebSocket that a fan-out may write through: the task
/// reads its half as a plain `TcpStream` would (a short read marks the socket not
/// readable, so the next poll costs no syscall) and shares the write half.
#[derive(Debug)]
pub(crate) struct SharedTcp {
    read: OwnedReadHalf,
    write: Writer,
}

impl SharedTcp {
    /// Splits `tcp` into the task's read half and the shared write half.
    pub(crate) fn new(tcp: TcpStream) -> Self {
        let (read, write) = tcp.into_split();
        SharedTcp {
            read,
            write: Writer(Arc::new(write)),
        }
    }

    /// The handle a fan-out writes with.
    pub(crate) fn writer(&self) -> &Writer {
        &self.write
    }
}

/// The write half of a [`SharedTcp`], cheap to clone; held by a send queue only
/// while the connection's task is idle.
#[derive(Debug, Clone)]
pub(crate) struct Writer(Arc<OwnedWriteHalf>);

impl Writer {
    /// Writes as much of `frame` as the socket takes now; `WouldBlock` if it takes
    /// nothing (tokio then waits for the kernel to say it has room again).
    pub(crate) fn try_write(&self, frame: &[u8]) -> io::Result<usize> {
        self.0.try_write(frame)
    }
}

/// A text message framed once for write-through: the server frame's header
/// (unmasked, FIN set) and the payload in one buffer, and where the payload starts.
#[derive(Debug, Clone)]
pub(crate) struct Framed {
    pub(crate) bytes: Bytes,
    pub(crate) header_len: usize,
}

impl Framed {
    /// Frames `payload` as a text message (one copy, once per publication).
    pub(crate) fn text(payload: &[u8]) -> Self {
        let (head, n) = super::plain::header(super::plain::OP_TEXT, payload.len());
        let mut v = Vec::with_capacity(n + payload.len());
        v.extend_from_slice(&head[..n]);
        v.extend_from_slice(payload);
        Framed {
            bytes: Bytes::from(v),
            header_len: n,
        }
    }

    /// The payload alone, sharing the buffer (for the send queue).
    pub(crate) fn payload(&self) -> Bytes {
        self.bytes.slice(self.header_len..)
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let w: &TcpStream = (*self.write.0).as_ref();
        loop {
            ready!(w.poll_write_ready(cx))?;
            match w.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let w: &TcpStream = (*self.write.0).as_ref();
        loop {
            ready!(w.poll_write_ready(cx))?;
            match w.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Only the task shuts down, and only once no queue holds the writer.
        match Arc::get_mut(&mut self.write.0) {
            Some(w) => Pin::new(w).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}
