//! A minimal WebSocket client for load generation: raw TCP, an HTTP/1.1 upgrade,
//! masked frames out, unmasked frames scanned in place.
//!
//! Built for throughput on one core, not for generality: a read takes whatever the
//! socket holds (with room for at least [`READ_ROOM`]) into a buffer that every
//! reader on the thread shares, frames are found by scanning headers without
//! copying or allocating, and only what a scenario needs from a payload is looked
//! at. It does not negotiate compression and does not reassemble fragmented
//! messages (the scenarios' messages are small, and servers send them whole).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::LazyLock;

use anyhow::{bail, Context};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The room every read has, at least (more once a frame larger than this has
/// passed through). A server that fell behind writes a batch of a hundred frames
/// or more at once: read 4 KiB at a time, that cost the load generator eight reads
/// where one does (it had 12 frames a `recvfrom` at 2 M deliveries/s).
pub(crate) const READ_ROOM: usize = 64 * 1024;

/// A connected, upgraded socket.
pub(crate) struct Conn {
    /// The socket.
    pub(crate) tcp: TcpStream,
    /// Bytes read but not yet consumed (frames after the handshake, partial frames;
    /// [`Conn::read_frames`] keeps only a partial frame here).
    pub(crate) buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pub(crate) pos: usize,
}

/// One frame found in the buffer.
pub(crate) struct Frame<'a> {
    /// The opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong, 0 continuation).
    pub(crate) opcode: u8,
    /// The payload.
    pub(crate) payload: &'a [u8],
}

/// Connects to `addr` from `source` (port chosen by the kernel) and upgrades at `path`.
pub(crate) async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
) -> anyhow::Result<Conn> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let mut tcp = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let end = loop {
        if len == buf.len() {
            bail!("handshake response too large");
        }
        let n = tcp.read(&mut buf[len..]).await?;
        if n == 0 {
            bail!("closed during handshake");
        }
        len += n;
        if let Some(p) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&buf[..end]);
        bail!("upgrade refused: {}", line.lines().next().unwrap_or(""));
    }
    buf.truncate(len);
    Ok(Conn { tcp, buf, pos: end })
}

/// Appends one masked client frame to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    // A fixed mask: the server must unmask whatever it is; RFC 6455's masking protects
    // intermediaries from crafted plaintext, which a local benchmark does not need.
    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

impl Conn {
    /// Sends one text frame.
    pub(crate) async fn send_text(&mut self, text: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(text.len() + 14);
        encode(&mut out, 1, text);
        self.tcp.write_all(&out).await
    }

    /// Reads more bytes into the buffer (no zeroing, no copy of what is there unless
    /// it must move to make room); Ok(false) at EOF.
    pub(crate) async fn fill(&mut self) -> std::io::Result<bool> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            let more = self.buf.len().max(4096);
            self.buf.reserve(more);
        }
        let n = self.tcp.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    /// The next complete frame in the buffer, if there is one; advances past it.
    pub(crate) fn next_frame(&mut self) -> Option<Frame<'_>> {
        let (opcode, payload) = parse_frame(&self.buf[self.pos..])?;
        let (start, end) = (self.pos + payload.start, self.pos + payload.end);
        self.pos = end;
        Some(Frame {
            opcode,
            payload: &self.buf[start..end],
        })
    }

    /// Reads what the socket holds (with room for at least [`READ_ROOM`]) into
    /// `scratch` (a buffer that the readers of a thread share, so that it stays in
    /// the cache), behind what was left from before, and hands each whole frame to
    /// `each` until it breaks; a partial frame at the end is kept for the next call.
    /// Frames left by the handshake's read are handed over too, also when the
    /// socket has nothing new (`WouldBlock`, which clears its readiness: wait with
    /// `readable()` before calling again). Returns `Ok(false)` at EOF.
    pub(crate) fn read_frames(
        &mut self,
        scratch: &mut Vec<u8>,
        mut each: impl FnMut(Frame<'_>) -> ControlFlow<()>,
    ) -> io::Result<bool> {
        scratch.clear();
        scratch.extend_from_slice(&self.buf[self.pos..]);
        scratch.reserve(READ_ROOM);
        let open = match self.tcp.try_read_buf(scratch) {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(e),
        };
        let mut at = 0;
        while let Some((opcode, payload)) = parse_frame(&scratch[at..]) {
            let frame = Frame {
                opcode,
                payload: &scratch[at + payload.start..at + payload.end],
            };
            at += payload.end;
            if each(frame).is_break() {
                break;
            }
        }
        self.buf.clear();
        self.pos = 0;
        self.buf.extend_from_slice(&scratch[at..]);
        Ok(open)
    }
}

/// The opcode and payload range of the whole frame at the start of `b` (the range's
/// end is where the frame ends), or None while it is not all there.
fn parse_frame(b: &[u8]) -> Option<(u8, std::ops::Range<usize>)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let mut len = (b[1] & 0x7f) as usize;
    let mut off: usize = 2;
    if len == 126 {
        if b.len() < 4 {
            return None;
        }
        len = u16::from_be_bytes([b[2], b[3]]) as usize;
        off = 4;
    } else if len == 127 {
        if b.len() < 10 {
            return None;
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[2..10]);
        len = u64::from_be_bytes(l) as usize;
        off = 10;
    }
    if masked {
        off += 4;
    }
    (b.len() >= off.checked_add(len)?).then_some((opcode, off..off + len))
}

/// The key [`find_timestamp`] looks for, with its searcher built once (a
/// vectorised search for the whole key: one call where a search from colon to
/// colon made five, and those were a sixth of the load generator's samples).
static TIMESTAMP_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"t\":"));

/// Finds `"t":<digits>` in a payload and returns the number (the send time in ns
/// since the run's start). Cheap: one search for the key, no JSON parsing.
pub(crate) fn find_timestamp(payload: &[u8]) -> Option<u64> {
    let at = TIMESTAMP_KEY.find(payload)? + 4;
    let mut v: u64 = 0;
    let mut any = false;
    for &c in &payload[at..] {
        if c.is_ascii_digit() {
            v = v * 10 + (c - b'0') as u64;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_timestamps() {
        assert_eq!(
            find_timestamp(br#"{"type":"message","payload":{"data":{"t":12345,"p":"x"}}}"#),
            Some(12345)
        );
        assert_eq!(find_timestamp(br#"42["m",{"t":7}]"#), Some(7));
        assert_eq!(find_timestamp(br#"{"type":"ping"}"#), None);
        assert_eq!(
            find_timestamp(br#"{"at":1,"t":2}"#),
            Some(2),
            "a key ending in t is not it"
        );
        assert_eq!(find_timestamp(br#"t":5"#), None, "no opening quote");
        assert_eq!(find_timestamp(br#"{"t":"x"}"#), None);
    }

    #[test]
    fn encodes_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            encode(&mut out, 1, &vec![b'a'; len]);
            let header = if len < 126 {
                2
            } else if len <= 0xffff {
                4
            } else {
                10
            };
            assert_eq!(out.len(), header + 4 + len);
        }
    }

    /// An unmasked frame, as a server sends it.
    fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
        out.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
    }

    /// Reads with `read_frames` until `want` frames were seen in all (true) or EOF
    /// (false); fails the test if neither comes within 10 s (a lost frame).
    async fn read_until(
        c: &mut Conn,
        scratch: &mut Vec<u8>,
        seen: &mut Vec<(u8, Vec<u8>)>,
        want: usize,
    ) -> bool {
        let read = async {
            while seen.len() < want {
                c.tcp.readable().await.expect("readable");
                let open = c
                    .read_frames(scratch, |f| {
                        seen.push((f.opcode, f.payload.to_vec()));
                        ControlFlow::Continue(())
                    })
                    .expect("read");
                if !open {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("frames or EOF within 10 s")
    }

    #[tokio::test]
    async fn read_frames_keeps_partial_frames_for_the_next_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        // A frame left behind by the handshake's read, as `connect` leaves it.
        let mut left = Vec::new();
        server_frame(&mut left, 1, b"welcome");
        let mut c = Conn {
            tcp,
            buf: left,
            pos: 0,
        };
        let mut expected = vec![(1, b"welcome".to_vec())];
        let mut seen: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut scratch = Vec::new();
        // Nothing has been sent yet: the read would block, and the frame the
        // handshake left is handed over all the same.
        let open = c
            .read_frames(&mut scratch, |f| {
                seen.push((f.opcode, f.payload.to_vec()));
                ControlFlow::Continue(())
            })
            .expect("read");
        assert!(open);
        assert_eq!(seen, expected);

        let mut wire = Vec::new();
        for i in 0..3u8 {
            server_frame(&mut wire, 1, &[i; 250]);
            expected.push((1, vec![i; 250]));
        }
        // The fourth frame (a ping) is cut inside its header, then inside its payload.
        let mut ping = Vec::new();
        server_frame(&mut ping, 9, &[7; 200]);
        expected.push((9, vec![7; 200]));
        // A frame larger than a read's room, so it must be carried across reads.
        let mut big = Vec::new();
        server_frame(&mut big, 2, &vec![b'z'; READ_ROOM + 1000]);
        expected.push((2, vec![b'z'; READ_ROOM + 1000]));
        server_frame(&mut big, 1, b"last");
        expected.push((1, b"last".to_vec()));

        wire.extend_from_slice(&ping[..1]);
        server.write_all(&wire).await.expect("write");
        assert!(read_until(&mut c, &mut scratch, &mut seen, 4).await);
        assert_eq!(c.buf, ping[..1], "the cut header is kept");
        server.write_all(&ping[1..100]).await.expect("write");
        // Nothing new is whole yet: reads may come and go without a frame.
        c.tcp.readable().await.expect("readable");
        assert!(c
            .read_frames(&mut scratch, |_| panic!("no whole frame yet"))
            .expect("read"));
        server.write_all(&ping[100..]).await.expect("write");
        server.write_all(&big).await.expect("write");
        assert!(read_until(&mut c, &mut scratch, &mut seen, expected.len()).await);
        assert_eq!(seen, expected);
        assert!(c.buf.is_empty(), "nothing left over");
        drop(server);
        assert!(
            !read_until(&mut c, &mut scratch, &mut seen, usize::MAX).await,
            "EOF"
        );
    }
}
