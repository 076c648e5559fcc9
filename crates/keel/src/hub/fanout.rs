//! Local fan-out: which connections of this node are in each channel, and the
//! last hop from a broker's publication to their send queues.
//!
//! The node keeps, per channel, its local members. It holds one broker interest
//! per local channel (taken by the first member, given back when the last one
//! leaves), and it is the node's [`Deliver`] sink: a publication is encoded once
//! per node and the same buffer is queued to every member.
//!
//! Presence is the broker's (so it spans nodes); this module keeps it true for
//! its members: a join adds the member for `presence_ttl`, the sweeper refreshes
//! members that showed a sign of life within `presence_ttl`, a clean leave
//! removes at once, and a member that vanished is left to expire
//! `presence_ttl` after its last frame (its session may come back).
//!
//! **The last hop enforces the stream guarantee, whatever the broker does.** A
//! channel remembers the last offset it delivered: a publication at or below it is
//! dropped, so a broker that delivers twice (a Redis reconnect) never makes a
//! client see an offset twice. A joining member is first *joining*: live
//! publications are buffered for it while the broker's history is read, then it
//! gets the replay, then what was buffered above the replay's end, then goes live:
//! nothing lost, nothing twice, in order. A member whose replay went past what the
//! channel had delivered live keeps its own watermark (`ahead`) until the channel
//! catches up. With nobody joining or ahead, delivering is one pass over the
//! members that only reads them, as cheap as it was before the broker cut.
//!
//! What it must not do: await anything while holding a channel's lock, call the
//! broker while holding one (the broker calls in here with its own lock held), or
//! know how a broker stores streams.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::broker::{Delivered, HistoryQuery, PresenceEntry, StreamPosition, StreamPublication};
use crate::conn::{Connection, Delivery};
use crate::error::{Error, ErrorKind, Result};
use crate::hub::{BroadcastResult, Hub};
use crate::transport::Outgoing;

/// What [`Hub::subscribe`](crate::Hub::subscribe) did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Subscribed {
    /// Where the subscriber stands: the last offset queued to it (the channel's
    /// head when it joined, or later if live publications followed the replay),
    /// in the channel's epoch.
    pub position: StreamPosition,
    /// Whether everything after `since` was replayed (false without `since`).
    pub recovered: bool,
    /// Publications replayed.
    pub replayed: usize,
}

/// The state of this node's broker interest in a channel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Interest {
    /// Not asked for.
    None,
    /// A joiner is asking for it.
    Asking,
    /// Held: publications reach the sink.
    Held,
}

struct LocalState {
    members: HashMap<Arc<str>, Connection>,
    /// Members still joining, with the live publications that arrived meanwhile.
    joining: HashMap<Arc<str>, Vec<Arc<StreamPublication>>>,
    /// Members whose replay went past `delivered`, with the last offset queued
    /// to them.
    ahead: HashMap<Arc<str>, u64>,
    /// The epoch of the publications delivered so far (offsets refer to it).
    epoch: Option<Arc<str>>,
    /// The last offset delivered live in `epoch`.
    delivered: u64,
    interest: Interest,
    /// Set when the channel left the registry; a holder of a stale `Arc` must
    /// look it up again.
    dead: bool,
}

struct LocalChannel {
    name: Arc<str>,
    state: Mutex<LocalState>,
    /// Joiners wait here until the broker interest is held.
    ready: tokio::sync::Notify,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<LocalChannel>>>;

/// This node's channels (see the module docs).
pub(crate) struct Fanout {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Fanout {
    pub(crate) fn new(num_shards: usize) -> Self {
        Fanout {
            shards: (0..num_shards.max(1)).map(|_| RwLock::default()).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn get(&self, name: &str) -> Option<Arc<LocalChannel>> {
        self.shard(name).read().get(name).cloned()
    }

    fn get_or_create(&self, name: &str) -> Arc<LocalChannel> {
        if let Some(c) = self.get(name) {
            return c;
        }
        self.shard(name)
            .write()
            .entry(Arc::from(name))
            .or_insert_with_key(|key| {
                Arc::new(LocalChannel {
                    name: key.clone(),
                    state: Mutex::new(LocalState {
                        members: HashMap::new(),
                        joining: HashMap::new(),
                        ahead: HashMap::new(),
                        epoch: None,
                        delivered: 0,
                        interest: Interest::None,
                        dead: false,
                    }),
                    ready: tokio::sync::Notify::new(),
                })
            })
            .clone()
    }

    /// Runs `f` on the live state of channel `name`, creating it if needed.
    fn with_live<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Arc<LocalChannel>, &mut LocalState) -> R,
    ) -> R {
        loop {
            let ch = self.get_or_create(name);
            let mut st = ch.state.lock();
            if st.dead {
                continue;
            }
            return f(&ch, &mut st);
        }
    }

    /// The last hop: queues `p` to every live member above its watermark, and
    /// buffers it for members still joining.
    pub(crate) fn deliver(&self, delivery: &Delivery, p: &Arc<StreamPublication>) -> Delivered {
        let Some(ch) = self.get(&p.channel) else {
            return Delivered::default();
        };
        // Encoded once per node, outside the channel's lock.
        let frame = Arc::new(p.encode());
        let mut result = BroadcastResult::default();
        let mut st = ch.state.lock();
        let st = &mut *st;
        if st.epoch.as_deref() != Some(&*p.epoch) {
            // A new epoch (the stream was lost and started again): offsets start
            // again, and so do the watermarks.
            st.epoch = Some(p.epoch.clone());
            st.delivered = 0;
            st.ahead.clear();
        }
        if p.offset <= st.delivered {
            // Delivered already: a broker's redelivery.
            return Delivered::default();
        }
        st.delivered = p.offset;
        if st.joining.is_empty() && st.ahead.is_empty() {
            for c in st.members.values() {
                result.add(c.push_shared_with(delivery, &frame));
            }
        } else {
            for (id, c) in st.members.iter() {
                if let Some(buffer) = st.joining.get_mut(id) {
                    buffer.push(p.clone());
                    continue;
                }
                if st.ahead.get(id).is_some_and(|a| p.offset <= *a) {
                    continue;
                }
                result.add(c.push_shared_with(delivery, &frame));
            }
            let delivered = st.delivered;
            st.ahead.retain(|_, a| *a > delivered);
        }
        Delivered {
            queued: result.sent,
            dropped: result.dropped,
        }
    }

    /// Adds `conn` to `name`: takes the broker interest if this node has none,
    /// reads history (a replay after `since`, or just the head), queues the replay
    /// and what arrived meanwhile, then lets live publications through. Publishes a
    /// presence `join` first where the channel has presence events, so the joiner
    /// does not get its own.
    pub(crate) async fn join(
        &self,
        hub: &Hub,
        name: &str,
        conn: &Connection,
        since: Option<&StreamPosition>,
    ) -> Result<Subscribed> {
        let id = conn.client_id();
        let rules = hub.channel_rules(name);
        let presence_events = rules.presence_events;
        let rules = rules.stream;
        if since.is_none() && self.is_live_member(name, conn) {
            // Subscribed already and receiving: nothing to replay, and taking it
            // out of the live stream to join again could only lose publications.
            return self.position_of(hub, name, rules).await;
        }
        // Present first (a join event, where there are any, goes out before
        // the member is in, so it does not get its own).
        let entry = PresenceEntry {
            client_id: id.to_string(),
            info: conn.info(),
        };
        let joined = hub
            .broker()
            .presence_add(name, &entry, hub.config().presence_ttl)
            .await?;
        if presence_events && joined {
            hub.publish_presence_event(name, "join", &id, &entry.info)
                .await;
        }
        let ch = self.with_live(name, |ch, st| {
            st.members.insert(id.clone(), conn.clone());
            st.ahead.remove(&id);
            st.joining.insert(id.clone(), Vec::new());
            ch.clone()
        });
        {
            let mut mine = conn.inner.channels.lock();
            if !mine.iter().any(|c| **c == *ch.name) {
                mine.push(ch.name.clone());
            }
        }
        if conn.inner.gone.load(Ordering::Acquire) {
            // The connection is unregistering and may have missed this join.
            self.leave(hub, name, conn, None);
            return Err(Error::new(
                ErrorKind::ConnectionNotFound,
                "the connection is closing",
            ));
        }
        if let Err(e) = self.ensure_interest(hub, &ch).await {
            self.leave(hub, name, conn, None);
            return Err(e);
        }
        // With `since`, a recovery (all after it, or nothing); without, only the
        // head.
        let query = HistoryQuery {
            after: since.map_or(0, |s| s.offset),
            epoch: since.map(|s| s.epoch.as_str()),
            limit: if since.is_some() { usize::MAX } else { 0 },
        };
        let history = match hub.broker().history(name, query, rules).await {
            Ok(h) => h,
            Err(e) => {
                self.leave(hub, name, conn, None);
                return Err(e);
            }
        };
        let head = history.position.unwrap_or_else(|| StreamPosition {
            offset: 0,
            epoch: String::new(),
        });
        let recovered = since.is_some() && history.complete;
        let mut st = ch.state.lock();
        let st = &mut *st;
        if !st.members.get(&id).is_some_and(|m| m.same(conn)) {
            // Left (or was replaced) while it joined.
            return Err(Error::new(
                ErrorKind::ConnectionNotFound,
                "the connection left",
            ));
        }
        let buffer = st.joining.remove(&id).unwrap_or_default();
        let mut after = head.offset;
        let mut replayed = 0;
        if recovered {
            for p in &history.publications {
                conn.push(Outgoing::Text(p.encode()));
                replayed += 1;
            }
            after = history
                .publications
                .last()
                .map_or(since.map_or(0, |s| s.offset), |p| p.offset)
                .max(after);
        }
        let epoch: Arc<str> = match &st.epoch {
            Some(e) if **e == *head.epoch || head.epoch.is_empty() => e.clone(),
            _ => Arc::from(head.epoch.as_str()),
        };
        for p in &buffer {
            if *p.epoch == *epoch && p.offset > after {
                conn.push(Outgoing::Text(p.encode()));
                after = p.offset;
            }
        }
        if st.epoch.is_none() && !epoch.is_empty() {
            st.epoch = Some(epoch.clone());
        }
        if st.epoch.as_deref() == Some(&*epoch) && after > st.delivered {
            st.ahead.insert(id.clone(), after);
        }
        Ok(Subscribed {
            position: StreamPosition {
                offset: after,
                epoch: epoch.to_string(),
            },
            recovered,
            replayed,
        })
    }

    /// Whether `conn` is a member of `name` that is past joining.
    fn is_live_member(&self, name: &str, conn: &Connection) -> bool {
        self.get(name).is_some_and(|ch| {
            let st = ch.state.lock();
            let id = conn.client_id();
            st.members.get(&id).is_some_and(|m| m.same(conn)) && !st.joining.contains_key(&id)
        })
    }

    /// The channel's head, as a live member's re-subscribe answers it.
    async fn position_of(
        &self,
        hub: &Hub,
        name: &str,
        rules: crate::broker::StreamRules,
    ) -> Result<Subscribed> {
        let query = HistoryQuery {
            after: 0,
            epoch: None,
            limit: 0,
        };
        let head = hub.broker().history(name, query, rules).await?.position;
        Ok(Subscribed {
            position: head.unwrap_or_else(|| StreamPosition {
                offset: 0,
                epoch: String::new(),
            }),
            recovered: false,
            replayed: 0,
        })
    }

    /// Makes sure this node holds the broker interest in `ch`: the first joiner
    /// asks for it, later ones wait until it is held (or ask again if asking
    /// failed). If the channel died while the interest was asked for, it is given
    /// back at once.
    async fn ensure_interest(&self, hub: &Hub, ch: &Arc<LocalChannel>) -> Result<()> {
        loop {
            let notified = ch.ready.notified();
            let ask = {
                let mut st = ch.state.lock();
                match st.interest {
                    Interest::Held => return Ok(()),
                    _ if st.dead => return Ok(()),
                    Interest::Asking => false,
                    Interest::None => {
                        st.interest = Interest::Asking;
                        true
                    }
                }
            };
            if ask {
                return self.take_interest(hub, ch).await;
            }
            notified.await;
        }
    }

    async fn take_interest(&self, hub: &Hub, ch: &Arc<LocalChannel>) -> Result<()> {
        let asked = hub.broker().subscribe(hub.node(), &ch.name).await;
        let give_back = {
            let mut st = ch.state.lock();
            match &asked {
                Ok(()) => {
                    st.interest = Interest::Held;
                    st.dead
                }
                Err(_) => {
                    st.interest = Interest::None;
                    false
                }
            }
        };
        ch.ready.notify_waiters();
        if give_back {
            hub.detached_broker_call(ch.name.clone(), |b, node, name| {
                Box::pin(async move { b.unsubscribe(node, &name).await })
            });
        }
        asked
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
        let id = conn.client_id();
        let removed = {
            let mut st = ch.state.lock();
            let removed = match st.members.get(&id) {
                Some(m) if m.same(conn) => st.members.remove(&id).is_some(),
                _ => false,
            };
            if removed {
                st.joining.remove(&id);
                st.ahead.remove(&id);
            }
            removed
        };
        if removed {
            match linger {
                // Present until `until`: what is left of its TTL from now.
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    let entry = PresenceEntry {
                        client_id: id.to_string(),
                        info: conn.info(),
                    };
                    let channel = ch.name.clone();
                    hub.detached_broker_call(channel, move |b, _, name| {
                        Box::pin(async move { b.presence_add(&name, &entry, left).await.map(drop) })
                    });
                }
                None => hub.end_presence_detached(name, &id),
            }
        }
        self.forget_if_idle(hub, &ch);
        removed
    }

    /// Drops the channel from the registry if nobody is in it or lingers, and
    /// gives the broker interest back.
    fn forget_if_idle(&self, hub: &Hub, ch: &Arc<LocalChannel>) {
        let give_back = {
            let mut shard = self.shard(&ch.name).write();
            let mut st = ch.state.lock();
            if st.members.is_empty() && !st.dead {
                if shard.get(&ch.name).is_some_and(|cur| Arc::ptr_eq(cur, ch)) {
                    shard.remove(&ch.name);
                    st.dead = true;
                    st.interest == Interest::Held
                } else {
                    false
                }
            } else {
                false
            }
        };
        if give_back {
            ch.ready.notify_waiters();
            hub.detached_broker_call(ch.name.clone(), |b, node, name| {
                Box::pin(async move { b.unsubscribe(node, &name).await })
            });
        }
    }

    /// This node's members of `name` with a sign of life within `presence_ttl`
    /// (what the broker's entries for them say, but exact to the frame: the
    /// broker's are refreshed once per sweep).
    pub(crate) fn live_presence(&self, hub: &Hub, name: &str) -> Vec<PresenceEntry> {
        let Some(ch) = self.get(name) else {
            return Vec::new();
        };
        let ttl_ms = hub.config().presence_ttl.as_millis() as u64;
        let now_ms = hub.now_ms();
        let st = ch.state.lock();
        st.members
            .iter()
            .filter(|(_, c)| {
                now_ms.saturating_sub(c.inner.last_seen.load(Ordering::Relaxed)) < ttl_ms
            })
            .map(|(id, c)| PresenceEntry {
                client_id: id.to_string(),
                info: c.info(),
            })
            .collect()
    }

    /// The members of `name`.
    pub(crate) fn members(&self, name: &str) -> Vec<Connection> {
        self.get(name)
            .map(|ch| ch.state.lock().members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Queues `frame` (not part of the stream) to every member of `name` but
    /// `exclude`.
    pub(crate) fn broadcast(
        &self,
        name: &str,
        frame: Bytes,
        exclude: Option<&str>,
    ) -> BroadcastResult {
        let frame = Arc::new(frame);
        let mut result = BroadcastResult::default();
        for c in self.members(name) {
            if exclude.is_some_and(|x| x == &*c.client_id()) {
                continue;
            }
            result.add(c.push_shared_counted(&frame));
        }
        result
    }

    /// Refreshes the presence of members that showed a sign of life within
    /// `presence_ttl` (until `presence_ttl` after their last frame) and forgets
    /// idle channels. Called by the sweeper, more often than `presence_ttl`.
    pub(crate) fn sweep(&self, hub: &Hub) {
        let ttl = hub.config().presence_ttl;
        let ttl_ms = ttl.as_millis() as u64;
        let now_ms = hub.now_ms();
        for shard in self.shards.iter() {
            let channels: Vec<Arc<LocalChannel>> = shard.read().values().cloned().collect();
            for ch in channels {
                let live: Vec<(PresenceEntry, std::time::Duration)> = {
                    let st = ch.state.lock();
                    st.members
                        .iter()
                        .filter_map(|(id, c)| {
                            let age =
                                now_ms.saturating_sub(c.inner.last_seen.load(Ordering::Relaxed));
                            (age < ttl_ms).then(|| {
                                let entry = PresenceEntry {
                                    client_id: id.to_string(),
                                    info: c.info(),
                                };
                                (entry, ttl - std::time::Duration::from_millis(age))
                            })
                        })
                        .collect()
                };
                if !live.is_empty() {
                    // A member whose entry had lapsed (silent past `presence_ttl`,
                    // its leave announced by the broker's expiry) joins again.
                    let events = hub.channel_rules(&ch.name).presence_events;
                    let hub2 = hub.clone();
                    hub.detached_broker_call(ch.name.clone(), move |b, _, name| {
                        Box::pin(async move {
                            for (entry, left) in live {
                                if b.presence_add(&name, &entry, left).await? && events {
                                    hub2.publish_presence_event(
                                        &name,
                                        "join",
                                        &entry.client_id,
                                        &entry.info,
                                    )
                                    .await;
                                }
                            }
                            Ok(())
                        })
                    });
                }
                self.forget_if_idle(hub, &ch);
            }
        }
    }
}
