//! Two gateway nodes sharing one real `redis-server` (`broker = "redis"`): a
//! publication on either node reaches subscribers on both, with one sequence of
//! offsets; a session detached on one node resumes on the other with what it
//! missed; a ticket issued by one node is good once, on the other; and a Redis
//! outage is reported by `/health/broker` while readiness stays up, publishes
//! fail with `unavailable`, and everything works again once Redis is back.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keel_testkit::gateway::API_KEY;
use keel_testkit::redis::RedisServer;
use serde_json::json;

fn node(redis: &RedisServer) -> keel_server::settings::Settings {
    let mut s = config();
    s.set("broker", "redis").unwrap();
    s.set("redis_url", &redis.url()).unwrap();
    // One key for the cluster: a token from one node is good on the other.
    s.set("reconnect_secret", "a-cluster-secret-of-32-bytes-long")
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_reach_both_nodes_in_one_order() {
    let redis = RedisServer::start();
    let (n1, n2) = (gateway(node(&redis)).await, gateway(node(&redis)).await);
    let mut a = Client::connect(n1.addr).await;
    let mut b = Client::connect(n2.addr).await;
    a.subscribe("room").await;
    b.subscribe("room").await;
    let mut p1 = Client::connect(n1.addr).await;
    let mut p2 = Client::connect(n2.addr).await;
    for i in 0..20 {
        let p = if i % 2 == 0 { &mut p1 } else { &mut p2 };
        let r = p
            .request("publish", json!({"channel": "room", "data": i}))
            .await;
        assert_eq!(r["type"], "publish_response", "{r}");
        assert_eq!(
            r["payload"]["offset"],
            i + 1,
            "one sequence for the cluster"
        );
    }
    for c in [&mut a, &mut b] {
        for i in 0..20u64 {
            let m = c.recv().await;
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["payload"]["offset"], i + 1);
            assert_eq!(m["payload"]["data"], i);
        }
    }
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_detached_on_one_node_resumes_on_the_other_and_a_ticket_is_good_once() {
    let redis = RedisServer::start();
    let (n1, n2) = (gateway(node(&redis)).await, gateway(node(&redis)).await);
    let mut a = Client::connect(n1.addr).await;
    let id = a.client_id();
    let tok = a.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();
    let sub = a.subscribe("news").await;
    let epoch = sub["payload"]["epoch"].as_str().unwrap().to_string();
    drop(a);
    eventually("the session to be detached in redis", || {
        n2.hub.detached_session_count() == 1
    })
    .await;
    for n in 1..=3 {
        let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
        n1.hub.publish("news", &raw, None).await.unwrap();
    }
    let mut b = Client::connect(n2.addr).await;
    b.send(json!({"type": "resume", "request_id": "r1", "payload": {
        "reconnect_token": tok, "positions": {"news": {"offset": 0, "epoch": epoch}}}}))
        .await;
    for n in 1..=3u64 {
        let m = b.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["payload"]["offset"], n);
    }
    let r = b.recv().await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["client_id"], id.as_str());
    assert_eq!(r["payload"]["recovered"], json!({"news": true}));
    // The same token again, on the first node: used up.
    let mut c = Client::connect(n1.addr).await;
    let again = c
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(again["type"], "error", "{again}");

    // A ticket from node 1 connects once, on node 2.
    let (s, body) = http(
        n1.addr,
        "POST",
        "/api/ticket",
        Some(API_KEY),
        Some(json!({"user_id": "u1"})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let ticket = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("ws://{}/ws?ticket={ticket}", n2.addr);
    let t = Client::connect_url(&url).await;
    assert_eq!(t.welcome["type"], "welcome");
    let refused = yawc::WebSocket::connect(url.parse().unwrap()).await;
    assert!(refused.is_err(), "a ticket is good once across the cluster");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_reported_and_ridden_out() {
    let mut redis = RedisServer::start();
    let n1 = gateway(node(&redis)).await;
    let mut sub = Client::connect(n1.addr).await;
    sub.subscribe("live").await;
    let mut p = Client::connect(n1.addr).await;
    let (s, _) = http(n1.addr, "GET", "/health/broker", None, None).await;
    assert_eq!(s, 200);

    redis.stop();
    let (s, body) = http(n1.addr, "GET", "/health/broker", None, None).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    let (s, _) = http(n1.addr, "GET", "/health", None, None).await;
    assert_eq!(
        s, 200,
        "readiness stays up: one Redis outage must not empty the balancer"
    );
    let r = p
        .request("publish", json!({"channel": "live", "data": 1}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["payload"]["code"], "unavailable", "{r}");
    let (s, _) = http(
        n1.addr,
        "POST",
        "/api/publish",
        Some(API_KEY),
        Some(json!({"channel": "live", "data": 1})),
    )
    .await;
    assert_eq!(s, 503);

    redis.resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, _) = http(n1.addr, "GET", "/health/broker", None, None).await;
        if s == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/health/broker stays 503"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Publishing works again, and the subscriber (resubscribed by the node) gets it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let offset = loop {
        let r = p
            .request("publish", json!({"channel": "live", "data": "back"}))
            .await;
        if r["type"] == "publish_response" {
            break r["payload"]["offset"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let m = sub.recv().await;
    assert_eq!(m["payload"]["data"], "back", "{m}");
    assert_eq!(m["payload"]["offset"], offset);
    assert_eq!(
        sub.welcome["type"], "welcome",
        "the subscriber stayed connected"
    );
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_published_while_a_node_was_off_pubsub_arrives_from_history() {
    let redis = RedisServer::start();
    let (n1, n2) = (gateway(node(&redis)).await, gateway(node(&redis)).await);
    let mut a = Client::connect(n1.addr).await;
    a.subscribe("gap").await;
    // Node 1 loses its pub/sub connection and cannot get it back for a while
    // (connections already open keep working: node 2 publishes).
    let mut admin = redis.admin();
    assert_eq!(
        admin.command("CONFIG SET requirepass a-password-for-a-while"),
        "+OK"
    );
    let killed = admin.command("CLIENT KILL TYPE pubsub");
    assert!(killed.starts_with(':') && killed != ":0", "{killed}");
    for n in 1..=5 {
        let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
        n2.hub.publish("gap", &raw, None).await.unwrap();
    }
    // Node 1 reconnects, subscribes again and fills the gap: no later
    // publication is needed for the subscriber to get all five, in order.
    assert_eq!(admin.command("CONFIG SET requirepass \"\""), "+OK");
    for n in 1..=5u64 {
        let m = a.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["payload"]["offset"], n, "{m}");
        assert_eq!(m["payload"]["data"]["n"], n);
    }
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_this_node_and_the_cluster_and_a_gone_node_drops_out() {
    let redis = RedisServer::start();
    let mut s1 = node(&redis);
    s1.set("node_id", "node-one").unwrap();
    let mut s2 = node(&redis);
    s2.set("node_id", "node-two").unwrap();
    let (n1, n2) = (gateway(s1).await, gateway(s2).await);
    let _a = Client::connect(n1.addr).await;
    let _b = Client::connect(n2.addr).await;
    let _c = Client::connect(n2.addr).await;
    let stats = |addr| async move {
        let (s, body) = http(addr, "GET", "/api/stats", Some(API_KEY), None).await;
        assert_eq!(s, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let deadline = std::time::Instant::now() + WAIT;
    let st = loop {
        let st = stats(n1.addr).await;
        if st["cluster"]["connections"] == 3 {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(st["node"], "node-one");
    assert_eq!(st["connections"], 1, "this node's own");
    let mut nodes: Vec<(String, u64)> = st["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            assert!(n["seen_ms_ago"].as_u64().unwrap() < 5_000, "{n}");
            (
                n["node"].as_str().unwrap().to_string(),
                n["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec![("node-one".into(), 1), ("node-two".into(), 2)]);

    // Node two goes away: it stops announcing, and drops out after its TTL.
    drop((_b, _c));
    n2.shutdown().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let st = stats(n1.addr).await;
        if st["cluster"]["nodes"].as_array().map(Vec::len) == Some(1) {
            assert_eq!(st["cluster"]["connections"], 1, "{st}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_asked_of_one_node_closes_the_client_on_the_other() {
    let redis = RedisServer::start();
    let (n1, n2) = (gateway(node(&redis)).await, gateway(node(&redis)).await);
    let mut far = Client::connect(n2.addr).await;
    let (s, body) = http(
        n1.addr,
        "POST",
        "/api/disconnect",
        Some(API_KEY),
        Some(json!({"client_id": far.client_id(), "code": 4100, "reason": "bye from node one"})),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    assert!(body.contains("requested"), "{body}");
    assert_eq!(far.expect_close().await, 4100);
    // A client on the asked node itself is closed there, and says so.
    let near = Client::connect(n1.addr).await;
    let (s, body) = http(
        n1.addr,
        "POST",
        "/api/disconnect",
        Some(API_KEY),
        Some(json!({"client_id": near.client_id()})),
    )
    .await;
    assert_eq!((s, body.as_str()), (200, r#"{"disconnected":true}"#));
    n1.shutdown().await;
    n2.shutdown().await;
}
