//! `wss://` served by the gateway itself: a self-signed certificate made in the
//! test, a client that trusts exactly that certificate, a WebSocket upgrade and the
//! protocol's `welcome` over TLS, HTTPS health, a plain-text client refused, and
//! bad key files refused at start naming the option.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

struct Pki {
    /// Removed with the Pki.
    dir: common::TempDir,
    cert_der: CertificateDer<'static>,
}

fn pki(tag: &str) -> Pki {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = common::TempDir::new(&format!("tls-{tag}"));
    std::fs::write(dir.0.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("key.pem"), signing_key.serialize_pem()).unwrap();
    Pki {
        dir,
        cert_der: cert.der().clone(),
    }
}

fn tls_config(p: &Pki) -> keel_server::settings::Settings {
    let mut c = config();
    c.set("tls_cert", p.dir.0.join("cert.pem").to_str().unwrap())
        .unwrap();
    c.set("tls_key", p.dir.0.join("key.pem").to_str().unwrap())
        .unwrap();
    c
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    p: &Pki,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(p.cert_der.clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the test certificate")
}

/// Reads until `\r\n\r\n`; returns the head and what came after it.
async fn read_head(s: &mut (impl AsyncReadExt + Unpin)) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed before the head ended");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(p + 4);
            return (String::from_utf8_lossy(&buf).to_string(), rest);
        }
    }
}

#[tokio::test]
async fn websocket_and_https_over_tls_with_a_self_signed_certificate() {
    let p = pki("ok");
    let gw = gateway(tls_config(&p)).await;

    let mut s = tls_connect(gw.addr, &p).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, mut rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The first frame: an unmasked text frame carrying `welcome`.
    while rest.len() < 4 {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(rest[0] & 0x0f, 1, "a text frame");
    let (len, off) = match rest[1] & 0x7f {
        126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
        n => (n as usize, 2),
    };
    while rest.len() < off + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&chunk[..n]);
    }
    let welcome: serde_json::Value = serde_json::from_slice(&rest[off..off + len]).unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    eventually("registered", || gw.hub.connection_count() == 1).await;

    let mut h = tls_connect(gw.addr, &p).await;
    h.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_head(&mut h).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Plain HTTP on the TLS port gets no answer but the end of the connection.
    let mut plain = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"));
}

#[tokio::test]
async fn bad_tls_files_stop_start_up_naming_the_option() {
    let p = pki("bad");
    let mut c = tls_config(&p);
    c.set("tls_cert", p.dir.0.join("missing.pem").to_str().unwrap())
        .unwrap();
    let e = keel_server::start(c).await.err().unwrap();
    assert!(format!("{e:#}").contains("tls_cert"), "{e:#}");
    let mut c = tls_config(&p);
    // A certificate where the key should be.
    c.set("tls_key", p.dir.0.join("cert.pem").to_str().unwrap())
        .unwrap();
    let e = keel_server::start(c).await.err().unwrap();
    assert!(format!("{e:#}").contains("tls_key"), "{e:#}");
    let mut c = config();
    c.set("tls_cert", p.dir.0.join("cert.pem").to_str().unwrap())
        .unwrap();
    let e = keel_server::start(c).await.err().unwrap();
    assert!(format!("{e:#}").contains("tls_key"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_and_a_silent_tls_session_are_closed_in_time() {
    let p = pki("silent");
    let mut c = tls_config(&p);
    c.set("handshake_timeout", "1s").unwrap();
    let gw = gateway(c).await;
    let t0 = std::time::Instant::now();
    // No TLS handshake at all.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // A TLS session that never sends its request.
    let mut quiet = tls_connect(gw.addr, &p).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let first = t0.elapsed();
    let n = tokio::time::timeout(WAIT, quiet.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let second = t0.elapsed();
    // Each within the timeout plus a second (the session's request gets its own
    // timeout after the TLS handshake).
    assert!(
        first >= std::time::Duration::from_millis(900)
            && first <= std::time::Duration::from_secs(2),
        "{first:?}"
    );
    assert!(second <= std::time::Duration::from_secs(3), "{second:?}");
    assert_eq!(gw.hub.metrics_snapshot().handshake_timeouts_total, 2);
    // And a client that speaks is served.
    let mut ok = tls_connect(gw.addr, &p).await;
    ok.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, ok.read_to_end(&mut out))
        .await
        .expect("answered")
        .ok();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    gw.shutdown().await;
}
