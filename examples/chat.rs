//! Quick start: a chat room on axum with the keel library.
//!
//! `cargo run -p keel-examples --example chat`, then connect any WebSocket client to
//! `ws://127.0.0.1:3000/ws?name=alice` and send text: everyone in the lobby gets
//! `{"type":"message","payload":{"channel":"lobby","data":{"from":..,"text":..},...}}`.
//! Heartbeats, slow clients, dead connections and shutdown are the Hub's problem.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keel::{Config, Connection, Deferred, Handler, Hub, Message, Upgrade};

/// The chat's behaviour: join the lobby on connect, publish what is said.
struct Chat;

impl Handler for Chat {
    // Joining and publishing wait on the broker: each hook hands that work back
    // to the connection's task, which finishes it before reading on.
    fn on_connect(&self, hub: &Hub, conn: &Connection) -> Option<Deferred> {
        let (hub, conn) = (hub.clone(), conn.clone());
        Some(Box::pin(async move {
            let _ = hub.subscribe(&conn, "lobby", None).await;
        }))
    }

    fn on_message(&self, hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
        let Message::Text(text) = msg else {
            conn.close(1003, "text only");
            return None;
        };
        let name = conn.metadata()["name"].as_str().unwrap_or("anonymous");
        let data = serde_json::json!({ "from": name, "text": text });
        let raw = keel::RawValue::from_string(data.to_string()).ok()?;
        let (hub, conn) = (hub.clone(), conn.clone());
        Some(Box::pin(async move {
            let _ = hub.publish("lobby", &raw, Some(&conn.client_id())).await;
        }))
    }
}

#[derive(serde::Deserialize)]
struct Params {
    name: Option<String>,
}

async fn ws(State(hub): State<Hub>, Query(p): Query<Params>, upgrade: Upgrade) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let meta = serde_json::json!({ "name": p.name });
    match hub.connect(id, upgrade, meta) {
        Ok(response) => response,
        Err(e) => (e.http_status(), e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let hub = Hub::with_handler(Config::default(), Chat);
    hub.start();
    let app = Router::new().route("/ws", get(ws)).with_state(hub.clone());
    // keel::Listener: TCP_NODELAY, each 101 goes out with the first message, and
    // `route_upgrades` answers plain upgrades without hyper. The Hub's gate times
    // out connections that never finish their handshake.
    let gate = hub.gate();
    let listener = keel::Listener::bind("127.0.0.1:3000")
        .await?
        .route_upgrades(app.clone())
        .gate(gate.clone());
    println!("chat on ws://{}/ws?name=you", listener.local_addr()?);
    keel::listener::serve(listener, app, gate, async move {
        let _ = tokio::signal::ctrl_c().await;
        let report = hub
            .graceful_shutdown(std::time::Duration::from_secs(10))
            .await;
        println!("{report:?}");
    })
    .await;
    Ok(())
}
