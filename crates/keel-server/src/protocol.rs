//! The gateway's side of PROTOCOL.md v1: a [`keel::Handler`] that reads client
//! envelopes and answers them through the Hub's public API.
//!
//! Every bad message gets an `error` with the documented code and the connection
//! stays open; only the close-code table's cases close it (binary frames: 1003;
//! the transport handles 1007 and 1009). This module must not touch sockets or
//! queues directly: it calls the Hub, like any application would.

use std::sync::Arc;

use keel::{Action, Authenticator, Connection, Deferred, DisconnectReason, Handler, Hub, Message};
use keel_protocol::encode;
use keel_protocol::{
    kind, AuthPayload, ChannelPayload, ClientEnvelope, ErrorCode, HistoryPayload, PublishPayload,
    ResumePayload, RpcPayload, SubscribePayload,
};
use serde::Serialize;
use serde_json::value::RawValue;

/// The gateway's protocol handler.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Node name sent in `welcome`.
    pub node_id: String,
    /// Checks the JWTs of `auth` and `refresh`; `None` when no key is configured.
    pub auth: Option<Arc<Authenticator>>,
}

#[derive(Serialize)]
struct AuthReply<'a> {
    client_id: &'a str,
}

#[derive(Serialize)]
struct RefreshReply {
    expires_at: Option<u64>,
}

#[derive(Serialize)]
struct Welcome<'a> {
    client_id: &'a str,
    session_id: String,
    /// Null when `enable_reconnect` is off.
    reconnect_token: Option<String>,
    heartbeat: HeartbeatInfo,
    resume_ttl_ms: u64,
    node: &'a str,
}

#[derive(Serialize)]
struct PublishReply<'a> {
    channel: &'a str,
    offset: u64,
    epoch: &'a str,
}

#[derive(Serialize)]
struct EchoPayload<'a> {
    data: &'a RawValue,
}

#[derive(Serialize)]
struct HeartbeatInfo {
    interval_ms: u64,
    timeout_ms: u64,
    mode: &'static str,
}

impl Gateway {
    fn welcome(&self, hub: &Hub, conn: &Connection) {
        let cfg = hub.config();
        let welcome = Welcome {
            client_id: &conn.client_id(),
            session_id: conn.session_id(),
            reconnect_token: cfg.enable_reconnect.then(|| hub.reconnect_token(conn)),
            heartbeat: HeartbeatInfo {
                interval_ms: cfg.heartbeat_interval.as_millis() as u64,
                timeout_ms: cfg.heartbeat_timeout.as_millis() as u64,
                mode: cfg.heartbeat_mode.as_str(),
            },
            resume_ttl_ms: cfg.reconnect_token_ttl.as_millis() as u64,
            node: &self.node_id,
        };
        conn.send_text(encode::envelope("welcome", welcome, None));
    }

    /// A first-message client's first frame: `auth` with a JWT, or the end.
    fn first_message(&self, hub: &Hub, conn: &Connection, text: &str) {
        let refuse = |code: ErrorCode, detail: &str, rid| {
            conn.send_and_close(
                DisconnectReason::AuthFailed,
                encode::error(code, detail, rid),
                keel_protocol::close::POLICY_VIOLATION,
                "authentication failed",
            );
        };
        let env = match ClientEnvelope::parse(text) {
            Ok(env) => env,
            Err(e) => return refuse(e.code(), e.detail(), None),
        };
        let rid = env.request_id;
        if env.kind != kind::AUTH {
            return refuse(ErrorCode::Unauthorized, "authenticate first (`auth`)", rid);
        }
        let p: AuthPayload = match env.payload() {
            Ok(p) => p,
            Err(_) => return refuse(ErrorCode::InvalidMessage, "`auth` needs a `token`", rid),
        };
        let Some(auth) = &self.auth else {
            return refuse(ErrorCode::Unauthorized, "token auth is not configured", rid);
        };
        match auth.verify(&p.token) {
            Ok(identity) => {
                let client_id = identity.client_id.clone();
                if let Err(e) = hub.authenticate(conn, identity) {
                    return refuse(ErrorCode::InvalidMessage, e.detail(), rid);
                }
                let reply = AuthReply {
                    client_id: &client_id,
                };
                conn.send_text(encode::reply(&env.kind, reply, rid));
                self.welcome(hub, conn);
            }
            Err(e) => refuse(error_code(&e), e.detail(), rid),
        }
    }
}

impl Handler for Gateway {
    fn on_connect(&self, hub: &Hub, conn: &Connection) -> Option<Deferred> {
        // A first-message client hears nothing before its `auth_response`.
        if !conn.awaiting_auth() {
            self.welcome(hub, conn);
        }
        None
    }

    fn on_message(&self, hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
        match msg {
            // The lock behind `awaiting_auth` is taken only where first-message
            // auth is on: not on every message of every connection.
            Message::Text(text) if hub.config().auth_first_message && conn.awaiting_auth() => {
                self.first_message(hub, conn, text);
                None
            }
            Message::Text(text) => handle_text(self, hub, conn, text),
            Message::Binary(_) => {
                conn.close(
                    keel_protocol::close::UNSUPPORTED_DATA,
                    "binary frames are not part of protocol v1",
                );
                None
            }
        }
    }
}

/// The protocol error code for a library error.
fn error_code(e: &keel::Error) -> ErrorCode {
    match e.kind() {
        keel::ErrorKind::InvalidArgument => ErrorCode::InvalidMessage,
        keel::ErrorKind::MemoryLimitExceeded
        | keel::ErrorKind::ConnectionLimitExceeded
        | keel::ErrorKind::LimitExceeded => ErrorCode::LimitExceeded,
        keel::ErrorKind::ConnectionNotFound => ErrorCode::NotFound,
        keel::ErrorKind::InvalidToken => ErrorCode::InvalidToken,
        keel::ErrorKind::TokenExpired => ErrorCode::TokenExpired,
        keel::ErrorKind::Forbidden => ErrorCode::Forbidden,
        keel::ErrorKind::Unauthorized => ErrorCode::Unauthorized,
        keel::ErrorKind::RateLimited => ErrorCode::RateLimited,
        keel::ErrorKind::Unavailable => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

/// Where the answer to a request that waits on the broker goes: owned, so the
/// connection's task can finish the request after the handler returned.
struct Pending {
    hub: Hub,
    conn: Connection,
    request_id: Option<Box<RawValue>>,
}

impl Pending {
    fn new(hub: &Hub, conn: &Connection, request_id: Option<&RawValue>) -> Self {
        Pending {
            hub: hub.clone(),
            conn: conn.clone(),
            request_id: request_id.map(|r| r.to_owned()),
        }
    }

    fn reply<P: Serialize>(&self, request_kind: &str, payload: P) {
        let frame = encode::reply(request_kind, payload, self.request_id.as_deref());
        self.conn.send_text(frame);
    }

    fn error(&self, e: &keel::Error) {
        let frame = encode::error(error_code(e), e.detail(), self.request_id.as_deref());
        self.conn.send_text(frame);
    }
}

/// Handles one client envelope. Requests that wait on the broker (subscribe,
/// publish, history, resume) come back as a [`Deferred`] that the connection's
/// task finishes before it reads the next message, so a connection's requests are
/// answered in the order they were sent.
fn handle_text(gw: &Gateway, hub: &Hub, conn: &Connection, text: &str) -> Option<Deferred> {
    let env = match ClientEnvelope::parse(text) {
        Ok(env) => env,
        Err(e) => {
            conn.send_text(encode::error(e.code(), e.detail(), None));
            return None;
        }
    };
    let rid = env.request_id;
    let reply = |payload: &serde_json::Value| {
        conn.send_text(encode::reply(&env.kind, payload, rid));
        None
    };
    let fail = |code: ErrorCode, detail: &str| {
        conn.send_text(encode::error(code, detail, rid));
        None
    };
    let bad_payload = |e: serde_json::Error| {
        fail(
            ErrorCode::InvalidMessage,
            &format!("bad payload for `{}`: {e}", env.kind),
        )
    };
    let hub_error = |e: keel::Error| fail(error_code(&e), e.detail());
    // The payload of this envelope's type, or an `invalid_message` answer.
    macro_rules! payload {
        () => {
            match env.payload() {
                Ok(p) => p,
                Err(e) => return bad_payload(e),
            }
        };
    }
    // Goes on only if the connection may do `action` on `channel`.
    macro_rules! authorized {
        ($action:expr, $channel:expr) => {
            if let Err(e) = hub.authorize(conn, $action, $channel) {
                return hub_error(e);
            }
        };
    }

    match env.kind.as_ref() {
        kind::SUBSCRIBE => {
            let p: SubscribePayload = payload!();
            authorized!(Action::Subscribe, &p.channel);
            let out = Pending::new(hub, conn, rid);
            Some(Box::pin(async move {
                match out
                    .hub
                    .subscribe(&out.conn, &p.channel, p.since.as_ref())
                    .await
                {
                    Ok(s) => out.reply(
                        kind::SUBSCRIBE,
                        serde_json::json!({
                            "channel": p.channel,
                            "offset": s.position.offset,
                            "epoch": s.position.epoch,
                            "recovered": s.recovered,
                            "replayed": s.replayed,
                        }),
                    ),
                    Err(e) => out.error(&e),
                }
            }))
        }
        kind::UNSUBSCRIBE => {
            let p: ChannelPayload = payload!();
            hub.unsubscribe(conn, &p.channel);
            reply(&serde_json::json!({ "channel": p.channel }))
        }
        kind::PUBLISH => {
            let p: PublishPayload<'_> = payload!();
            authorized!(Action::Publish, &p.channel);
            let out = Pending::new(hub, conn, rid);
            let (channel, data) = (p.channel, p.data.to_owned());
            Some(Box::pin(async move {
                let publisher = out.conn.client_id();
                match out.hub.publish(&channel, &data, Some(&publisher)).await {
                    // The hot reply: a typed payload, no intermediate `Value`.
                    Ok(publication) => out.reply(
                        kind::PUBLISH,
                        PublishReply {
                            channel: &channel,
                            offset: publication.offset,
                            epoch: &publication.epoch,
                        },
                    ),
                    Err(e) => out.error(&e),
                }
            }))
        }
        kind::RPC => {
            let p: RpcPayload<'_> = payload!();
            match p.method.as_str() {
                "echo" => {
                    let data = p.data.unwrap_or(RawValue::NULL);
                    conn.send_text(encode::reply(&env.kind, EchoPayload { data }, rid));
                    None
                }
                other => fail(ErrorCode::NotFound, &format!("no rpc method `{other}`")),
            }
        }
        kind::PRESENCE => {
            let p: ChannelPayload = payload!();
            authorized!(Action::Presence, &p.channel);
            let out = Pending::new(hub, conn, rid);
            Some(Box::pin(async move {
                match presence(&out.hub, &p.channel).await {
                    Ok(v) => out.reply(kind::PRESENCE, v),
                    Err(e) => out.error(&e),
                }
            }))
        }
        kind::HISTORY => {
            let p: HistoryPayload = payload!();
            authorized!(Action::History, &p.channel);
            let out = Pending::new(hub, conn, rid);
            Some(Box::pin(async move {
                match history(&out.hub, &p.channel, p.since.as_ref(), p.limit).await {
                    Ok(h) => out.reply(kind::HISTORY, h),
                    Err(e) => out.error(&e),
                }
            }))
        }
        kind::PING => {
            conn.send_text(encode::pong(rid));
            None
        }
        kind::PONG => None,
        kind::RESUME => {
            let p: ResumePayload = payload!();
            // Channels this client may no longer subscribe to are not taken back
            // (a private channel is judged by the session's own client_id).
            let owner = hub
                .validate_reconnect_token(&p.reconnect_token)
                .map(|c| c.client_id)
                .ok();
            let positions: Vec<(String, Option<keel_protocol::StreamPosition>)> = p
                .positions
                .into_iter()
                .filter(|(ch, _)| match ch.strip_prefix('#') {
                    Some(id) => owner.as_deref() == Some(id),
                    None => hub.authorize(conn, Action::Subscribe, ch).is_ok(),
                })
                .collect();
            // A reconnect token is not a credential: an authenticated connection
            // may only resume its own client's session.
            let me = conn.identity().map(|i| i.client_id);
            let out = Pending::new(hub, conn, rid);
            let token = p.reconnect_token;
            Some(Box::pin(async move {
                let resumed = out
                    .hub
                    .resume(&out.conn, &token, &positions, me.as_deref())
                    .await;
                match resumed {
                    Ok(r) => out.reply(kind::RESUME, &r),
                    Err(e) => out.error(&e),
                }
            }))
        }
        kind::AUTH => fail(
            ErrorCode::InvalidMessage,
            "`auth` is only accepted as the first message of an unauthenticated connection",
        ),
        kind::REFRESH => {
            let p: AuthPayload = payload!();
            let Some(auth) = &gw.auth else {
                return fail(ErrorCode::Unauthorized, "token auth is not configured");
            };
            if !conn.is_authenticated() {
                return fail(
                    ErrorCode::Unauthorized,
                    "this connection did not authenticate",
                );
            }
            match auth.verify(&p.token).and_then(|id| {
                let exp = id.expires_at;
                hub.refresh_identity(conn, id).map(|()| exp)
            }) {
                Ok(expires_at) => {
                    conn.send_text(encode::reply(&env.kind, RefreshReply { expires_at }, rid));
                    None
                }
                Err(e) => hub_error(e),
            }
        }
        other => fail(
            ErrorCode::UnknownType,
            &format!("unknown message type `{other}`"),
        ),
    }
}

/// `presence_response` payload (also `GET /api/presence/{channel}`).
pub async fn presence(hub: &Hub, channel: &str) -> keel::Result<serde_json::Value> {
    let clients = hub.presence(channel).await?;
    Ok(serde_json::json!({ "channel": channel, "clients": clients }))
}

/// One publication in a `history_response`: the `message` payload.
#[derive(Serialize)]
struct HistoryMessage<'a> {
    channel: &'a str,
    data: &'a RawValue,
    offset: u64,
    epoch: &'a str,
    publisher: Option<&'a str>,
}

/// `history_response` payload (also `GET /api/history/{channel}`): the
/// publications after `since`, oldest first, at most `limit`. With an epoch in
/// `since`, a recovery: all that followed it or none (`recovered` says which);
/// without, what is kept. `epoch` is null for a channel with no stream.
pub async fn history(
    hub: &Hub,
    channel: &str,
    since: Option<&keel_protocol::StreamPosition>,
    limit: Option<usize>,
) -> keel::Result<serde_json::Value> {
    let query = keel::HistoryQuery {
        after: since.map_or(0, |s| s.offset),
        epoch: since.map(|s| s.epoch.as_str()).filter(|e| !e.is_empty()),
        limit: limit.unwrap_or(usize::MAX),
    };
    let h = hub.history(channel, query).await?;
    let messages: Vec<HistoryMessage<'_>> = h
        .publications
        .iter()
        .map(|p| HistoryMessage {
            channel: &p.channel,
            data: &p.data,
            offset: p.offset,
            epoch: &p.epoch,
            publisher: p.publisher.as_deref(),
        })
        .collect();
    let (offset, epoch) = match &h.position {
        Some(pos) => (pos.offset, Some(pos.epoch.as_str())),
        None => (0, None),
    };
    Ok(serde_json::json!({
        "channel": channel,
        "epoch": epoch,
        "offset": offset,
        "recovered": h.complete,
        "messages": messages,
    }))
}
