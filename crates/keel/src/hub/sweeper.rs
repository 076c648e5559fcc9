//! The Hub's sweeper: heartbeats, heartbeat timeouts, slow-consumer timeouts,
//! memory checks (every `memory_check_interval`, on their own timer), history and
//! presence expiry, credential expiry and auth timeouts, and the reclaiming of
//! detached sessions, for all connections, from one task.
//!
//! # Why a sweep and not a timer per connection
//!
//! A timer per connection costs a timer-wheel entry and a task wake-up per tick
//! for every idle connection, and a separate ping task would cost a task each.
//! Here each connection has one `last_seen` atomic, stored by its own task when a
//! frame arrives. One task wakes every `tick` (a quarter of the smallest of
//! interval, timeout, presence TTL, session TTL, auth timeout when auth comes in
//! the first message, and slow-consumer timeout under `disconnect`; at least
//! 10 ms) and walks the registry: it closes connections silent for longer than
//! `interval + timeout`, and pings one shard in `num_shards` per `interval /
//! num_shards`, so heartbeats are spread over the interval instead of arriving in
//! one burst. An idle connection's task is woken once per interval, to
//! write its ping, and at no other time. The JSON `ping` is encoded once per sweep
//! and shared by every queue.
//!
//! Detection is therefore within `interval + timeout + tick`. The sweeper holds a
//! `Weak` reference: it stops when the Hub is dropped or stopped, and it never
//! awaits a socket.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::{HeartbeatMode, SlowConsumerPolicy};
use crate::conn::{Connection, DisconnectReason};
use crate::hub::{Hub, HubInner};

pub(crate) async fn sweeper(hub: Weak<HubInner>, stop: CancellationToken) {
    let (interval, timeout, shards, check_every, deadlines) = match hub.upgrade() {
        Some(h) => (
            h.config.heartbeat_interval,
            h.config.heartbeat_timeout,
            h.config.num_shards.max(1),
            h.config
                .max_total_memory
                .map(|_| h.config.memory_check_interval),
            h.config
                .presence_ttl
                .min(h.config.reconnect_token_ttl)
                .min(if h.config.auth_first_message {
                    h.config.auth_timeout
                } else {
                    Duration::MAX
                })
                .min(
                    if h.config.slow_consumer_policy == SlowConsumerPolicy::Disconnect {
                        h.config.slow_consumer_timeout
                    } else {
                        Duration::MAX
                    },
                ),
        ),
        None => return,
    };
    let tick = (interval.min(timeout).min(deadlines) / 4).max(Duration::from_millis(10));
    let ping_step = interval / shards as u32;
    let start = Instant::now();
    // Shard i is first pinged at i * ping_step, then every interval.
    let mut next_ping: Vec<Instant> = (0..shards)
        .map(|i| start + ping_step * i as u32 + ping_step)
        .collect();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Memory checks keep their own interval, which may be shorter than the tick
    // (a tick derived from a 25 s heartbeat is 6.25 s) or longer. Without a
    // memory limit there is nothing to check and no timer.
    let mut memory_ticker = check_every.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let memory_check = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => false,
            _ = async {
                match memory_ticker.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let Some(inner) = hub.upgrade() else { return };
        let hub = Hub { inner };
        if memory_check {
            crate::hub::user_data::enforce_total_memory(&hub);
            continue;
        }
        let now = Instant::now();
        sweep(&hub, now, &mut next_ping, interval);
        hub.inner.fanout.sweep(&hub);
        let expiry = hub
            .inner
            .broker
            .expire(&|name| hub.channel_rules(name).stream);
        for gone in expiry.presence {
            if hub.channel_rules(&gone.channel).presence_events {
                hub.presence_event_detached(
                    &gone.channel,
                    "leave",
                    &gone.entry.client_id,
                    gone.entry.info,
                );
            }
        }
        if expiry.sessions > 0 {
            hub.inner
                .metrics
                .sessions_expired
                .fetch_add(expiry.sessions as u64, Ordering::Relaxed);
            tracing::debug!(freed = expiry.sessions, "detached sessions reclaimed");
        }
        if let Some(limits) = &hub.inner.ip_limits {
            limits.sweep();
        }
    }
}

fn sweep(hub: &Hub, now: Instant, next_ping: &mut [Instant], interval: Duration) {
    let cfg = hub.config();
    let deadline_ms = (cfg.heartbeat_interval + cfg.heartbeat_timeout).as_millis() as u64;
    let now_ms = hub.now_ms();
    let slow_timeout = cfg.slow_consumer_timeout;
    let disconnect_slow = cfg.slow_consumer_policy == SlowConsumerPolicy::Disconnect;
    let mut json_encoded = false;
    let unix_s = crate::policy::token::unix_ms() / 1000;
    let (grace, auth_timeout) = (cfg.auth_refresh_grace, cfg.auth_timeout);
    for (i, shard) in hub.shards().iter().enumerate() {
        let ping = now >= next_ping[i];
        if ping {
            next_ping[i] += interval;
            if next_ping[i] < now {
                next_ping[i] = now + interval;
            }
        }
        let conns: Vec<Connection> = shard.read().values().cloned().collect();
        for c in conns {
            let seen = c.inner.last_seen.load(Ordering::Relaxed);
            if now_ms.saturating_sub(seen) > deadline_ms {
                tracing::debug!(client_id = %c.client_id(), "heartbeat timeout");
                // Best effort: the peer is usually gone, so do not wait for its Close.
                c.close_as(
                    DisconnectReason::HeartbeatTimeout,
                    keel_protocol::close::HEARTBEAT_TIMEOUT,
                    "heartbeat timeout",
                    true,
                );
                c.kill(
                    DisconnectReason::HeartbeatTimeout,
                    keel_protocol::close::HEARTBEAT_TIMEOUT,
                );
                continue;
            }
            c.check_auth(now, unix_s, grace, auth_timeout);
            if disconnect_slow {
                if let Some(since) = c.inner.queue.full_since() {
                    if now.duration_since(since) >= slow_timeout {
                        c.close_as(
                            DisconnectReason::SlowConsumer,
                            keel_protocol::close::SLOW_CONSUMER,
                            "slow consumer",
                            true,
                        );
                        continue;
                    }
                }
            }
            if ping {
                // Once per interval, also give back what a burst left in the queue.
                c.inner.queue.trim();
                let ws = matches!(cfg.heartbeat_mode, HeartbeatMode::Ws | HeartbeatMode::Both);
                let json = matches!(
                    cfg.heartbeat_mode,
                    HeartbeatMode::Json | HeartbeatMode::Both
                );
                if json && !json_encoded {
                    // Once per sweep: fresh timestamp, one buffer for every queue.
                    *hub.inner.json_ping.lock() = keel_protocol::encode::ping();
                    json_encoded = true;
                }
                c.inner.queue.push_heartbeat(ws, json);
            }
        }
    }
}
