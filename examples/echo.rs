//! Echo server on the library's connection layer: every text and binary message
//! comes back unchanged. The Autobahn|Testsuite fuzzing client runs against it.
//!
//! `cargo run --release -p keel-examples --example echo -- 127.0.0.1:9001`
//! (compression on; add `none` as a second argument to turn it off).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keel::{Config, Connection, Deferred, Handler, Hub, Message, Upgrade};

/// Sends every message back as it came.
struct Echo;

impl Handler for Echo {
    fn on_message(&self, _hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
        match msg {
            Message::Text(t) => conn.send_text(bytes::Bytes::copy_from_slice(t.as_bytes())),
            Message::Binary(b) => conn.send_binary(bytes::Bytes::copy_from_slice(b)),
        };
        None
    }
}

async fn ws(State(hub): State<Hub>, upgrade: Upgrade) -> Response {
    match hub.connect(
        uuid::Uuid::new_v4().to_string(),
        upgrade,
        serde_json::Value::Null,
    ) {
        Ok(r) => r,
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let compression = args.next().unwrap_or_else(|| "deflate".into());
    let mut config = Config::default();
    // Autobahn sends messages up to 16 MiB and bursts of many; an echo server must
    // neither refuse nor drop them.
    config.set("max_message_size", "67108864")?;
    config.set("send_queue_max_bytes", "268435456")?;
    config.set("send_queue_max_messages", "1000000")?;
    // Autobahn sends thousands of messages a second on one connection.
    config.set("rate_limit_messages", "0")?;
    config.set("compression", &compression)?;
    // Heartbeats as Ping frames only: a JSON `ping` is Keel's protocol, and an echo
    // peer would see it as an unexpected message.
    config.set("heartbeat_mode", "ws")?;
    let hub = Hub::with_handler(config, Echo);
    hub.start();
    let gate = hub.gate();
    let app = Router::new()
        .route("/", get(ws))
        .route("/ws", get(ws))
        .with_state(hub);
    // Plain upgrades answered by the listener, deflate ones through hyper: the
    // Autobahn suite goes down both paths.
    let listener = keel::Listener::bind(&addr)
        .await?
        .route_upgrades(app.clone())
        .gate(gate.clone());
    println!("echo listening on {}", listener.local_addr()?);
    keel::listener::serve(listener, app, gate, std::future::pending()).await;
    Ok(())
}
