//! Channels (rooms): who is in each, and each channel's stream position (offset
//! within an epoch) and recent history, for the embedded in-memory broker.
//!
//! The registry is sharded by channel name; each channel has its own mutex, under
//! which a publication gets its offset, is encoded once, appended to history and
//! queued to every member. Doing all of that under one per-channel lock is what
//! makes every subscriber see a channel's offsets strictly increasing with no
//! duplicates, even with concurrent publishers; queuing never waits on a socket, so
//! the lock is held for microseconds per thousand members. There is no global lock
//! on this path.
//!
//! A channel is forgotten when it has no members, no lingering presence and no
//! live history; if it comes back, it gets a new epoch, since its old offsets can
//! no longer be served.
//!
//! Presence is the members plus, for `presence_ttl` after their last sign of life,
//! those that vanished without a clean close (their session may come back); a
//! clean leave is immediate. With `presence_events`, joins and leaves are published
//! into the channel's stream as ordinary messages (offsets, history, recovery).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::connection::Connection;
use crate::hub::{BroadcastResult, Hub};
use crate::transport::Outgoing;

/// A channel's position: the last offset assigned, in its current epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamPosition {
    /// The last offset assigned (0 before the first publication).
    pub offset: u64,
    /// The epoch the offsets belong to.
    pub epoch: String,
}

/// What a publication did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Publication {
    /// The offset it got.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Subscribers it was queued to.
    pub delivered: usize,
    /// Subscribers whose queue dropped it (or an older message) for it.
    pub dropped: usize,
}

/// One client present in a channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceEntry {
    /// The client.
    pub client_id: String,
    /// What the application attached at connect time (null if nothing).
    pub info: serde_json::Value,
}

/// A member that vanished without a clean close: still present until `until`.
pub(crate) struct Absent {
    info: serde_json::Value,
    until: Instant,
}

/// A publication as kept in history: the encoded `message` frame, sent again as-is
/// on replay.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) offset: u64,
    pub(crate) at: Instant,
    pub(crate) frame: Bytes,
}

pub(crate) struct ChannelState {
    pub(crate) members: HashMap<Arc<str>, Connection>,
    pub(crate) offset: u64,
    pub(crate) epoch: Arc<str>,
    pub(crate) history: VecDeque<Entry>,
    /// Members that vanished and still count as present.
    pub(crate) absent: HashMap<Arc<str>, Absent>,
    /// Set when the channel was dropped from the registry; a holder of a stale
    /// `Arc` must look the channel up again.
    pub(crate) dead: bool,
}

pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) state: Mutex<ChannelState>,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

/// All channels of a Hub.
pub(crate) struct Channels {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    /// Prefix of every epoch this Hub hands out: changes on every start.
    epoch_base: String,
    epoch_seq: AtomicU64,
    history_size: usize,
    history_ttl: Duration,
    /// Namespaces with their own history settings and presence events.
    namespaces: Vec<crate::config::Namespace>,
    presence_ttl: Duration,
    presence_events: bool,
}

impl Channels {
    pub(crate) fn new(config: &crate::Config) -> Self {
        let num_shards = config.num_shards.max(1);
        Channels {
            presence_ttl: config.presence_ttl,
            presence_events: config.presence_events,
            shards: (0..num_shards).map(|_| RwLock::default()).collect(),
            hasher: Default::default(),
            epoch_base: format!("{:08x}", rand::random::<u32>()),
            epoch_seq: AtomicU64::new(0),
            history_size: config.history_size,
            history_ttl: config.history_ttl,
            namespaces: config.namespaces.clone(),
        }
    }

    /// History size, history TTL and presence events of channel `name`: its
    /// namespace's where it sets them, else the top-level options.
    fn rules(&self, name: &str) -> (usize, Duration, bool) {
        match crate::permissions::namespace(&self.namespaces, name) {
            Some(n) => (
                n.history_size.unwrap_or(self.history_size),
                n.history_ttl.unwrap_or(self.history_ttl),
                n.presence_events.unwrap_or(self.presence_events),
            ),
            None => (self.history_size, self.history_ttl, self.presence_events),
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.shard(name).read().get(name).cloned()
    }

    fn get_or_create(&self, name: &str) -> Arc<Channel> {
        if let Some(c) = self.get(name) {
            return c;
        }
        let mut shard = self.shard(name).write();
        shard
            .entry(Arc::from(name))
            .or_insert_with_key(|key| {
                let epoch = format!(
                    "{}{}",
                    self.epoch_base,
                    self.epoch_seq.fetch_add(1, Ordering::Relaxed)
                );
                Arc::new(Channel {
                    name: key.clone(),
                    state: Mutex::new(ChannelState {
                        members: HashMap::new(),
                        offset: 0,
                        epoch: epoch.into(),
                        history: VecDeque::new(),
                        absent: HashMap::new(),
                        dead: false,
                    }),
                })
            })
            .clone()
    }

    /// Runs `f` on the live state of channel `name`, creating it if needed.
    fn with_live<R>(&self, name: &str, f: impl FnOnce(&Channel, &mut ChannelState) -> R) -> R {
        loop {
            let ch = self.get_or_create(name);
            let mut st = ch.state.lock();
            // Removed by `forget_if_idle` between lookup and lock: look it up again.
            if st.dead {
                continue;
            }
            return f(&ch, &mut st);
        }
    }

    /// Adds `conn` to `name`; returns the channel's position at the moment of joining
    /// (every later publication reaches the new member).
    pub(crate) fn join(&self, hub: &Hub, name: &str, conn: &Connection) -> StreamPosition {
        self.join_since(hub, name, conn, None).0
    }

    /// Joins, and if `since` is given, queues the publications after it first, all
    /// under the channel's lock: the replay comes before any live message, and no
    /// publication is both replayed and delivered live. Replays only when every
    /// publication after `since` is still in history (same epoch, not trimmed, not
    /// expired); otherwise replays nothing. Returns the position, whether it
    /// recovered, and how many it replayed.
    pub(crate) fn join_since(
        &self,
        hub: &Hub,
        name: &str,
        conn: &Connection,
        since: Option<&keel_protocol::StreamPosition>,
    ) -> (StreamPosition, bool, usize) {
        self.with_live(name, |ch, st| {
            let mut recovered = false;
            let mut replayed = 0;
            if let Some(since) = since {
                let (_, history_ttl, _) = self.rules(name);
                let now = Instant::now();
                let live = |e: &&Entry| now.duration_since(e.at) <= history_ttl;
                let wanted = st.offset.saturating_sub(since.offset);
                let first_kept = st.history.iter().find(live).map(|e| e.offset);
                let complete = since.epoch == *st.epoch
                    && since.offset <= st.offset
                    && (wanted == 0 || first_kept.is_some_and(|f| f <= since.offset + 1));
                if complete {
                    recovered = true;
                    for e in st.history.iter().filter(|e| e.offset > since.offset) {
                        conn.push(hub, Outgoing::Text(e.frame.clone()));
                        replayed += 1;
                    }
                }
            }
            let id = conn.client_id();
            let was_present = st.members.contains_key(&id) || st.absent.remove(&id).is_some();
            if self.rules(name).2 && !was_present {
                // Before the insert: the joining client does not get its own join.
                self.presence_event(hub, &ch.name, st, "join", &id, &conn.info());
            }
            st.members.insert(id, conn.clone());
            {
                let mut mine = conn.inner.channels.lock();
                if !mine.iter().any(|c| **c == *ch.name) {
                    mine.push(ch.name.clone());
                }
            }
            if conn.inner.gone.load(std::sync::atomic::Ordering::Acquire) {
                // The connection is unregistering and may have missed this join.
                st.members.remove(&conn.client_id());
            }
            let pos = StreamPosition {
                offset: st.offset,
                epoch: st.epoch.to_string(),
            };
            (pos, recovered, replayed)
        })
    }

    /// Removes `conn` from `name` (only this connection, not a newer one with the
    /// same client_id). With `linger`, it stays present until that instant (it
    /// vanished; its session may resume); without, it leaves at once. Returns
    /// whether it was a member.
    pub(crate) fn leave(
        &self,
        hub: &Hub,
        name: &str,
        conn: &Connection,
        linger: Option<Instant>,
    ) -> bool {
        conn.inner.channels.lock().retain(|c| &**c != name);
        let Some(ch) = self.get(name) else {
            return false;
        };
        let removed = {
            let mut st = ch.state.lock();
            let id = conn.client_id();
            let removed = match st.members.get(&id) {
                Some(m) if m.same(conn) => st.members.remove(&id).is_some(),
                _ => false,
            };
            if removed {
                match linger {
                    Some(until) => {
                        let info = conn.info();
                        st.absent.insert(id, Absent { info, until });
                    }
                    None if self.rules(name).2 => {
                        self.presence_event(hub, name, &mut st, "leave", &id, &conn.info());
                    }
                    None => {}
                }
            }
            removed
        };
        self.forget_if_idle(&ch);
        removed
    }

    /// Drops the channel from the registry if nobody is in it and its history is gone.
    fn forget_if_idle(&self, ch: &Arc<Channel>) {
        let mut shard = self.shard(&ch.name).write();
        let mut st = ch.state.lock();
        if st.members.is_empty() && st.history.is_empty() && st.absent.is_empty() && !st.dead {
            if let Some(cur) = shard.get(&ch.name) {
                if Arc::ptr_eq(cur, ch) {
                    shard.remove(&ch.name);
                    st.dead = true;
                }
            }
        }
    }

    /// Assigns the next offset, encodes once, keeps it in history and queues it to
    /// every member.
    pub(crate) fn publish(
        &self,
        hub: &Hub,
        name: &str,
        data: &RawValue,
        publisher: Option<&str>,
    ) -> Publication {
        self.with_live(name, |_, st| {
            self.publish_locked(hub, name, st, data, publisher)
        })
    }

    /// `publish` with the channel's lock held.
    fn publish_locked(
        &self,
        hub: &Hub,
        name: &str,
        st: &mut ChannelState,
        data: &RawValue,
        publisher: Option<&str>,
    ) -> Publication {
        st.offset += 1;
        let offset = st.offset;
        let frame = keel_protocol::encode::message(name, data, offset, &st.epoch, publisher);
        let (history_size, _, _) = self.rules(name);
        if history_size > 0 {
            st.history.push_back(Entry {
                offset,
                at: Instant::now(),
                frame: frame.clone(),
            });
            while st.history.len() > history_size {
                st.history.pop_front();
            }
        }
        let result = fan_out(hub, st.members.values(), &frame);
        Publication {
            offset,
            epoch: st.epoch.to_string(),
            delivered: result.sent,
            dropped: result.dropped,
        }
    }

    /// Publishes a `join` / `leave` event into the channel's stream.
    fn presence_event(
        &self,
        hub: &Hub,
        name: &str,
        st: &mut ChannelState,
        event: &str,
        client_id: &str,
        info: &serde_json::Value,
    ) {
        let data = serde_json::json!({ "presence": event, "client_id": client_id, "info": info });
        if let Ok(raw) = serde_json::value::to_raw_value(&data) {
            self.publish_locked(hub, name, st, &raw, None);
        }
    }

    /// Who is present in `name`: members that showed a sign of life within
    /// `presence_ttl`, and vanished ones whose presence has not expired.
    pub(crate) fn presence(&self, hub: &Hub, name: &str) -> Vec<PresenceEntry> {
        let Some(ch) = self.get(name) else {
            return Vec::new();
        };
        let now = Instant::now();
        let now_ms = hub.now_ms();
        let ttl_ms = self.presence_ttl.as_millis() as u64;
        let st = ch.state.lock();
        let mut out: Vec<PresenceEntry> = st
            .members
            .iter()
            .filter(|(_, c)| {
                now_ms.saturating_sub(c.inner.last_seen.load(std::sync::atomic::Ordering::Relaxed))
                    <= ttl_ms
            })
            .map(|(id, c)| PresenceEntry {
                client_id: id.to_string(),
                info: c.info(),
            })
            .collect();
        out.extend(
            st.absent
                .iter()
                .filter(|(_, a)| a.until > now)
                .map(|(id, a)| PresenceEntry {
                    client_id: id.to_string(),
                    info: a.info.clone(),
                }),
        );
        out
    }

    /// Ends the lingering presence of `client_id` in `name` now (a resumed session
    /// that did not take this channel back).
    pub(crate) fn end_presence(&self, hub: &Hub, name: &str, client_id: &str) {
        if let Some(ch) = self.get(name) {
            let mut st = ch.state.lock();
            if let Some(a) = st.absent.remove(client_id) {
                if self.rules(name).2 {
                    self.presence_event(hub, name, &mut st, "leave", client_id, &a.info);
                }
            }
        }
    }

    /// The encoded publications of `name` after `after` (oldest first, at most
    /// `limit`), with the channel's position; `None` if the channel does not exist.
    pub(crate) fn history(
        &self,
        name: &str,
        after: u64,
        limit: usize,
    ) -> Option<(StreamPosition, Vec<Bytes>)> {
        let ch = self.get(name)?;
        let st = ch.state.lock();
        let (_, history_ttl, _) = self.rules(name);
        let frames = st
            .history
            .iter()
            .filter(|e| e.offset > after && Instant::now().duration_since(e.at) <= history_ttl)
            .take(limit)
            .map(|e| e.frame.clone())
            .collect();
        Some((
            StreamPosition {
                offset: st.offset,
                epoch: st.epoch.to_string(),
            },
            frames,
        ))
    }

    /// Client ids in `name`.
    pub(crate) fn members(&self, name: &str) -> Vec<Connection> {
        self.get(name)
            .map(|ch| ch.state.lock().members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The channel's current position, if it exists.
    pub(crate) fn position(&self, name: &str) -> Option<StreamPosition> {
        self.get(name).map(|ch| {
            let st = ch.state.lock();
            StreamPosition {
                offset: st.offset,
                epoch: st.epoch.to_string(),
            }
        })
    }

    /// Drops expired history and presence (publishing `leave` events), and forgets
    /// idle channels. Called by the sweeper.
    pub(crate) fn sweep(&self, hub: &Hub) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let idle: Vec<Arc<Channel>> = shard
                .read()
                .values()
                .filter(|ch| {
                    let (_, history_ttl, presence_events) = self.rules(&ch.name);
                    let mut st = ch.state.lock();
                    while st
                        .history
                        .front()
                        .is_some_and(|e| now.duration_since(e.at) > history_ttl)
                    {
                        st.history.pop_front();
                    }
                    if !st.absent.is_empty() {
                        let expired: Vec<(Arc<str>, serde_json::Value)> = st
                            .absent
                            .iter()
                            .filter(|(_, a)| a.until <= now)
                            .map(|(id, a)| (id.clone(), a.info.clone()))
                            .collect();
                        for (id, info) in expired {
                            st.absent.remove(&id);
                            if presence_events {
                                self.presence_event(hub, &ch.name, &mut st, "leave", &id, &info);
                            }
                        }
                    }
                    st.members.is_empty() && st.history.is_empty() && st.absent.is_empty()
                })
                .cloned()
                .collect();
            for ch in idle {
                self.forget_if_idle(&ch);
            }
        }
    }

    /// Number of channels.
    pub(crate) fn count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

fn fan_out<'a>(
    hub: &Hub,
    members: impl Iterator<Item = &'a Connection>,
    frame: &Bytes,
) -> BroadcastResult {
    let mut result = BroadcastResult::default();
    let frame = Arc::new(frame.clone());
    for m in members {
        result.add(m.push_shared_counted(hub, &frame));
    }
    result
}
