//! Helpers for the library's tests: an axum app around a Hub whose client_id comes
//! from `?id=`, and a WebSocket client. Every wait has a deadline.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used
)]

use std::net::SocketAddr;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures::{SinkExt, StreamExt};
use keel::{Hub, Upgrade};
use yawc::frame::OpCode;
use yawc::{Frame, TcpWebSocket};

pub use keel_testkit::ws::expect_close;
pub use keel_testkit::{eventually, WAIT};

#[derive(serde::Deserialize)]
pub struct Id {
    id: String,
}

pub async fn ws(State(hub): State<Hub>, Query(q): Query<Id>, upgrade: Upgrade) -> Response {
    match hub.connect(q.id.clone(), upgrade, serde_json::json!({"id": q.id})) {
        Ok(r) => r,
        Err(e) => (e.http_status(), e.to_string()).into_response(),
    }
}

/// The app the tests serve: `hub` at `/ws?id=...`.
pub fn app(hub: &Hub) -> Router {
    Router::new().route("/ws", get(ws)).with_state(hub.clone())
}

/// Serves `hub` on 127.0.0.1:0 at `/ws?id=...`, the way the crate docs show:
/// a [`keel::Listener`] that answers upgrades itself, with [`keel::Peer`] as
/// connect info.
pub async fn serve(hub: &Hub) -> SocketAddr {
    hub.start();
    serve_app(app(hub)).await
}

/// Serves `app` as [`serve`] does.
pub async fn serve_app(app: Router) -> SocketAddr {
    let listener = keel::Listener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .route_upgrades(app.clone());
    spawn_server(listener, app)
}

/// As [`serve`], with every request through hyper: a [`keel::Listener`] without
/// `route_upgrades` (the 101 still rides with the first message).
pub async fn serve_through_hyper(hub: &Hub) -> SocketAddr {
    hub.start();
    let listener = keel::Listener::bind("127.0.0.1:0").await.unwrap();
    spawn_server(listener, app(hub))
}

fn spawn_server(listener: keel::Listener, app: Router) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<keel::Peer>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// As [`serve`], on a plain tokio listener without connect info: what an app that
/// never heard of [`keel::Listener`] does.
pub async fn serve_on_tokio_listener(hub: &Hub) -> SocketAddr {
    hub.start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app(hub);
    tokio::spawn(async move {
        axum::serve(listener.tap_io(|tcp| drop(tcp.set_nodelay(true))), app)
            .await
            .unwrap();
    });
    addr
}

pub async fn connect(addr: SocketAddr, id: &str) -> TcpWebSocket {
    yawc::WebSocket::connect(format!("ws://{addr}/ws?id={id}").parse().unwrap())
        .await
        .expect("connects")
}

pub async fn send(ws: &mut TcpWebSocket, text: &str) {
    ws.send(Frame::text(text.to_string())).await.unwrap();
}

/// The next text frame (control frames skipped).
pub async fn recv(ws: &mut TcpWebSocket) -> String {
    loop {
        let f = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("open");
        match f.opcode() {
            OpCode::Text => return String::from_utf8(f.payload().to_vec()).unwrap(),
            OpCode::Close => panic!("closed {:?}", f.close_code()),
            _ => {}
        }
    }
}
