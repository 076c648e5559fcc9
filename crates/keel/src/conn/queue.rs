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
//! them, and the sweeper's [`SendQueue::trim`] can hand back what a burst left. It
//! must not do I/O or know what the frames mean beyond their size.

use std::collections::VecDeque;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::transport::{Outgoing, Slot};

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
    /// Queued after dropping this many older messages (`drop_oldest`).
    DroppedOldest(usize),
    /// Not queued: the queue was full (`drop_newest`, `disconnect`).
    DroppedNewest,
    /// Not queued: the connection is closing.
    Closed,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Slot>,
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

impl SendQueue {
    /// Queues a data frame under `limits`, and wakes the writer if the queue was
    /// empty. A non-empty queue means the writer has not finished draining it: it
    /// is either running (and will pop this too) or waiting for the socket (which
    /// will wake it). Skipping those wake-ups is most of what a broadcast to busy
    /// subscribers would otherwise spend.
    pub(crate) fn push(&self, item: Outgoing, limits: &Limits) -> Pushed {
        self.push_slot(Slot::Own(Box::new(item)), limits)
    }

    /// Queues a text frame that other queues share (a publication's one encoded
    /// copy), as [`push`](Self::push) does.
    pub(crate) fn push_shared(&self, frame: &Arc<Bytes>, limits: &Limits) -> Pushed {
        self.push_slot(Slot::Shared(frame.clone()), limits)
    }

    fn push_slot(&self, item: Slot, limits: &Limits) -> Pushed {
        let size = item.size();
        let was_empty;
        let result = {
            let mut q = self.inner.lock();
            if q.closed {
                return Pushed::Closed;
            }
            was_empty = q.items.is_empty() && !q.ping_due && !q.json_ping_due;
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
                            let Some(old) = q.items.pop_front() else {
                                break;
                            };
                            q.bytes -= old.size();
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
            if discard {
                q.items = VecDeque::new();
                q.bytes = 0;
                q.ping_due = false;
                q.json_ping_due = false;
            }
            q.items.push_back(Slot::Own(Box::new(Outgoing::Close(
                code,
                reason.to_string(),
            ))));
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
            q.bytes += item.size();
            q.items.push_back(Slot::Own(Box::new(item)));
            q.items.push_back(Slot::Own(Box::new(Outgoing::Close(
                code,
                reason.to_string(),
            ))));
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
        json_ping: impl FnOnce() -> bytes::Bytes,
        max_items: usize,
        max_bytes: usize,
        mut send: impl FnMut(Slot) -> Result<(), E>,
    ) -> Result<Drained, E> {
        let mut q = self.inner.lock();
        let mut n = 0;
        if std::mem::take(&mut q.ping_due) {
            send(Slot::from(Outgoing::Ping))?;
            n += 1;
        }
        if std::mem::take(&mut q.json_ping_due) {
            send(Slot::from(Outgoing::Text(json_ping())))?;
            n += 1;
        }
        let mut bytes = 0;
        while n < max_items && bytes < max_bytes {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            let size = item.size();
            q.bytes -= size;
            bytes += size;
            let close = item.is_close();
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
    pub(crate) fn take_close(&self) -> Option<Outgoing> {
        let mut q = self.inner.lock();
        let close = q.items.pop_back().filter(Slot::is_close);
        q.items = VecDeque::new();
        q.bytes = 0;
        close.map(Slot::into_outgoing)
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
                out.push(i.into_outgoing());
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
    fn shared_frames_count_and_keep_their_place_among_others() {
        let q = SendQueue::default();
        let l = limits(SlowConsumerPolicy::DropOldest);
        let shared = Arc::new(Bytes::from_static(b"publication"));
        assert_eq!(q.push_shared(&shared, &l), Pushed::Queued);
        assert_eq!(q.push(text(5), &l), Pushed::Queued);
        assert_eq!(q.push_shared(&shared, &l), Pushed::Queued);
        assert_eq!(q.depth(), (27, 3));
        assert_eq!(Arc::strong_count(&shared), 3, "one count per queued copy");
        // The bounds see shared frames too: a fourth push drops the oldest.
        assert_eq!(q.push(text(1), &l), Pushed::DroppedOldest(1));
        assert_eq!(Arc::strong_count(&shared), 2, "the dropped one let go");
        let all = drain(&q, &Bytes::new());
        let texts: Vec<&[u8]> = all
            .iter()
            .map(|o| match o {
                Outgoing::Text(b) => &b[..],
                _ => panic!("only text was queued"),
            })
            .collect();
        assert_eq!(texts, [&b"xxxxx"[..], b"publication", b"x"]);
        drop(all);
        assert_eq!(Arc::strong_count(&shared), 1, "sent copies let go");
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
}
