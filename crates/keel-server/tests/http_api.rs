//! The gateway's HTTP surface: health, metrics, the API key, `/api/*`,
//! `max_connections`, origins and `/admin/drain`, against a gateway on port 0.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_the_key_and_says_nothing_without_it() {
    let gw = gateway(config()).await;
    for (method, path) in [
        ("POST", "/api/publish"),
        ("POST", "/api/broadcast"),
        ("POST", "/api/disconnect"),
        ("GET", "/api/stats"),
        ("GET", "/api/presence/x"),
        ("GET", "/api/history/x"),
        ("POST", "/admin/drain"),
    ] {
        for key in [
            None,
            Some("wrong-key"),
            Some("test-ke"),
            Some("test-key-and-more"),
        ] {
            let (status, body) = http(gw.addr, method, path, key, None).await;
            assert_eq!(status, 401, "{method} {path} with {key:?}");
            assert!(body.is_empty(), "401 carries no detail, got {body:?}");
        }
    }
    assert!(!gw.hub.is_draining(), "an unauthorized drain did nothing");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_broadcast_presence_history_and_disconnect() {
    let gw = gateway(config()).await;
    let mut a = Client::connect(gw.addr).await;
    let mut b = Client::connect(gw.addr).await;
    a.subscribe("news").await;
    b.subscribe("sport").await;

    let (s, body) = http(
        gw.addr,
        "POST",
        "/api/publish",
        Some("test-key"),
        Some(json!({"channel": "news", "data": {"h": 1}})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["offset"], 1);
    let m = a.recv().await;
    assert_eq!(m["payload"]["data"]["h"], 1);
    assert_eq!(m["payload"]["publisher"], Value::Null);

    let (s, body) = http(
        gw.addr,
        "POST",
        "/api/broadcast",
        Some("test-key"),
        Some(json!({"channels": ["news", "sport"], "data": "all"})),
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(a.recv().await["payload"]["offset"], 2);
    assert_eq!(b.recv().await["payload"]["data"], "all");

    let (s, body) = http(gw.addr, "GET", "/api/presence/news", Some("test-key"), None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["clients"][0]["client_id"], a.client_id());

    let (s, body) = http(
        gw.addr,
        "GET",
        "/api/history/news?since=1",
        Some("test-key"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["messages"][0]["offset"], 2);

    let (s, body) = http(gw.addr, "GET", "/api/stats", Some("test-key"), None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 2);
    assert_eq!(v["channels"], 2);
    assert_eq!(v["memory"]["connection_count"], 2);

    // Bad bodies are refused with a 4xx, and nothing is published.
    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/publish",
        Some("test-key"),
        Some(json!({"channel": "news"})),
    )
    .await;
    assert!((400..500).contains(&s), "{s}");
    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/publish",
        Some("test-key"),
        Some(json!({"channel": "", "data": 1})),
    )
    .await;
    assert_eq!(s, 400);

    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/disconnect",
        Some("test-key"),
        Some(json!({"client_id": "nobody"})),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/disconnect",
        Some("test-key"),
        Some(json!({"client_id": b.client_id(), "code": 4321, "reason": "bye"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b.expect_close().await, 4321);
    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/disconnect",
        Some("test-key"),
        Some(json!({"client_id": a.client_id()})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(a.expect_close().await, 1000);
    eventually("both gone", || gw.hub.connection_count() == 0).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let gw = gateway(config()).await;
    let mut c = Client::connect(gw.addr).await;
    c.subscribe("m").await;
    c.request("publish", json!({"channel": "m", "data": 1}))
        .await;
    let (s, body) = http(gw.addr, "GET", "/health", None, None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["connections"], 1);
    assert_eq!(v["broker"], "memory");
    assert!(v["version"].is_string() && v["uptime"].is_number() && v["memory"].is_object());
    let (s, _) = http(gw.addr, "GET", "/health/live", None, None).await;
    assert_eq!(s, 200);
    let (s, body) = http(gw.addr, "GET", "/health/broker", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["overall"],
        "healthy"
    );
    let (s, text) = http(gw.addr, "GET", "/metrics", None, None).await;
    assert_eq!(s, 200);
    for line in [
        "keel_connections 1",
        "keel_connects_total 1",
        "keel_publications_total 1",
        "# TYPE keel_disconnects_total counter",
        "keel_messages_in_total 2",
    ] {
        assert!(text.contains(line), "metrics lack `{line}`:\n{text}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_answers_503_with_retry_after() {
    let mut c = config();
    c.set("max_connections", "2").unwrap();
    let gw = gateway(c).await;
    let a = Client::connect(gw.addr).await;
    let _b = Client::connect(gw.addr).await;
    let err = Raw::connect_with(gw.addr, "")
        .await
        .err()
        .expect("third is refused");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    assert!(err.to_ascii_lowercase().contains("retry-after: "), "{err}");
    // A place frees up when one leaves.
    drop(a);
    eventually("a left", || gw.hub.connection_count() == 1).await;
    let _c = Client::connect(gw.addr).await;
    let refused = gw.hub.metrics_snapshot().rejected_total;
    assert_eq!(
        refused.iter().find(|(r, _)| *r == "limit").map(|r| r.1),
        Some(1)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_before_the_upgrade() {
    let mut c = config();
    c.set(
        "allowed_origins",
        "https://app.example.com,https://*.example.org",
    )
    .unwrap();
    let gw = gateway(c).await;
    let err = Raw::connect_with(gw.addr, "Origin: https://evil.example\r\n")
        .await
        .err()
        .expect("refused");
    assert!(err.starts_with("HTTP/1.1 403"), "{err}");
    assert!(
        Raw::connect_with(gw.addr, "Origin: https://app.example.com\r\n")
            .await
            .is_ok()
    );
    assert!(
        Raw::connect_with(gw.addr, "Origin: https://eu.example.org\r\n")
            .await
            .is_ok()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_turns_readiness_off_and_tells_clients_to_reconnect() {
    let mut c = config();
    c.set("shutdown_reconnect_window", "2s").unwrap();
    let gw = gateway(c).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(gw.addr).await);
    }
    let (s, _) = http(gw.addr, "POST", "/admin/drain", Some("test-key"), None).await;
    assert_eq!(s, 202);
    let (s, body) = http(gw.addr, "GET", "/health", None, None).await;
    assert_eq!(s, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "draining"
    );
    for c in clients.iter_mut() {
        let m = c.recv().await;
        assert_eq!(m["type"], "server_shutdown", "{m}");
        assert_eq!(m["payload"]["reconnect"], true);
        let delay = m["payload"]["delay_ms"].as_u64().unwrap();
        assert!(delay <= 2000, "{delay}");
        assert_eq!(c.expect_close().await, 1012);
    }
    // New upgrades are refused while draining; the process (here: the task) lives on.
    let err = Raw::connect_with(gw.addr, "").await.err().expect("refused");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    let (s, _) = http(gw.addr, "GET", "/health/live", None, None).await;
    assert_eq!(s, 200);
    gw.shutdown().await;
}
