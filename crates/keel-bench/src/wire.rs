//! A minimal WebSocket client for load generation: raw TCP, an HTTP/1.1 upgrade,
//! masked frames out, unmasked frames scanned in place.
//!
//! Built for throughput on one core, not for generality: reads are batched into a
//! per-connection buffer, frames are found by scanning headers without copying or
//! allocating, and only what a scenario needs from a payload is looked at. It does
//! not negotiate compression and does not reassemble fragmented messages (the
//! scenarios' messages are small, and servers send them whole).

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connected, upgraded socket.
pub(crate) struct Conn {
    /// The socket.
    pub(crate) tcp: TcpStream,
    /// Bytes read but not yet consumed (frames after the handshake, partial frames).
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
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let mut len = (b[1] & 0x7f) as usize;
        let mut off = 2;
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
        if b.len() < off + len {
            return None;
        }
        let start = self.pos + off;
        self.pos = start + len;
        Some(Frame {
            opcode,
            payload: &self.buf[start..start + len],
        })
    }
}

/// Finds `"t":<digits>` in a payload and returns the number (the send time in ns
/// since the run's start). Cheap: a scan from colon to colon, no JSON parsing.
pub(crate) fn find_timestamp(payload: &[u8]) -> Option<u64> {
    let mut from = 0;
    let at = loop {
        let colon = from + payload[from..].iter().position(|&b| b == b':')?;
        if colon >= 3 && &payload[colon - 3..colon] == b"\"t\"" {
            break colon + 1;
        }
        from = colon + 1;
    };
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
}
