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
pub(crate) fn eviction_order(
    mut conns: Vec<(Connection, usize)>,
    policy: EvictionPolicy,
) -> Vec<(Connection, usize)> {
    use std::sync::atomic::Ordering;
    match policy {
        EvictionPolicy::Lru => {
            conns.sort_by_key(|(c, _)| c.inner.last_seen.load(Ordering::Relaxed))
        }
        EvictionPolicy::Fifo => conns.sort_by_key(|(c, _)| c.inner.connected_at),
        EvictionPolicy::Oldest => conns.sort_by_key(|(c, _)| {
            c.inner
                .user_data
                .lock()
                .as_ref()
                .map(|u| u.first_write)
                // Connections without user data go last.
                .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1 << 30))
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
}
