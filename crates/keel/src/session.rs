//! Sessions that outlive their connection: what a dropped client gets back when it
//! sends `resume` with its reconnect token.
//!
//! A session is a client_id, a session_id, user data and the channels it was in.
//! While connected, all of that lives on the [`Connection`](crate::Connection).
//! When a connection ends without a clean goodbye (lost socket, heartbeat timeout,
//! shutdown, slow consumer), the Hub moves it here, keyed by session_id, for
//! `reconnect_token_ttl`; the sweeper reclaims it after that, so abandoned
//! sessions cost memory for a bounded time only. A client close with 1000, a
//! server-side disconnect, a replacement (4002) and an eviction leave nothing
//! behind.
//!
//! Each session remembers the generation its current token carries: a resume must
//! present exactly that generation and moves it on, which makes a token good for
//! one resume. This module holds data; the resume itself (rebinding the new
//! connection, replaying channels) is [`Hub::resume`](crate::Hub::resume).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::broker::StreamPosition;
use crate::memory::UserData;
use crate::token::TokenSigner;

/// A session whose connection is gone, waiting to be resumed.
pub(crate) struct Detached {
    pub(crate) client_id: Arc<str>,
    pub(crate) generation: u64,
    pub(crate) user_data: Option<Box<UserData>>,
    /// Channels it was in (presence lingers there until `presence_ttl`).
    pub(crate) channels: Vec<Arc<str>>,
    pub(crate) expires: Instant,
}

/// Detached sessions of a Hub, and the key their tokens are signed with.
pub(crate) struct Sessions {
    /// One lock: touched on disconnect, resume and once per sweep, never on the
    /// message path.
    detached: Mutex<HashMap<u128, Detached>>,
    pub(crate) signer: TokenSigner,
    pub(crate) ttl: Duration,
}

impl Sessions {
    pub(crate) fn new(secret: Option<&str>, ttl: Duration) -> Self {
        Sessions {
            detached: Mutex::new(HashMap::new()),
            signer: TokenSigner::new(secret),
            ttl,
        }
    }

    /// Keeps a session for `ttl`.
    pub(crate) fn detach(&self, session_id: u128, session: Detached) {
        self.detached.lock().insert(session_id, session);
    }

    /// Removes and returns session `session_id`, whatever its state.
    pub(crate) fn take(&self, session_id: u128) -> Option<Detached> {
        self.detached.lock().remove(&session_id)
    }

    /// Removes and returns session `session_id` if `pred` accepts it; otherwise
    /// leaves it and says whether it exists.
    pub(crate) fn take_if(
        &self,
        session_id: u128,
        pred: impl FnOnce(&Detached) -> bool,
    ) -> Result<Detached, bool> {
        let mut map = self.detached.lock();
        match map.get(&session_id) {
            Some(d) if pred(d) => Ok(map.remove(&session_id).unwrap_or_else(|| unreachable!())),
            Some(_) => Err(true),
            None => Err(false),
        }
    }

    /// Drops sessions past their expiry; returns the user-data bytes they held.
    pub(crate) fn reclaim(&self, now: Instant) -> (usize, usize) {
        let mut freed = 0;
        let mut bytes = 0;
        let mut map = self.detached.lock();
        map.retain(|_, d| {
            let keep = d.expires > now;
            if !keep {
                freed += 1;
                bytes += d.user_data.as_ref().map_or(0, |u| u.bytes);
            }
            keep
        });
        if map.capacity() > 64 && map.len() < map.capacity() / 4 {
            map.shrink_to_fit();
        }
        (freed, bytes)
    }

    /// Sessions waiting to be resumed.
    pub(crate) fn count(&self) -> usize {
        self.detached.lock().len()
    }
}

/// What [`Hub::resume`](crate::Hub::resume) restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Resumed {
    /// The session's client_id, now this connection's.
    pub client_id: String,
    /// The session id (unchanged by the resume).
    pub session_id: String,
    /// The successor token; the one just used is refused from now on.
    pub reconnect_token: String,
    /// Per channel named in `positions`: whether everything missed was replayed.
    pub recovered: BTreeMap<String, bool>,
    /// Per channel: its position now, to re-anchor on (also where not recovered).
    pub positions: BTreeMap<String, StreamPosition>,
    /// Messages replayed, all channels together.
    pub replayed: usize,
    /// Whether the session's state (user data) was found on this node; false when
    /// it was restored from the token alone (another node, or after a restart).
    pub restored_state: bool,
}
