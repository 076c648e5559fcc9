//! The per-connection send queue: bounded in messages and bytes, filled by anyone,
//! drained only by the connection's own task.
//!
//! Pushing never awaits: it takes a short lock, applies the slow-consumer policy if
//! the queue is full, and wakes the writer. This is what keeps a broadcast from ever
//! waiting on a socket. The queue holds already-encoded frames (`Bytes`), so a
//! publication sent to ten thousand subscribers is ten thousand reference-count
//! increments, not ten thousand serializations.
//!
//! It is a `VecDeque` behind a `parking_lot` mutex plus an `AtomicWaker`, not a tokio
//! channel: an empty queue allocates nothing (an idle connection pays ~100 bytes
//! here). Heartbeats are not queued items but two flags beside the queue, so an
//! idle connection's pings never allocate queue storage, a full queue never delays
//! them, and the sweeper's [`SendQueue::trim`] can hand back what a burst left.
//!
//! While the connection's task is idle (nothing queued, nothing of its own to
//! write), it leaves its socket's [`Writer`] here, and a fan-out's
//! [`SendQueue::push_through`] writes the frame to the socket itself, under this
//! lock, instead of queueing it and waking the task (`transport::shared`). The
//! task takes the writer back before it writes anything; every other push takes it
//! away too. Apart from that one non-waiting write, it must not do I/O or know what
//! the frames mean beyond their size.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::transport::{Framed, Outgoing, Writer};

/// Limits a queue enforces; copied from the Config once per Hub.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) policy: SlowConsumerPolicy,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued, nothing dropped.
    Queued,
    /// Written to the socket at once (a write-through): the task was not woken.
    Written,
    /// Queued after dropping this many older messages (`drop_oldest`).
    DroppedOldest(usize),
    /// Not queued: the queue was full (`drop_newest`, `disconnect`).
    DroppedNewest,
    /// Not queued: the connection is closing.
    Closed,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Outgoing>,
    /// Bytes of the data frames in `items`.
    bytes: usize,
    /// When the queue last became full (for the `disconnect` policy); `None` while not full.
    full_since: Option<Instant>,
    /// Set once a Close is queued: nothing is accepted after it.
    closed: bool,
    /// A Ping frame is due.
    ping_due: bool,
    /// A JSON `ping` is due (its bytes are the Hub's, given to `pop`).
    json_ping_due: bool,
    /// The socket's writer, left here by the idle task: `Some` only while nothing
    /// is queued or due and the task has nothing of its own to write.
    writer: Option<Writer>,
}

/// What a [`SendQueue::drain_into`] left behind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// Nothing more is queued.
    pub(crate) empty: bool,
    /// A Close is queued or was taken: the connection is on its way out.
    pub(crate) closing: bool,
}

/// The queue itself.
#[derive(Default)]
pub(crate) struct SendQueue {
    inner: Mutex<Inner>,
    waker: AtomicWaker,
}

fn size_of(item: &Outgoing) -> usize {
    match item {
        Outgoing::Text(b) | Outgoing::Binary(b) | Outgoing::Framed(b) => b.len(),
        Outgoing::Ping | Outgoing::Close(..) => 0,
    }
}

impl SendQueue {
    /// Queues a data frame under `limits`, and wakes the writer if the queue was
    /// empty. A non-empty queue means the writer has not finished draining it: it
    /// is either running (and will pop this too) or waiting for the socket (which
    /// will wake it). Skipping those wake-ups is most of what a broadcast to busy
    /// subscribers would otherwise spend.
    pub(crate) fn push(&self, item: Outgoing, limits: &Limits) -> Pushed {
        let size = size_of(&item);
        let was_empty;
        let result = {
            let mut q = self.inner.lock();
            if q.closed {
                return Pushed::Closed;
            }
            was_empty = q.items.is_empty() && !q.ping_due && !q.json_ping_due;
            // The task writes what is queued: no write-through ahead of it.
            q.writer = None;
            let full = |q: &Inner| {
                q.items.len() >= limits.max_messages
                    || (q.bytes + size > limits.max_bytes && !q.items.is_empty())
            };
            if !full(&q) {
                q.full_since = None;
                q.bytes += size;
                q.items.push_back(item);
                Pushed::Queued
            } else {
                match limits.policy {
                    SlowConsumerPolicy::DropOldest => {
                        // Only data is in `items` here: a Close closes the queue to
                        // pushes, and heartbeats are flags.
                        let mut dropped = 0;
                        while full(&q) {
                            // The rest of a frame already begun on the wire cannot
                            // be dropped: the one behind it goes instead.
                            let at =
                                usize::from(matches!(q.items.front(), Some(Outgoing::Framed(_))));
                            let Some(old) = q.items.remove(at) else {
                                break;
                            };
                            q.bytes -= size_of(&old);
                            dropped += 1;
                        }
                        q.bytes += size;
                        q.items.push_back(item);
                        Pushed::DroppedOldest(dropped)
                    }
                    SlowConsumerPolicy::DropNewest | SlowConsumerPolicy::Disconnect => {
                        q.full_since.get_or_insert_with(Instant::now);
                        Pushed::DroppedNewest
                    }
                }
            }
        };
        if was_empty && result != Pushed::DroppedNewest {
            self.waker.wake();
        }
        result
    }

    /// Writes `frame` to the socket at once if the task left its writer here (see
    /// the module docs), else queues its payload as [`push`](Self::push) does. What
    /// the socket does not take of it is queued ahead of anything else, and the
    /// task is woken to finish it.
    pub(crate) fn push_through(&self, frame: &Framed, limits: &Limits) -> Pushed {
        {
            let mut q = self.inner.lock();
            if let Some(w) = q.writer.as_ref() {
                match w.try_write(&frame.bytes) {
                    Ok(n) if n == frame.bytes.len() => return Pushed::Written,
                    Ok(n) => {
                        q.writer = None;
                        let rest = frame.bytes.slice(n..);
                        q.bytes += rest.len();
                        q.items.push_back(Outgoing::Framed(rest));
                        drop(q);
                        self.waker.wake();
                        return Pushed::Written;
                    }
                    // Full (or failing): the task takes over, and finds out which.
                    Err(_) => q.writer = None,
                }
            }
        }
        self.push(Outgoing::Text(frame.payload()), limits)
    }

    /// Leaves the socket's writer here for write-throughs, if nothing is queued or
    /// due; returns whether it was left.
    pub(crate) fn offer_writer(&self, writer: &Writer) -> bool {
        let mut q = self.inner.lock();
        if q.items.is_empty() && !q.ping_due && !q.json_ping_due && !q.closed {
            q.writer = Some(writer.clone());
            true
        } else {
            false
        }
    }

    /// Takes the writer back (the task is about to write, or to end): once this
    /// returns, no write-through is under way or can start.
    pub(crate) fn reclaim_writer(&self) {
        self.inner.lock().writer = None;
    }

    /// Marks heartbeats due: a Ping frame (`ws`) and/or a JSON ping (`json`). They
    /// go out before queued data and do not count against the bounds.
    pub(crate) fn push_heartbeat(&self, ws: bool, json: bool) -> bool {
        {
            let mut q = self.inner.lock();
            if q.closed {
                return false;
            }
            q.ping_due |= ws;
            q.json_ping_due |= json;
            q.writer = None;
        }
        self.waker.wake();
        true
    }

    /// Gives back queue storage a burst left behind, once the queue is empty.
    pub(crate) fn trim(&self) {
        let mut q = self.inner.lock();
        if q.items.is_empty() && q.items.capacity() > 0 {
            q.items = VecDeque::new();
        }
    }

    /// Queues a Close after what is already queued (graceful: earlier messages go
    /// out first), or instead of it (`discard = true`: the peer is not reading).
    /// Returns false if a Close was already queued.
    pub(crate) fn close(&self, code: u16, reason: &str, discard: bool) -> bool {
        {
            let mut q = self.inner.lock();
            if q.closed {
                return false;
            }
            q.closed = true;
            q.writer = None;
            if discard {
                // The rest of a frame already begun stays: a Close cannot cut
                // into it.
                let begun = match q.items.pop_front() {
                    Some(Outgoing::Framed(b)) => Some(b),
                    _ => None,
                };
                q.items = VecDeque::new();
                q.bytes = begun.as_ref().map_or(0, Bytes::len);
                q.items.extend(begun.map(Outgoing::Framed));
                q.ping_due = false;
                q.json_ping_due = false;
            }
            q.items.push_back(Outgoing::Close(code, reason.to_string()));
        }
        self.waker.wake();
        true
    }

    /// Queues data and then a Close, atomically (nothing can slip in between).
    pub(crate) fn push_then_close(&self, item: Outgoing, code: u16, reason: &str) -> bool {
        {
            let mut q = self.inner.lock();
            if q.closed {
                return false;
            }
            q.closed = true;
            q.writer = None;
            q.bytes += size_of(&item);
            q.items.push_back(item);
            q.items.push_back(Outgoing::Close(code, reason.to_string()));
        }
        self.waker.wake();
        true
    }

    /// Hands up to `max_items` frames (and about `max_bytes`) to `send` under one
    /// lock: due heartbeats first, then queued frames, stopping after a Close or
    /// when `send` fails. `json_ping` supplies the JSON heartbeat's bytes. Returns
    /// what is left (so the writer need not lock the queue again to find out),
    /// or the first error.
    ///
    /// `send` runs with the queue locked; it must only encode into a buffer (no
    /// waiting), which keeps pushes to this connection waiting at most that long.
    pub(crate) fn drain_into<E>(
        &self,
        json_ping: impl FnOnce() -> Bytes,
        max_items: usize,
        max_bytes: usize,
        mut send: impl FnMut(Outgoing) -> Result<(), E>,
    ) -> Result<Drained, E> {
        let mut q = self.inner.lock();
        q.writer = None;
        let mut n = 0;
        if std::mem::take(&mut q.ping_due) {
            send(Outgoing::Ping)?;
            n += 1;
        }
        if std::mem::take(&mut q.json_ping_due) {
            send(Outgoing::Text(json_ping()))?;
            n += 1;
        }
        let mut bytes = 0;
        while n < max_items && bytes < max_bytes {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            let size = size_of(&item);
            q.bytes -= size;
            bytes += size;
            let close = matches!(item, Outgoing::Close(..));
            send(item)?;
            n += 1;
            if close {
                break;
            }
        }
        if q.items.is_empty() && q.items.capacity() > 64 {
            // A burst is over: give the memory back so idle stays cheap.
            q.items.shrink_to_fit();
        }
        Ok(Drained {
            empty: q.items.is_empty(),
            closing: q.closed,
        })
    }

    /// Takes the queued Close, dropping whatever was queued before it: for a
    /// connection cut off at once, which gets one try at telling the peer why.
    /// A connection whose last frame a write-through left half-written gets none:
    /// a Close after part of a frame would be read as the rest of it.
    pub(crate) fn take_close(&self) -> Option<Outgoing> {
        let mut q = self.inner.lock();
        q.writer = None;
        let begun = matches!(q.items.front(), Some(Outgoing::Framed(_)));
        let close = q
            .items
            .pop_back()
            .filter(|i| matches!(i, Outgoing::Close(..)) && !begun);
        q.items = VecDeque::new();
        q.bytes = 0;
        close
    }

    /// Registers the writer's waker.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Wakes the writer (to notice a kill flag, say).
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }

    /// Queued bytes and messages.
    pub(crate) fn depth(&self) -> (usize, usize) {
        let q = self.inner.lock();
        (q.bytes, q.items.len())
    }

    /// Whether a Close has been queued (the connection is on its way out).
    pub(crate) fn is_closing(&self) -> bool {
        self.inner.lock().closed
    }

    /// Since when the queue has been full, if it is.
    pub(crate) fn full_since(&self) -> Option<Instant> {
        self.inner.lock().full_since
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn text(n: usize) -> Outgoing {
        Outgoing::Text(Bytes::from(vec![b'x'; n]))
    }

    /// Everything the writer would take, in order (heartbeats as `json`).
    fn drain(q: &SendQueue, json: &Bytes) -> Vec<Outgoing> {
        let mut out = Vec::new();
        q.drain_into(
            || json.clone(),
            usize::MAX,
            usize::MAX,
            |i| {
                out.push(i);
                Ok::<(), ()>(())
            },
        )
        .unwrap();
        out
    }

    fn limits(policy: SlowConsumerPolicy) -> Limits {
        Limits {
            max_messages: 3,
            max_bytes: 100,
            policy,
        }
    }

    #[test]
    fn drop_oldest_keeps_newest_within_bounds() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        for _ in 0..3 {
            assert_eq!(q.push(text(10), &l), Pushed::Queued);
        }
        assert_eq!(q.push(text(20), &l), Pushed::DroppedOldest(1));
        assert_eq!(q.depth(), (40, 3));
        // a large message pushes out as many as needed for the byte bound
        assert_eq!(q.push(text(90), &l), Pushed::DroppedOldest(3));
        assert_eq!(q.depth(), (90, 1));
    }

    #[test]
    fn drop_newest_and_disconnect_refuse_and_mark_full() {
        for policy in [
            SlowConsumerPolicy::DropNewest,
            SlowConsumerPolicy::Disconnect,
        ] {
            let q = SendQueue::default();
            let l = limits(policy);
            for _ in 0..3 {
                q.push(text(1), &l);
            }
            assert!(q.full_since().is_none());
            assert_eq!(q.push(text(1), &l), Pushed::DroppedNewest);
            assert!(q.full_since().is_some());
            assert_eq!(q.depth(), (3, 3));
            let mut one = 0;
            q.drain_into(Bytes::new, 1, usize::MAX, |_| {
                one += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
            assert_eq!(one, 1);
            assert_eq!(q.push(text(1), &l), Pushed::Queued);
            assert!(q.full_since().is_none());
        }
    }

    #[test]
    fn one_oversized_message_still_fits_an_empty_queue() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropNewest);
        assert_eq!(q.push(text(500), &l), Pushed::Queued);
    }

    #[test]
    fn close_discards_and_refuses_later_pushes() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        q.push(text(10), &l);
        assert!(q.close(4000, "slow", true));
        assert_eq!(q.push(text(1), &l), Pushed::Closed);
        assert!(!q.close(1000, "again", false));
        let left = drain(&q, &Bytes::new());
        assert_eq!(left.len(), 1);
        assert!(matches!(left[0], Outgoing::Close(4000, _)));
    }

    #[test]
    fn take_close_finds_the_close_behind_queued_data() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        q.push(text(10), &l);
        assert!(q.take_close().is_none(), "no Close queued");
        q.push(text(10), &l);
        assert!(q.close(4001, "heartbeat timeout", false));
        assert!(matches!(q.take_close(), Some(Outgoing::Close(4001, _))));
        assert_eq!(q.depth(), (0, 0));
    }

    #[test]
    fn heartbeats_go_first_and_ignore_the_bounds() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropNewest);
        for _ in 0..3 {
            q.push(text(10), &l);
        }
        let json = Bytes::from_static(b"{\"type\":\"ping\"}");
        assert!(q.push_heartbeat(true, true));
        assert!(
            q.push_heartbeat(true, false),
            "a second mark does not queue twice"
        );
        let all = drain(&q, &json);
        assert!(matches!(all[0], Outgoing::Ping));
        assert!(matches!(&all[1], Outgoing::Text(b) if *b == json));
        assert_eq!(all.len(), 5, "ping, JSON ping, then the 3 queued");
        assert_eq!(q.depth(), (0, 0));
    }

    #[test]
    fn trim_returns_storage_of_an_empty_queue() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        q.push(text(1), &l);
        drain(&q, &Bytes::new());
        q.trim();
        assert_eq!(q.inner.lock().items.capacity(), 0);
    }

    /// A loopback pair: the server end split for write-through, the client end.
    async fn pair() -> (crate::transport::SharedTcp, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (
            crate::transport::SharedTcp::new(server.unwrap().0),
            client.unwrap(),
        )
    }

    /// Reads `n` server frames (unmasked, FIN set) from `client`; returns their payloads.
    async fn frames(client: &mut tokio::net::TcpStream, n: usize) -> Vec<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        for _ in 0..n {
            let mut h = [0u8; 2];
            client.read_exact(&mut h).await.unwrap();
            assert_eq!(h[0], 0x81, "a whole text frame starts here");
            let len = match h[1] {
                126 => client.read_u16().await.unwrap() as usize,
                127 => client.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            out.push(payload);
        }
        out
    }

    #[tokio::test]
    async fn a_write_through_goes_out_at_once_or_leaves_its_rest_at_the_front() {
        let (server, mut client) = pair().await;
        let q = SendQueue::default();
        let l = Limits {
            max_messages: 1_000_000,
            max_bytes: usize::MAX,
            policy: SlowConsumerPolicy::DropOldest,
        };
        let hello = Framed::text(b"hello");
        assert_eq!(
            q.push_through(&hello, &l),
            Pushed::Queued,
            "no writer left: queued"
        );
        drain(&q, &Bytes::new());

        assert!(q.offer_writer(server.writer()));
        assert_eq!(q.push_through(&hello, &l), Pushed::Written);
        assert_eq!(q.depth(), (0, 0), "written, not queued");
        assert_eq!(frames(&mut client, 1).await, vec![b"hello".to_vec()]);

        // Any other push, or a heartbeat, takes the writer away: what follows it
        // queues behind it, though the socket has room.
        for other in [0, 1] {
            assert!(q.offer_writer(server.writer()));
            if other == 0 {
                q.push(text(3), &l);
            } else {
                q.push_heartbeat(true, false);
            }
            assert_eq!(q.push_through(&hello, &l), Pushed::Queued);
            let queued = drain(&q, &Bytes::new());
            assert_eq!(queued.len(), 2);
            assert!(matches!(&queued[1], Outgoing::Text(b) if &b[..] == b"hello"));
        }
        assert!(q.offer_writer(server.writer()));
        q.reclaim_writer();
        assert_eq!(q.push_through(&hello, &l), Pushed::Queued, "taken back");
        drain(&q, &Bytes::new());
        assert!(q.offer_writer(server.writer()));

        // The client stops reading: write through until the socket takes part of a
        // frame, or none of one.
        let big = Framed::text(&[b'b'; 50_000]);
        let mut written = 0;
        while q.depth() == (0, 0) {
            assert!(
                written < 10_000,
                "loopback took 500 MB without pushing back"
            );
            q.push_through(&big, &l);
            written += 1;
        }
        assert_eq!(
            q.push_through(&hello, &l),
            Pushed::Queued,
            "once the task has the writer back, frames queue behind the rest"
        );
        assert!(
            !q.offer_writer(server.writer()),
            "not while frames are queued"
        );
        let queued = drain(&q, &Bytes::new());
        // What the task would write: the rest as it is, the others framed.
        let mut wire = Vec::new();
        for item in &queued {
            match item {
                Outgoing::Framed(b) => wire.extend_from_slice(b),
                Outgoing::Text(b) => wire.extend_from_slice(&Framed::text(b).bytes),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Every frame pushed reaches the client whole: those written at once, and
        // the last, begun or not, from the queue.
        let expect = written;
        let reader = tokio::spawn(async move { frames(&mut client, expect + 1).await });
        let w = server.writer();
        let mut at = 0;
        while at < wire.len() {
            match w.try_write(&wire[at..]) {
                Ok(n) => at += n,
                Err(_) => tokio::task::yield_now().await,
            }
        }
        let got = reader.await.unwrap();
        assert!(got[..expect]
            .iter()
            .all(|p| p.len() == 50_000 && p.iter().all(|&b| b == b'b')));
        assert_eq!(got[expect], b"hello");
    }

    #[test]
    fn a_begun_frame_is_neither_dropped_nor_cut_by_a_close() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        q.inner
            .lock()
            .items
            .push_back(Outgoing::Framed(Bytes::from_static(b"rest")));
        q.inner.lock().bytes = 4;
        for _ in 0..10 {
            q.push(text(10), &l);
        }
        assert!(
            matches!(q.inner.lock().items.front(), Some(Outgoing::Framed(_))),
            "the oldest dropped were behind it"
        );
        assert!(q.close(4000, "slow", true));
        let left = drain(&q, &Bytes::new());
        assert!(matches!(&left[0], Outgoing::Framed(b) if &b[..] == b"rest"));
        assert!(matches!(left[1], Outgoing::Close(4000, _)));
        assert_eq!(left.len(), 2);
    }
}
