//! The [`Broker`]: what the nodes of a cluster share about channel streams, behind
//! one trait, so the in-process [`MemoryBroker`] and a Redis broker are
//! interchangeable.
//!
//! A broker owns what every node of a cluster must see alike: each channel's
//! stream (the offset counter and the epoch it belongs to, the history kept as
//! data, not as frames, and which nodes want the channel's publications), who is
//! present in each channel (entries with a TTL that their node refreshes),
//! one-use tickets, and the sessions of clients that went away, kept for a
//! `resume` on any node. Publishing assigns the next offset
//! atomically with the history append; then the broker hands the publication to
//! the [`Deliver`] sink of every interested node, in offset order per channel. A
//! history read answers either a complete replay after a position or "gone, here
//! is the head": never a partial replay.
//!
//! What it must not do: know about connections, queues, frames or the wire format
//! (delivery to sockets is the node's business, see `fanout`), await inside a
//! sink, or promise exactly-once delivery by itself: a sink may see a publication
//! twice or, after an epoch change, offsets that start again, and the node's last
//! hop filters by each subscriber's watermark (`fanout`'s module docs).
//!
//! Every method that may need a round trip to another process returns a
//! [`BrokerFuture`]; the memory broker's are ready on their first poll.

mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

pub use keel_protocol::StreamPosition;
pub use memory::{MemoryBroker, MAX_TICKETS};

use crate::error::Result;

/// What a broker call returns: a boxed future, so the trait is object safe
/// (`Arc<dyn Broker>`) and a broker can do I/O.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A publication as a broker keeps and delivers it: data, not an encoded frame.
/// Each node encodes it once for its own subscribers.
#[derive(Debug)]
pub struct StreamPublication {
    /// The channel.
    pub channel: Arc<str>,
    /// Its offset within `epoch` (from 1).
    pub offset: u64,
    /// The epoch of the stream it belongs to.
    pub epoch: Arc<str>,
    /// The publishing client (None for server-side publications).
    pub publisher: Option<Arc<str>>,
    /// When it was published, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The data, byte for byte as published.
    pub data: Box<RawValue>,
}

impl StreamPublication {
    /// Its position in the stream.
    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.to_string(),
        }
    }

    /// The `message` envelope of PROTOCOL.md, encoded.
    pub fn encode(&self) -> bytes::Bytes {
        keel_protocol::encode::message(
            &self.channel,
            &self.data,
            self.offset,
            &self.epoch,
            self.publisher.as_deref(),
        )
    }
}

/// How long and how much of a channel's stream is kept: the channel's namespace
/// settings or the top-level ones, passed with every call that writes, so a
/// broker needs no copy of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRules {
    /// Publications kept (0: none).
    pub history_size: usize,
    /// How long a publication is kept.
    pub history_ttl: Duration,
    /// Most bytes of history kept (0: only `history_size` bounds it); past it the
    /// oldest publications go first. One publication larger than this is not
    /// kept at all.
    pub history_bytes: usize,
}

/// What [`Broker::publish`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Publication {
    /// The offset it got.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Subscribers it was queued to by sinks that delivered it within the call
    /// (with the memory broker, every node's; with a broker that delivers later,
    /// 0).
    pub delivered: usize,
    /// Of those, subscribers whose queue dropped it or an older message for it.
    pub dropped: usize,
}

/// A history read: where to start and how much.
#[derive(Debug, Clone, Copy)]
pub struct HistoryQuery<'a> {
    /// Publications after this offset.
    pub after: u64,
    /// The epoch `after` belongs to. `Some`: a recovery, answered with every
    /// publication after `after` or with none (`complete: false`) when the epoch
    /// changed or history no longer holds all of them. `None`: a browse of what is
    /// kept after `after` in the current epoch.
    pub epoch: Option<&'a str>,
    /// At most this many publications (the oldest first).
    pub limit: usize,
}

/// The answer to [`Broker::history`].
#[derive(Debug, Clone)]
pub struct History {
    /// The stream's head when it was read; `None` if the channel has no stream
    /// (reading does not create one).
    pub position: Option<StreamPosition>,
    /// Whether `publications` starts right after the query's `after` in its epoch
    /// (nothing missing before the first one).
    pub complete: bool,
    /// Oldest first, at most `limit`; empty for a recovery that is not complete.
    pub publications: Vec<Arc<StreamPublication>>,
}

/// One client present in a channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PresenceEntry {
    /// The client.
    pub client_id: String,
    /// What the application attached at connect time (null if nothing).
    pub info: serde_json::Value,
}

/// A presence entry that ran out its TTL, as [`Broker::expire`] reports it, so
/// its node can announce the leave.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    /// The channel it was present in.
    pub channel: Arc<str>,
    /// Who it was.
    pub entry: PresenceEntry,
}

/// A session whose connection is gone, kept for a `resume` on any node.
#[derive(Debug, Clone, PartialEq)]
pub struct DetachedSession {
    /// The session's client.
    pub client_id: String,
    /// The generation its current reconnect token carries.
    pub generation: u64,
    /// Its user data, key to value (empty if it had none).
    pub user_data: std::collections::HashMap<String, serde_json::Value>,
    /// The channels it was in.
    pub channels: Vec<String>,
}

/// What [`Broker::session_take`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionTake {
    /// The session, now removed: whoever got it resumes it.
    Taken(DetachedSession),
    /// A session under that id exists but belongs to another client or token
    /// generation (its token was already used); it is left in place.
    Mismatch,
    /// No such session (never detached, taken, or past its TTL).
    Missing,
}

/// What [`Broker::expire`] found expired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expiry {
    /// Presence entries that ran out their TTL, for their leave events.
    pub presence: Vec<Expired>,
    /// Detached sessions dropped at the end of their TTL.
    pub sessions: usize,
}

/// Bounds a broker keeps on what clients can make it hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Most bytes of history in all channels together (`None`: unbounded). Past
    /// it the oldest publications of the channels holding most go first; a later
    /// recovery that needed them answers "not complete", truthfully.
    pub max_history_bytes: Option<usize>,
    /// Most channels with a stream (`None`: unbounded). Past it a publish,
    /// subscribe or presence that would create one is refused with
    /// [`ErrorKind::LimitExceeded`](crate::ErrorKind::LimitExceeded).
    pub max_channels: Option<usize>,
    /// Most one-use tickets held at once.
    pub max_tickets: usize,
    /// Most detached sessions (`None`: unbounded). Past it the ones closest to
    /// their expiry go first; their `session_take` then finds nothing.
    pub max_sessions: Option<usize>,
    /// Most presence entries in all channels (`None`: unbounded). Past it a
    /// `presence_add` of a new entry is refused with
    /// [`ErrorKind::LimitExceeded`](crate::ErrorKind::LimitExceeded); refreshing
    /// one is not.
    pub max_presence: Option<usize>,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_history_bytes: None,
            max_channels: None,
            max_tickets: MAX_TICKETS,
            max_sessions: None,
            max_presence: None,
        }
    }
}

/// What a broker holds now, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BrokerUsage {
    /// Channels with a stream.
    pub channels: usize,
    /// Bytes of history kept, all channels (data plus per-publication overhead).
    pub history_bytes: usize,
    /// Detached sessions held.
    pub sessions: usize,
    /// One-use tickets held.
    pub tickets: usize,
    /// Presence entries held, all channels.
    pub presence: usize,
}

/// Identifies one node's sink within a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

/// What a delivery did on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Subscribers it was queued to.
    pub queued: usize,
    /// Of those, subscribers whose queue dropped it or an older message for it.
    pub dropped: usize,
}

/// Where a broker hands a node its publications. Called in offset order per
/// channel, possibly with a broker lock held: it must never await or block.
pub trait Deliver: Send + Sync + 'static {
    /// One publication of a channel this node is interested in.
    fn deliver(&self, publication: &Arc<StreamPublication>) -> Delivered;

    /// A [`Signal`] sent to every node. Must not block either.
    fn signal(&self, signal: &Signal) {
        let _ = signal;
    }
}

/// A message for every node of a cluster, about a client that may be on any.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Signal {
    /// Close `client_id`'s connection, wherever it is, with `code` and `reason`.
    Disconnect {
        /// The client.
        client_id: String,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// The shared state of channel streams. See the module docs for the contract;
/// `tests/broker_contract.rs` holds it as tests that every broker must pass.
pub trait Broker: Send + Sync + 'static {
    /// Registers a node's delivery sink; publications of channels the node
    /// [subscribes](Self::subscribe) to reach it.
    fn attach(&self, sink: Arc<dyn Deliver>) -> NodeId;

    /// Forgets a node and its interests.
    fn detach(&self, node: NodeId);

    /// Counts one interest of `node` in `channel` (a local subscriber, or a
    /// presence that lingers). When the future resolves, the channel's stream
    /// exists, and every publication from then on reaches the node's sink until
    /// the interest is [withdrawn](Self::unsubscribe) as often as it was counted.
    /// A stream with interest keeps its epoch.
    fn subscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()>;

    /// Withdraws one interest counted by [`subscribe`](Self::subscribe).
    fn unsubscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()>;

    /// Assigns the next offset, appends to history as `rules` say, and hands the
    /// publication to every interested node, all as one step: concurrent
    /// publishers on one channel, on any node, never get the same offset or skip
    /// one, and every sink sees a channel's publications in offset order.
    fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, Publication>;

    /// Reads history; see [`HistoryQuery`] and [`History`]. Publications past
    /// their channel's `history_ttl` are never returned.
    fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, History>;

    /// Adds `entry` to `channel`'s presence, or refreshes it, for `ttl` from now
    /// (a presence keeps its channel's stream, and so its epoch; creating one is
    /// subject to the channel bound). Returns whether the client was not present
    /// before: a join.
    fn presence_add(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        ttl: Duration,
    ) -> BrokerFuture<'_, bool>;

    /// Removes `client_id` from `channel`'s presence. Returns the entry if it
    /// was present (a leave), `None` if not.
    fn presence_remove(
        &self,
        channel: &str,
        client_id: &str,
    ) -> BrokerFuture<'_, Option<PresenceEntry>>;

    /// Who is present in `channel` now (entries past their TTL are not).
    fn presence(&self, channel: &str) -> BrokerFuture<'_, Vec<PresenceEntry>>;

    /// Keeps `value` under `key` for `ttl`, to be [taken](Self::ticket_take)
    /// once. [`ErrorKind::LimitExceeded`](crate::ErrorKind::LimitExceeded) when
    /// the broker holds as many as it may.
    fn ticket_put(&self, key: &str, value: &str, ttl: Duration) -> BrokerFuture<'_, ()>;

    /// Takes `key`'s value: of any number of concurrent callers on any node, at
    /// most one gets it, once. `None` for a key unknown, taken or past its TTL.
    fn ticket_take(&self, key: &str) -> BrokerFuture<'_, Option<String>>;

    /// Keeps `session` under `session_id` for `ttl`, replacing what was there.
    fn session_put(
        &self,
        session_id: &str,
        session: DetachedSession,
        ttl: Duration,
    ) -> BrokerFuture<'_, ()>;

    /// Takes session `session_id`: with `expect` (client_id, generation), only
    /// if it matches, else it is left and the answer is `Mismatch`. Atomic: of
    /// concurrent takers on any node, at most one gets it.
    fn session_take(
        &self,
        session_id: &str,
        expect: Option<(&str, u64)>,
    ) -> BrokerFuture<'_, SessionTake>;

    /// What the broker holds now (for a shared broker, the cluster's): channels
    /// with a stream (interest, history or presence), history bytes, detached
    /// sessions, tickets, presence entries. The memory broker answers on the
    /// first poll; a broker that must ask another process may not, and the Hub
    /// then reports the last answer it had (see `Hub::metrics_snapshot`).
    fn usage(&self) -> BrokerFuture<'_, BrokerUsage>;

    /// Drops expired history, presence, tickets and sessions and forgets streams
    /// nobody holds; says which presence entries expired (for their leave events)
    /// and how many sessions. Called by each node's sweeper: with several nodes,
    /// each expiry is reported to one of them.
    fn expire(&self, rules: &dyn Fn(&str) -> StreamRules) -> Expiry;

    /// Its name, for health answers (`memory`, `redis`).
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// Whether it can serve now: a round trip to whatever it keeps its state
    /// in. The memory broker always can.
    fn check(&self) -> BrokerFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Whether its state is shared by other processes (nodes of a cluster).
    fn shared(&self) -> bool {
        false
    }

    /// Hands `signal` to every node's sink (on every process sharing the
    /// broker), this one's included.
    fn signal(&self, signal: Signal) -> BrokerFuture<'_, ()>;

    /// Announces node `name` with `connections` open; the announcement lasts
    /// `ttl` unless renewed, so a dead node drops out by itself. A broker that
    /// is not shared keeps nothing.
    fn announce(&self, name: &str, connections: usize, ttl: Duration) -> BrokerFuture<'_, ()> {
        let _ = (name, connections, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    /// The nodes whose announcement is still good, by name.
    fn nodes(&self) -> BrokerFuture<'_, Vec<NodeInfo>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// A node of a cluster, as its last announcement told.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// Its name (`node_id`).
    pub node: String,
    /// Connections it had open.
    pub connections: usize,
    /// Milliseconds since it announced itself.
    pub seen_ms_ago: u64,
}
