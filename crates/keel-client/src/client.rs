//! The [`Client`] handle and the one task that owns its connection.
//!
//! The task runs a loop: connect, read `welcome`, resume the previous session (or
//! subscribe again with `since` if the session is gone), send what was queued
//! while disconnected, then serve the connection until it ends; then back off
//! with jitter and start again. Everything the application does goes through a
//! command channel to that task, so the connection has exactly one owner and no
//! lock. The heartbeat watchdog is the task's own deadline: nothing received for
//! the server's `interval + timeout` means the server (or the path to it) is dead.
//!
//! It must not retry a request whose fate is unknown (a publication in flight when
//! the connection dropped fails with [`ErrorKind::Disconnected`]), and it never
//! hands the application a message twice or out of order (see [`crate::stream`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::ReconnectOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, INVALID_FRAME};
use crate::stream::{Action, Publication, Tracker};
use crate::transport::{Incoming, Socket};

/// How a [`Client`] behaves. `ClientOptions::default()` is what most applications want.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientOptions {
    /// Reconnect delays and attempts.
    pub reconnect: ReconnectOptions,
    /// How long a request waits for its answer once sent.
    pub request_timeout: Duration,
    /// How long one connection attempt (TCP + WebSocket handshake + `welcome`) may take.
    pub connect_timeout: Duration,
    /// Most calls kept while disconnected; past it they fail with
    /// [`ErrorKind::QueueFull`].
    pub max_queued: usize,
    /// Events buffered for the application; when full, the client stops reading
    /// the socket until the application catches up.
    pub event_buffer: usize,
    /// Most messages held per channel behind a gap while it is repaired.
    pub max_pending_messages: usize,
    /// Largest message accepted from the server (a `history` answer carries up to
    /// 100 publications).
    pub max_message_size: usize,
    /// Silence after which the server counts as dead before `welcome` announced
    /// its heartbeat (then `interval + timeout` from `welcome` applies).
    pub default_dead_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            reconnect: ReconnectOptions::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_queued: 1000,
            event_buffer: 1024,
            max_pending_messages: 10_000,
            max_message_size: 16 * 1024 * 1024,
            default_dead_after: Duration::from_secs(50),
        }
    }
}

/// A handle to a client. Cheap to clone; the connection lives in a task that ends
/// when [`close`](Self::close) is called or every handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

/// The stream of [`Event`]s of one client.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` after [`Event::Closed`].
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// The answer to a subscribe.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribed {
    /// The channel's offset when the subscription took effect.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Whether what was missed since the previous position was replayed.
    pub recovered: bool,
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The offset the publication got.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
}

#[derive(Debug)]
enum Command {
    Request {
        kind: String,
        payload: Value,
        reply: oneshot::Sender<Result<Value>>,
    },
    Close,
}

impl Client {
    /// Starts a client for `url` (`ws://host:port/ws`) and returns at once; the
    /// connection is made (and remade) in the background. Must be called inside a
    /// tokio runtime.
    pub fn connect(url: &str, options: ClientOptions) -> Result<(Client, Events)> {
        let url: url::Url = url
            .parse()
            .map_err(|e| Error::new(ErrorKind::InvalidUrl, format!("{url}: {e}")))?;
        if !matches!(url.scheme(), "ws" | "wss") {
            return Err(Error::new(
                ErrorKind::InvalidUrl,
                format!("{url}: the scheme must be ws or wss"),
            ));
        }
        let (commands, cmd_rx) = mpsc::channel(options.max_queued.max(16));
        let (ev_tx, rx) = mpsc::channel(options.event_buffer.max(1));
        let task = Task {
            url,
            tracker: Tracker::new(options.max_pending_messages),
            opts: options,
            commands: cmd_rx,
            events: ev_tx,
            token: None,
            fresh_token: None,
            queued: VecDeque::new(),
            pending: HashMap::new(),
            next_id: 0,
            closing: false,
            shutdown_hint: None,
        };
        tokio::spawn(task.run());
        Ok((Client { commands }, Events { rx }))
    }

    /// Sends `kind` with `payload` and waits for the answer's payload. While
    /// disconnected the request waits in the outgoing queue (bounded by
    /// `max_queued`) and is sent after reconnection.
    pub async fn request(&self, kind: &str, payload: Value) -> Result<Value> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                kind: kind.to_string(),
                payload,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Subscribes to `channel`; from then on its messages arrive as
    /// [`Event::Message`], in order, and the subscription survives reconnects.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscribed> {
        let v = self
            .request(
                keel_protocol::kind::SUBSCRIBE,
                json!({ "channel": channel }),
            )
            .await?;
        Ok(Subscribed {
            offset: v["offset"].as_u64().unwrap_or(0),
            epoch: v["epoch"].as_str().unwrap_or_default().to_string(),
            recovered: v["recovered"].as_bool().unwrap_or(false),
        })
    }

    /// Leaves `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.request(
            keel_protocol::kind::UNSUBSCRIBE,
            json!({ "channel": channel }),
        )
        .await
        .map(|_| ())
    }

    /// Publishes `data` to `channel`.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Published> {
        let v = self
            .request(
                keel_protocol::kind::PUBLISH,
                json!({ "channel": channel, "data": data }),
            )
            .await?;
        Ok(Published {
            offset: v["offset"].as_u64().unwrap_or(0),
            epoch: v["epoch"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Calls server method `method` with `data`; returns the answer's `data`.
    pub async fn rpc(&self, method: &str, data: Value) -> Result<Value> {
        let mut v = self
            .request(
                keel_protocol::kind::RPC,
                json!({ "method": method, "data": data }),
            )
            .await?;
        Ok(v["data"].take())
    }

    /// Who is present in `channel` (`presence_response` payload).
    pub async fn presence(&self, channel: &str) -> Result<Value> {
        self.request(keel_protocol::kind::PRESENCE, json!({ "channel": channel }))
            .await
    }

    /// `channel`'s publications after `since` (oldest first, at most `limit`).
    pub async fn history(
        &self,
        channel: &str,
        since: Option<(u64, &str)>,
        limit: Option<usize>,
    ) -> Result<Vec<Publication>> {
        let mut payload = json!({ "channel": channel });
        if let Some((offset, epoch)) = since {
            payload["since"] = json!({ "offset": offset, "epoch": epoch });
        }
        if let Some(limit) = limit {
            payload["limit"] = json!(limit);
        }
        let v = self.request(keel_protocol::kind::HISTORY, payload).await?;
        Ok(v["messages"]
            .as_array()
            .map(|a| a.iter().filter_map(Publication::from_payload).collect())
            .unwrap_or_default())
    }

    /// Closes the connection with 1000 and stops for good ([`Event::Closed`]
    /// follows). Queued calls fail with [`ErrorKind::Closed`].
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the client is closed")
}

/// A call made while disconnected.
struct Queued {
    kind: String,
    payload: Value,
    reply: oneshot::Sender<Result<Value>>,
}

/// What an in-flight request is for.
enum Purpose {
    /// The application's; answered through `reply`.
    App {
        reply: oneshot::Sender<Result<Value>>,
        subscribe: Option<String>,
    },
    /// The task's resume.
    Resume,
    /// The task re-subscribing after a lost session.
    Resubscribe(String),
    /// The task repairing a gap.
    History(String),
}

struct Pending {
    purpose: Purpose,
    deadline: Instant,
}

/// How a connection ended.
struct End {
    code: Option<u16>,
    reason: String,
    /// Whether `welcome` arrived (the backoff starts over).
    welcomed: bool,
}

struct Task {
    url: url::Url,
    opts: ClientOptions,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    tracker: Tracker,
    /// The token to resume with on the next connection.
    token: Option<String>,
    /// The token of this connection's own new session (from `welcome`), which
    /// becomes `token` if the resume fails; until its answer, `token` stays the old
    /// one, so a drop during the resume does not lose the session.
    fresh_token: Option<String>,
    queued: VecDeque<Queued>,
    pending: HashMap<String, Pending>,
    next_id: u64,
    closing: bool,
    /// `server_shutdown.delay_ms`: the next reconnect waits this instead of backoff.
    shutdown_hint: Option<Duration>,
}

impl Task {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let stop_reason = loop {
            let end = match tokio::time::timeout(
                self.opts.connect_timeout,
                Socket::connect(&self.url, self.opts.max_message_size),
            )
            .await
            {
                Ok(Ok(ws)) => self.serve(ws).await,
                Ok(Err(e)) => End {
                    code: None,
                    reason: format!("connect failed: {e}"),
                    welcomed: false,
                },
                Err(_) => End {
                    code: None,
                    reason: "connect timed out".into(),
                    welcomed: false,
                },
            };
            self.connection_ended();
            if end.welcomed {
                attempt = 0;
            }
            let stop = if self.closing {
                Some("closed by the application".to_string())
            } else {
                match end.code {
                    Some(keel_protocol::close::POLICY_VIOLATION) => {
                        Some(format!("refused by the server (1008): {}", end.reason))
                    }
                    Some(keel_protocol::close::REPLACED) => Some(format!(
                        "replaced by a newer connection of this session (4002): {}",
                        end.reason
                    )),
                    Some(keel_protocol::close::UNSUPPORTED_DATA) => {
                        Some(format!("protocol mismatch (1003): {}", end.reason))
                    }
                    _ => None,
                }
            };
            let out_of_attempts = self
                .opts
                .reconnect
                .max_attempts
                .is_some_and(|max| attempt >= max);
            if end.welcomed {
                self.emit(Event::Disconnected {
                    code: end.code,
                    reason: end.reason.clone(),
                    will_reconnect: stop.is_none() && !out_of_attempts,
                })
                .await;
            }
            if let Some(reason) = stop {
                break reason;
            }
            if out_of_attempts {
                break format!("gave up after {attempt} attempts: {}", end.reason);
            }
            attempt += 1;
            let delay = self
                .shutdown_hint
                .take()
                .unwrap_or_else(|| self.opts.reconnect.delay(attempt, &mut rand::thread_rng()));
            tracing::debug!(attempt, ?delay, reason = %end.reason, "reconnecting");
            self.emit(Event::Reconnecting { attempt, delay }).await;
            if !self.wait_offline(delay).await {
                break "closed by the application".to_string();
            }
        };
        for q in self.queued.drain(..) {
            let _ = q.reply.send(Err(closed()));
        }
        self.commands.close();
        while let Ok(Command::Request { reply, .. }) = self.commands.try_recv() {
            let _ = reply.send(Err(closed()));
        }
        self.emit(Event::Closed {
            reason: stop_reason,
        })
        .await;
    }

    async fn emit(&self, ev: Event) {
        // An application that dropped its Events does not stop the client.
        let _ = self.events.send(ev).await;
    }

    /// Waits `delay` while disconnected, queueing calls. False if closed meanwhile.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request { kind, payload, reply }) => {
                        self.queue(kind, payload, reply)
                    }
                    Some(Command::Close) | None => {
                        self.closing = true;
                        return false;
                    }
                },
            }
        }
    }

    fn queue(&mut self, kind: String, payload: Value, reply: oneshot::Sender<Result<Value>>) {
        if self.queued.len() >= self.opts.max_queued {
            let _ = reply.send(Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "disconnected, and {} calls are already waiting (max_queued)",
                    self.queued.len()
                ),
            )));
        } else {
            self.queued.push_back(Queued {
                kind,
                payload,
                reply,
            });
        }
    }

    /// Fails what was in flight and makes every channel wait for its next anchor.
    fn connection_ended(&mut self) {
        for (_, p) in self.pending.drain() {
            if let Purpose::App { reply, .. } = p.purpose {
                let _ = reply.send(Err(Error::new(
                    ErrorKind::Disconnected,
                    "the connection dropped before the answer came",
                )));
            }
        }
        self.tracker.disconnected();
    }

    fn request_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    async fn send(&mut self, ws: &mut Socket, v: &Value) -> bool {
        ws.send_text(v.to_string()).await
    }

    /// Sends a request of the task's own.
    async fn send_internal(
        &mut self,
        ws: &mut Socket,
        kind: &str,
        payload: Value,
        purpose: Purpose,
    ) -> bool {
        let id = self.request_id();
        let ok = self
            .send(
                ws,
                &json!({ "type": kind, "payload": payload, "request_id": id }),
            )
            .await;
        self.pending.insert(
            id,
            Pending {
                purpose,
                deadline: Instant::now() + self.opts.request_timeout,
            },
        );
        ok
    }

    /// Sends an application request.
    async fn send_app(
        &mut self,
        ws: &mut Socket,
        kind: String,
        mut payload: Value,
        reply: oneshot::Sender<Result<Value>>,
    ) -> bool {
        let channel = payload["channel"].as_str().map(str::to_string);
        let mut subscribe = None;
        match (kind.as_str(), channel) {
            (keel_protocol::kind::SUBSCRIBE, Some(ch)) => {
                // Subscribing again to a channel we follow: ask for what we lack.
                if let Some(t) = self.tracker.channels.get(&ch) {
                    if let Some(epoch) = &t.epoch {
                        payload["since"] = json!({ "offset": t.offset, "epoch": epoch });
                    }
                }
                self.tracker.subscribing(&ch);
                subscribe = Some(ch);
            }
            (keel_protocol::kind::UNSUBSCRIBE, Some(ch)) => self.tracker.remove(&ch),
            _ => {}
        }
        let id = self.request_id();
        let ok = self
            .send(
                ws,
                &json!({ "type": kind, "payload": payload, "request_id": id }),
            )
            .await;
        self.pending.insert(
            id,
            Pending {
                purpose: Purpose::App { reply, subscribe },
                deadline: Instant::now() + self.opts.request_timeout,
            },
        );
        ok
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, mut ws: Socket) -> End {
        let mut end = End {
            code: None,
            reason: String::new(),
            welcomed: false,
        };
        let mut dead_after = self.opts.default_dead_after;
        let mut last_heard = Instant::now();
        // Until `welcome`, the connect timeout bounds the wait.
        let welcome_deadline = last_heard + self.opts.connect_timeout;
        loop {
            let watchdog = if end.welcomed {
                last_heard + dead_after
            } else {
                welcome_deadline
            };
            let next_timeout = self
                .pending
                .values()
                .map(|p| p.deadline)
                .min()
                .map_or(watchdog, |d| d.min(watchdog));
            // Take commands only once welcomed: before that they wait in the queue.
            let accept_commands = end.welcomed;
            tokio::select! {
                frame = ws.next() => {
                    let Some(frame) = frame else {
                        if end.reason.is_empty() {
                            end.reason = "connection lost".into();
                        }
                        return end;
                    };
                    last_heard = Instant::now();
                    match frame {
                        Incoming::Text(text) => {
                            let v = match serde_json::from_slice::<Value>(&text) {
                                Ok(v) => v,
                                Err(e) => {
                                    // Not JSON, or nested past the parser's limit: the
                                    // application hears of it and the connection stays.
                                    self.emit(Event::Error {
                                        code: INVALID_FRAME.into(),
                                        detail: format!(
                                            "a {}-byte text frame the client could not parse: {e}",
                                            text.len()
                                        ),
                                    })
                                    .await;
                                    continue;
                                }
                            };
                            if v["type"] == "welcome" && !end.welcomed {
                                end.welcomed = true;
                                let hb = &v["payload"]["heartbeat"];
                                if let (Some(i), Some(t)) = (hb["interval_ms"].as_u64(), hb["timeout_ms"].as_u64()) {
                                    dead_after = Duration::from_millis(i + t);
                                }
                                if !self.on_welcome(&mut ws, &v["payload"]).await {
                                    end.reason = "send failed".into();
                                    return end;
                                }
                                continue;
                            }
                            if !self.on_envelope(&mut ws, v).await {
                                end.reason = "send failed".into();
                                return end;
                            }
                        }
                        Incoming::Close { code, reason } => {
                            end.code = code;
                            end.reason = reason;
                            // Read on until the socket ends (the close handshake).
                        }
                        Incoming::Other => {}
                    }
                }
                cmd = self.commands.recv(), if accept_commands => match cmd {
                    Some(Command::Request { kind, payload, reply }) => {
                        if !self.send_app(&mut ws, kind, payload, reply).await {
                            end.reason = "send failed".into();
                            return end;
                        }
                    }
                    Some(Command::Close) | None => {
                        self.closing = true;
                        ws.close("client closed").await;
                        end.code = Some(keel_protocol::close::NORMAL);
                        end.reason = "closed by the application".into();
                        return end;
                    }
                },
                _ = tokio::time::sleep_until(next_timeout) => {
                    let now = Instant::now();
                    if now >= watchdog {
                        // Silent server (or path): drop the socket without a close
                        // handshake nobody would answer.
                        end.reason = if end.welcomed {
                            format!("nothing heard from the server for {dead_after:?}")
                        } else {
                            "no welcome from the server".into()
                        };
                        return end;
                    }
                    self.expire_requests(&mut ws, now).await;
                }
            }
        }
    }

    async fn expire_requests(&mut self, ws: &mut Socket, now: Instant) {
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let actions = match p.purpose {
                Purpose::App { reply, .. } => {
                    let _ = reply.send(Err(Error::new(
                        ErrorKind::Timeout,
                        "no answer within request_timeout",
                    )));
                    Vec::new()
                }
                Purpose::History(ch) => self.tracker.on_history(&ch, None, None),
                Purpose::Resume | Purpose::Resubscribe(_) => Vec::new(),
            };
            self.perform(ws, actions).await;
        }
    }

    /// `welcome`: resume the previous session if there is one, else subscribe
    /// again to what we follow; then send what was queued.
    async fn on_welcome(&mut self, ws: &mut Socket, p: &Value) -> bool {
        let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
        self.emit(Event::Connected {
            client_id: s("client_id"),
            session_id: s("session_id"),
            node: s("node"),
        })
        .await;
        let fresh = p["reconnect_token"].as_str().map(str::to_string);
        let mut ok = true;
        match self.token.clone() {
            Some(token) => {
                self.fresh_token = fresh;
                let mut positions = serde_json::Map::new();
                for (ch, pos) in self.tracker.positions() {
                    self.tracker.subscribing(&ch);
                    positions.insert(
                        ch,
                        pos.map_or(
                            Value::Null,
                            |(offset, epoch)| json!({ "offset": offset, "epoch": epoch }),
                        ),
                    );
                }
                ok &= self
                    .send_internal(
                        ws,
                        keel_protocol::kind::RESUME,
                        json!({ "reconnect_token": token, "positions": positions }),
                        Purpose::Resume,
                    )
                    .await;
            }
            None => {
                self.token = fresh;
                ok &= self.resubscribe_all(ws).await;
            }
        }
        while let Some(q) = self.queued.pop_front() {
            ok &= self.send_app(ws, q.kind, q.payload, q.reply).await;
        }
        ok
    }

    /// Subscribes again to every channel followed, each from its last position.
    async fn resubscribe_all(&mut self, ws: &mut Socket) -> bool {
        let mut ok = true;
        for (ch, pos) in self.tracker.positions() {
            self.tracker.subscribing(&ch);
            let mut payload = json!({ "channel": ch });
            if let Some((offset, epoch)) = pos {
                payload["since"] = json!({ "offset": offset, "epoch": epoch });
            }
            ok &= self
                .send_internal(
                    ws,
                    keel_protocol::kind::SUBSCRIBE,
                    payload,
                    Purpose::Resubscribe(ch),
                )
                .await;
        }
        ok
    }

    async fn on_envelope(&mut self, ws: &mut Socket, mut v: Value) -> bool {
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        let payload = v["payload"].take();
        match kind.as_str() {
            "message" => {
                if let Some(p) = Publication::from_payload(&payload) {
                    let actions = self.tracker.on_message(p);
                    return self.perform(ws, actions).await;
                }
                true
            }
            "ping" => {
                self.send(ws, &json!({ "type": keel_protocol::kind::PONG }))
                    .await
            }
            "server_shutdown" => {
                let delay = Duration::from_millis(payload["delay_ms"].as_u64().unwrap_or(0));
                if payload["reconnect"].as_bool().unwrap_or(true) {
                    self.shutdown_hint = Some(delay);
                }
                self.emit(Event::ServerShutdown { delay }).await;
                true
            }
            _ => {
                let id = match &v["request_id"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                };
                let pending = id.and_then(|id| self.pending.remove(&id));
                let error = (kind == "error").then(|| {
                    (
                        payload["code"].as_str().unwrap_or("internal").to_string(),
                        payload["detail"].as_str().unwrap_or_default().to_string(),
                    )
                });
                match pending {
                    Some(p) => self.on_answer(ws, p.purpose, payload, error).await,
                    None => {
                        if let Some((code, detail)) = error {
                            self.emit(Event::Error { code, detail }).await;
                        }
                        true
                    }
                }
            }
        }
    }

    async fn on_answer(
        &mut self,
        ws: &mut Socket,
        purpose: Purpose,
        payload: Value,
        error: Option<(String, String)>,
    ) -> bool {
        let position = |p: &Value| {
            (
                p["offset"].as_u64().unwrap_or(0),
                p["epoch"].as_str().unwrap_or_default().to_string(),
            )
        };
        match purpose {
            Purpose::App { reply, subscribe } => {
                let mut actions = Vec::new();
                if let Some(ch) = &subscribe {
                    if error.is_none() {
                        let recovered = payload["recovered"].as_bool().unwrap_or(false);
                        actions = self.tracker.anchor(ch, recovered, position(&payload));
                    } else {
                        self.tracker.remove(ch);
                    }
                }
                let _ = reply.send(match error {
                    Some((code, detail)) => Err(Error::server(&code, &detail)),
                    None => Ok(payload),
                });
                self.perform(ws, actions).await
            }
            Purpose::Resubscribe(ch) => {
                if let Some((code, detail)) = error {
                    self.tracker.remove(&ch);
                    self.emit(Event::Error { code, detail }).await;
                    return true;
                }
                let recovered = payload["recovered"].as_bool().unwrap_or(false);
                let actions = self.tracker.anchor(&ch, recovered, position(&payload));
                self.perform(ws, actions).await
            }
            Purpose::History(ch) => {
                let epoch = payload["epoch"].as_str().map(str::to_string);
                let messages = error.is_none().then(|| {
                    payload["messages"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Publication::from_payload).collect())
                        .unwrap_or_default()
                });
                let actions = self.tracker.on_history(&ch, epoch.as_deref(), messages);
                self.perform(ws, actions).await
            }
            Purpose::Resume => {
                if let Some((code, _)) = error {
                    // The session is gone; we are the welcome's new session.
                    self.token = self.fresh_token.take();
                    self.emit(Event::SessionLost { code }).await;
                    return self.resubscribe_all(ws).await;
                }
                self.fresh_token = None;
                if let Some(t) = payload["reconnect_token"].as_str() {
                    self.token = Some(t.to_string());
                }
                let mut recovered = BTreeMap::new();
                let mut actions = Vec::new();
                for (ch, _) in self.tracker.positions() {
                    let r = payload["recovered"][&ch].as_bool().unwrap_or(false);
                    recovered.insert(ch.clone(), r);
                    let pos = position(&payload["positions"][&ch]);
                    actions.extend(self.tracker.anchor(&ch, r, pos));
                }
                self.emit(Event::Resumed {
                    client_id: payload["client_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    recovered,
                })
                .await;
                self.perform(ws, actions).await
            }
        }
    }

    async fn perform(&mut self, ws: &mut Socket, actions: Vec<Action>) -> bool {
        let mut ok = true;
        for a in actions {
            match a {
                Action::Deliver(p) => self.emit(Event::Message(p)).await,
                Action::Unrecovered { channel, from, to } => {
                    self.emit(Event::Unrecovered { channel, from, to }).await
                }
                Action::FetchHistory {
                    channel,
                    since,
                    epoch,
                    limit,
                } => {
                    ok &= self
                        .send_internal(
                            ws,
                            keel_protocol::kind::HISTORY,
                            json!({
                                "channel": channel,
                                "since": { "offset": since, "epoch": epoch },
                                "limit": limit,
                            }),
                            Purpose::History(channel),
                        )
                        .await;
                }
            }
        }
        ok
    }
}
