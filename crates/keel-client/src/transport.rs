//! The only module of the client that knows the WebSocket crate (yawc): connect,
//! send a text frame, read the next message, close. Everything above it sees
//! [`Socket`] and [`Incoming`].
//!
//! It must not interpret the protocol: envelopes, pings of the JSON kind and
//! request ids belong to `client`. WebSocket Ping frames are answered by yawc
//! itself while [`Socket::next`] is polled.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use yawc::frame::OpCode;
use yawc::{Frame, TcpWebSocket};

/// One WebSocket connection to the gateway.
pub(crate) struct Socket {
    ws: TcpWebSocket,
}

/// What the server sent.
pub(crate) enum Incoming {
    /// A text message (reassembled if fragmented).
    Text(bytes::Bytes),
    /// The server's Close frame.
    Close {
        /// Its code, if it had one.
        code: Option<u16>,
        /// Its reason text.
        reason: String,
    },
    /// Anything else (Ping, Pong, binary): proof of life, nothing to act on.
    Other,
}

impl Socket {
    /// Connects and upgrades; messages larger than `max_message_size` are refused.
    pub(crate) async fn connect(url: &url::Url, max_message_size: usize) -> Result<Socket, String> {
        yawc::WebSocket::connect(url.clone())
            .with_options(
                yawc::Options::default()
                    .with_limits(max_message_size, max_message_size)
                    .with_no_delay(),
            )
            .await
            .map(|ws| Socket { ws })
            .map_err(|e| e.to_string())
    }

    /// The next message; `None` when the connection has ended.
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        let frame = self.ws.next().await?;
        Some(match frame.opcode() {
            OpCode::Text => Incoming::Text(frame.into_payload()),
            OpCode::Close => Incoming::Close {
                code: frame.close_code().map(u16::from),
                reason: frame
                    .close_reason()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_string(),
            },
            _ => Incoming::Other,
        })
    }

    /// Sends one text frame; false if the connection is gone.
    pub(crate) async fn send_text(&mut self, text: String) -> bool {
        self.ws.send(Frame::text(text)).await.is_ok()
    }

    /// Sends Close 1000 with `reason` and waits (at most 2 s) for the server to
    /// finish the handshake.
    pub(crate) async fn close(&mut self, reason: &str) {
        let _ = self
            .ws
            .send(Frame::close(yawc::close::CloseCode::Normal, reason))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.ws.next().await.is_some() {}
        })
        .await;
    }
}
