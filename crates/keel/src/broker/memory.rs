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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::{
    Broker, BrokerFuture, BrokerLimits, BrokerUsage, Deliver, DetachedSession, Expired, Expiry,
    History, HistoryQuery, NodeId, PresenceEntry, Publication, SessionTake, Signal, StreamPosition,
    StreamPublication, StreamRules,
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
    /// What `history` costs, as `history_cost` counts it.
    history_bytes: usize,
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
    limits: BrokerLimits,
    /// Streams in the registry.
    streams: AtomicUsize,
    /// History kept, all streams.
    history_bytes: AtomicUsize,
    /// Presence entries, all streams.
    presence_entries: AtomicUsize,
    /// Held by the one publisher that trims history down to its bound.
    evicting: Mutex<()>,
    /// Detached sessions and their expiry. One lock: touched on disconnect,
    /// resume and once per sweep, never on the message path.
    sessions: Mutex<HashMap<Box<str>, (DetachedSession, Instant)>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("channels", &self.streams.load(Ordering::Relaxed))
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
            limits: BrokerLimits::default(),
            streams: AtomicUsize::new(0),
            history_bytes: AtomicUsize::new(0),
            presence_entries: AtomicUsize::new(0),
            evicting: Mutex::new(()),
        }
    }

    /// This broker with `limits`.
    pub fn with_limits(mut self, limits: BrokerLimits) -> Self {
        self.limits = limits;
        self
    }

    fn shard(&self, name: &str) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.shard(name).read().get(name).cloned()
    }

    fn get_or_create(&self, name: &str) -> crate::Result<Arc<Stream>> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let mut shard = self.shard(name).write();
        if let Some(s) = shard.get(name) {
            return Ok(s.clone());
        }
        if let Some(max) = self.limits.max_channels {
            if self.streams.load(Ordering::Relaxed) >= max {
                return Err(Error::new(
                    ErrorKind::LimitExceeded,
                    format!("at max_channels ({max})"),
                ));
            }
        }
        self.streams.fetch_add(1, Ordering::Relaxed);
        Ok(shard
            .entry(Arc::from(name))
            .or_insert_with_key(|key| {
                Arc::new(Stream {
                    name: key.clone(),
                    state: Mutex::new(StreamState {
                        offset: 0,
                        epoch: self.new_epoch().into(),
                        history: VecDeque::new(),
                        history_bytes: 0,
                        interest: Vec::new(),
                        presence: HashMap::new(),
                        dead: false,
                    }),
                })
            })
            .clone())
    }

    fn new_epoch(&self) -> String {
        format!(
            "{}{}",
            self.epoch_base,
            self.epoch_seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs `f` on the live state of stream `name`, creating it if needed (and
    /// the channel bound allows).
    fn with_live<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Stream, &mut StreamState) -> R,
    ) -> crate::Result<R> {
        loop {
            let s = self.get_or_create(name)?;
            let mut st = s.state.lock();
            // Forgotten between lookup and lock: look it up again.
            if st.dead {
                continue;
            }
            return Ok(f(&s, &mut st));
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
                    self.streams.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn trim(&self, st: &mut StreamState, now: Instant, ttl: std::time::Duration) {
        while st
            .history
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ttl)
        {
            self.pop_oldest(st);
        }
    }

    /// Drops the oldest publication of a stream's history, counting it out.
    fn pop_oldest(&self, st: &mut StreamState) {
        if let Some((_, p)) = st.history.pop_front() {
            let cost = history_cost(&p);
            st.history_bytes -= cost;
            self.history_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Keeps a publication in a stream's history, counting it in.
    fn keep(&self, st: &mut StreamState, p: Arc<StreamPublication>) {
        let cost = history_cost(&p);
        st.history_bytes += cost;
        self.history_bytes.fetch_add(cost, Ordering::Relaxed);
        st.history.push_back((Instant::now(), p));
    }

    /// Brings history back under `max_history_bytes` (to nine tenths of it, so
    /// this runs rarely): one publication at a time, the oldest of the stream
    /// holding most (of equals, the one whose oldest is oldest). One caller at a
    /// time; the others go on.
    fn evict_history(&self, max: usize) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let Some(_one) = self.evicting.try_lock() else {
            return;
        };
        let target = max / 10 * 9;
        let over = || self.history_bytes.load(Ordering::Relaxed) > target;
        let mut streams: Vec<Arc<Stream>> = Vec::new();
        let mut heap = BinaryHeap::new();
        for shard in self.shards.iter() {
            for s in shard.read().values() {
                let st = s.state.lock();
                if let Some((at, _)) = st.history.front() {
                    heap.push((st.history_bytes, Reverse(*at), streams.len()));
                    streams.push(s.clone());
                }
            }
        }
        while over() {
            let Some((_, _, i)) = heap.pop() else {
                return;
            };
            let s = &streams[i];
            let next = {
                let mut st = s.state.lock();
                self.pop_oldest(&mut st);
                st.history
                    .front()
                    .map(|(at, _)| (st.history_bytes, Reverse(*at), i))
            };
            match next {
                Some(entry) => heap.push(entry),
                None => self.forget_if_idle(s),
            }
        }
    }

    fn subscribe_now(&self, node: NodeId, channel: &str) -> crate::Result<()> {
        let Some(sink) = self.nodes.read().get(&node).cloned() else {
            return Ok(());
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
        })
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
    ) -> crate::Result<Publication> {
        let published = self.with_live(channel, |s, st| {
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
                self.keep(st, publication.clone());
                while st.history.len() > rules.history_size
                    || (rules.history_bytes > 0 && st.history_bytes > rules.history_bytes)
                {
                    self.pop_oldest(st);
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
        })?;
        if let Some(max) = self.limits.max_history_bytes {
            if self.history_bytes.load(Ordering::Relaxed) > max {
                self.evict_history(max);
            }
        }
        Ok(published)
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
        self.trim(&mut st, Instant::now(), rules.history_ttl);
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
    ) -> crate::Result<bool> {
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
                    Ok(!was_present)
                }
                None => {
                    if let Some(max) = self.limits.max_presence {
                        if self.presence_entries.load(Ordering::Relaxed) >= max {
                            return Err(Error::new(
                                ErrorKind::LimitExceeded,
                                format!("presence is full ({max} entries, max_presence_entries)"),
                            ));
                        }
                    }
                    self.presence_entries.fetch_add(1, Ordering::Relaxed);
                    st.presence.insert(
                        Arc::from(entry.client_id.as_str()),
                        (entry.info.clone(), until),
                    );
                    Ok(true)
                }
            }
        })?
    }

    fn presence_remove_now(&self, channel: &str, client_id: &str) -> Option<PresenceEntry> {
        let s = self.get(channel)?;
        let (was, idle) = {
            let mut st = s.state.lock();
            let was = st
                .presence
                .remove(client_id)
                .inspect(|_| {
                    self.presence_entries.fetch_sub(1, Ordering::Relaxed);
                })
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
        if map.len() >= self.limits.max_tickets {
            map.retain(|_, (_, exp)| *exp > now);
            if map.len() >= self.limits.max_tickets {
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
        Box::pin(std::future::ready(self.subscribe_now(node, channel)))
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
        Box::pin(std::future::ready(
            self.publish_now(channel, data, publisher, rules),
        ))
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
        Box::pin(std::future::ready(
            self.presence_add_now(channel, entry, ttl),
        ))
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
        let now = Instant::now();
        let mut map = self.sessions.lock();
        if let Some(max) = self.limits.max_sessions {
            if map.len() >= max && !map.contains_key(session_id) {
                make_room(&mut map, max, now);
            }
        }
        map.insert(Box::from(session_id), (session, now + ttl));
        ready(())
    }

    fn session_take(
        &self,
        session_id: &str,
        expect: Option<(&str, u64)>,
    ) -> BrokerFuture<'_, SessionTake> {
        ready(self.session_take_now(session_id, expect))
    }

    fn usage(&self) -> BrokerFuture<'_, BrokerUsage> {
        ready(BrokerUsage {
            channels: self.streams.load(Ordering::Relaxed),
            history_bytes: self.history_bytes.load(Ordering::Relaxed),
            sessions: self.sessions.lock().len(),
            tickets: self.tickets.lock().len(),
            presence: self.presence_entries.load(Ordering::Relaxed),
        })
    }

    fn signal(&self, signal: Signal) -> BrokerFuture<'_, ()> {
        let sinks: Vec<Arc<dyn Deliver>> = self.nodes.read().values().cloned().collect();
        for s in sinks {
            s.signal(&signal);
        }
        ready(())
    }

    fn expire(&self, rules: &dyn Fn(&str) -> StreamRules) -> Expiry {
        let now = Instant::now();
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let streams: Vec<Arc<Stream>> = shard.read().values().cloned().collect();
            for s in streams {
                let idle = {
                    let mut st = s.state.lock();
                    self.trim(&mut st, now, rules(&s.name).history_ttl);
                    if !st.presence.is_empty() {
                        let gone: Vec<Arc<str>> = st
                            .presence
                            .iter()
                            .filter(|(_, (_, exp))| *exp <= now)
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in gone {
                            if let Some((info, _)) = st.presence.remove(&id) {
                                self.presence_entries.fetch_sub(1, Ordering::Relaxed);
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

/// Makes room in a full map of detached sessions: drops the expired ones and,
/// if that is not a tenth of `max`, the ones closest to expiry down to nine
/// tenths of it (so a flood of disconnects pays for this once per tenth).
fn make_room(map: &mut HashMap<Box<str>, (DetachedSession, Instant)>, max: usize, now: Instant) {
    map.retain(|_, (_, exp)| *exp > now);
    let target = max - max.div_ceil(10);
    if map.len() <= target {
        return;
    }
    let mut expiries: Vec<Instant> = map.values().map(|(_, exp)| *exp).collect();
    let cut = map.len() - target;
    let (_, nth, _) = expiries.select_nth_unstable(cut - 1);
    let cutoff = *nth;
    let mut left = cut;
    map.retain(|_, (_, exp)| {
        if left > 0 && *exp <= cutoff {
            left -= 1;
            false
        } else {
            true
        }
    });
    tracing::warn!(
        max,
        dropped = cut - left,
        "max_detached_sessions reached: the sessions closest to expiry were dropped"
    );
}

/// What one publication in history costs: its data and publisher, and the
/// fixed parts (the publication, its `Arc`, the entry in the history queue).
fn history_cost(p: &StreamPublication) -> usize {
    const FIXED: usize = std::mem::size_of::<StreamPublication>() + 16 + 24;
    FIXED + p.data.get().len() + p.publisher.as_ref().map_or(0, |s| s.len())
}
