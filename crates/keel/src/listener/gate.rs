//! The bounds on connections that are not WebSockets (yet): how many may be open
//! at once, how long one may take to send its request, and what accepting does
//! when the process runs out of file descriptors.
//!
//! A TCP connection costs a descriptor from its accept, but until it is upgraded
//! it has given nothing: no heartbeat watches it and no limit of the Hub counts
//! it. Without these bounds, a few thousand sockets that send nothing (or half a
//! request line) hold the process's descriptors for ever and nobody else can
//! connect. A [`Gate`] gives each accepted connection a [`Ticket`] that is held
//! until the connection is a WebSocket or closed; past `max_pending_connections`
//! tickets, accepting waits (new clients wait in the kernel's backlog, which
//! costs no descriptor) until one is given back. `handshake_timeout` is enforced
//! by the readers of a request (the listener's own for plain upgrades, hyper's
//! header timeout for everything else, see [`serve`](super::serve)); the gate
//! counts what they closed.
//!
//! What it must not do: touch a connection once it is a WebSocket, spin when
//! `accept` fails, or log more than a line every few seconds however fast
//! accepting fails.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The first pause after a failed accept; doubled each time it fails again.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause after a failed accept: serving resumes at most this long
/// after descriptors free up.
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this long for each kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds on a server's connections until they are WebSockets, shared by its
/// listener and its serve loop; cheap to clone. A [`Hub`](crate::Hub) makes one
/// from its configuration ([`Hub::gate`](crate::Hub::gate)) and reports its
/// counters in its metrics.
#[derive(Clone, Debug)]
pub struct Gate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handshake_timeout: Duration,
    max_pending: usize,
    pending: AtomicUsize,
    /// Signalled when a ticket is given back.
    freed: Notify,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    paused: AtomicU64,
    /// When each kind of trouble was last logged, and how often since.
    log_accept: Mutex<Quiet>,
    log_full: Mutex<Quiet>,
}

/// A rate-limited log line's state.
#[derive(Debug, Default)]
struct Quiet {
    last: Option<Instant>,
    since: u64,
}

impl Quiet {
    /// Whether to log now, and how many occurrences went unlogged before this one.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        self.since += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since) - 1)
    }
}

/// A point-in-time copy of a [`Gate`]'s state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    /// Connections accepted and not yet WebSockets (plain HTTP ones included).
    pub pending: usize,
    /// Connections closed because their request did not arrive within
    /// `handshake_timeout` (or an HTTP keep-alive connection idle that long).
    pub handshake_timeouts_total: u64,
    /// Accepts that failed (out of file descriptors, typically).
    pub accept_errors_total: u64,
    /// Times accepting paused because `max_pending_connections` were open.
    pub accept_paused_total: u64,
}

impl Gate {
    /// A gate that closes a connection whose request has not arrived within
    /// `handshake_timeout` and holds at most `max_pending` connections that are not
    /// WebSockets (`None`: no cap).
    pub fn new(handshake_timeout: Duration, max_pending: Option<usize>) -> Self {
        Gate {
            inner: Arc::new(Inner {
                handshake_timeout,
                max_pending: max_pending.unwrap_or(usize::MAX),
                pending: AtomicUsize::new(0),
                freed: Notify::new(),
                timed_out: AtomicU64::new(0),
                accept_errors: AtomicU64::new(0),
                paused: AtomicU64::new(0),
                log_accept: Mutex::default(),
                log_full: Mutex::default(),
            }),
        }
    }

    /// How long a connection may take from its accept to a complete request
    /// head, and how long an HTTP keep-alive connection may stay idle.
    pub fn handshake_timeout(&self) -> Duration {
        self.inner.handshake_timeout
    }

    /// The counters and the number of connections pending now.
    pub fn stats(&self) -> GateStats {
        let i = &self.inner;
        GateStats {
            pending: i.pending.load(Ordering::Relaxed),
            handshake_timeouts_total: i.timed_out.load(Ordering::Relaxed),
            accept_errors_total: i.accept_errors.load(Ordering::Relaxed),
            accept_paused_total: i.paused.load(Ordering::Relaxed),
        }
    }

    /// Waits while `max_pending_connections` connections are pending.
    pub async fn room(&self) {
        let i = &self.inner;
        let mut paused = false;
        loop {
            let freed = i.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a ticket given back in between wakes it.
            freed.as_mut().enable();
            let now = i.pending.load(Ordering::Acquire);
            if now < i.max_pending {
                return;
            }
            if !paused {
                paused = true;
                i.paused.fetch_add(1, Ordering::Relaxed);
                if let Some(unlogged) = i.log_full.lock().due() {
                    tracing::warn!(
                        pending = now,
                        unlogged,
                        "max_pending_connections reached: accepting waits until a connection \
                         upgrades, closes or times out (handshake_timeout)"
                    );
                }
            }
            freed.await;
        }
    }

    /// A ticket for a connection just accepted. Taken after [`room`](Self::room)
    /// said there was room; one accept loop per listener keeps the count within
    /// the cap.
    pub fn ticket(&self) -> Ticket {
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        Ticket {
            gate: Some(self.inner.clone()),
        }
    }

    /// Accepts the next connection on `listener` with a ticket for it: waits for
    /// a ticket first, and when accepting fails (out of descriptors), counts and
    /// logs it (once every few seconds), pauses (a few milliseconds, doubling to
    /// 100 ms) and tries again, so that serving resumes soon after descriptors
    /// free up, without spinning meanwhile.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Ticket) {
        self.room().await;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => return (tcp, addr, self.ticket()),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    self.accept_failed(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Counts and (rate-limited) logs a failed accept.
    pub fn accept_failed(&self, e: &io::Error) {
        let i = &self.inner;
        i.accept_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(unlogged) = i.log_accept.lock().due() {
            tracing::error!(
                error = %e,
                unlogged,
                "accept failed (out of file descriptors?): new connections wait until \
                 some close; raise `ulimit -n` or lower max_connections"
            );
        }
    }

    /// Counts a connection closed for taking longer than `handshake_timeout`.
    pub fn timed_out(&self) {
        self.inner.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Gate {
    /// The library's defaults: `handshake_timeout` 10 s, no cap on pending
    /// connections.
    fn default() -> Self {
        Gate::new(Duration::from_secs(10), None)
    }
}

/// Errors of one connection, not of the listener: accept the next one at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One pending connection's place under a [`Gate`]'s cap, given back when
/// dropped (the connection became a WebSocket or closed).
#[derive(Debug, Default)]
pub struct Ticket {
    gate: Option<Arc<Inner>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take() {
            g.pending.fetch_sub(1, Ordering::AcqRel);
            g.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn past_the_cap_there_is_room_again_once_a_ticket_is_given_back() {
        let gate = Gate::new(Duration::from_secs(1), Some(2));
        gate.room().await;
        let a = gate.ticket();
        gate.room().await;
        let _b = gate.ticket();
        assert_eq!(gate.stats().pending, 2);
        let room = gate.room();
        tokio::pin!(room);
        assert!(room.as_mut().now_or_never().is_none(), "the cap holds");
        assert!(room.as_mut().now_or_never().is_none(), "still");
        assert_eq!(
            gate.stats().accept_paused_total,
            1,
            "one pause, counted once"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), room)
            .await
            .expect("a given-back ticket makes room");
        assert_eq!(gate.stats().pending, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_is_rate_limited_and_counts_what_it_skipped() {
        let mut q = Quiet::default();
        assert_eq!(q.due(), Some(0));
        assert_eq!(q.due(), None);
        assert_eq!(q.due(), None);
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(q.due(), Some(2), "two went unlogged in between");
    }
}
