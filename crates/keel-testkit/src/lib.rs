//! Test helpers shared by Keel's crates: the broker contract suite and waits with
//! deadlines.
//!
//! # Layout
//!
//! - [`broker_contract`]: what every [`keel::Broker`] must do, as async
//!   functions that take a factory of brokers. `tests/memory_broker.rs` runs them
//!   against [`keel::MemoryBroker`]; a Redis broker runs the same functions
//!   against a real `redis-server`.
//! - [`Recorder`]: a delivery sink that keeps what it was given and lets a test
//!   wait for it.
//! - [`eventually`] and [`WAIT`]: poll a condition until a deadline, and fail
//!   with a message that names what did not happen.
//! - [`ws`]: masked client frames of every length form, and waiting for a
//!   Close, for tests that speak WebSocket below a well-behaved client.
//! - [`gateway`]: a `keel serve` in the test's process on 127.0.0.1 port 0.
//! - [`redis`]: a real `redis-server` on a free port, stopped when dropped.
//!
//! What it must not do: sleep in place of waiting for an event, or hold state
//! between tests (every function builds what it uses).

#![allow(clippy::unwrap_used)]

pub mod broker_contract;
pub mod gateway;
pub mod redis;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use keel::broker::{Deliver, Delivered, StreamPublication};
use parking_lot::Mutex;

/// How long a test waits for something that should happen at once, on a loaded
/// two-core machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` every few milliseconds until it holds; panics naming `what` after
/// [`WAIT`].
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(what, WAIT, cond).await
}

/// [`eventually`] with a deadline of `within`.
pub async fn eventually_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A delivery sink that records every publication it is handed.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<Vec<Arc<StreamPublication>>>,
    changed: tokio::sync::Notify,
}

impl Recorder {
    /// A new, empty recorder behind an `Arc` (what `Broker::attach` takes).
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    /// What it was handed so far, in order.
    pub fn seen(&self) -> Vec<Arc<StreamPublication>> {
        self.seen.lock().clone()
    }

    /// The offsets it was handed for `channel`, in order.
    pub fn offsets(&self, channel: &str) -> Vec<u64> {
        self.seen
            .lock()
            .iter()
            .filter(|p| &*p.channel == channel)
            .map(|p| p.offset)
            .collect()
    }

    /// Waits until it holds at least `n` publications of `channel`; panics after
    /// [`WAIT`].
    pub async fn wait_for(&self, channel: &str, n: usize) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let changed = self.changed.notified();
            let offsets = self.offsets(channel);
            if offsets.len() >= n {
                return offsets;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "timed out waiting for {n} publications of {channel}: got {}",
                    offsets.len()
                );
            }
        }
    }
}

impl Deliver for Recorder {
    fn deliver(&self, publication: &Arc<StreamPublication>) -> Delivered {
        self.seen.lock().push(publication.clone());
        self.changed.notify_waiters();
        Delivered {
            queued: 1,
            dropped: 0,
        }
    }
}
