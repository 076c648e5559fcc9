//! The HTTP serve loop: what `axum::serve` does, plus the deadlines `axum::serve`
//! cannot set.
//!
//! Each connection a listener hands over is served by hyper's HTTP/1.1 server
//! with a timer, so that `header_read_timeout` holds: a request head that has not
//! arrived whole within the gate's `handshake_timeout` (of the connection's
//! start, or of the end of the previous response on a keep-alive connection)
//! closes the connection. That bounds silent and half-sent connections that
//! went to hyper, idle keep-alive connections, and upgrades through hyper (TLS,
//! permessage-deflate). Handlers get the connection's [`Peer`] as `ConnectInfo`,
//! as with `into_make_service_with_connect_info::<Peer>()`.
//!
//! What it must not do: bound a request while a handler runs (a drain may take
//! its time), touch a connection once it has been upgraded (hyper hands it over
//! and the connection's task here ends), or keep serving HTTP after `shutdown`
//! beyond finishing the requests in flight.

use std::future::Future;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::{Gate, Peer, Stream};

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting,
/// lets the requests in flight finish and returns once every HTTP connection is
/// closed (WebSockets are the Hub's: drain them first).
///
/// `gate` sets the deadlines (usually the listener's own, [`Hub::gate`](crate::Hub::gate)).
pub async fn serve<L, S>(
    mut listener: L,
    app: axum::Router,
    gate: Gate,
    shutdown: impl Future<Output = ()> + Send,
) where
    L: axum::serve::Listener<Io = Stream<S>, Addr = SocketAddr>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (closing, _) = tokio::sync::watch::channel(());
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let peer = Peer::of(&io, addr);
        let app = app.clone();
        let gate = gate.clone();
        let mut closing = closing.subscribe();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                let mut app = app.clone();
                // A Router is always ready.
                async move { Service::call(&mut app, request).await }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(gate.handshake_timeout());
            let conn = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    gate.timed_out();
                    tracing::debug!(%addr, "closed: no request within handshake_timeout");
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(());
    tasks.close();
    tasks.wait().await;
}
