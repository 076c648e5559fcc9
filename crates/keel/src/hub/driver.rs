//! The task that owns one connection's socket: a hand-written future
//! (`Driver`) that both reads and writes it in one `poll`. It drains the send
//! queue into the socket's write buffer, flushes, and reads the next message, all
//! on one waker. There is no second task, no channel between a reader and a
//! writer, and no timer while the connection is healthy (heartbeats come from the
//! Hub's sweeper). A timer exists only while a close handshake is in flight.
//!
//! The task is the only owner of the socket and of the registry entry's lifetime:
//! it unregisters on every exit path (clean close, error, kill, panic) in its
//! `Drop`. It never waits on anything but its own socket and the work a hook
//! handed back ([`Deferred`]), which it finishes before it reads the next
//! message; hooks run synchronously inside its `poll`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use crate::conn::rate::{Bucket, Verdict};
use crate::conn::{ConnInner, Connection, DisconnectReason, Message};
use crate::hub::handler::Deferred;
use crate::hub::Hub;
use crate::transport::{self, Batch, Incoming, Outgoing, ReadError, Slot, Socket};

/// Drives one connection until it ends: a hand-written future, so the task holds
/// exactly these fields (176 bytes with the plain socket, most of it the socket) and no
/// compiler-generated state machine around them. Registration already happened;
/// dropping the driver, however it ends (completion, panic, runtime shutdown),
/// unregisters.
pub(crate) struct Driver {
    hub: Hub,
    conn: Connection,
    socket: Socket,
    /// Our Close frame has been handed to the socket: send nothing more.
    close_sent: bool,
    /// What the task holds only for a while (a close timer, a hook's work that
    /// waits): boxed, so an idle connection's task pays 8 bytes for it. The
    /// task's allocation is padded to 128 bytes; 16 more bytes here cost 128 per
    /// connection (measured: idle RSS 1,488 -> 1,592 B at 10 k).
    aside: Option<Box<Aside>>,
    /// How it ended as this task saw it, if the server did not decide it first.
    end: (DisconnectReason, u16),
}

/// The rarely held parts of a [`Driver`].
#[derive(Default)]
struct Aside {
    /// Runs only while a close handshake is in flight.
    close_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A message's handling that waits (see [`Deferred`]): finished before the
    /// next message is read.
    deferred: Option<Deferred>,
}

/// Inbound messages handled per poll before yielding to other tasks.
const BUDGET: usize = 64;

/// Frames taken from the send queue per queue lock (and per readiness check):
/// what one vectored write carries under load.
const WRITE_BATCH: usize = transport::BATCH_MAX;

/// Bytes moved per queue lock, about; bounds the write buffer's overshoot.
const WRITE_BATCH_BYTES: usize = 32 * 1024;

enum Step {
    Continue,
    Stop,
}

impl Driver {
    /// Registers nothing; calls `on_connect` and returns the future to spawn.
    pub(crate) fn new(hub: Hub, conn: Connection, socket: Socket) -> Self {
        let handler = hub.handler();
        let deferred =
            match std::panic::catch_unwind(AssertUnwindSafe(|| handler.on_connect(&hub, &conn))) {
                Ok(deferred) => deferred,
                Err(_) => {
                    handler_panicked(&conn);
                    None
                }
            };
        Driver {
            hub,
            conn,
            socket,
            close_sent: false,
            aside: deferred.map(|d| {
                Box::new(Aside {
                    close_timer: None,
                    deferred: Some(d),
                })
            }),
            end: (
                DisconnectReason::ConnectionLost,
                keel_protocol::close::ABNORMAL,
            ),
        }
    }

    fn start_close_timer(&mut self) {
        let aside = self.aside.get_or_insert_with(Box::default);
        if aside.close_timer.is_none() {
            let t = self.hub.config().close_timeout;
            aside.close_timer = Some(Box::pin(tokio::time::sleep(t)));
        }
    }

    /// Polls a hook's deferred work; keeps it only if it is not done. Returns
    /// whether it is still pending.
    fn poll_deferred(&mut self, cx: &mut Context<'_>, fresh: Option<Deferred>) -> bool {
        let mut work = match fresh {
            Some(d) => d,
            None => match self.aside.as_mut().and_then(|a| a.deferred.take()) {
                Some(d) => d,
                None => return false,
            },
        };
        let pending = match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Pending) => true,
            Ok(Poll::Ready(())) => false,
            Err(_) => {
                handler_panicked(&self.conn);
                false
            }
        };
        if pending {
            self.aside.get_or_insert_with(Box::default).deferred = Some(work);
        } else if self
            .aside
            .as_ref()
            .is_some_and(|a| a.close_timer.is_none() && a.deferred.is_none())
        {
            self.aside = None;
        }
        pending
    }

    /// Takes queued frames in batches (up to `WRITE_BATCH` frames or about
    /// `WRITE_BATCH_BYTES` per queue lock) and hands each batch to the socket,
    /// which writes it at once if it can and buffers what it cannot; then flushes
    /// what is buffered. Stops when the queue is empty, the socket is full, or our
    /// Close is out. Returns whether the connection is closing (a Close queued).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let inner = &self.conn.inner;
        let hub = &self.hub;
        let mut closing = None;
        while !self.close_sent {
            match transport::poll_ready(&mut self.socket, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(())) => return Err(()),
                Poll::Pending => break,
            }
            let mut batch = Batch::new();
            let drained = inner.queue.drain_into(
                || hub.json_ping(),
                WRITE_BATCH,
                WRITE_BATCH_BYTES,
                // Never full: the drain takes at most WRITE_BATCH (= BATCH_MAX)
                // frames. Were it full, the frame would be lost, so end the
                // connection rather than carry on without it.
                |item| if batch.push(item) { Ok(()) } else { Err(()) },
            )?;
            closing = Some(drained.closing);
            if batch.len() == 0 {
                break;
            }
            let (mut messages, mut bytes) = (0, 0);
            for item in batch.iter() {
                match item {
                    Slot::Shared(b) => {
                        messages += 1;
                        bytes += b.len() as u64;
                    }
                    Slot::Own(o) => match &**o {
                        Outgoing::Text(b) | Outgoing::Binary(b) => {
                            messages += 1;
                            bytes += b.len() as u64;
                        }
                        Outgoing::Close(..) => self.close_sent = true,
                        Outgoing::Ping => {}
                    },
                }
            }
            if messages > 0 {
                inner
                    .stats
                    .messages_out
                    .fetch_add(messages, Ordering::Relaxed);
                inner.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
            }
            transport::send_batch(&mut self.socket, cx, &mut batch)?;
            if drained.empty {
                break;
            }
        }
        if let Poll::Ready(Err(())) = transport::poll_flush(&mut self.socket, cx) {
            return Err(());
        }
        Ok(self.close_sent || closing.unwrap_or_else(|| inner.queue.is_closing()))
    }

    /// One non-waiting attempt to tell the peer why it is being cut off.
    fn send_close_now(&mut self, cx: &mut Context<'_>) {
        if let Some(close) = self.conn.inner.queue.take_close() {
            if let Poll::Ready(Ok(())) = transport::poll_ready(&mut self.socket, cx) {
                if transport::start_send(&mut self.socket, close).is_ok() {
                    let _ = transport::poll_flush(&mut self.socket, cx);
                }
            }
        }
    }

    /// Whether a data message may reach the handler under the rate limit.
    fn admit(&mut self, now_ms: u64) -> bool {
        let Some(limit) = self.hub.inner.rate.as_ref() else {
            return true;
        };
        let verdict = self
            .conn
            .inner
            .bucket
            .lock()
            .get_or_insert_with(|| Box::new(Bucket::new(limit, now_ms)))
            .check(limit, now_ms);
        match verdict {
            Verdict::Pass => true,
            Verdict::Drop { notify } => {
                self.hub
                    .metrics()
                    .rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                if notify {
                    self.conn.send_text(keel_protocol::encode::error(
                        keel_protocol::ErrorCode::RateLimited,
                        "too many messages: this one was dropped",
                        None,
                    ));
                }
                false
            }
            Verdict::Close => {
                self.hub
                    .metrics()
                    .rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                self.conn.close_as(
                    DisconnectReason::RateLimited,
                    keel_protocol::close::RATE_LIMITED,
                    "rate limited",
                    true,
                );
                false
            }
        }
    }

    /// Handles one inbound frame; returns the work a hook handed back, if any.
    fn on_frame(&mut self, frame: Incoming) -> Option<Deferred> {
        let now_ms = self.hub.now_ms();
        self.conn.inner.last_seen.store(now_ms, Ordering::Relaxed);
        if matches!(frame, Incoming::Text(_) | Incoming::Binary(_)) && !self.admit(now_ms) {
            return None;
        }
        let inner = &self.conn.inner;
        match frame {
            Incoming::Text(text) => {
                count_in(inner, text.len());
                return dispatch(&self.hub, &self.conn, Message::Text(&text));
            }
            Incoming::Binary(bytes) => {
                count_in(inner, bytes.len());
                return dispatch(&self.hub, &self.conn, Message::Binary(&bytes));
            }
            Incoming::Control => {}
            Incoming::Close(code) => {
                // The transport answers the Close; keep polling until the socket
                // reports the end, so the answer is flushed.
                let end = (
                    DisconnectReason::ClientClosed,
                    code.unwrap_or(keel_protocol::close::NO_STATUS),
                );
                self.end = end;
                inner.close_reason.lock().get_or_insert(end);
                self.start_close_timer();
            }
        }
        None
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if self.conn.inner.kill.load(Ordering::Acquire) {
            self.send_close_now(cx);
            return Poll::Ready(Step::Stop);
        }
        self.conn.inner.queue.register(cx.waker());
        let Ok(closing) = self.poll_write(cx) else {
            return Poll::Ready(Step::Stop);
        };
        // The close deadline runs from when the close was asked for, not from when
        // the Close frame got out: a peer that does not read may never take it.
        if closing {
            self.start_close_timer();
        }
        if let Some(timer) = self.aside.as_mut().and_then(|a| a.close_timer.as_mut()) {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Stop);
            }
        }
        if self.aside.as_ref().is_some_and(|a| a.deferred.is_some()) {
            if self.poll_deferred(cx, None) {
                return Poll::Pending;
            }
            // Its answers were queued: write them before reading on.
            return Poll::Ready(Step::Continue);
        }
        match transport::poll_read(&mut self.socket, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(frame)) => {
                // Work a hook hands back is polled at once: with a broker that
                // answers at once (the memory broker) it is done here and never
                // stored.
                if let Some(work) = self.on_frame(frame) {
                    self.poll_deferred(cx, Some(work));
                }
                Poll::Ready(Step::Continue)
            }
            Poll::Ready(Err(ReadError::Closed)) => Poll::Ready(Step::Stop),
            Poll::Ready(Err(ReadError::Protocol(code, detail))) => {
                tracing::debug!(client_id = %self.conn.client_id(), code, %detail, "protocol error");
                // Some layers of the transport answer with a Close themselves, some
                // do not: queue ours; if theirs went first, the socket refuses the
                // second and the connection ends with theirs.
                self.conn
                    .close_as(DisconnectReason::ProtocolError, code, &detail, true);
                Poll::Ready(Step::Continue)
            }
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..BUDGET {
            match this.step(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Step::Stop) => return Poll::Ready(()),
                Poll::Ready(Step::Continue) => {}
            }
        }
        // A busy client: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let (reason, code) = self.conn.inner.close_reason.lock().unwrap_or(self.end);
        let reason = if std::thread::panicking() {
            DisconnectReason::InternalError
        } else {
            reason
        };
        self.hub.unregister(&self.conn, reason, code);
    }
}

fn count_in(inner: &ConnInner, len: usize) {
    inner.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .bytes_in
        .fetch_add(len as u64, Ordering::Relaxed);
}

/// Hands a message to the handler; a panic closes this connection with 1011 and
/// touches nothing else. Returns the handler's deferred work, if any.
fn dispatch(hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
    let handler = hub.handler();
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.on_message(hub, conn, msg))) {
        Ok(deferred) => deferred,
        Err(_) => {
            handler_panicked(conn);
            None
        }
    }
}

fn handler_panicked(conn: &Connection) {
    tracing::error!(client_id = %conn.client_id(), "handler panicked; closing the connection with 1011");
    conn.close_as(
        DisconnectReason::InternalError,
        keel_protocol::close::INTERNAL_ERROR,
        "internal error",
        true,
    );
}

// Regression: the broker cut first grew the task by 16 bytes (the deferred
// work, inline) and a connection's shared state by 16 (its delivery context and
// the alignment after it); idle RSS per connection at 10 k went from 1,488 to
// 1,592 B, since the task's allocation is padded to 128 bytes. These sizes are
// what the idle figures in docs/benchmarks.md were measured with.
#[cfg(all(test, target_pointer_width = "64"))]
mod sizes {
    #[test]
    fn an_idle_connection_costs_no_more_than_before_the_broker_cut() {
        assert!(std::mem::size_of::<super::Driver>() <= 184);
        assert!(std::mem::size_of::<crate::conn::ConnInner>() <= 336);
    }
}
