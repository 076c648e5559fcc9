//! Helpers for the client's tests: a real gateway on 127.0.0.1:0, a TCP proxy
//! between client and gateway that can cut (RST), refuse, freeze or re-target
//! connections (the network failures the client must survive), and event helpers
//! with deadlines. Nothing sleeps and hopes.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used
)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_client::{Event, Events};
use keel_server::settings::Settings as Config;
use keel_server::Running;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const WAIT: Duration = Duration::from_secs(20);

pub use keel_testkit::gateway::gateway;

/// The testkit's gateway settings, with a fixed reconnect secret.
pub fn config() -> Config {
    let mut c = keel_testkit::gateway::settings();
    c.set("reconnect_secret", "a-test-secret-of-32-bytes-length")
        .unwrap();
    c
}

/// Client options for tests: quick reconnects (the curve itself is tested apart).
pub fn fast() -> keel_client::ClientOptions {
    let mut o = keel_client::ClientOptions::default();
    o.reconnect.initial_delay = Duration::from_millis(5);
    o.reconnect.max_delay = Duration::from_millis(50);
    o.event_buffer = 100_000;
    o
}

struct Conn {
    task: tokio::task::AbortHandle,
    gate: watch::Sender<bool>,
}

/// A TCP proxy on 127.0.0.1:0 in front of a target address.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    conns: Arc<Mutex<Vec<Conn>>>,
    blocked: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let (t, c, b) = (target.clone(), conns.clone(), blocked.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    return;
                };
                // RST instead of FIN when a side is dropped: an abrupt cut.
                let _ = down.set_zero_linger();
                if b.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let to = *t.lock().unwrap();
                let Ok(up) = TcpStream::connect(to).await else {
                    continue;
                };
                let _ = up.set_zero_linger();
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                let (gate, rx) = watch::channel(false);
                let task = tokio::spawn(async move {
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = pump(dr, uw, rx.clone()) => {}
                        _ = pump(ur, dw, rx) => {}
                    }
                });
                c.lock().unwrap().push(Conn {
                    task: task.abort_handle(),
                    gate,
                });
            }
        });
        Proxy {
            addr,
            target,
            conns,
            blocked,
            accept,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Resets every open connection (both sides see a reset, no close handshake).
    pub fn cut(&self) -> usize {
        let conns: Vec<Conn> = std::mem::take(&mut *self.conns.lock().unwrap());
        for c in &conns {
            c.task.abort();
        }
        conns.len()
    }

    /// While blocked, new connections are reset at once.
    pub fn block(&self, on: bool) {
        self.blocked.store(on, Ordering::SeqCst);
    }

    /// Stops forwarding on the open connections without closing them (a zombie
    /// path: no FIN, no RST, just silence).
    pub fn freeze(&self) {
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.gate.send(true);
        }
    }

    pub fn thaw(&self) {
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.gate.send(false);
        }
    }

    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *gate.borrow() {
            if gate.changed().await.is_err() {
                return;
            }
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *gate.borrow() {
            if gate.changed().await.is_err() {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The next event matching `pred`, skipping others; panics at the deadline.
pub async fn next_matching(
    events: &mut Events,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(e) if pred(&e) => return e,
                Some(_) => continue,
                None => panic!("events ended while waiting for {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

pub async fn connected(events: &mut Events) {
    next_matching(events, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
}

/// Waits until `cond` holds, polling; panics with `what` at [`WAIT`] (longer
/// here than the testkit's: reconnect tests wait through backoff).
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    keel_testkit::eventually_within(what, WAIT, cond).await
}

/// The next `Disconnected`: (code, reason, will_reconnect).
pub async fn disconnected(events: &mut Events) -> (Option<u16>, String, bool) {
    match next_matching(events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected {
            code,
            reason,
            will_reconnect,
        } => (code, reason, will_reconnect),
        _ => unreachable!(),
    }
}

/// The next `Resumed`: what it says per channel.
pub async fn resumed(events: &mut Events) -> std::collections::BTreeMap<String, bool> {
    match next_matching(events, "Resumed", |e| matches!(e, Event::Resumed { .. })).await {
        Event::Resumed { recovered, .. } => recovered,
        _ => unreachable!(),
    }
}

/// The next `Unrecovered` event, whole.
pub async fn unrecovered(events: &mut Events) -> Event {
    next_matching(events, "Unrecovered", |e| {
        matches!(e, Event::Unrecovered { .. })
    })
    .await
}
