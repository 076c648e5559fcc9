//! Authentication against a real gateway: JWTs (HS256, RS256, ES256) in
//! `?token=` and in the session cookie, one-time tickets, first-message `auth`,
//! `refresh` before a token's expiry, anonymous access on and off, and resume
//! bound to the authenticated client. Every refusal is checked for its status or
//! code, and every positive path for the identity it yields.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "a-shared-jwt-secret-for-tests";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn signed(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn user(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "info": {"name": sub.to_uppercase()}})
}

fn hs_config() -> keel_server::settings::Settings {
    let mut c = config();
    c.set("auth_jwt_secret", SECRET).unwrap();
    c.set("auth_allow_anonymous", "false").unwrap();
    c
}

/// The status line of a refused upgrade (panics if it was accepted).
async fn refused(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    match Raw::connect_to(addr, path, headers).await {
        Ok(_) => panic!("upgrade at {path} was accepted"),
        Err(head) => head.lines().next().unwrap_or_default().to_string(),
    }
}

#[tokio::test]
async fn hs256_token_in_the_query_is_the_identity() {
    let gw = gateway(hs_config()).await;
    let token = hs256(user("alice"));
    let mut c = Client::connect_url(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    assert_eq!(c.client_id(), "alice");
    c.subscribe("room").await;
    let p = c.request("presence", json!({"channel": "room"})).await;
    assert_eq!(
        p["payload"]["clients"],
        json!([{"client_id": "alice", "info": {"name": "ALICE"}}])
    );
}

#[tokio::test]
async fn bad_jwts_and_missing_credentials_are_refused_before_the_upgrade() {
    let gw = gateway(hs_config()).await;
    let a = gw.addr;
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &user("eve"),
        &EncodingKey::from_secret(b"not-the-secret-at-all").unwrap(),
    )
    .unwrap();
    let expired = hs256(json!({"sub": "eve", "exp": now() - 10}));
    let no_sub = hs256(json!({"exp": now() + 60}));
    let alg_none = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(user("eve").to_string())
        )
    };
    let cases = [
        ("/ws", "no credentials"),
        (&*format!("/ws?token={wrong_key}"), "wrong signature"),
        (&*format!("/ws?token={expired}"), "expired"),
        (&*format!("/ws?token={no_sub}"), "no sub"),
        (&*format!("/ws?token={alg_none}"), "alg none"),
        ("/ws?token=garbage", "garbage"),
        ("/ws?ticket=never-issued", "unknown ticket"),
    ];
    for (path, what) in cases {
        let status = refused(a, path, "").await;
        assert!(status.contains(" 401 "), "{what}: {status}");
    }
    // The body says what kind of problem, never the token.
    let answer = Raw::connect_to(a, &format!("/ws?token={expired}"), "")
        .await
        .err()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.contains("expired") && !answer.contains(&expired),
        "{answer}"
    );
    // A forbidden origin is 403 even with a good token.
    let mut cfg = hs_config();
    cfg.set("allowed_origins", "https://app.example.com")
        .unwrap();
    let gw2 = gateway(cfg).await;
    let good = hs256(user("alice"));
    let status = refused(
        gw2.addr,
        &format!("/ws?token={good}"),
        "Origin: https://evil.example.net\r\n",
    )
    .await;
    assert!(status.contains(" 403 "), "{status}");
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_the_public_key_and_confusion_fails() {
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
    ] {
        let mut cfg = config();
        cfg.set("auth_jwt_public_key_file", &fixture(public))
            .unwrap();
        cfg.set("auth_allow_anonymous", "false").unwrap();
        let gw = gateway(cfg).await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = signed(alg, &key, user("bob"));
        let c = Client::connect_url(&format!("ws://{}/ws?token={token}", gw.addr)).await;
        assert_eq!(c.client_id(), "bob", "{alg:?}");
        // Algorithm confusion: HS256 "signed" with the public key as the secret.
        let public_pem = std::fs::read(fixture(public)).unwrap();
        let confused = signed(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem).unwrap(),
            user("mallory"),
        );
        let status = refused(gw.addr, &format!("/ws?token={confused}"), "").await;
        assert!(status.contains(" 401 "), "{alg:?} confusion: {status}");
        // A token of the other family is refused too.
        let hs = hs256(user("mallory"));
        let status = refused(gw.addr, &format!("/ws?token={hs}"), "").await;
        assert!(status.contains(" 401 "), "{status}");
    }
}

#[tokio::test]
async fn the_session_cookie_is_checked_like_a_token() {
    let mut cfg = hs_config();
    cfg.set("auth_cookie_name", "sid").unwrap();
    let gw = gateway(cfg).await;
    let token = hs256(user("carol"));
    let _carol = Raw::connect_to(
        gw.addr,
        "/ws",
        &format!("Cookie: theme=dark; sid={token}\r\n"),
    )
    .await
    .expect("101 with the cookie");
    let status = refused(gw.addr, "/ws", "Cookie: sid=forged.token.value\r\n").await;
    assert!(status.contains(" 401 "), "{status}");
    eventually("carol connected", || gw.hub.connection("carol").is_some()).await;
}

#[tokio::test]
async fn tickets_are_issued_with_the_api_key_and_work_once() {
    let gw = gateway(hs_config()).await;
    let (status, body) = http(gw.addr, "POST", "/api/ticket", None, Some(json!({}))).await;
    assert_eq!((status, body.as_str()), (401, ""));
    let (status, body) = http(
        gw.addr,
        "POST",
        "/api/ticket",
        Some("test-key"),
        Some(json!({"client_id": "dave", "info": {"role": "admin"}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    assert_eq!(v["expires_in"], 30.0);
    let url = format!("ws://{}/ws?ticket={ticket}", gw.addr);
    let mut c = Client::connect_url(&url).await;
    assert_eq!(c.client_id(), "dave");
    c.subscribe("ops").await;
    assert_eq!(
        gw.hub.presence("ops").await.unwrap()[0].info,
        json!({"role": "admin"})
    );
    // Replayed: refused.
    let status = refused(gw.addr, &format!("/ws?ticket={ticket}"), "").await;
    assert!(status.contains(" 401 "), "{status}");

    // Eight upgrades race for one ticket: exactly one wins.
    let (_, body) = http(
        gw.addr,
        "POST",
        "/api/ticket",
        Some("test-key"),
        Some(json!({"client_id": "erin"})),
    )
    .await;
    let ticket: Value = serde_json::from_str(&body).unwrap();
    let path = format!("/ws?ticket={}", ticket["ticket"].as_str().unwrap());
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, path) = (gw.addr, path.clone());
            tokio::spawn(async move { Raw::connect_to(addr, &path, "").await.is_ok() })
        })
        .collect();
    let mut wins = 0;
    for r in racers {
        wins += r.await.unwrap() as usize;
    }
    assert_eq!(wins, 1);
}

#[tokio::test]
async fn an_expired_ticket_is_refused() {
    let mut cfg = hs_config();
    cfg.set("auth_ticket_ttl", "200ms").unwrap();
    let gw = gateway(cfg).await;
    let (_, body) = http(gw.addr, "POST", "/api/ticket", Some("test-key"), None).await;
    let ticket: Value = serde_json::from_str(&body).unwrap();
    // The ticket's own clock: 200 ms after issue it is past its TTL.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/ws?ticket={}", ticket["ticket"].as_str().unwrap());
    let answer = Raw::connect_to(gw.addr, &path, "").await.err().unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("ticket expired"), "{answer}");
}

fn first_message_config() -> keel_server::settings::Settings {
    let mut c = hs_config();
    c.set("auth_first_message", "true").unwrap();
    c
}

#[tokio::test]
async fn first_message_auth_then_welcome() {
    let gw = gateway(first_message_config()).await;
    let mut ws = open(&ws_url(gw.addr)).await;
    let token = hs256(user("frank"));
    use futures::SinkExt;
    ws.send(yawc::Frame::text(
        json!({"type": "auth", "payload": {"token": token}, "request_id": 1}).to_string(),
    ))
    .await
    .unwrap();
    // Nothing came before the auth_response.
    let r = recv_json(&mut ws).await;
    assert_eq!(r["type"], "auth_response", "{r}");
    assert_eq!(r["payload"]["client_id"], "frank");
    assert_eq!(r["request_id"], 1);
    let w = recv_json(&mut ws).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["payload"]["client_id"], "frank");
    assert!(gw.hub.connection("frank").is_some());
    // A second auth is a bad message; the connection stays.
    ws.send(yawc::Frame::text(
        json!({"type": "auth", "payload": {"token": token}}).to_string(),
    ))
    .await
    .unwrap();
    let e = recv_json(&mut ws).await;
    assert_eq!(e["payload"]["code"], "invalid_message", "{e}");
}

#[tokio::test]
async fn first_message_refusals_close_with_1008() {
    let mut cfg = first_message_config();
    cfg.set("auth_timeout", "300ms").unwrap();
    let gw = gateway(cfg).await;
    use futures::SinkExt;
    let expired = hs256(json!({"sub": "g", "exp": now() - 10}));
    for (first, code) in [
        (
            json!({"type": "subscribe", "payload": {"channel": "x"}}),
            "unauthorized",
        ),
        (
            json!({"type": "auth", "payload": {"token": "x.y.z"}}),
            "invalid_token",
        ),
        (
            json!({"type": "auth", "payload": {"token": expired}}),
            "token_expired",
        ),
        (json!({"type": "auth", "payload": {}}), "invalid_message"),
    ] {
        let mut ws = open(&ws_url(gw.addr)).await;
        ws.send(yawc::Frame::text(first.to_string())).await.unwrap();
        let e = recv_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{first}: {e}");
        assert_eq!(e["payload"]["code"], code, "{first}: {e}");
        assert_eq!(expect_close(&mut ws).await, 1008, "{first}");
    }
    // Silence: closed once auth_timeout has passed, not before.
    let started = tokio::time::Instant::now();
    let mut ws = open(&ws_url(gw.addr)).await;
    let e = recv_json(&mut ws).await;
    assert_eq!(e["payload"]["code"], "unauthorized", "{e}");
    assert_eq!(expect_close(&mut ws).await, 1008);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn anonymous_access_follows_allow_anonymous() {
    // Default: anonymous clients connect with a generated id.
    let gw = gateway(config()).await;
    let c = Client::connect(gw.addr).await;
    assert_eq!(c.client_id().len(), 36, "a UUID");
    // With a key configured but anonymous still allowed, both kinds connect.
    let mut cfg = hs_config();
    cfg.set("auth_allow_anonymous", "true").unwrap();
    let gw = gateway(cfg).await;
    Client::connect(gw.addr).await;
    let token = hs256(user("hana"));
    let c = Client::connect_url(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    assert_eq!(c.client_id(), "hana");
}

#[tokio::test]
async fn an_expiring_token_must_be_refreshed_or_the_connection_closes_1008() {
    let mut cfg = hs_config();
    cfg.set("heartbeat_interval", "100ms").unwrap();
    cfg.set("auth_refresh_grace", "400ms").unwrap();
    let gw = gateway(cfg).await;
    let exp = now() + 2;
    let short = |sub: &str| hs256(json!({"sub": sub, "exp": exp}));
    let mut keeps =
        Client::connect_url(&format!("ws://{}/ws?token={}", gw.addr, short("ivan"))).await;
    let mut lapses =
        Client::connect_url(&format!("ws://{}/ws?token={}", gw.addr, short("judy"))).await;

    let warned = keeps.recv().await;
    assert_eq!(warned["type"], "error", "{warned}");
    assert_eq!(warned["payload"]["code"], "token_expired");
    assert!(now() >= exp, "warned at expiry, not before");
    // A token of someone else does not refresh this connection.
    let r = keeps
        .request("refresh", json!({"token": hs256(user("mallory"))}))
        .await;
    assert_eq!(r["payload"]["code"], "forbidden", "{r}");
    let fresh = hs256(json!({"sub": "ivan", "exp": now() + 600}));
    let r = keeps.request("refresh", json!({"token": fresh})).await;
    assert_eq!(r["type"], "refresh_response", "{r}");
    assert_eq!(r["payload"]["expires_at"].as_u64(), Some(now() + 600));

    let warned = lapses.recv().await;
    assert_eq!(warned["payload"]["code"], "token_expired");
    assert_eq!(lapses.expect_close().await, 1008);
    // Both were warned in the same sweep (one expiry, one clock reading), so both
    // deadlines have passed now: the refreshed one is still served.
    assert_eq!(keeps.request("ping", json!({})).await["type"], "pong");
    assert!(gw.hub.connection("judy").is_none());
}

#[tokio::test]
async fn an_anonymous_connection_cannot_refresh() {
    let mut cfg = hs_config();
    cfg.set("auth_allow_anonymous", "true").unwrap();
    let gw = gateway(cfg).await;
    let mut c = Client::connect(gw.addr).await;
    let r = c
        .request("refresh", json!({"token": hs256(user("x"))}))
        .await;
    assert_eq!(r["payload"]["code"], "unauthorized", "{r}");
}

#[tokio::test]
async fn resume_is_only_for_the_same_authenticated_client() {
    let mut cfg = hs_config();
    cfg.set("auth_allow_anonymous", "true").unwrap();
    let gw = gateway(cfg).await;
    let url = |sub: &str| format!("ws://{}/ws?token={}", gw.addr, hs256(user(sub)));
    let alice = Client::connect_url(&url("alice")).await;
    let tok = alice.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();
    drop(alice);
    eventually("alice's session detached", || {
        gw.hub.detached_session_count() == 1
    })
    .await;
    let mut bob = Client::connect_url(&url("bob")).await;
    let r = bob
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["payload"]["code"], "forbidden", "{r}");
    // An anonymous connection holding alice's token is not alice either.
    let mut anon = Client::connect(gw.addr).await;
    let r = anon
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["payload"]["code"], "forbidden", "{r}");
    assert!(r["payload"]["detail"]
        .as_str()
        .unwrap()
        .contains("authenticate"));
    assert_eq!(bob.request("ping", json!({})).await["type"], "pong");
    let mut alice = Client::connect_url(&url("alice")).await;
    let r = alice
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["client_id"], "alice");
}
