//! Per-connection user data with memory accounting ([`Hub::set_user_data`] and
//! friends), and the policy that evicts connections when the total goes over
//! `max_total_memory` (checked by the sweeper every `memory_check_interval`).
//!
//! A connection's memory, as counted here, is its user data (keys plus the JSON
//! size of values) plus the bytes waiting in its send queue. The count is an
//! estimate of what the application put in, not of allocator overhead; the
//! benchmark measures the real RSS. Nothing here allocates for a connection that
//! never stores user data.

use std::sync::atomic::Ordering;
use tokio::time::Instant;

use serde::Serialize;

use crate::config::EvictionPolicy;
use crate::conn::{entry_size, Connection, DisconnectReason, UserData};
use crate::error::{Error, ErrorKind, Result};
use crate::hub::Hub;

/// Totals for `Hub::memory_usage` and `/api/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryUsage {
    /// Bytes of user data plus queued output, all connections.
    pub total_memory: usize,
    /// Connections counted.
    pub connection_count: usize,
    /// `total_memory / connection_count` (0 with no connections).
    pub per_connection_average: f64,
}

impl Hub {
    /// Memory held by connections: user data plus queued output.
    pub fn memory_usage(&self) -> MemoryUsage {
        let mut total = 0;
        let mut count = 0;
        for s in self.inner.shards.iter() {
            for c in s.read().values() {
                total += c.memory();
                count += 1;
            }
        }
        MemoryUsage {
            total_memory: total,
            connection_count: count,
            per_connection_average: if count == 0 {
                0.0
            } else {
                total as f64 / count as f64
            },
        }
    }

    /// Stores `value` under `key` for `client_id`. Fails with
    /// [`ErrorKind::MemoryLimitExceeded`] if it would take the connection past
    /// `max_memory_per_connection` or all connections past `max_total_memory`;
    /// nothing is changed then.
    pub fn set_user_data(
        &self,
        client_id: &str,
        key: &str,
        value: serde_json::Value,
    ) -> Result<()> {
        let c = self.require(client_id)?;
        let cfg = &self.inner.config;
        let add = entry_size(key, &value);
        let mut slot = c.inner.user_data.lock();
        let ud = slot.get_or_insert_with(|| Box::new(UserData::new()));
        let old = ud.map.get(key).map_or(0, |v| entry_size(key, v));
        let new_conn = ud.bytes - old + add;
        if let Some(max) = cfg.max_memory_per_connection {
            if new_conn > max {
                return Err(Error::new(
                    ErrorKind::MemoryLimitExceeded,
                    format!("user data of {client_id} would be {new_conn} bytes, over max_memory_per_connection ({max})"),
                ));
            }
        }
        if let Some(max) = cfg.max_total_memory {
            let total = self.inner.user_data_bytes.load(Ordering::Relaxed) - old + add;
            if total > max {
                return Err(Error::new(
                    ErrorKind::MemoryLimitExceeded,
                    format!("user data would total {total} bytes, over max_total_memory ({max})"),
                ));
            }
        }
        ud.map.insert(key.to_string(), value);
        ud.bytes = new_conn;
        self.inner.user_data_bytes.fetch_add(add, Ordering::Relaxed);
        self.inner.user_data_bytes.fetch_sub(old, Ordering::Relaxed);
        Ok(())
    }

    /// The value under `key` for `client_id`, if any.
    pub fn user_data(&self, client_id: &str, key: &str) -> Option<serde_json::Value> {
        let c = self.connection(client_id)?;
        let slot = c.inner.user_data.lock();
        slot.as_ref()?.map.get(key).cloned()
    }
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
        EvictionPolicy::Fifo => conns.sort_by_key(|(c, mem)| (c.inner.connected_ms, Reverse(*mem))),
        EvictionPolicy::Oldest => conns.sort_by_cached_key(|(c, mem)| {
            let first = c.inner.user_data.lock().as_ref().map(|u| u.first_write);
            (first.unwrap_or(never), Reverse(*mem))
        }),
    }
    conns
}

/// Closes connections (1013) by the eviction policy until the total memory is under
/// `max_total_memory`. Returns how many were closed.
pub(crate) fn enforce_total_memory(hub: &Hub) -> usize {
    let Some(max) = hub.config().max_total_memory else {
        return 0;
    };
    // Only connections holding memory can be evicted, so only they are collected:
    // a check walks every connection but clones few handles.
    let mut total = 0;
    let mut conns: Vec<(Connection, usize)> = Vec::new();
    for shard in hub.shards() {
        for c in shard.read().values() {
            let mem = c.memory();
            if mem > 0 {
                total += mem;
                conns.push((c.clone(), mem));
            }
        }
    }
    if total <= max {
        return 0;
    }
    let mut excess = total - max;
    let mut closed = 0;
    for (c, mem) in eviction_order(conns, hub.config().memory_eviction_policy) {
        if excess == 0 {
            break;
        }
        tracing::warn!(client_id = %c.client_id(), bytes = mem, "evicting connection over max_total_memory");
        c.close_as(
            DisconnectReason::MemoryEvicted,
            keel_protocol::close::TRY_AGAIN_LATER,
            "memory limit",
            true,
        );
        excess = excess.saturating_sub(mem);
        closed += 1;
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::conn::entry_size;

    #[test]
    fn entry_size_counts_key_and_json() {
        assert_eq!(entry_size("k", &serde_json::json!("abc")), 1 + 5);
        assert_eq!(entry_size("key", &serde_json::json!({"a": 1})), 3 + 7);
    }

    fn conn(id: &str, last_seen_ms: u64) -> Connection {
        let limits = crate::conn::queue::Limits {
            max_messages: 16,
            max_bytes: 1 << 20,
            policy: crate::config::SlowConsumerPolicy::DropOldest,
        };
        let delivery = std::sync::Arc::new(crate::conn::Delivery::new(limits));
        Connection::new(
            id.into(),
            serde_json::Value::Null,
            None,
            None,
            last_seen_ms,
            delivery,
        )
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
