//! Counters of a Hub and their Prometheus text rendering.
//!
//! Hot per-message counters live on each connection and are only written by its
//! own task (no shared cache line on the fan-out path); they are folded in here when
//! the connection ends and summed over live connections when metrics are read.
//! Everything else is a Hub-wide relaxed atomic. This module never blocks and never
//! allocates on the paths it counts.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::BrokerUsage;
use crate::conn::{ConnStats, DisconnectReason};
use crate::listener::GateStats;

/// Hub-wide counters.
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) connects: AtomicU64,
    pub(crate) disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    pub(crate) heartbeat_timeouts: AtomicU64,
    /// Inbound messages dropped by the per-connection rate limit.
    pub(crate) rate_limited: AtomicU64,
    pub(crate) publications: AtomicU64,
    pub(crate) rejected_limit: AtomicU64,
    pub(crate) rejected_draining: AtomicU64,
    /// Upgrades refused at `max_connections_per_ip`.
    pub(crate) rejected_ip_limit: AtomicU64,
    /// Upgrades refused over `connection_rate_per_ip`.
    pub(crate) rejected_ip_rate: AtomicU64,
    /// Resumes by outcome: resumed, invalid, expired, forbidden.
    pub(crate) resumes: [AtomicU64; 4],
    /// Detached sessions freed at the end of their TTL.
    pub(crate) sessions_expired: AtomicU64,
    /// Counters of connections that have ended.
    pub(crate) closed: ConnStats,
}

impl Metrics {
    pub(crate) fn fold(&self, s: &ConnStats) {
        for (to, from) in [
            (&self.closed.messages_in, &s.messages_in),
            (&self.closed.bytes_in, &s.bytes_in),
            (&self.closed.messages_out, &s.messages_out),
            (&self.closed.bytes_out, &s.bytes_out),
            (&self.closed.dropped, &s.dropped),
        ] {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// A point-in-time copy of a Hub's counters and gauges.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Open connections.
    pub connections: usize,
    /// Channels known (with members or live history).
    pub channels: usize,
    /// Bytes of history kept in the broker (all channels).
    pub history_bytes: usize,
    /// Connections accepted since start.
    pub connects_total: u64,
    /// Connections ended since start, by reason.
    pub disconnects_total: Vec<(&'static str, u64)>,
    /// Messages received from clients.
    pub messages_in_total: u64,
    /// Bytes received from clients (payloads).
    pub bytes_in_total: u64,
    /// Messages written to clients.
    pub messages_out_total: u64,
    /// Bytes written to clients (payloads, before compression).
    pub bytes_out_total: u64,
    /// Messages dropped by the slow-consumer policy, by policy.
    pub dropped_total: Vec<(&'static str, u64)>,
    /// Connections closed for silence.
    pub heartbeat_timeouts_total: u64,
    /// Inbound messages dropped by the per-connection rate limit.
    pub rate_limited_total: u64,
    /// Publications made.
    pub publications_total: u64,
    /// Upgrades refused, by reason.
    pub rejected_total: Vec<(&'static str, u64)>,
    /// Bytes waiting in send queues.
    pub send_queue_bytes: usize,
    /// Messages waiting in send queues.
    pub send_queue_messages: usize,
    /// Bytes of user data (of connections and of detached sessions).
    pub user_data_bytes: usize,
    /// Sessions resumes, by outcome (`resumed`, `invalid`, `expired`, `forbidden`).
    pub resumes_total: Vec<(&'static str, u64)>,
    /// Detached sessions waiting for a resume.
    pub sessions_detached: usize,
    /// Detached sessions freed at the end of their TTL.
    pub sessions_expired_total: u64,
    /// One-use connection tickets waiting to be used.
    pub tickets: usize,
    /// Presence entries, all channels.
    pub presence_entries: usize,
    /// Connections accepted that are not WebSockets (yet): handshaking, or plain HTTP.
    pub pending_connections: usize,
    /// Connections closed for not sending a request within `handshake_timeout`.
    pub handshake_timeouts_total: u64,
    /// Accepts that failed (out of file descriptors, typically).
    pub accept_errors_total: u64,
    /// Times accepting paused at `max_pending_connections`.
    pub accept_paused_total: u64,
}

impl MetricsSnapshot {
    pub(crate) fn collect<'a>(
        m: &Metrics,
        live: impl Iterator<Item = &'a crate::Connection>,
        user_data_bytes: usize,
        (dropped_oldest, dropped_newest): (u64, u64),
        broker: &BrokerUsage,
        gate: GateStats,
    ) -> Self {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = MetricsSnapshot {
            channels: broker.channels,
            history_bytes: broker.history_bytes,
            tickets: broker.tickets,
            presence_entries: broker.presence,
            pending_connections: gate.pending,
            handshake_timeouts_total: gate.handshake_timeouts_total,
            accept_errors_total: gate.accept_errors_total,
            accept_paused_total: gate.accept_paused_total,
            connects_total: r(&m.connects),
            disconnects_total: DisconnectReason::ALL
                .iter()
                .map(|d| (d.as_str(), r(&m.disconnects[d.index()])))
                .collect(),
            messages_in_total: r(&m.closed.messages_in),
            bytes_in_total: r(&m.closed.bytes_in),
            messages_out_total: r(&m.closed.messages_out),
            bytes_out_total: r(&m.closed.bytes_out),
            dropped_total: vec![
                ("drop_oldest", dropped_oldest),
                ("drop_newest", dropped_newest),
            ],
            heartbeat_timeouts_total: r(&m.heartbeat_timeouts),
            rate_limited_total: r(&m.rate_limited),
            publications_total: r(&m.publications),
            rejected_total: vec![
                ("limit", r(&m.rejected_limit)),
                ("draining", r(&m.rejected_draining)),
                ("ip_limit", r(&m.rejected_ip_limit)),
                ("ip_rate", r(&m.rejected_ip_rate)),
            ],
            user_data_bytes,
            resumes_total: ["resumed", "invalid", "expired", "forbidden"]
                .iter()
                .zip(&m.resumes)
                .map(|(l, v)| (*l, r(v)))
                .collect(),
            sessions_detached: broker.sessions,
            sessions_expired_total: r(&m.sessions_expired),
            ..Default::default()
        };
        for c in live {
            let st = &c.inner.stats;
            s.connections += 1;
            s.messages_in_total += r(&st.messages_in);
            s.bytes_in_total += r(&st.bytes_in);
            s.messages_out_total += r(&st.messages_out);
            s.bytes_out_total += r(&st.bytes_out);
            let (bytes, msgs) = c.inner.queue.depth();
            s.send_queue_bytes += bytes;
            s.send_queue_messages += msgs;
        }
        s
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut o = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "keel_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.to_string(),
        );
        one(
            "keel_channels",
            "gauge",
            "Channels with a stream: subscribers, history or presence (bounded by max_channels).",
            self.channels.to_string(),
        );
        one(
            "keel_history_bytes",
            "gauge",
            "Bytes of history kept, all channels (bounded by max_history_memory).",
            self.history_bytes.to_string(),
        );
        one(
            "keel_connects_total",
            "counter",
            "Connections accepted.",
            self.connects_total.to_string(),
        );
        one(
            "keel_messages_in_total",
            "counter",
            "Messages received from clients.",
            self.messages_in_total.to_string(),
        );
        one(
            "keel_bytes_in_total",
            "counter",
            "Payload bytes received from clients.",
            self.bytes_in_total.to_string(),
        );
        one(
            "keel_messages_out_total",
            "counter",
            "Messages written to clients.",
            self.messages_out_total.to_string(),
        );
        one(
            "keel_bytes_out_total",
            "counter",
            "Payload bytes written to clients.",
            self.bytes_out_total.to_string(),
        );
        one(
            "keel_heartbeat_timeouts_total",
            "counter",
            "Connections closed for heartbeat silence.",
            self.heartbeat_timeouts_total.to_string(),
        );
        one(
            "keel_rate_limited_messages_total",
            "counter",
            "Inbound messages dropped by the per-connection rate limit.",
            self.rate_limited_total.to_string(),
        );
        one(
            "keel_publications_total",
            "counter",
            "Publications made.",
            self.publications_total.to_string(),
        );
        one(
            "keel_send_queue_bytes",
            "gauge",
            "Bytes waiting in send queues.",
            self.send_queue_bytes.to_string(),
        );
        one(
            "keel_send_queue_messages",
            "gauge",
            "Messages waiting in send queues.",
            self.send_queue_messages.to_string(),
        );
        one(
            "keel_user_data_bytes",
            "gauge",
            "Bytes of per-connection user data.",
            self.user_data_bytes.to_string(),
        );
        one(
            "keel_sessions_detached",
            "gauge",
            "Sessions kept for a resume after their connection ended (bounded by max_detached_sessions).",
            self.sessions_detached.to_string(),
        );
        one(
            "keel_sessions_expired_total",
            "counter",
            "Detached sessions freed unresumed at the end of reconnect_token_ttl.",
            self.sessions_expired_total.to_string(),
        );
        one(
            "keel_tickets",
            "gauge",
            "One-use connection tickets waiting to be used.",
            self.tickets.to_string(),
        );
        one(
            "keel_presence_entries",
            "gauge",
            "Presence entries, all channels (bounded by max_presence_entries).",
            self.presence_entries.to_string(),
        );
        one(
            "keel_pending_connections",
            "gauge",
            "Connections accepted that are not WebSockets yet (bounded by max_pending_connections).",
            self.pending_connections.to_string(),
        );
        one(
            "keel_handshake_timeouts_total",
            "counter",
            "Connections closed for sending no whole request within handshake_timeout.",
            self.handshake_timeouts_total.to_string(),
        );
        one(
            "keel_accept_errors_total",
            "counter",
            "Accepts that failed (out of file descriptors, typically).",
            self.accept_errors_total.to_string(),
        );
        one(
            "keel_accept_paused_total",
            "counter",
            "Times accepting waited at max_pending_connections.",
            self.accept_paused_total.to_string(),
        );
        let mut labelled = |name: &str, help: &str, label: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, v) in rows {
                let _ = writeln!(o, "{name}{{{label}=\"{l}\"}} {v}");
            }
        };
        labelled(
            "keel_disconnects_total",
            "Connections ended, by reason.",
            "reason",
            &self.disconnects_total,
        );
        labelled(
            "keel_dropped_messages_total",
            "Messages dropped by the slow-consumer policy.",
            "policy",
            &self.dropped_total,
        );
        labelled(
            "keel_upgrades_rejected_total",
            "WebSocket upgrades refused.",
            "reason",
            &self.rejected_total,
        );
        labelled(
            "keel_resumes_total",
            "Session resumes, by outcome.",
            "result",
            &self.resumes_total,
        );
        o
    }
}
