//! `wss://` without a terminating proxy: rustls in front of the gateway's HTTP
//! server, configured by `tls_cert` and `tls_key` (PEM files).
//!
//! Handshakes run in their own tasks, bounded by `handshake_timeout`, so a client
//! that opens a socket and says nothing cannot hold up anyone else's accept;
//! finished ones are handed to the HTTP server through a channel. Accepting goes
//! through the Hub's [`keel::Gate`]: a connection holds its ticket from the TCP
//! accept until it is a WebSocket, so handshakes count against
//! `max_pending_connections`. This module only
//! terminates TLS: it knows nothing of WebSockets or of the protocol. Keys are
//! read once at start; a bad file stops start-up with the option's name.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The acceptor for `cert` (a PEM chain) and `key` (a PEM private key).
pub fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("option `tls_cert`: cannot read {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("option `tls_cert`: {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("option `tls_key`: cannot read {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("option `tls_key`: the key does not match `tls_cert`")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A connection with TLS terminated, as the HTTP server gets it.
type Conn = keel::listener::Stream<TlsStream<TcpStream>>;

/// A listener whose connections arrive with TLS already terminated.
pub struct TlsListener {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` through `gate`, handshakes with `acceptor`, hands the
    /// results over. The accept task ends when the listener is dropped.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor, gate: keel::Gate) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer, ticket) = tokio::select! {
                    _ = tx.closed() => return,
                    a = gate.accept(&tcp) => a,
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx, gate) = (acceptor.clone(), tx.clone(), gate.clone());
                tokio::spawn(async move {
                    let timeout = gate.handshake_timeout();
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // The 101 rides with the `welcome` above TLS too (one TLS
                            // record and one write fewer per connect).
                            let conn = keel::listener::Stream::accepted(tls, Vec::new(), ticket);
                            let _ = tx.send((conn, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            gate.timed_out();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task is gone (it ends only when this listener is
            // dropped): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
