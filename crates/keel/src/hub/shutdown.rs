//! The graceful shutdown sequence.
//!
//! The Hub starts refusing upgrades (the gateway's readiness
//! turns 503 from the same flag), every client gets `server_shutdown` with a
//! reconnect delay drawn uniformly from `shutdown_reconnect_window` (so a restart
//! does not become a reconnection storm) followed by Close 1012, and the Hub waits
//! for connection tasks to end. Those still open at the deadline are force-closed.
//! The result is a [`ShutdownReport`]. It must not exit the process: the caller
//! decides that (the gateway exits 0 after SIGTERM; `/admin/drain` does not exit).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use rand::Rng;
use serde::Serialize;

use crate::conn::{Connection, DisconnectReason};
use crate::hub::Hub;

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ShutdownReport {
    /// Connections open when the shutdown began.
    pub connections_at_start: usize,
    /// Connections that ended within the deadline.
    pub closed_gracefully: usize,
    /// Connections force-closed at the deadline.
    pub force_closed: usize,
    /// How long it took, in seconds.
    pub duration_seconds: f64,
}

impl Hub {
    /// Drains the Hub: refuse new connections, tell every client to reconnect
    /// later (`server_shutdown`, then close 1012), wait up to `timeout` for them to
    /// go, force-close the rest. Calling it again after it finished returns a report
    /// of an empty Hub.
    ///
    /// The Hub refuses new connections (and readiness can report draining) from the
    /// moment this is called, before the returned future is first polled: a caller
    /// that spawns the drain and answers at once (`POST /admin/drain`) must not
    /// leave a window where it still looks ready.
    pub fn graceful_shutdown(
        &self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = ShutdownReport> + Send + 'static {
        self.inner.draining.store(true, Ordering::Release);
        let hub = self.clone();
        async move { hub.drain(timeout).await }
    }

    async fn drain(&self, timeout: Duration) -> ShutdownReport {
        let started = Instant::now();
        let conns: Vec<Connection> = self
            .shards()
            .iter()
            .flat_map(|s| s.read().values().cloned().collect::<Vec<_>>())
            .collect();
        let at_start = conns.len();
        let window = self.config().shutdown_reconnect_window.as_millis() as u64;
        tracing::info!(connections = at_start, "graceful shutdown started");
        for (i, c) in conns.iter().enumerate() {
            let delay_ms = if window == 0 {
                0
            } else {
                rand::thread_rng().gen_range(0..=window)
            };
            let notice = keel_protocol::encode::server_shutdown("server shutdown", true, delay_ms);
            c.send_then_close(
                DisconnectReason::Shutdown,
                notice,
                keel_protocol::close::SERVICE_RESTART,
                "server shutdown",
            );
            if (i + 1) % self.config().max_concurrent_cleanup == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Wait for the connection tasks themselves, not just the registry.
        self.inner.tasks.close();
        let _ = tokio::time::timeout(timeout, self.inner.tasks.wait()).await;
        let mut force_closed = 0;
        for s in self.shards() {
            for c in s.read().values() {
                c.kill(
                    DisconnectReason::Shutdown,
                    keel_protocol::close::SERVICE_RESTART,
                );
                force_closed += 1;
            }
        }
        // Killed tasks end at their next poll; wait for them (bounded, to be safe).
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.tasks.wait()).await;
        self.inner.stop.cancel();
        let report = ShutdownReport {
            connections_at_start: at_start,
            closed_gracefully: at_start.saturating_sub(force_closed),
            force_closed,
            duration_seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            connections_at_start = report.connections_at_start,
            closed_gracefully = report.closed_gracefully,
            force_closed = report.force_closed,
            duration_seconds = report.duration_seconds,
            "shutdown report"
        );
        report
    }
}
