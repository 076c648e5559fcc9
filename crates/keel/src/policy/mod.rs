//! Policy: who may connect and what a connection may do, decided from the
//! request, the credential and the configuration alone.
//!
//! - [`auth`]: JWT verification (HS256, RS256, ES256), one-time tickets, and the
//!   [`Identity`](auth::Identity) a credential proves.
//! - [`token`]: reconnect tokens (HMAC-SHA256) and their claims.
//! - [`permissions`]: channel namespaces, private channels and the JWT `channels`
//!   claim, as the pure function [`authorize`](permissions::authorize).
//! - [`ip_limits`]: per-address connection caps and rates, trusted proxies.
//!
//! What it must not do: hold connections, send anything, or reach into the Hub;
//! the Hub asks, policy answers.

pub mod auth;
pub mod ip_limits;
pub mod permissions;
pub mod token;
