//! The protocols the load generator speaks: Keel's own, the trivial room protocol
//! every peer in `bench/peers/` implements (join the room named in the URL, every
//! text message goes to the whole room), and Socket.IO 4's framing over a raw
//! WebSocket (engine.io v4).
//!
//! Each dialect knows how to join a room, how to write a publication carrying a
//! send timestamp, and which server frames need an answer (heartbeats). Nothing
//! else: payloads are never parsed beyond finding the timestamp.

use anyhow::{bail, Context};

use crate::wire::{self, Conn};

/// A protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Keel's protocol v1 (`subscribe`, `publish`).
    Keel,
    /// `GET /ws?room=R`; every text message is broadcast to the room.
    Trivial,
    /// Socket.IO 4: `40` to connect, `42["join",R]`, `42["msg",{..}]`.
    SocketIo,
}

/// What a server frame asks of the client.
pub(crate) enum Answer {
    /// Nothing.
    None,
    /// Send this text back (a heartbeat answer).
    Text(&'static [u8]),
}

impl Dialect {
    /// Parses a dialect name.
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "keel" => Dialect::Keel,
            "trivial" => Dialect::Trivial,
            "socketio" => Dialect::SocketIo,
            _ => bail!("unknown protocol `{s}` (keel, trivial, socketio)"),
        })
    }

    /// The upgrade path for a client of `room`.
    pub(crate) fn path(self, room: &str) -> String {
        match self {
            Dialect::Keel => "/ws".into(),
            Dialect::Trivial => format!("/ws?room={room}"),
            Dialect::SocketIo => "/socket.io/?EIO=4&transport=websocket".into(),
        }
    }

    /// Completes the protocol's own handshake and joins `room` (when `join`).
    pub(crate) async fn setup(self, conn: &mut Conn, room: &str, join: bool) -> anyhow::Result<()> {
        match self {
            Dialect::Keel => {
                expect_text(conn, self, |t| t.starts_with(br#"{"type":"welcome""#))
                    .await
                    .context("no welcome")?;
                if join {
                    let sub = format!(r#"{{"type":"subscribe","payload":{{"channel":"{room}"}}}}"#);
                    conn.send_text(sub.as_bytes()).await?;
                    expect_text(conn, self, |t| {
                        t.starts_with(br#"{"type":"subscribe_response""#)
                    })
                    .await
                    .context("no subscribe_response")?;
                }
            }
            Dialect::Trivial => {}
            Dialect::SocketIo => {
                expect_text(conn, self, |t| t.starts_with(b"0{"))
                    .await
                    .context("no engine.io open")?;
                conn.send_text(b"40").await?;
                expect_text(conn, self, |t| t.starts_with(b"40"))
                    .await
                    .context("no namespace connect")?;
                if join {
                    let j = format!(r#"42["join","{room}"]"#);
                    conn.send_text(j.as_bytes()).await?;
                    expect_text(conn, self, |t| t.starts_with(br#"42["joined""#))
                        .await
                        .context("no join ack")?;
                }
            }
        }
        Ok(())
    }

    /// A publication to `room` carrying send time `t` (ns) and `pad` bytes of padding.
    pub(crate) fn publication(self, room: &str, t: u64, pad: &str) -> Vec<u8> {
        match self {
            Dialect::Keel => format!(
                r#"{{"type":"publish","payload":{{"channel":"{room}","data":{{"t":{t},"p":"{pad}"}}}}}}"#
            ),
            Dialect::Trivial => format!(r#"{{"t":{t},"p":"{pad}"}}"#),
            Dialect::SocketIo => format!(r#"42["msg",{{"t":{t},"p":"{pad}"}}]"#),
        }
        .into_bytes()
    }

    /// What a text frame from the server asks for.
    pub(crate) fn answer(self, text: &[u8]) -> Answer {
        match self {
            Dialect::Keel if text.starts_with(br#"{"type":"ping""#) => {
                Answer::Text(br#"{"type":"pong"}"#)
            }
            Dialect::SocketIo if text == b"2" => Answer::Text(b"3"),
            _ => Answer::None,
        }
    }
}

/// Reads frames until a text frame for which `want` is true (answering Pings on the
/// way); fails on close or after 10 s.
async fn expect_text(
    conn: &mut Conn,
    dialect: Dialect,
    want: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<()> {
    next_text(conn, dialect, want).await.map(drop)
}

/// Reads frames until a text frame for which `want` is true and returns it,
/// answering WebSocket Pings and the dialect's own pings on the way; fails on close or
/// after 10 s.
pub(crate) async fn next_text(
    conn: &mut Conn,
    dialect: Dialect,
    want: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        while let Some(f) = conn.next_frame() {
            match f.opcode {
                1 if want(f.payload) => return Ok(f.payload.to_vec()),
                1 => {
                    if let Answer::Text(t) = dialect.answer(f.payload) {
                        wire::encode(&mut out, 1, t);
                    }
                }
                8 => bail!("closed by server"),
                9 => wire::encode(&mut out, 10, f.payload),
                _ => {}
            }
        }
        if !out.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut conn.tcp, &out).await?;
        }
        match tokio::time::timeout_at(deadline, conn.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("connection closed"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("timed out"),
        }
    }
}
