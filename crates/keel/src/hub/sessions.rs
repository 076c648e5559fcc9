//! Sessions that outlive their connection: what a dropped client gets back when it
//! sends `resume` with its reconnect token.
//!
//! A session is a client_id, a session_id, user data and the channels it was in.
//! While connected, all of that lives on the [`Connection`](crate::Connection).
//! When a connection ends without a clean goodbye (lost socket, heartbeat timeout,
//! shutdown, slow consumer), the Hub hands it to the broker, keyed by session_id,
//! for `reconnect_token_ttl` (so a resume works on any node sharing the broker);
//! the broker drops it after that, so abandoned sessions cost memory for a
//! bounded time only. A client close with 1000, a server-side disconnect, a
//! replacement (4002) and an eviction leave nothing behind.
//!
//! Each session remembers the generation its current token carries: a resume must
//! present exactly that generation (the broker's take checks it atomically) and
//! moves it on, which makes a token good for one resume. Here: the tokens and
//! [`Hub::resume`](crate::Hub::resume), which rebinds the new connection and
//! replays its channels.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::broker::{SessionTake, StreamPosition};
use crate::conn::{Connection, UserData};
use crate::error::{Error, ErrorKind, Result};
use crate::hub::Hub;
use crate::policy::token::{self, ReconnectClaims};

impl UserData {
    /// User data restored from a detached session, counted again.
    fn restored(map: std::collections::HashMap<String, serde_json::Value>) -> Option<Box<Self>> {
        if map.is_empty() {
            return None;
        }
        let mut ud = UserData::new();
        ud.bytes = map.iter().map(|(k, v)| crate::conn::entry_size(k, v)).sum();
        ud.map = map;
        Some(Box::new(ud))
    }
}

impl Hub {
    /// A reconnect token for `client_id`'s current session and generation, valid
    /// for `reconnect_token_ttl`. The gateway puts one in `welcome` and each
    /// `resume_response`.
    pub fn generate_reconnect_token(&self, client_id: &str) -> Result<String> {
        let c = self.require(client_id)?;
        Ok(self.token_for(&c))
    }

    /// A reconnect token for `conn`'s session as it is now (what `welcome` carries).
    pub fn reconnect_token(&self, conn: &Connection) -> String {
        self.token_for(conn)
    }

    fn token_for(&self, conn: &Connection) -> String {
        let ident = conn.ident();
        self.inner.signer.sign(&ReconnectClaims {
            client_id: ident.client_id.to_string(),
            session_id: uuid::Uuid::from_u128(ident.session_id).to_string(),
            generation: ident.generation,
            expires_at_ms: token::unix_ms()
                + self.inner.config.reconnect_token_ttl.as_millis() as u64,
            authenticated: conn.is_authenticated(),
        })
    }

    /// The claims of `token` if it was signed with this Hub's `reconnect_secret`
    /// and has not expired: [`ErrorKind::InvalidToken`] for a malformed, tampered
    /// or foreign token, [`ErrorKind::TokenExpired`] for one past its expiry. Says
    /// nothing about whether it was already used (that is [`resume`](Self::resume)'s
    /// business).
    pub fn validate_reconnect_token(&self, token: &str) -> Result<ReconnectClaims> {
        self.inner.signer.verify(token, token::unix_ms())
    }

    /// Detached sessions waiting for a resume (in the broker: with a shared
    /// broker, every node's).
    pub fn detached_session_count(&self) -> usize {
        self.broker_usage().sessions
    }

    /// Resumes the session `token` names on connection `conn`: `conn` takes the
    /// session's client_id and session_id (a connection still holding them is
    /// closed with 4002), gets its user data back, and is subscribed to each channel
    /// in `positions`, with what it missed after each position replayed (or nothing,
    /// and `recovered: false`, where history no longer has all of it).
    ///
    /// Refused, with `conn` left as it was (a new session): a forged, malformed or
    /// already used token ([`ErrorKind::InvalidToken`]), an expired one or a session
    /// already reclaimed ([`ErrorKind::TokenExpired`]), a session of another client
    /// when `conn` authenticated as someone (`authenticated_as`), or the session
    /// of an authenticated client when `conn` did not authenticate
    /// ([`ErrorKind::Forbidden`] both), and resume when `enable_reconnect` is off
    /// ([`ErrorKind::InvalidArgument`]).
    ///
    /// A token is good for one resume: the result carries its successor. On a node
    /// that does not hold the session (another node of a cluster, or after a
    /// restart), a valid unexpired token still restores the identity and the
    /// subscriptions, without user data (`restored_state: false`).
    pub async fn resume(
        &self,
        conn: &Connection,
        token: &str,
        positions: &[(String, Option<keel_protocol::StreamPosition>)],
        authenticated_as: Option<&str>,
    ) -> Result<Resumed> {
        let m = &self.inner.metrics;
        let result = self
            .resume_inner(conn, token, positions, authenticated_as)
            .await;
        let outcome = match &result {
            Ok(_) => 0,
            Err(e) if e.kind() == &ErrorKind::TokenExpired => 2,
            Err(e) if e.kind() == &ErrorKind::Forbidden => 3,
            Err(_) => 1,
        };
        m.resumes[outcome].fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(r) => tracing::info!(
                client_id = %r.client_id,
                session_id = %r.session_id,
                replayed = r.replayed,
                restored_state = r.restored_state,
                "resume"
            ),
            Err(e) => tracing::info!(
                client_id = %conn.client_id(),
                error = ?e.kind(),
                "resume refused"
            ),
        }
        result
    }

    async fn resume_inner(
        &self,
        conn: &Connection,
        token: &str,
        positions: &[(String, Option<keel_protocol::StreamPosition>)],
        authenticated_as: Option<&str>,
    ) -> Result<Resumed> {
        if !self.inner.config.enable_reconnect {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "session resume is disabled on this server",
            ));
        }
        for (channel, _) in positions {
            self.check_channel_name(channel)?;
        }
        let claims = self.inner.signer.verify_signature(token)?;
        let invalid = |why: &str| Error::new(ErrorKind::InvalidToken, why.to_string());
        let session_uuid = uuid::Uuid::parse_str(&claims.session_id)
            .map_err(|_| invalid("invalid reconnect token"))?;
        let session_id = session_uuid.as_u128();
        let session_key = session_uuid.to_string();
        if authenticated_as.is_some_and(|me| me != claims.client_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "the session belongs to another client",
            ));
        }
        // A reconnect token is not a credential: the session of an authenticated
        // client goes only to a connection that authenticated as that client.
        if claims.authenticated && authenticated_as.is_none() {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "the session belongs to an authenticated client: authenticate first",
            ));
        }
        let mine = conn.ident();
        if mine.session_id == session_id {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "this connection already is that session",
            ));
        }
        // Where is the session? Detached (in the broker: from any node), still
        // attached to an open connection here, or nowhere.
        let expect = Some((claims.client_id.as_str(), claims.generation));
        let taken = self.inner.broker.session_take(&session_key, expect).await?;
        let (user_data, lingering, restored_state) = match taken {
            SessionTake::Taken(d) => {
                let ud = UserData::restored(d.user_data);
                self.count_user_data(ud.as_deref());
                (ud, d.channels, true)
            }
            SessionTake::Mismatch => return Err(invalid("reconnect token already used")),
            SessionTake::Missing => match self.connection(&claims.client_id) {
                Some(old) if old.ident().session_id == session_id => {
                    if old.ident().generation != claims.generation {
                        return Err(invalid("reconnect token already used"));
                    }
                    // Still open (a zombie, or two tabs): take it over.
                    old.inner.taken_over.store(true, Ordering::Release);
                    let ud = old.inner.user_data.lock().take();
                    (ud, Vec::new(), true)
                }
                _ => {
                    if claims.expires_at_ms < token::unix_ms() {
                        return Err(Error::new(
                            ErrorKind::TokenExpired,
                            "reconnect token expired",
                        ));
                    }
                    (None, Vec::new(), false)
                }
            },
        };

        // Rebind to the session's identity, with its user data.
        self.rebind(
            conn,
            crate::conn::Ident {
                client_id: Arc::from(claims.client_id.as_str()),
                session_id,
                generation: claims.generation + 1,
            },
        );
        let previous = std::mem::replace(&mut *conn.inner.user_data.lock(), user_data);
        self.free_user_data(previous);
        // A copy detached by a connection that ended while we took it over.
        if let SessionTake::Taken(stale) =
            self.inner.broker.session_take(&session_key, None).await?
        {
            let mut slot = conn.inner.user_data.lock();
            if slot.is_none() {
                *slot = UserData::restored(stale.user_data);
                self.count_user_data(slot.as_deref());
            }
        }

        let mut resumed = Resumed {
            client_id: claims.client_id.clone(),
            session_id: claims.session_id.clone(),
            reconnect_token: self.token_for(conn),
            recovered: Default::default(),
            positions: Default::default(),
            replayed: 0,
            restored_state,
        };
        for (channel, since) in positions {
            let s = self
                .inner
                .fanout
                .join(self, channel, conn, since.as_ref())
                .await?;
            resumed.recovered.insert(channel.clone(), s.recovered);
            resumed.positions.insert(channel.clone(), s.position);
            resumed.replayed += s.replayed;
        }
        // Channels the session was in but did not ask back: its presence ends now.
        for ch in lingering {
            if !resumed.recovered.contains_key(&ch) {
                self.end_presence_detached(&ch, &claims.client_id);
            }
        }
        Ok(resumed)
    }

    fn free_user_data(&self, ud: Option<Box<UserData>>) {
        if let Some(ud) = ud {
            self.inner
                .user_data_bytes
                .fetch_sub(ud.bytes, Ordering::Relaxed);
        }
    }

    /// Counts user data that came back from a detached session.
    fn count_user_data(&self, ud: Option<&UserData>) {
        if let Some(ud) = ud {
            self.inner
                .user_data_bytes
                .fetch_add(ud.bytes, Ordering::Relaxed);
        }
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
