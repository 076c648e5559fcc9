//! The gateway's HTTP surface (WebSocket endpoint, health, metrics, `/api/*`,
//! `/admin/*`) and the serve loop with its graceful shutdown.
//!
//! Handlers call the Hub's public API and nothing else. `/api` and `/admin` need
//! `Authorization: Bearer <api_key>`; a wrong or missing key gets 401 with an empty
//! body. The serve loop owns the shutdown sequence: on the trigger it drains the
//! Hub (readiness 503 at once), then stops accepting HTTP, then returns the report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel::{Authenticator, Hub, Identity, ShutdownReport, Tickets, Upgrade};
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::protocol::{self, Gateway};
use crate::settings::{BrokerKind, Settings};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    hub: Hub,
    /// The gateway's options (the library's are the Hub's `config()`).
    settings: Arc<Settings>,
    api_key: Arc<str>,
    node_id: Arc<str>,
    /// JWT checks; `None` when no key is configured.
    auth: Option<Arc<Authenticator>>,
    /// One-time tickets issued by `POST /api/ticket`.
    tickets: Arc<Tickets>,
}

/// A running gateway.
pub struct Running {
    /// The address it listens on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    /// Its Hub.
    pub hub: Hub,
    /// The API key in force (configured or generated).
    pub api_key: String,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<ShutdownReport>,
}

impl Running {
    /// Runs the shutdown sequence and waits for it: drain, then stop serving.
    pub async fn shutdown(self) -> ShutdownReport {
        self.stop.notify_one();
        self.wait().await
    }

    /// A handle that triggers the same shutdown as [`shutdown`](Self::shutdown),
    /// for signal handlers.
    pub fn stopper(&self) -> Arc<Notify> {
        self.stop.clone()
    }

    /// Waits until the gateway has stopped (after the stopper fired), returning
    /// the drain report.
    pub async fn wait(self) -> ShutdownReport {
        self.task.await.unwrap_or_default()
    }
}

/// Binds, starts the Hub and serves until [`Running::shutdown`] (or its stopper).
pub async fn start(mut config: Settings) -> anyhow::Result<Running> {
    if config.node_id.is_empty() {
        config.node_id = format!("keel-{:08x}", rand_u32());
    }
    let api_key = match config.api_key.clone() {
        Some(k) => k,
        None => {
            let k = uuid::Uuid::new_v4().simple().to_string();
            // Printed once, on stderr, not through the log pipeline.
            eprintln!("keel: no api_key configured; generated one for this run: {k}");
            k
        }
    };
    let listener = keel::listener::bind_tcp(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("option `listen`: cannot bind {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let auth = Authenticator::from_config(&config.keel)?.map(Arc::new);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("options `tls_cert` and `tls_key` go together"),
    };
    let node_id: Arc<str> = config.node_id.clone().into();
    let drain_timeout = config.drain_timeout;
    let ws_path = config.ws_path.clone();
    let metrics_on = config.enable_metrics;
    let settings = Arc::new(config);
    let gateway = Gateway {
        node_id: node_id.to_string(),
        auth: auth.clone(),
    };
    let hub = match settings.broker {
        BrokerKind::Memory => Hub::with_handler(settings.keel.clone(), gateway),
        BrokerKind::Redis => {
            let k = &settings.keel;
            let broker = keel_redis::RedisBroker::connect(&settings.redis_url, "keel")
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "option `redis_url`: cannot reach {}: {e}",
                        settings.redis_url
                    )
                })?
                .with_limits(keel::broker::BrokerLimits {
                    max_history_bytes: k.max_history_memory,
                    max_channels: k.max_channels,
                    max_sessions: k.max_detached_sessions,
                    max_presence: k.max_presence_entries,
                    ..Default::default()
                });
            Hub::with_broker(settings.keel.clone(), gateway, Arc::new(broker))
        }
    };
    hub.start();
    let tickets = Arc::new(Tickets::new(hub.broker().clone(), settings.auth_ticket_ttl));
    let state = AppState {
        hub: hub.clone(),
        settings: settings.clone(),
        api_key: api_key.clone().into(),
        node_id,
        auth,
        tickets,
    };
    let app = router(state.clone(), &ws_path, metrics_on);
    let tls_on = tls.is_some();
    if !settings.keel.auth_configured() && settings.auth_allow_anonymous {
        tracing::warn!(
            "AUTH IS NOT CONFIGURED: any client can connect anonymously and subscribe or \
             publish to any channel. Set [auth] jwt_secret or jwt_public_key_file (and \
             allow_anonymous = false) before exposing this gateway."
        );
    }
    // After the warning: whoever waits for this line has seen the warning too.
    tracing::info!(%addr, tls = tls_on, "listening on {addr}");
    if settings.allowed_origins.is_empty() {
        tracing::debug!(
            "allowed_origins is empty: only same-origin or Origin-less upgrades are accepted"
        );
    }

    if hub.broker().shared() {
        // The node's heartbeat in the cluster registry: its name and its
        // connections, every second, lasting NODE_TTL.
        let hub = hub.clone();
        let name = state.node_id.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if hub.is_draining() && hub.connection_count() == 0 {
                    return;
                }
                let _ = hub
                    .broker()
                    .announce(&name, hub.connection_count(), NODE_TTL)
                    .await;
            }
        });
    }
    let stop = Arc::new(Notify::new());
    let stop2 = stop.clone();
    let hub2 = hub.clone();
    let task = tokio::spawn(async move {
        let server_stop = Arc::new(Notify::new());
        let server_stop2 = server_stop.clone();
        let until = async move { server_stop2.notified().await };
        let gate = hub2.gate();
        let server = match tls {
            // TCP_NODELAY is set by the TLS listener before the handshake.
            Some(acceptor) => {
                let listener = crate::tls::TlsListener::new(listener, acceptor, gate.clone());
                tokio::spawn(async move {
                    match listener {
                        Ok(l) => keel::listener::serve(l, app, gate, until).await,
                        Err(e) => tracing::error!(error = %e, "TLS listener failed"),
                    }
                })
            }
            // keel::Listener sets TCP_NODELAY (without it, Nagle holds a small write
            // back while an earlier one is unacknowledged, and the client's delayed
            // ACK turns that into 40 ms stalls) and sends each upgrade's 101 with
            // the `welcome`.
            // It also answers plain upgrades itself, without hyper (HTTP requests
            // and upgrades offering permessage-deflate still go through hyper).
            None => tokio::spawn(keel::listener::serve(
                keel::Listener::from(listener)
                    .route_upgrades(app.clone())
                    .gate(gate.clone()),
                app,
                gate,
                until,
            )),
        };
        stop2.notified().await;
        let report = hub2.graceful_shutdown(drain_timeout).await;
        server_stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        report
    });
    Ok(Running {
        addr,
        hub,
        api_key,
        stop,
        task,
    })
}

/// This process's resident set, from `/proc/self/statm` (Linux; `None` elsewhere).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn rand_u32() -> u32 {
    rand::random()
}

fn router(state: AppState, ws_path: &str, metrics_on: bool) -> Router {
    let api = Router::new()
        .route("/api/publish", post(api_publish))
        .route("/api/broadcast", post(api_broadcast))
        .route("/api/disconnect", post(api_disconnect))
        .route("/api/ticket", post(api_ticket))
        .route("/api/stats", get(api_stats))
        .route("/api/presence/{channel}", get(api_presence))
        .route("/api/history/{channel}", get(api_history))
        .route("/admin/drain", post(admin_drain))
        // Inside the key check: a caller without the key is refused unread.
        .route_layer(middleware::from_fn_with_state(state.clone(), body_deadline))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut app = Router::new()
        .route(ws_path, get(ws_upgrade))
        .route("/health", get(health))
        .route(
            "/health/live",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route("/health/broker", get(health_broker));
    if metrics_on {
        app = app.route("/metrics", get(metrics));
    }
    app.merge(api).with_state(state)
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| constant_time_eq(k.trim().as_bytes(), state.api_key.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

/// How long a node's announcement in the cluster registry lasts: a node dead
/// this long (killed, cut off) drops out of `/api/stats`.
const NODE_TTL: Duration = Duration::from_secs(5);

/// The largest `/api` or `/admin` request body (axum's own default bound).
const MAX_API_BODY: usize = 2 * 1024 * 1024;

/// Reads a request's body whole within `handshake_timeout` of the handler being
/// reached (408 otherwise; 413 past [`MAX_API_BODY`]), so that a caller who sends
/// headers and then trickles the body, or stops, holds neither a connection nor
/// a handler for longer than that.
async fn body_deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let deadline = state.hub.config().handshake_timeout;
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_API_BODY)).await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_API_BODY} bytes, or cut short"),
            )
            .into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body did not arrive within handshake_timeout",
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unavailable(detail: &str) -> Response {
    ApiError::unavailable(detail).into_response()
}

/// Credentials a client may bring to the upgrade. Deserialized from the query
/// string; `Debug` is not derived so they cannot end up in a log line.
#[derive(Deserialize, Default)]
struct Credentials {
    token: Option<String>,
    ticket: Option<String>,
}

fn unauthorized(detail: &str) -> Response {
    ApiError::unauthorized(detail).into_response()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

async fn ws_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(creds): Query<Credentials>,
    upgrade: Upgrade,
) -> Response {
    if !origin_allowed(&state.settings.allowed_origins, &headers) {
        return ApiError::new(StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    // Refuse early what would be refused anyway, before spending a credential.
    if let Err(e) = state.hub.check_admission() {
        return unavailable(e.detail());
    }
    let cfg = &*state.settings;
    let jwt = creds
        .token
        .as_deref()
        .or_else(|| cookie(&headers, &cfg.auth_cookie_name));
    let identity: Option<Identity> = if let Some(ticket) = creds.ticket.as_deref() {
        match state.tickets.redeem(ticket).await {
            Ok(id) => Some(id),
            Err(e) => return unauthorized(e.detail()),
        }
    } else if let Some(token) = jwt {
        let Some(auth) = &state.auth else {
            return unauthorized("token auth is not configured");
        };
        match auth.verify(token) {
            Ok(id) => Some(id),
            Err(e) => return unauthorized(e.detail()),
        }
    } else {
        None
    };
    let result = match identity {
        Some(id) => state.hub.connect_as(id, upgrade),
        None if cfg.keel.auth_first_message => state.hub.connect_awaiting_auth(upgrade),
        None if cfg.auth_allow_anonymous => {
            // From the thread's generator: `Uuid::new_v4` costs a getrandom
            // syscall per connection.
            let client_id = uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string();
            state
                .hub
                .connect(client_id, upgrade, serde_json::Value::Null)
        }
        None => return unauthorized("credentials required"),
    };
    match result {
        Ok(response) => response,
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Empty list: same-origin (Origin's host equals Host) or no Origin header. Otherwise
/// the Origin must equal an entry, or match `scheme://*.domain` as a subdomain.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        return origin
            .split_once("://")
            .is_some_and(|(_, h)| !host.is_empty() && h == host);
    }
    allowed.iter().any(|a| {
        if a == "*" || *a == origin {
            return true;
        }
        match (a.split_once("://*."), origin.split_once("://")) {
            (Some((scheme, domain)), Some((oscheme, ohost))) => {
                scheme == oscheme && ohost.ends_with(&format!(".{domain}"))
            }
            _ => false,
        }
    })
}

async fn health(State(state): State<AppState>) -> Response {
    let hub = &state.hub;
    if hub.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    Json(json!({
        "status": "ok",
        "uptime": hub.uptime().as_secs_f64(),
        "connections": hub.connection_count(),
        "memory": hub.memory_usage(),
        "version": env!("CARGO_PKG_VERSION"),
        "broker": "memory",
        "node": &*state.node_id,
    }))
    .into_response()
}

async fn health_broker(State(state): State<AppState>) -> Response {
    // A round trip to where the broker keeps its state (for the memory broker,
    // a lookup through the channel registry).
    let t = Instant::now();
    let broker = state.hub.broker();
    let checked = tokio::time::timeout(Duration::from_secs(2), broker.check()).await;
    let _ = state.hub.channel_position("__keel_health").await;
    let latency_ms = t.elapsed().as_secs_f64() * 1000.0;
    match checked {
        Ok(Ok(())) => Json(json!({
            "overall": "healthy",
            "broker": broker.kind(),
            "latency_ms": latency_ms,
        }))
        .into_response(),
        Ok(Err(e)) => broker_down(broker.kind(), e.detail(), latency_ms),
        Err(_) => broker_down(broker.kind(), "no answer within 2 s", latency_ms),
    }
}

/// 503 with the reason: the broker cannot serve. Readiness (`/health`) stays
/// 200, so that one broker outage does not empty the whole load balancer.
fn broker_down(kind: &str, reason: &str, latency_ms: f64) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "overall": "unhealthy",
            "broker": kind,
            "error": reason,
            "latency_ms": latency_ms,
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.hub.metrics_text(),
    )
        .into_response()
}

fn bad_request(detail: impl std::fmt::Display) -> Response {
    ApiError::bad_request(detail.to_string()).into_response()
}

#[derive(Deserialize)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
}

async fn api_publish(State(state): State<AppState>, body: Json<PublishBody>) -> Response {
    match state.hub.publish(&body.channel, &body.data, None).await {
        Ok(p) => Json(json!({"channel": body.channel, "offset": p.offset, "epoch": p.epoch, "delivered": p.delivered})).into_response(),
        // Its own status: 400 for a bad channel or data, 503 when the broker
        // cannot answer, 429 or 403 where those apply.
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Deserialize)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
}

async fn api_broadcast(State(state): State<AppState>, body: Json<BroadcastBody>) -> Response {
    let mut results = Vec::with_capacity(body.channels.len());
    for ch in &body.channels {
        results.push(match state.hub.publish(ch, &body.data, None).await {
            Ok(p) => json!({"channel": ch, "offset": p.offset, "epoch": p.epoch, "delivered": p.delivered}),
            Err(e) => json!({"channel": ch, "error": e.detail()}),
        });
    }
    Json(json!({ "results": results })).into_response()
}

#[derive(Deserialize)]
struct DisconnectBody {
    client_id: String,
    code: Option<u16>,
    reason: Option<String>,
}

async fn api_disconnect(State(state): State<AppState>, body: Json<DisconnectBody>) -> Response {
    let code = body.code.unwrap_or(keel_protocol::close::NORMAL);
    if !(code == 1000 || (3000..=4999).contains(&code)) {
        return bad_request("code must be 1000 or 3000-4999");
    }
    let reason = body.reason.as_deref().unwrap_or("disconnected by server");
    match state
        .hub
        .disconnect_anywhere(&body.client_id, code, reason)
        .await
    {
        Ok(true) => Json(json!({"disconnected": true})).into_response(),
        // Not on this node: every node of the cluster was asked.
        Ok(false) => (
            StatusCode::ACCEPTED,
            Json(json!({"disconnected": "requested", "detail": "not on this node; every node was asked"})),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Deserialize, Default)]
struct TicketBody {
    client_id: Option<String>,
    #[serde(default)]
    info: serde_json::Value,
    channels: Option<Vec<String>>,
}

/// `POST /api/ticket`: a one-time ticket for `?ticket=` on the upgrade.
async fn api_ticket(State(state): State<AppState>, body: bytes::Bytes) -> Response {
    // An empty body asks for a ticket with a generated client_id.
    let body: TicketBody = if body.iter().all(u8::is_ascii_whitespace) {
        TicketBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return bad_request(format!("bad ticket request: {e}")),
        }
    };
    let client_id = body
        .client_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if client_id.is_empty() || client_id.len() > 255 || client_id.chars().any(char::is_control) {
        return bad_request("client_id must be 1 to 255 printable characters");
    }
    let identity = Identity {
        client_id: client_id.clone(),
        info: body.info,
        channels: body.channels,
        expires_at: None,
    };
    match state.tickets.issue(identity).await {
        Ok(ticket) => Json(json!({
            "ticket": ticket,
            "client_id": client_id,
            "expires_in": state.tickets.ttl().as_secs_f64(),
        }))
        .into_response(),
        Err(e) => unavailable(e.detail()),
    }
}

async fn api_stats(State(state): State<AppState>) -> Response {
    let hub = &state.hub;
    let m = hub.metrics_snapshot();
    let mut memory = serde_json::to_value(hub.memory_usage()).unwrap_or_default();
    if let Some(o) = memory.as_object_mut() {
        // Each part clients can make the gateway hold, with its bound's option.
        o.insert(
            "parts".into(),
            json!({
                "user_data_bytes": m.user_data_bytes,
                "send_queue_bytes": m.send_queue_bytes,
                "history_bytes": m.history_bytes,
                "channels": m.channels,
                "sessions_detached": m.sessions_detached,
                "presence_entries": m.presence_entries,
                "tickets": m.tickets,
                "pending_connections": m.pending_connections,
            }),
        );
        if let Some(rss) = rss_bytes() {
            o.insert("rss_bytes".into(), rss.into());
        }
    }
    let mut stats = json!({
        "connections": m.connections,
        "channels": m.channels,
        "history_bytes": m.history_bytes,
        "memory": memory,
        "node": &*state.node_id,
        "dropped_messages": hub.dropped_total(),
        "send_queue_bytes": m.send_queue_bytes,
        "draining": hub.is_draining(),
    });
    let broker = hub.broker();
    if broker.shared() {
        // Every node that announced itself within NODE_TTL; a broker that
        // cannot answer leaves the section out rather than fail the stats.
        if let Ok(Ok(nodes)) = tokio::time::timeout(Duration::from_secs(2), broker.nodes()).await {
            let total: usize = nodes.iter().map(|n| n.connections).sum();
            stats["cluster"] = json!({"connections": total, "nodes": nodes});
        }
    }
    Json(stats).into_response()
}

async fn api_presence(State(state): State<AppState>, Path(channel): Path<String>) -> Response {
    match protocol::presence(&state.hub, &channel).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => unavailable(e.detail()),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

async fn api_history(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let since = q.since.map(|offset| keel_protocol::StreamPosition {
        offset,
        epoch: String::new(),
    });
    match protocol::history(&state.hub, &channel, since.as_ref(), q.limit).await {
        Ok(h) => Json(h).into_response(),
        Err(e) => bad_request(e.detail()),
    }
}

/// Starts the drain without exiting: readiness turns 503, clients are told to
/// reconnect elsewhere. The process keeps running until a signal ends it.
async fn admin_drain(State(state): State<AppState>) -> Response {
    if !state.hub.is_draining() {
        // Called here, not inside the task: the call marks the Hub draining, so
        // readiness is off before the 202 goes out (inside the spawned task it
        // raced with the client's next `/health`).
        let drain = state.hub.graceful_shutdown(state.settings.drain_timeout);
        tokio::spawn(async move {
            let report = drain.await;
            tracing::info!(?report, "drain finished; waiting for a signal to exit");
        });
    }
    (StatusCode::ACCEPTED, Json(json!({"status": "draining"}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(&none, &headers(None, "a.com")));
        assert!(origin_allowed(
            &none,
            &headers(Some("https://a.com"), "a.com")
        ));
        assert!(!origin_allowed(
            &none,
            &headers(Some("https://evil.com"), "a.com")
        ));
        let list = vec![
            "https://app.example.com".to_string(),
            "https://*.example.org".to_string(),
        ];
        assert!(origin_allowed(
            &list,
            &headers(Some("https://app.example.com"), "x")
        ));
        assert!(origin_allowed(
            &list,
            &headers(Some("https://a.b.example.org"), "x")
        ));
        assert!(!origin_allowed(
            &list,
            &headers(Some("https://example.org.evil.com"), "x")
        ));
        assert!(!origin_allowed(
            &list,
            &headers(Some("http://a.example.org"), "x")
        ));
    }
}
