//! WebSocket below a well-behaved client: masked client frames built by hand (for
//! frames a client library would not send, or bytes cut at chosen places), and
//! waiting for the server's Close.

use futures::StreamExt;
use yawc::frame::OpCode;
use yawc::TcpWebSocket;

use crate::WAIT;

/// A masked client frame with first byte `b0` (FIN, RSV bits, opcode) and
/// `payload`, in whichever length form the payload needs (7-bit, 16-bit or
/// 64-bit).
pub fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let len = payload.len();
    let mut f = vec![b0];
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= 0xffff {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Waits (up to [`WAIT`]) for the server's Close, skipping other frames, and
/// completes the handshake as a real client would; returns the close code (1005
/// when the Close carries none). Panics if the connection ends without one.
pub async fn expect_close(ws: &mut TcpWebSocket) -> u16 {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a Close within the deadline");
        match frame {
            Some(f) if f.opcode() == OpCode::Close => {
                // Keep polling so the answering Close goes out.
                let _ =
                    tokio::time::timeout(WAIT, async { while ws.next().await.is_some() {} }).await;
                return f
                    .close_code()
                    .map(u16::from)
                    .unwrap_or(keel_protocol::close::NO_STATUS);
            }
            Some(_) => continue,
            None => panic!("connection ended without a Close frame"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client_frame;

    #[test]
    fn client_frames_use_each_length_form_and_mask_the_payload() {
        let f = client_frame(0x81, b"hi");
        assert_eq!(&f[..2], &[0x81, 0x82]);
        assert_eq!(f.len(), 2 + 4 + 2);
        let unmasked: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ f[2 + i % 4])
            .collect();
        assert_eq!(unmasked, b"hi");
        let f = client_frame(0x82, &[0; 300]);
        assert_eq!(&f[..4], &[0x82, 0x80 | 126, 1, 44]);
        let f = client_frame(0x82, &[0; 70_000]);
        assert_eq!(f[1], 0x80 | 127);
        assert_eq!(&f[2..10], &70_000u64.to_be_bytes());
    }
}
