//! RFC 6455 framing of our own, for connections that negotiated no extension.
//!
//! Why it exists: an idle connection is what Keel holds most of, and yawc's socket
//! struct (about 620 bytes inside every connection task) plus the read and write
//! buffers it keeps were a third of an idle connection's memory. This socket is
//! 144 bytes and holds no buffer while idle: reads land in a stack buffer and
//! only the tail of an incomplete frame is kept on the heap; frames are written
//! from a stack buffer or straight from their shared buffers, and the write
//! buffer holds only what the kernel did not take, given back once flushed.
//! Connections that negotiate permessage-deflate still go through yawc (see the
//! parent module).
//!
//! It moves and checks frames (masking, lengths, fragmentation, control frames,
//! UTF-8 of text messages and close reasons, close codes) and answers Ping and
//! Close; it must not learn anything about Keel's protocol.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Batch, Incoming, Outgoing, ReadError, Slot, BATCH_MAX};

/// Bytes read per `read` call into the stack.
const READ_CHUNK: usize = 4096;

/// Past this much waiting to be written, `poll_ready` writes it out before taking
/// more: a slow reader's backlog stays in the send queue (where the limits see it),
/// not here.
const WRITE_HIGH_WATER: usize = 8 * 1024;

/// A batch of frames up to this size is copied into a stack buffer and sent with
/// one plain write; a larger one is copied into a buffer made for the write, or,
/// if its frames are large ([`VECTORED_FRAME`]), goes out in a vectored write from
/// their own buffers. A `writev` costs the
/// kernel about twice what a `send` does per call (`vfs_writev`, `fdget_pos`), and
/// a busy subscriber's batch of publications is a few KiB: at 2 KiB nearly every
/// write at 1 M deliveries/s was a `writev`. Copying 16 KiB costs less than that
/// difference (uWebSockets corks into a buffer of the same size).
const STACK_WRITE: usize = 16 * 1024;

/// A batch past [`STACK_WRITE`] whose frames average at least this much goes out in
/// a vectored write from the frames' own buffers; one of smaller frames is copied.
const VECTORED_FRAME: usize = 4096;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A frame header as it came, not yet checked.
struct Header {
    /// Bytes up to the payload (2 to 14).
    header_len: usize,
    fin: bool,
    /// RSV1-3, shifted down.
    rsv: u8,
    opcode: u8,
    masked: bool,
    len: u64,
    mask: [u8; 4],
}

impl Header {
    /// Reads a header from the start of `b`; `None` until all of it is there.
    fn parse(b: &[u8]) -> Option<Header> {
        let (&b0, &b1) = (b.first()?, b.get(1)?);
        let (len, mut at) = match b1 & 0x7F {
            126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as u64, 4),
            127 => {
                let n: [u8; 8] = b.get(2..10)?.try_into().ok()?;
                (u64::from_be_bytes(n), 10)
            }
            n => (n as u64, 2),
        };
        let masked = b1 & 0x80 != 0;
        let mut mask = [0u8; 4];
        if masked {
            mask.copy_from_slice(b.get(at..at + 4)?);
            at += 4;
        }
        Some(Header {
            header_len: at,
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0F,
            masked,
            len,
            mask,
        })
    }
}

/// What parsing found: a message, nothing yet, or a protocol error (close code
/// and detail).
type Parsed = Result<Option<Incoming>, (u16, String)>;

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Frames flow both ways.
    Open,
    /// A protocol error was reported: incoming frames are read and dropped until
    /// the peer's Close (or the end of the stream).
    Failed,
    /// The peer's Close arrived: once our Close is flushed, the read side reports
    /// the end.
    PeerClosed,
}

/// A message being reassembled from fragments.
struct Partial {
    opcode: u8,
    data: Vec<u8>,
    /// For text: how many leading bytes are known to be valid UTF-8.
    checked: usize,
}

/// A server-side WebSocket over `S`, without extensions.
pub(crate) struct PlainSocket<S> {
    io: S,
    /// Read but not yet consumed: the start of an incomplete frame, or frames that
    /// arrived together. Empty (and unallocated) between messages, usually.
    rbuf: Vec<u8>,
    /// Where the unconsumed part of `rbuf` starts.
    rpos: usize,
    /// Encoded frames not yet written, from `wpos` on.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Fragments of a message, while one is arriving.
    partial: Option<Box<Partial>>,
    /// The largest message accepted (1009 above it).
    max_message: usize,
    /// Our Close frame is in `wbuf` (or written): nothing more is sent.
    close_sent: bool,
    state: State,
    /// Bytes still to drop: the rest of a frame that failed, or of one dropped
    /// while waiting for the peer's Close.
    skip: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PlainSocket<S> {
    /// Wraps an upgraded stream.
    pub(crate) fn new(io: S, max_message: usize) -> Self {
        PlainSocket {
            io,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            partial: None,
            max_message,
            close_sent: false,
            state: State::Open,
            skip: 0,
        }
    }

    /// Polls the next complete message (Ping and Pong show as `Control`).
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, ReadError>> {
        loop {
            if self.state == State::PeerClosed {
                // Our answer (or our own Close) must reach the peer before the end.
                return match self.poll_flush(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(Err(ReadError::Closed)),
                };
            }
            if !self.rbuf.is_empty() {
                let buf = std::mem::take(&mut self.rbuf);
                let (used, parsed) = self.parse(&buf[self.rpos..]);
                self.rbuf = buf;
                self.consume(used);
                match self.report(parsed) {
                    Some(r) => return Poll::Ready(r),
                    None if self.state == State::PeerClosed => continue,
                    None => {}
                }
            }
            // Not zeroed: this runs at every wake-up, most of which find nothing
            // to read, and clearing 4 KiB each time showed in fan-out profiles.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(ReadError::Closed)),
                Poll::Ready(Ok(())) => {}
            }
            let got = buf.filled();
            if got.is_empty() {
                return Poll::Ready(Err(ReadError::Closed));
            }
            if !self.rbuf.is_empty() {
                // The rest of a frame begun earlier.
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
                self.rbuf.extend_from_slice(got);
                continue;
            }
            // The usual case: parse straight from the stack; keep only a remainder.
            let (used, parsed) = self.parse(got);
            if used < got.len() {
                self.rbuf.extend_from_slice(&got[used..]);
            }
            if let Some(r) = self.report(parsed) {
                return Poll::Ready(r);
            }
        }
    }

    /// Turns a parse result into what `poll_read` returns, if anything.
    fn report(&mut self, parsed: Parsed) -> Option<Result<Incoming, ReadError>> {
        match parsed {
            Ok(Some(incoming)) => Some(Ok(incoming)),
            Ok(None) => None,
            Err((code, detail)) => {
                self.state = State::Failed;
                self.partial = None;
                Some(Err(ReadError::Protocol(code, detail)))
            }
        }
    }

    /// Takes whole frames from the front of `buf` until one makes a message, more
    /// bytes are needed, or one breaks the protocol. Returns the bytes used.
    fn parse(&mut self, buf: &[u8]) -> (usize, Parsed) {
        let mut used = 0;
        loop {
            if self.state == State::PeerClosed {
                return (used, Ok(None));
            }
            let rest = &buf[used..];
            if self.skip > 0 {
                // The rest of a frame that failed, or one dropped after a failure.
                let n = self.skip.min(rest.len() as u64) as usize;
                used += n;
                self.skip -= n as u64;
                if self.skip > 0 {
                    return (used, Ok(None));
                }
                continue;
            }
            let Some(h) = Header::parse(rest) else {
                return (used, Ok(None));
            };
            let total = (h.header_len as u64).saturating_add(h.len);
            if self.state == State::Failed {
                // Dropping frames until the peer's Close; never buffer one.
                if h.opcode != OP_CLOSE || h.len > 125 {
                    self.skip = total;
                    continue;
                }
            } else if let Err(e) = self.check(&h) {
                self.skip = total;
                return (used, Err(e));
            }
            // `check` bounded the length by `max_message`.
            let total = total as usize;
            if rest.len() < total {
                return (used, Ok(None));
            }
            let mut payload = rest[h.header_len..total].to_vec();
            used += total;
            if self.state == State::Failed {
                self.state = State::PeerClosed;
                return (used, Ok(None));
            }
            unmask(&mut payload, h.mask);
            match self.on_frame(h.fin, h.opcode, payload) {
                Ok(None) => {}
                other => return (used, other),
            }
        }
    }

    /// Checks a client frame's header against RFC 6455 and the size limit.
    fn check(&self, h: &Header) -> Result<(), (u16, String)> {
        if h.rsv != 0 {
            return Err((1002, "reserved bits set without an extension".into()));
        }
        match h.opcode {
            OP_CONT | OP_TEXT | OP_BINARY => {}
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err((1002, "fragmented control frame".into()));
                }
                if h.len > 125 {
                    return Err((1002, "control frame over 125 bytes".into()));
                }
            }
            other => return Err((1002, format!("reserved opcode {other:#x}"))),
        }
        if !h.masked {
            return Err((1002, "client frames must be masked".into()));
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
        if h.opcode < OP_CLOSE && so_far.saturating_add(h.len) > self.max_message as u64 {
            return Err((1009, "message too large".into()));
        }
        Ok(())
    }

    /// Drops `n` bytes from the front of `rbuf`, giving its memory back when empty.
    fn consume(&mut self, n: usize) {
        self.rpos += n;
        if self.rpos >= self.rbuf.len() {
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
    }

    /// One checked, unmasked frame: a message to report, or `None`.
    fn on_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    ) -> Result<Option<Incoming>, (u16, String)> {
        match opcode {
            OP_PING => {
                if !self.close_sent {
                    self.encode(OP_PONG, &payload);
                }
                Ok(Some(Incoming::Control))
            }
            OP_PONG => Ok(Some(Incoming::Control)),
            OP_CLOSE => {
                let code = close_code(&payload)?;
                if !self.close_sent {
                    // Echo the status code (RFC 6455 section 5.5.1).
                    let echo = code.map(u16::to_be_bytes);
                    self.encode(OP_CLOSE, echo.as_ref().map_or(&[][..], |e| &e[..]));
                    self.close_sent = true;
                }
                self.state = State::PeerClosed;
                Ok(Some(Incoming::Close(code)))
            }
            OP_CONT => {
                let Some(mut partial) = self.partial.take() else {
                    return Err((1002, "continuation without a message".into()));
                };
                partial.data.extend_from_slice(&payload);
                if partial.opcode == OP_TEXT {
                    check_utf8_prefix(&mut partial, fin)?;
                }
                if fin {
                    return finish(partial.opcode, partial.data).map(Some);
                }
                self.partial = Some(partial);
                Ok(None)
            }
            _ => {
                if self.partial.is_some() {
                    return Err((1002, "new message inside a fragmented one".into()));
                }
                if fin {
                    return finish(opcode, payload).map(Some);
                }
                let mut partial = Box::new(Partial {
                    opcode,
                    data: payload,
                    checked: 0,
                });
                if opcode == OP_TEXT {
                    check_utf8_prefix(&mut partial, false)?;
                }
                self.partial = Some(partial);
                Ok(None)
            }
        }
    }

    /// Appends a server frame (unmasked, FIN set) to the write buffer.
    fn encode(&mut self, opcode: u8, payload: &[u8]) {
        let (head, n) = header(opcode, payload.len());
        self.wbuf.reserve(n + payload.len());
        self.wbuf.extend_from_slice(&head[..n]);
        self.wbuf.extend_from_slice(payload);
    }

    /// Sends a batch of frames. When nothing is buffered ahead of them and the
    /// batch holds no Close, they are written at once without touching the heap:
    /// a small batch (the usual one, a frame or two) is copied into a buffer on
    /// the stack and sent with one plain write; a larger one goes in one vectored
    /// write straight from the frames' own buffers (a vectored write costs more
    /// per call than a plain one, which a large batch amortises). Whatever the
    /// socket does not take at once (all of it, otherwise) is encoded into the
    /// write buffer for `poll_flush`, which has registered for writability if
    /// the socket was full.
    pub(crate) fn send_batch(&mut self, cx: &mut Context<'_>, batch: &mut Batch) -> Result<(), ()> {
        let mut written = if self.wpos == self.wbuf.len() && !self.close_sent {
            self.write_now(cx, batch)?
        } else {
            0
        };
        for frame in batch.drain() {
            if self.close_sent {
                // Nothing goes after our Close.
                continue;
            }
            let Some((op, payload)) = simple(&frame) else {
                self.start_send(frame.into_outgoing())?;
                continue;
            };
            let (head, n) = header(op, payload.len());
            let total = n + payload.len();
            if written >= total {
                written -= total;
                continue;
            }
            // Not (or not wholly) written: keep the rest.
            self.wbuf.reserve(total - written);
            if written < n {
                self.wbuf.extend_from_slice(&head[written..n]);
                self.wbuf.extend_from_slice(payload);
            } else {
                self.wbuf.extend_from_slice(&payload[written - n..]);
            }
            written = 0;
        }
        Ok(())
    }

    /// The unbuffered write `send_batch` tries first; returns the bytes the socket
    /// took (0 if the batch holds a Close or the socket is full).
    fn write_now(&mut self, cx: &mut Context<'_>, batch: &Batch) -> Result<usize, ()> {
        let mut total = 0;
        for frame in batch.iter() {
            let Some((_, payload)) = simple(frame) else {
                return Ok(0);
            };
            total += header_len(payload.len()) + payload.len();
        }
        // The copy's buffer is zeroed first (no unsafe here), so it comes in a few
        // sizes: a small batch does not pay for clearing 16 KiB.
        let sent = if total <= 2048 {
            send_copied::<2048, S>(&mut self.io, cx, batch)
        } else if total <= 4096 {
            send_copied::<4096, S>(&mut self.io, cx, batch)
        } else if total <= 8192 {
            send_copied::<8192, S>(&mut self.io, cx, batch)
        } else if total <= STACK_WRITE {
            send_copied::<STACK_WRITE, S>(&mut self.io, cx, batch)
        } else if self.io.is_write_vectored() && total / batch.len().max(1) >= VECTORED_FRAME {
            // Large frames: written from their own buffers, not copied.
            let mut heads = [[0u8; 10]; BATCH_MAX];
            let mut lens = [0usize; BATCH_MAX];
            for ((frame, head), len) in batch.iter().zip(&mut heads).zip(&mut lens) {
                if let Some((op, payload)) = simple(frame) {
                    (*head, *len) = header(op, payload.len());
                }
            }
            let mut iov = [io::IoSlice::new(&[]); 2 * BATCH_MAX];
            let mut k = 0;
            for ((frame, head), len) in batch.iter().zip(&heads).zip(&lens) {
                if let Some((_, payload)) = simple(frame) {
                    iov[k] = io::IoSlice::new(&head[..*len]);
                    iov[k + 1] = io::IoSlice::new(payload);
                    k += 2;
                }
            }
            Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..k])
        } else {
            // Many small frames (a subscriber catching up): one copy into a buffer
            // made for this write, since the kernel copies a `writev`'s many short
            // buffers at a cost per buffer (`_copy_from_iter` was a fifth of a
            // saturated server's samples).
            let mut buf = Vec::with_capacity(total);
            for (op, payload) in batch.iter().filter_map(simple) {
                let (head, n) = header(op, payload.len());
                buf.extend_from_slice(&head[..n]);
                buf.extend_from_slice(payload);
            }
            Pin::new(&mut self.io).poll_write(cx, &buf)
        };
        match sent {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Err(()),
            Poll::Ready(Ok(n)) => Ok(n),
            Poll::Pending => Ok(0),
        }
    }

    /// Whether another frame may be queued now; writes out what is buffered when
    /// the buffer is past its high-water mark.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if self.wbuf.len() - self.wpos < WRITE_HIGH_WATER {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Encodes `frame` into the write buffer. After our Close, frames are dropped.
    pub(crate) fn start_send(&mut self, frame: Outgoing) -> Result<(), ()> {
        if self.close_sent {
            return Ok(());
        }
        match frame {
            Outgoing::Text(b) => self.encode(OP_TEXT, &b),
            Outgoing::Binary(b) => self.encode(OP_BINARY, &b),
            Outgoing::Ping => self.encode(OP_PING, &[]),
            Outgoing::Close(code, reason) => {
                let reason = super::truncate(&reason, 123);
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(reason.as_bytes());
                self.encode(OP_CLOSE, &payload);
                self.close_sent = true;
            }
        }
        Ok(())
    }

    /// Writes what is buffered; `Ready(Ok)` once all of it is written. The emptied
    /// buffer's memory is given back: an idle connection holds none.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => self.wpos += n,
            }
        }
        if self.wbuf.capacity() > 0 {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        Pin::new(&mut self.io)
            .poll_flush(cx)
            .map_err(|_: io::Error| ())
    }
}

/// Copies a batch's frames (headers and payloads, at most `N` bytes in all) into a
/// stack buffer and writes them with one plain write.
fn send_copied<const N: usize, S: AsyncWrite + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    batch: &Batch,
) -> Poll<io::Result<usize>> {
    let mut buf = [0u8; N];
    let mut at = 0;
    for (op, payload) in batch.iter().filter_map(simple) {
        let (head, n) = header(op, payload.len());
        buf[at..at + n].copy_from_slice(&head[..n]);
        at += n;
        buf[at..at + payload.len()].copy_from_slice(payload);
        at += payload.len();
    }
    Pin::new(io).poll_write(cx, &buf[..at])
}

/// How long the header of a server frame (unmasked) with `len` payload bytes is.
fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// A server frame's header (unmasked, FIN set) and its length.
fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// The opcode and payload of a frame that needs no encoding of its own (all but
/// Close, whose payload is built from its code and reason).
fn simple(frame: &Slot) -> Option<(u8, &[u8])> {
    match frame {
        Slot::Shared(b) => Some((OP_TEXT, b)),
        Slot::Own(o) => simple_owned(o),
    }
}

/// [`simple`] for an owned frame.
fn simple_owned(frame: &Outgoing) -> Option<(u8, &[u8])> {
    match frame {
        Outgoing::Text(b) => Some((OP_TEXT, b)),
        Outgoing::Binary(b) => Some((OP_BINARY, b)),
        Outgoing::Ping => Some((OP_PING, &[])),
        Outgoing::Close(..) => None,
    }
}

/// Checks the UTF-8 of a text message's fragments as they arrive, so an invalid
/// sequence fails the connection at once, not at the message's end.
fn check_utf8_prefix(partial: &mut Partial, fin: bool) -> Result<(), (u16, String)> {
    let rest = &partial.data[partial.checked..];
    match std::str::from_utf8(rest) {
        Ok(_) => partial.checked = partial.data.len(),
        // An incomplete sequence at the end may be finished by the next fragment.
        Err(e) if e.error_len().is_none() && !fin => partial.checked += e.valid_up_to(),
        Err(_) => return Err((1007, "invalid utf-8 in a text message".into())),
    }
    Ok(())
}

/// A whole message. A text message's UTF-8 is checked here, in the one pass that
/// also makes the `String` the connection hands to its handler.
fn finish(opcode: u8, data: Vec<u8>) -> Result<Incoming, (u16, String)> {
    if opcode == OP_TEXT {
        String::from_utf8(data)
            .map(Incoming::Text)
            .map_err(|_| (1007, "invalid utf-8 in a text message".into()))
    } else {
        Ok(Incoming::Binary(Bytes::from(data)))
    }
}

/// A Close frame's status code, checked (RFC 6455 section 7.4), and its reason's
/// UTF-8.
fn close_code(payload: &[u8]) -> Result<Option<u16>, (u16, String)> {
    match payload.len() {
        0 => Ok(None),
        1 => Err((1002, "close frame with a one-byte payload".into())),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
            if !allowed {
                return Err((1002, format!("close code {code} is not allowed")));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err((1007, "invalid utf-8 in a close reason".into()));
            }
            Ok(Some(code))
        }
    }
}

/// XORs `data` with the masking key, eight bytes at a time where it can.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A client frame: masked, with the given first byte (FIN, RSV, opcode).
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        // The server's length encoding (checked on its own by `server_frame`'s
        // decoding below), with this first byte and the mask bit.
        let (mut head, n) = header(0, payload.len());
        head[0] = b0;
        head[1] |= 0x80;
        let mut f = head[..n].to_vec();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn pair(max: usize) -> (PlainSocket<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (PlainSocket::new(a, max), b)
    }

    async fn read(s: &mut PlainSocket<DuplexStream>) -> Result<Incoming, ReadError> {
        poll_fn(|cx| s.poll_read(cx)).await
    }

    async fn flush(s: &mut PlainSocket<DuplexStream>) {
        poll_fn(|cx| s.poll_flush(cx)).await.expect("flush");
    }

    fn text(r: Result<Incoming, ReadError>) -> String {
        match r {
            Ok(Incoming::Text(t)) => t,
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    fn protocol_code(r: Result<Incoming, ReadError>) -> u16 {
        match r {
            Err(ReadError::Protocol(code, _)) => code,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    /// Reads one unmasked server frame: (first byte, payload).
    async fn server_frame<R: AsyncRead + Unpin>(peer: &mut R) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        peer.read_exact(&mut h).await.expect("header");
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => peer.read_u16().await.expect("len16") as usize,
            127 => peer.read_u64().await.expect("len64") as usize,
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        peer.read_exact(&mut p).await.expect("payload");
        (h[0], p)
    }

    #[tokio::test]
    async fn a_frame_arriving_a_byte_at_a_time_is_one_message() {
        let (mut s, mut peer) = pair(1 << 16);
        let frame = client_frame(0x81, "héllo, wörld".as_bytes());
        let writer = tokio::spawn(async move {
            for b in frame {
                peer.write_all(&[b]).await.expect("write");
                tokio::task::yield_now().await;
            }
            peer
        });
        assert_eq!(text(read(&mut s).await), "héllo, wörld");
        let _peer = writer.await.expect("writer");
        assert_eq!(s.rbuf.capacity(), 0, "nothing kept between messages");
    }

    #[tokio::test]
    async fn frames_in_one_write_come_out_in_order_with_sizes_of_every_length_form() {
        let (mut s, mut peer) = pair(1 << 20);
        let big = "x".repeat(70_000);
        let mid = "y".repeat(300);
        let mut all = client_frame(0x81, b"one");
        all.extend(client_frame(0x81, mid.as_bytes()));
        all.extend(client_frame(0x82, &[0, 159, 146, 150]));
        all.extend(client_frame(0x81, big.as_bytes()));
        peer.write_all(&all).await.expect("write");
        assert_eq!(text(read(&mut s).await), "one");
        assert_eq!(text(read(&mut s).await), mid);
        match read(&mut s).await {
            Ok(Incoming::Binary(b)) => assert_eq!(&b[..], &[0, 159, 146, 150]),
            other => panic!("expected binary, got {other:?}"),
        }
        assert_eq!(text(read(&mut s).await), big);
    }

    #[tokio::test]
    async fn fragments_are_joined_and_a_character_may_straddle_them() {
        let (mut s, mut peer) = pair(1 << 16);
        let word = "añb".as_bytes(); // ñ is two bytes: split it
        let mut all = client_frame(0x01, &word[..2]);
        all.extend(client_frame(0x89, b"ping inside")); // control frames may interleave
        all.extend(client_frame(0x80, &word[2..]));
        peer.write_all(&all).await.expect("write");
        assert!(matches!(read(&mut s).await, Ok(Incoming::Control)));
        assert_eq!(text(read(&mut s).await), "añb");
        flush(&mut s).await;
        assert_eq!(
            server_frame(&mut peer).await,
            (0x8A, b"ping inside".to_vec())
        );
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_the_fragment_that_carries_it() {
        let (mut s, mut peer) = pair(1 << 16);
        // The final fragment is never sent: the error must not wait for it.
        peer.write_all(&client_frame(0x01, &[b'o', b'k', 0xff]))
            .await
            .expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1007);
        let (mut s, mut peer) = pair(1 << 16);
        peer.write_all(&client_frame(0x81, &[0xc3, 0x28]))
            .await
            .expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1007);
    }

    #[tokio::test]
    async fn broken_frames_are_protocol_errors() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // not masked
            (vec![0x81, 0x02, b'h', b'i'], 1002),
            // reserved bits without an extension
            (client_frame(0xC1, b"hi"), 1002),
            // reserved opcodes
            (client_frame(0x83, b"hi"), 1002),
            (client_frame(0x8B, b""), 1002),
            // a fragmented ping, an oversized ping
            (client_frame(0x09, b""), 1002),
            (client_frame(0x89, &[0u8; 126]), 1002),
            // a continuation with nothing to continue
            (client_frame(0x80, b"x"), 1002),
            // a close with one byte, a forbidden code, a bad reason
            (client_frame(0x88, &[3]), 1002),
            (client_frame(0x88, &1005u16.to_be_bytes()), 1002),
            (client_frame(0x88, &[0x03, 0xe8, 0xff]), 1007),
        ];
        for (bytes, code) in cases {
            let (mut s, mut peer) = pair(1 << 16);
            peer.write_all(&bytes).await.expect("write");
            assert_eq!(protocol_code(read(&mut s).await), code, "{bytes:02x?}");
        }
        // A new message while a fragmented one is open.
        let (mut s, mut peer) = pair(1 << 16);
        let mut all = client_frame(0x01, b"a");
        all.extend(client_frame(0x81, b"b"));
        peer.write_all(&all).await.expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1002);
    }

    #[tokio::test]
    async fn too_large_is_refused_from_the_header_alone() {
        let (mut s, mut peer) = pair(1000);
        // Only the header of a 1 GB frame is sent.
        let header = [0x82, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4];
        peer.write_all(&header).await.expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1009);
        // A length at the top of u64 (the RFC says its top bit is 0): refused, and
        // the header plus length does not overflow.
        let (mut s, mut peer) = pair(1000);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        peer.write_all(&header).await.expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1009);
        // And across fragments: 600 + 600 > 1000.
        let (mut s, mut peer) = pair(1000);
        let mut all = client_frame(0x02, &[0u8; 600]);
        all.extend(client_frame(0x80, &[0u8; 600]));
        peer.write_all(&all).await.expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1009);
    }

    #[tokio::test]
    async fn a_peer_close_is_echoed_then_the_read_side_ends() {
        let (mut s, mut peer) = pair(1 << 16);
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        peer.write_all(&client_frame(0x88, &payload))
            .await
            .expect("write");
        assert!(matches!(
            read(&mut s).await,
            Ok(Incoming::Close(Some(4000)))
        ));
        assert!(matches!(read(&mut s).await, Err(ReadError::Closed)));
        assert_eq!(
            server_frame(&mut peer).await,
            (0x88, 4000u16.to_be_bytes().to_vec())
        );
        // Nothing is sent after the Close.
        s.start_send(Outgoing::Text(Bytes::from_static(b"late")))
            .expect("dropped quietly");
        assert!(s.wbuf.is_empty());
    }

    #[tokio::test]
    async fn after_an_error_frames_are_dropped_until_the_peers_close() {
        let (mut s, mut peer) = pair(1 << 16);
        let mut all = vec![0x81, 0x01, b'x']; // unmasked
        all.extend(client_frame(0x81, b"ignored"));
        all.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        peer.write_all(&all).await.expect("write");
        assert_eq!(protocol_code(read(&mut s).await), 1002);
        s.start_send(Outgoing::Close(1002, "protocol error".into()))
            .expect("close");
        assert!(matches!(read(&mut s).await, Err(ReadError::Closed)));
        let (b0, p) = server_frame(&mut peer).await;
        assert_eq!((b0, &p[..2]), (0x88, &1002u16.to_be_bytes()[..]));
    }

    #[tokio::test]
    async fn server_frames_use_each_length_form_and_the_buffer_is_given_back() {
        let (mut s, mut peer) = pair(1 << 20);
        for len in [0usize, 125, 126, 65535, 65536] {
            s.start_send(Outgoing::Text(Bytes::from(vec![b'a'; len])))
                .expect("send");
        }
        s.start_send(Outgoing::Ping).expect("ping");
        s.start_send(Outgoing::Close(1001, "é".repeat(100)))
            .expect("close");
        flush(&mut s).await;
        assert_eq!(
            s.wbuf.capacity(),
            0,
            "an idle connection keeps no write buffer"
        );
        for len in [0usize, 125, 126, 65535, 65536] {
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'a'; len]));
        }
        assert_eq!(server_frame(&mut peer).await, (0x89, vec![]));
        let (b0, p) = server_frame(&mut peer).await;
        assert_eq!(b0, 0x88);
        assert!(p.len() <= 125, "close reason cut to 123 bytes");
        assert!(
            std::str::from_utf8(&p[2..]).is_ok(),
            "cut at a char boundary"
        );
    }

    fn batch_of(frames: Vec<Outgoing>) -> Batch {
        let mut b = Batch::new();
        for f in frames {
            assert!(b.push(Slot::from(f)), "batch full");
        }
        b
    }

    fn send<S: AsyncRead + AsyncWrite + Unpin>(s: &mut PlainSocket<S>, frames: Vec<Outgoing>) {
        let mut b = batch_of(frames);
        let waker = futures::task::noop_waker();
        s.send_batch(&mut Context::from_waker(&waker), &mut b)
            .expect("send_batch");
        assert_eq!(b.len(), 0, "the batch is emptied");
    }

    fn data(len: usize, fill: u8) -> Outgoing {
        Outgoing::Text(Bytes::from(vec![fill; len]))
    }

    /// Over TCP, where vectored writes exist: a small batch goes out from the stack
    /// in one write, a large one in one vectored write; neither leaves a buffer.
    #[tokio::test]
    async fn batches_go_out_at_once_and_leave_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut peer = client.expect("connect");
        let mut s = PlainSocket::new(accepted.expect("accept").0, 1 << 16);
        assert!(s.io.is_write_vectored());

        send(
            &mut s,
            vec![
                data(3, b'a'),
                Outgoing::Ping,
                Outgoing::Binary(Bytes::from_static(&[1, 2, 3])),
            ],
        );
        assert_eq!(s.wbuf.capacity(), 0, "small batch: nothing buffered");
        assert_eq!(server_frame(&mut peer).await, (0x81, b"aaa".to_vec()));
        assert_eq!(server_frame(&mut peer).await, (0x89, vec![]));
        assert_eq!(server_frame(&mut peer).await, (0x82, vec![1, 2, 3]));

        // Each size of copy buffer, filled exactly and overshot by one byte: a
        // frame of 1000 bytes (4-byte header) and one that tops the batch up.
        for total in [2048usize, 2049, 4096, 4097, 8192, 8193, STACK_WRITE] {
            let last = total - 1004 - 4;
            send(&mut s, vec![data(1000, b'c'), data(last, b'd')]);
            assert_eq!(s.wbuf.capacity(), 0, "{total} bytes: nothing buffered");
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'c'; 1000]));
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'd'; last]));
        }

        // Over STACK_WRITE in small frames (a subscriber catching up): copied
        // into one buffer and written with one plain write.
        let many: Vec<Outgoing> = (0..100u8).map(|i| data(300, i)).collect();
        send(&mut s, many);
        let reader = async {
            for i in 0..100u8 {
                assert_eq!(server_frame(&mut peer).await, (0x81, vec![i; 300]));
            }
        };
        let (_, flushed) = tokio::join!(reader, poll_fn(|cx| s.poll_flush(cx)));
        flushed.expect("flush");
        assert_eq!(s.wbuf.capacity(), 0, "flushed buffer given back");

        // Over STACK_WRITE, with every length form: the vectored path.
        let lens = [0usize, 125, 126, 1000, 65535, 65536, 7];
        let on_wire: usize = lens.iter().map(|&n| header(0, n).1 + n).sum();
        send(&mut s, lens.iter().map(|&n| data(n, b'b')).collect());
        assert!(
            s.wbuf.len() < on_wire,
            "the vectored write took part of the batch at once ({} of {on_wire} bytes kept)",
            s.wbuf.len()
        );
        let reader = async {
            for n in lens {
                assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'b'; n]));
            }
        };
        let (_, flushed) = tokio::join!(reader, poll_fn(|cx| s.poll_flush(cx)));
        flushed.expect("flush");
        assert_eq!(s.wbuf.capacity(), 0, "flushed buffer given back");
    }

    /// A socket that takes only part of a batch, cutting a frame inside its
    /// header: the rest is kept and goes out in order, later batches queue behind
    /// it, and nothing follows our Close.
    #[tokio::test]
    async fn what_the_socket_does_not_take_is_kept_in_order() {
        // The stream takes 100 bytes, then waits for the peer to read.
        let (a, mut peer) = tokio::io::duplex(100);
        let mut s = PlainSocket::new(a, 1 << 16);
        // 2 + 97 = 99 bytes, then a frame with a 4-byte header: the cut falls
        // after its first byte.
        send(&mut s, vec![data(97, b'x'), data(200, b'y'), data(5, b'z')]);
        assert!(!s.wbuf.is_empty(), "the rest was kept");
        send(&mut s, vec![data(3000, b'w')]);
        send(
            &mut s,
            vec![Outgoing::Close(1000, "bye".into()), data(1, b'l')],
        );
        let reader = async {
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'x'; 97]));
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'y'; 200]));
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'z'; 5]));
            assert_eq!(server_frame(&mut peer).await, (0x81, vec![b'w'; 3000]));
            let (b0, p) = server_frame(&mut peer).await;
            assert_eq!(
                (b0, &p[..2], &p[2..]),
                (0x88, &1000u16.to_be_bytes()[..], &b"bye"[..])
            );
        };
        let (_, flushed) = tokio::join!(reader, poll_fn(|cx| s.poll_flush(cx)));
        flushed.expect("flush");
        // Nothing after the Close: the next read on the peer's side finds the
        // stream empty once the socket is dropped.
        drop(s);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.expect("read rest");
        assert!(rest.is_empty(), "a frame followed our Close: {rest:?}");
    }

    /// A Pong the read side queued goes out before a batch sent after it.
    #[tokio::test]
    async fn a_batch_waits_behind_an_answer_already_buffered() {
        let (mut s, mut peer) = pair(1 << 16);
        peer.write_all(&client_frame(0x89, b"p"))
            .await
            .expect("ping");
        assert!(matches!(read(&mut s).await, Ok(Incoming::Control)));
        send(&mut s, vec![data(2, b'd')]);
        flush(&mut s).await;
        assert_eq!(server_frame(&mut peer).await, (0x8A, b"p".to_vec()));
        assert_eq!(server_frame(&mut peer).await, (0x81, b"dd".to_vec()));
    }
}
