//! A server that sends frames the client cannot parse: not JSON, and JSON nested
//! deeper than any parser goes. The client reports each as an `Error` event,
//! keeps the connection (no reconnect loop) and goes on reading what follows.
//! The server is the keel library with a handler that misbehaves on purpose.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use common::*;
use keel::{Config, Connection, Deferred, Handler, Hub, Upgrade};
use keel_client::{Client, Event};
use serde_json::json;

/// Sends a `welcome`, then two frames no parser takes, then an `error` envelope.
struct Garbage {
    connects: Arc<AtomicUsize>,
}

impl Handler for Garbage {
    fn on_connect(&self, _hub: &Hub, conn: &Connection) -> Option<Deferred> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let welcome = json!({"type": "welcome", "payload": {
            "client_id": &*conn.client_id(), "session_id": "s", "reconnect_token": "t",
            "heartbeat": {"interval_ms": 25000, "timeout_ms": 25000, "mode": "both"},
            "resume_ttl_ms": 0, "node": "hostile"}});
        conn.send_text(welcome.to_string().into());
        conn.send_text(bytes::Bytes::from_static(b"this is not JSON"));
        let deep = format!(
            "{{\"type\":\"message\",\"payload\":{{\"channel\":\"c\",\"offset\":1,\"data\":{}{}}}}}",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        conn.send_text(deep.into());
        conn.send_text(
            json!({"type": "error", "payload": {"code": "internal", "detail": "after the garbage"}})
                .to_string()
                .into(),
        );
        None
    }
}

async fn ws(
    axum::extract::State(hub): axum::extract::State<Hub>,
    upgrade: Upgrade,
) -> axum::response::Response {
    let id = format!("c{}", rand::random::<u32>());
    hub.connect(id, upgrade, serde_json::Value::Null)
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_it_cannot_parse_are_reported_and_the_connection_stays() {
    let connects = Arc::new(AtomicUsize::new(0));
    let hub = Hub::with_handler(
        Config::default(),
        Garbage {
            connects: connects.clone(),
        },
    );
    hub.start();
    let app = axum::Router::new()
        .route("/ws", get(ws))
        .with_state(hub.clone());
    let gate = hub.gate();
    let listener = keel::Listener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .route_upgrades(app.clone())
        .gate(gate.clone());
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keel::listener::serve(
        listener,
        app,
        gate,
        std::future::pending(),
    ));

    let (client, mut events) = Client::connect(&format!("ws://{addr}/ws"), fast()).unwrap();
    let mut invalid = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await.expect("events open") {
                Event::Error { code, detail } if code == "invalid_frame" => invalid.push(detail),
                Event::Error { code, detail } => {
                    assert_eq!(
                        (code.as_str(), detail.as_str()),
                        ("internal", "after the garbage")
                    );
                    break;
                }
                e @ (Event::Disconnected { .. }
                | Event::Closed { .. }
                | Event::Reconnecting { .. }) => {
                    panic!("the connection must stay: {e:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the frame after the garbage arrives");
    assert_eq!(invalid.len(), 2, "{invalid:?}");
    assert!(invalid[0].contains("16-byte"), "{}", invalid[0]);
    assert!(invalid[1].contains("recursion limit"), "{}", invalid[1]);
    assert_eq!(connects.load(Ordering::SeqCst), 1, "no reconnect");
    assert_eq!(hub.connection_count(), 1);
    client.close().await;
}
