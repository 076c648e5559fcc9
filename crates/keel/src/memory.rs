//! Per-connection user data with memory accounting, and the policy that evicts
//! connections when the total goes over `max_total_memory`.
//!
//! A connection's memory, as counted here, is its user data (keys plus the JSON
//! size of values) plus the bytes waiting in its send queue. The count is an
//! estimate of what the application put in, not of allocator overhead; the
//! benchmark measures the real RSS. Nothing here allocates for a connection that
//! never stores user data.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use crate::config::EvictionPolicy;
use crate::connection::Connection;

/// Totals for `get_memory_usage` and `/api/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryUsage {
    /// Bytes of user data plus queued output, all connections.
    pub total_memory: usize,
    /// Connections counted.
    pub connection_count: usize,
    /// `total_memory / connection_count` (0 with no connections).
    pub per_connection_average: f64,
}

/// One connection's user data.
#[derive(Debug)]
pub(crate) struct UserData {
    pub(crate) map: HashMap<String, serde_json::Value>,
    /// Estimated bytes held (keys plus JSON sizes of values).
    pub(crate) bytes: usize,
    /// When data was first written, for the `oldest` eviction policy.
    pub(crate) first_write: Instant,
}

impl UserData {
    pub(crate) fn new() -> Self {
        UserData {
            map: HashMap::new(),
            bytes: 0,
            first_write: Instant::now(),
        }
    }
}

/// The estimated size of one entry.
pub(crate) fn entry_size(key: &str, value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, value);
    key.len() + c.0
}

/// Orders connections for eviction: the first in the returned list goes first.
///
/// The policy decides; among connections it cannot tell apart (the same
/// `last_seen` millisecond, say, or no user data under `oldest`) the one holding
/// more memory goes first, so that a tie never costs a connection that holds little
/// while the one filling memory stays.
pub(crate) fn eviction_order(
    mut conns: Vec<(Connection, usize)>,
    policy: EvictionPolicy,
) -> Vec<(Connection, usize)> {
    use std::cmp::Reverse;
    use std::sync::atomic::Ordering;
    // Connections without user data go last under `oldest`.
    let never = Instant::now() + std::time::Duration::from_secs(1 << 30);
    match policy {
        EvictionPolicy::Lru => {
            conns.sort_by_key(|(c, mem)| (c.inner.last_seen.load(Ordering::Relaxed), Reverse(*mem)))
        }
        EvictionPolicy::Fifo => conns.sort_by_key(|(c, mem)| (c.inner.connected_at, Reverse(*mem))),
        EvictionPolicy::Oldest => conns.sort_by_cached_key(|(c, mem)| {
            let first = c.inner.user_data.lock().as_ref().map(|u| u.first_write);
            (first.unwrap_or(never), Reverse(*mem))
        }),
    }
    conns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_size_counts_key_and_json() {
        assert_eq!(entry_size("k", &serde_json::json!("abc")), 1 + 5);
        assert_eq!(entry_size("key", &serde_json::json!({"a": 1})), 3 + 7);
    }

    fn conn(id: &str, last_seen_ms: u64) -> Connection {
        Connection::new(id.into(), serde_json::Value::Null, None, None, last_seen_ms)
    }

    fn ids(order: &[(Connection, usize)]) -> Vec<String> {
        order
            .iter()
            .map(|(c, _)| c.client_id().to_string())
            .collect()
    }

    // Regression: the CI of 2026-12-04 saw the connection that was reading
    // evicted. Two connections opened within one millisecond tie under `lru`, and
    // the tie fell to registry order, which can put the one holding little first.
    #[test]
    fn ties_go_to_the_connection_holding_more() {
        let order = eviction_order(
            vec![
                (conn("small", 7), 50),
                (conn("big", 7), 900),
                (conn("none", 7), 0),
            ],
            EvictionPolicy::Lru,
        );
        assert_eq!(ids(&order), ["big", "small", "none"]);
        // The policy still comes first: the least recently seen goes first even
        // when it holds less.
        let order = eviction_order(
            vec![(conn("recent", 9), 900), (conn("stale", 3), 50)],
            EvictionPolicy::Lru,
        );
        assert_eq!(ids(&order), ["stale", "recent"]);
        // Without user data, `oldest` cannot tell them apart either.
        let order = eviction_order(
            vec![(conn("small", 1), 10), (conn("big", 1), 20)],
            EvictionPolicy::Oldest,
        );
        assert_eq!(ids(&order), ["big", "small"]);
    }
}
