//! Time as the library reads it.
//!
//! Durations and deadlines (heartbeats, presence TTL, history TTL, session
//! expiry) are measured on tokio's clock (`tokio::time::Instant`), so a test can
//! pause it and move it on (`tokio::time::pause`, `advance`) instead of sleeping.
//! Wall-clock time is used only where it crosses a process boundary: token
//! expiries and the publication time a broker records ([`unix_ms`]).
//!
//! What it must not do: keep state, or read `std::time::Instant` for anything a
//! test might want to pause.

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
