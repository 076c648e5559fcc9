//! Channel permissions against a real gateway: namespaces (who may subscribe,
//! whether clients may publish, presence, per-namespace history), the JWT
//! `channels` claim, private `#client_id` channels, and the per-connection
//! subscription and channel-name limits. Every refusal is `error forbidden` (or
//! the limit's code) and the connection stays open.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "permissions-test-jwt-secret";

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn cfg() -> keel_server::settings::Settings {
    let mut c = config();
    c.set("auth_jwt_secret", SECRET).unwrap();
    for (k, v) in [
        ("namespaces.chat.subscribe", "authenticated"),
        ("namespaces.chat.publish", "true"),
        ("namespaces.chat.presence", "false"),
        ("namespaces.vip.subscribe", "claim"),
        ("namespaces.feed.subscribe", "anyone"),
        ("namespaces.feed.history_size", "2"),
    ] {
        c.set(k, v).unwrap();
    }
    c
}

async fn as_user(addr: std::net::SocketAddr, claims: Value) -> Client {
    Client::connect_url(&format!("ws://{addr}/ws?token={}", token(claims))).await
}

fn exp() -> u64 {
    jsonwebtoken::get_current_timestamp() + 600
}

/// Sends `kind` and returns the error code of the answer, or "ok".
async fn outcome(c: &mut Client, kind: &str, payload: Value) -> String {
    let r = c.request(kind, payload).await;
    if r["type"] == "error" {
        r["payload"]["code"].as_str().unwrap().to_string()
    } else {
        assert_eq!(r["type"], format!("{kind}_response"), "{r}");
        "ok".into()
    }
}

#[tokio::test]
async fn namespaces_decide_who_subscribes_publishes_and_sees_presence() {
    let gw = gateway(cfg()).await;
    let ch = |c: &str| json!({"channel": c});
    let publish = |c: &str| json!({"channel": c, "data": 1});

    let mut anon = Client::connect(gw.addr).await;
    assert_eq!(
        outcome(&mut anon, "subscribe", ch("chat:1")).await,
        "forbidden"
    );
    assert_eq!(
        outcome(&mut anon, "history", ch("chat:1")).await,
        "forbidden"
    );
    assert_eq!(outcome(&mut anon, "subscribe", ch("feed:x")).await, "ok");
    assert_eq!(
        outcome(&mut anon, "publish", publish("feed:x")).await,
        "forbidden"
    );
    assert_eq!(outcome(&mut anon, "publish", publish("plain")).await, "ok");
    assert_eq!(
        outcome(&mut anon, "subscribe", ch("nons:1")).await,
        "ok",
        "unknown namespace: top-level rules"
    );

    let mut alice = as_user(gw.addr, json!({"sub": "alice", "exp": exp()})).await;
    assert_eq!(outcome(&mut alice, "subscribe", ch("chat:1")).await, "ok");
    assert_eq!(
        outcome(&mut alice, "publish", publish("chat:1")).await,
        "ok"
    );
    assert_eq!(
        outcome(&mut alice, "presence", ch("chat:1")).await,
        "forbidden"
    );
    assert_eq!(outcome(&mut alice, "presence", ch("feed:x")).await, "ok");
    assert_eq!(
        outcome(&mut alice, "subscribe", ch("vip:gold")).await,
        "forbidden"
    );
    // Refusals leave the connection open.
    assert_eq!(alice.request("ping", json!({})).await["type"], "pong");
}

#[tokio::test]
async fn the_channels_claim_limits_subscriptions_everywhere() {
    let gw = gateway(cfg()).await;
    let ch = |c: &str| json!({"channel": c});
    let mut bob = as_user(
        gw.addr,
        json!({"sub": "bob", "exp": exp(), "channels": ["vip:gold", "chat:*"]}),
    )
    .await;
    assert_eq!(outcome(&mut bob, "subscribe", ch("vip:gold")).await, "ok");
    assert_eq!(
        outcome(&mut bob, "subscribe", ch("vip:silver")).await,
        "forbidden"
    );
    assert_eq!(
        outcome(&mut bob, "subscribe", ch("chat:anything")).await,
        "ok"
    );
    assert_eq!(
        outcome(&mut bob, "subscribe", ch("plain")).await,
        "forbidden"
    );
    // A client's own private channel needs no claim.
    assert_eq!(outcome(&mut bob, "subscribe", ch("#bob")).await, "ok");
}

#[tokio::test]
async fn private_channels_are_their_owners_alone() {
    let gw = gateway(cfg()).await;
    let ch = |c: &str| json!({"channel": c});
    let mut bob = as_user(gw.addr, json!({"sub": "bob", "exp": exp()})).await;
    let mut alice = as_user(gw.addr, json!({"sub": "alice", "exp": exp()})).await;
    assert_eq!(outcome(&mut bob, "subscribe", ch("#bob")).await, "ok");
    for kind in ["subscribe", "history", "presence"] {
        assert_eq!(
            outcome(&mut alice, kind, ch("#bob")).await,
            "forbidden",
            "{kind}"
        );
    }
    let write = json!({"channel": "#bob", "data": "hi"});
    assert_eq!(
        outcome(&mut alice, "publish", write.clone()).await,
        "forbidden"
    );
    assert_eq!(
        outcome(&mut bob, "publish", write).await,
        "forbidden",
        "server-side only"
    );
    // The server writes to it; only bob reads it.
    let raw = serde_json::value::to_raw_value(&json!("for bob")).unwrap();
    gw.hub.publish("#bob", &raw, None).await.unwrap();
    let m = bob.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["payload"]["data"].as_str()),
        (Some("message"), Some("for bob"))
    );
    // Anonymous clients have private channels too.
    let mut anon = Client::connect(gw.addr).await;
    let own = format!("#{}", anon.client_id());
    assert_eq!(outcome(&mut anon, "subscribe", ch(&own)).await, "ok");
    assert_eq!(
        outcome(&mut anon, "subscribe", ch("#bob")).await,
        "forbidden"
    );
}

#[tokio::test]
async fn namespaces_keep_their_own_history_size() {
    let gw = gateway(cfg()).await;
    for n in 1..=5 {
        let raw = serde_json::value::to_raw_value(&json!(n)).unwrap();
        gw.hub.publish("feed:x", &raw, None).await.unwrap();
        gw.hub.publish("plain", &raw, None).await.unwrap();
    }
    let mut c = Client::connect(gw.addr).await;
    let h = c.request("history", json!({"channel": "feed:x"})).await;
    let offsets: Vec<u64> = h["payload"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![4, 5], "feed keeps 2");
    let h = c.request("history", json!({"channel": "plain"})).await;
    assert_eq!(
        h["payload"]["messages"].as_array().unwrap().len(),
        5,
        "top level keeps 100"
    );
}

#[tokio::test]
async fn subscriptions_and_channel_names_are_bounded() {
    let mut c = cfg();
    c.set("max_subscriptions_per_connection", "3").unwrap();
    c.set("max_channel_name_length", "10").unwrap();
    let gw = gateway(c).await;
    let mut anon = Client::connect(gw.addr).await;
    for ch in ["a", "b", "c"] {
        assert_eq!(
            outcome(&mut anon, "subscribe", json!({"channel": ch})).await,
            "ok"
        );
    }
    assert_eq!(
        outcome(&mut anon, "subscribe", json!({"channel": "d"})).await,
        "limit_exceeded"
    );
    // Subscribing again to one it has is not a new subscription.
    assert_eq!(
        outcome(&mut anon, "subscribe", json!({"channel": "a"})).await,
        "ok"
    );
    assert_eq!(
        outcome(&mut anon, "unsubscribe", json!({"channel": "a"})).await,
        "ok"
    );
    assert_eq!(
        outcome(&mut anon, "subscribe", json!({"channel": "d"})).await,
        "ok"
    );
    assert_eq!(
        outcome(
            &mut anon,
            "publish",
            json!({"channel": "elevenchars", "data": 1})
        )
        .await,
        "invalid_message"
    );
}
