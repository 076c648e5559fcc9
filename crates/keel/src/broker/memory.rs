//! [`MemoryBroker`]: the embedded broker, for one process (one node, or several
//! Hubs in one process sharing it, as tests do to stand in for a cluster).
//!
//! Streams are sharded by channel name; each has its own mutex, under which a
//! publication gets its offset, is appended to history and is handed to every
//! interested node's sink. Doing all three under one per-channel lock is what
//! makes every sink see a channel's offsets strictly increasing with no
//! duplicates, even with concurrent publishers; sinks only queue, so the lock is
//! held for microseconds per thousand subscribers. There is no global lock on
//! this path.
//!
//! A stream is forgotten when no node holds an interest in it, its history is
//! gone (expired, or never kept) and nobody is present; if the channel comes back
//! it gets a new epoch, since its old offsets can no longer be served. Presence
//! lives beside the stream under the same lock. Tickets are one map under one
//! lock (a take removes under it, so two takes of one ticket cannot both win),
//! bounded in number. Nothing here knows about connections or frames.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::{
    Broker, BrokerFuture, Deliver, DetachedSession, Expired, Expiry, History, HistoryQuery, NodeId,
    PresenceEntry, Publication, SessionTake, StreamPosition, StreamPublication, StreamRules,
};
use crate::error::{Error, ErrorKind};

/// Most tickets a memory broker holds at once, by default.
pub const MAX_TICKETS: usize = 100_000;

/// One node's interest in a stream: how many times it was counted, and its sink.
struct Interest {
    node: NodeId,
    count: usize,
    sink: Arc<dyn Deliver>,
}

struct StreamState {
    offset: u64,
    epoch: Arc<str>,
    /// With the instant each was kept, for `history_ttl`.
    history: VecDeque<(Instant, Arc<StreamPublication>)>,
    interest: Vec<Interest>,
    /// Who is present, with when each entry expires.
    presence: HashMap<Arc<str>, (serde_json::Value, Instant)>,
    /// Set when the stream was dropped from the registry; a holder of a stale
    /// `Arc` must look it up again.
    dead: bool,
}

struct Stream {
    name: Arc<str>,
    state: Mutex<StreamState>,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Stream>>>;

/// The embedded, in-process [`Broker`] (the default).
pub struct MemoryBroker {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    /// Prefix of every epoch this broker hands out: changes with every broker.
    epoch_base: String,
    epoch_seq: AtomicU64,
    nodes: RwLock<HashMap<NodeId, Arc<dyn Deliver>>>,
    next_node: AtomicU64,
    /// One-use tickets: value and expiry.
    tickets: Mutex<HashMap<String, (String, Instant)>>,
    /// Detached sessions and their expiry. One lock: touched on disconnect,
    /// resume and once per sweep, never on the message path.
    sessions: Mutex<HashMap<Box<str>, (DetachedSession, Instant)>>,
    max_tickets: usize,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("channels", &self.channel_count())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(16)
    }
}

/// A future that is ready at once, for a broker with no I/O.
fn ready<'a, T: Send + 'a>(value: T) -> BrokerFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl MemoryBroker {
    /// A broker whose streams are spread over `shards` locks.
    pub fn new(shards: usize) -> Self {
        MemoryBroker {
            shards: (0..shards.max(1)).map(|_| RwLock::default()).collect(),
            hasher: Default::default(),
            epoch_base: format!("{:08x}", rand::random::<u32>()),
            epoch_seq: AtomicU64::new(0),
            nodes: RwLock::default(),
            next_node: AtomicU64::new(1),
            tickets: Mutex::default(),
            sessions: Mutex::default(),
            max_tickets: MAX_TICKETS,
        }
    }

    /// A broker that holds at most `max` tickets at once.
    pub fn with_max_tickets(mut self, max: usize) -> Self {
        self.max_tickets = max;
        self
    }

    fn shard(&self, name: &str) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.shard(name).read().get(name).cloned()
    }

    fn get_or_create(&self, name: &str) -> Arc<Stream> {
        if let Some(s) = self.get(name) {
            return s;
        }
        let mut shard = self.shard(name).write();
        shard
            .entry(Arc::from(name))
            .or_insert_with_key(|key| {
                Arc::new(Stream {
                    name: key.clone(),
                    state: Mutex::new(StreamState {
                        offset: 0,
                        epoch: self.new_epoch().into(),
                        history: VecDeque::new(),
                        interest: Vec::new(),
                        presence: HashMap::new(),
                        dead: false,
                    }),
                })
            })
            .clone()
    }

    fn new_epoch(&self) -> String {
        format!(
            "{}{}",
            self.epoch_base,
            self.epoch_seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs `f` on the live state of stream `name`, creating it if needed.
    fn with_live<R>(&self, name: &str, f: impl FnOnce(&Stream, &mut StreamState) -> R) -> R {
        loop {
            let s = self.get_or_create(name);
            let mut st = s.state.lock();
            // Forgotten between lookup and lock: look it up again.
            if st.dead {
                continue;
            }
            return f(&s, &mut st);
        }
    }

    /// Drops the stream from the registry if nobody holds it and its history is
    /// gone.
    fn forget_if_idle(&self, s: &Arc<Stream>) {
        let mut shard = self.shard(&s.name).write();
        let mut st = s.state.lock();
        if st.interest.is_empty() && st.history.is_empty() && st.presence.is_empty() && !st.dead {
            if let Some(cur) = shard.get(&s.name) {
                if Arc::ptr_eq(cur, s) {
                    shard.remove(&s.name);
                    st.dead = true;
                }
            }
        }
    }

    fn trim(st: &mut StreamState, now: Instant, ttl: std::time::Duration) {
        while st
            .history
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ttl)
        {
            st.history.pop_front();
        }
    }

    fn subscribe_now(&self, node: NodeId, channel: &str) {
        let Some(sink) = self.nodes.read().get(&node).cloned() else {
            return;
        };
        self.with_live(channel, |_, st| {
            match st.interest.iter_mut().find(|i| i.node == node) {
                Some(i) => i.count += 1,
                None => st.interest.push(Interest {
                    node,
                    count: 1,
                    sink,
                }),
            }
        });
    }

    fn unsubscribe_now(&self, node: NodeId, channel: &str) {
        let Some(s) = self.get(channel) else {
            return;
        };
        let idle = {
            let mut st = s.state.lock();
            if let Some(k) = st.interest.iter().position(|i| i.node == node) {
                st.interest[k].count -= 1;
                if st.interest[k].count == 0 {
                    st.interest.swap_remove(k);
                }
            }
            st.interest.is_empty() && st.history.is_empty() && st.presence.is_empty()
        };
        if idle {
            self.forget_if_idle(&s);
        }
    }

    fn publish_now(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
        rules: StreamRules,
    ) -> Publication {
        self.with_live(channel, |s, st| {
            st.offset += 1;
            let publication = Arc::new(StreamPublication {
                channel: s.name.clone(),
                offset: st.offset,
                epoch: st.epoch.clone(),
                publisher: publisher.map(Arc::from),
                time_ms: crate::clock::unix_ms(),
                data: data.to_owned(),
            });
            if rules.history_size > 0 {
                st.history.push_back((Instant::now(), publication.clone()));
                while st.history.len() > rules.history_size {
                    st.history.pop_front();
                }
            }
            let (mut delivered, mut dropped) = (0, 0);
            for i in &st.interest {
                let d = i.sink.deliver(&publication);
                delivered += d.queued;
                dropped += d.dropped;
            }
            Publication {
                offset: st.offset,
                epoch: st.epoch.to_string(),
                delivered,
                dropped,
            }
        })
    }

    fn history_now(&self, channel: &str, q: HistoryQuery<'_>, rules: StreamRules) -> History {
        let Some(s) = self.get(channel) else {
            // No stream: nothing kept, so a recovery answers "gone".
            return History {
                position: None,
                complete: q.epoch.is_none() && q.after == 0,
                publications: Vec::new(),
            };
        };
        let mut st = s.state.lock();
        Self::trim(&mut st, Instant::now(), rules.history_ttl);
        let position = StreamPosition {
            offset: st.offset,
            epoch: st.epoch.to_string(),
        };
        let same_epoch = q.epoch.is_none_or(|e| e == &*st.epoch);
        let wanted = st.offset.saturating_sub(q.after);
        let first_kept = st.history.front().map(|(_, p)| p.offset);
        let complete = same_epoch
            && q.after <= st.offset
            && (wanted == 0 || first_kept.is_some_and(|f| f <= q.after + 1));
        let publications = if complete || (q.epoch.is_none() && same_epoch) {
            st.history
                .iter()
                .filter(|(_, p)| p.offset > q.after)
                .take(q.limit)
                .map(|(_, p)| p.clone())
                .collect()
        } else {
            Vec::new()
        };
        History {
            position: Some(position),
            complete,
            publications,
        }
    }
}

impl MemoryBroker {
    fn presence_add_now(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        ttl: std::time::Duration,
    ) -> bool {
        let until = Instant::now() + ttl;
        self.with_live(channel, |_, st| {
            let now = Instant::now();
            match st.presence.get_mut(entry.client_id.as_str()) {
                Some((info, exp)) => {
                    let was_present = *exp > now;
                    *exp = until;
                    if *info != entry.info {
                        *info = entry.info.clone();
                    }
                    !was_present
                }
                None => {
                    st.presence.insert(
                        Arc::from(entry.client_id.as_str()),
                        (entry.info.clone(), until),
                    );
                    true
                }
            }
        })
    }

    fn presence_remove_now(&self, channel: &str, client_id: &str) -> Option<PresenceEntry> {
        let s = self.get(channel)?;
        let (was, idle) = {
            let mut st = s.state.lock();
            let was = st
                .presence
                .remove(client_id)
                .filter(|(_, exp)| *exp > Instant::now())
                .map(|(info, _)| PresenceEntry {
                    client_id: client_id.to_string(),
                    info,
                });
            let idle = st.interest.is_empty() && st.history.is_empty() && st.presence.is_empty();
            (was, idle)
        };
        if idle {
            self.forget_if_idle(&s);
        }
        was
    }

    fn presence_now(&self, channel: &str) -> Vec<PresenceEntry> {
        let Some(s) = self.get(channel) else {
            return Vec::new();
        };
        let now = Instant::now();
        let st = s.state.lock();
        st.presence
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|(id, (info, _))| PresenceEntry {
                client_id: id.to_string(),
                info: info.clone(),
            })
            .collect()
    }

    fn ticket_put_now(
        &self,
        key: &str,
        value: &str,
        ttl: std::time::Duration,
    ) -> crate::Result<()> {
        let now = Instant::now();
        let mut map = self.tickets.lock();
        if map.len() >= self.max_tickets {
            map.retain(|_, (_, exp)| *exp > now);
            if map.len() >= self.max_tickets {
                return Err(Error::new(
                    ErrorKind::LimitExceeded,
                    "too many outstanding tickets",
                ));
            }
        }
        map.insert(key.to_string(), (value.to_string(), now + ttl));
        Ok(())
    }

    fn session_take_now(&self, session_id: &str, expect: Option<(&str, u64)>) -> SessionTake {
        let now = Instant::now();
        let mut map = self.sessions.lock();
        match map.get(session_id) {
            None => SessionTake::Missing,
            Some((_, exp)) if *exp <= now => {
                map.remove(session_id);
                SessionTake::Missing
            }
            Some((d, _))
                if expect
                    .is_some_and(|(client, gen)| d.client_id != client || d.generation != gen) =>
            {
                SessionTake::Mismatch
            }
            Some(_) => match map.remove(session_id) {
                Some((d, _)) => SessionTake::Taken(d),
                None => SessionTake::Missing,
            },
        }
    }

    fn ticket_take_now(&self, key: &str) -> Option<String> {
        let found = self.tickets.lock().remove(key);
        found
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(v, _)| v)
    }
}

impl Broker for MemoryBroker {
    fn attach(&self, sink: Arc<dyn Deliver>) -> NodeId {
        let node = NodeId(self.next_node.fetch_add(1, Ordering::Relaxed));
        self.nodes.write().insert(node, sink);
        node
    }

    fn detach(&self, node: NodeId) {
        self.nodes.write().remove(&node);
        for shard in self.shards.iter() {
            let streams: Vec<Arc<Stream>> = shard.read().values().cloned().collect();
            for s in streams {
                let idle = {
                    let mut st = s.state.lock();
                    st.interest.retain(|i| i.node != node);
                    st.interest.is_empty() && st.history.is_empty() && st.presence.is_empty()
                };
                if idle {
                    self.forget_if_idle(&s);
                }
            }
        }
    }

    fn subscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
        self.subscribe_now(node, channel);
        ready(())
    }

    fn unsubscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
        self.unsubscribe_now(node, channel);
        ready(())
    }

    fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, Publication> {
        ready(self.publish_now(channel, data, publisher, rules))
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, History> {
        ready(self.history_now(channel, query, rules))
    }

    fn presence_add(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        ttl: std::time::Duration,
    ) -> BrokerFuture<'_, bool> {
        ready(self.presence_add_now(channel, entry, ttl))
    }

    fn presence_remove(
        &self,
        channel: &str,
        client_id: &str,
    ) -> BrokerFuture<'_, Option<PresenceEntry>> {
        ready(self.presence_remove_now(channel, client_id))
    }

    fn presence(&self, channel: &str) -> BrokerFuture<'_, Vec<PresenceEntry>> {
        ready(self.presence_now(channel))
    }

    fn ticket_put(&self, key: &str, value: &str, ttl: std::time::Duration) -> BrokerFuture<'_, ()> {
        let put = self.ticket_put_now(key, value, ttl);
        Box::pin(std::future::ready(put))
    }

    fn ticket_take(&self, key: &str) -> BrokerFuture<'_, Option<String>> {
        ready(self.ticket_take_now(key))
    }

    fn session_put(
        &self,
        session_id: &str,
        session: DetachedSession,
        ttl: std::time::Duration,
    ) -> BrokerFuture<'_, ()> {
        let until = Instant::now() + ttl;
        self.sessions
            .lock()
            .insert(Box::from(session_id), (session, until));
        ready(())
    }

    fn session_take(
        &self,
        session_id: &str,
        expect: Option<(&str, u64)>,
    ) -> BrokerFuture<'_, SessionTake> {
        ready(self.session_take_now(session_id, expect))
    }

    fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    fn expire(&self, rules: &dyn Fn(&str) -> StreamRules) -> Expiry {
        let now = Instant::now();
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let streams: Vec<Arc<Stream>> = shard.read().values().cloned().collect();
            for s in streams {
                let idle = {
                    let mut st = s.state.lock();
                    Self::trim(&mut st, now, rules(&s.name).history_ttl);
                    if !st.presence.is_empty() {
                        let gone: Vec<Arc<str>> = st
                            .presence
                            .iter()
                            .filter(|(_, (_, exp))| *exp <= now)
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in gone {
                            if let Some((info, _)) = st.presence.remove(&id) {
                                expired.push(Expired {
                                    channel: s.name.clone(),
                                    entry: PresenceEntry {
                                        client_id: id.to_string(),
                                        info,
                                    },
                                });
                            }
                        }
                    }
                    st.interest.is_empty() && st.history.is_empty() && st.presence.is_empty()
                };
                if idle {
                    self.forget_if_idle(&s);
                }
            }
        }
        self.tickets.lock().retain(|_, (_, exp)| *exp > now);
        let sessions = {
            let mut map = self.sessions.lock();
            let before = map.len();
            map.retain(|_, (_, exp)| *exp > now);
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
            before - map.len()
        };
        Expiry {
            presence: expired,
            sessions,
        }
    }
}
