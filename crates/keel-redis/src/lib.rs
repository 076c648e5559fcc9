//! Keel's [`Broker`] on Redis: what the nodes of a cluster share (channel
//! streams with offsets, epochs and history, presence, one-use tickets,
//! detached sessions) kept in one Redis (or Valkey), so that any node can serve
//! any client.
//!
//! # Layout in Redis
//!
//! Every key starts with the broker's prefix (`keel` for the gateway; tests use
//! a random one each). A channel's keys carry its name as a hash tag, `{name}`,
//! so that a script touching them touches one Redis Cluster slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{ch}:m` | hash | `e`: the stream's epoch, `s`: its last offset |
//! | `P:{ch}:h` | stream | history: entry id `offset-0`, fields `t` (ms), `p` (publisher), `d` (data) |
//! | `P:{ch}:p` | pub/sub channel | every publication, as `offset\nepoch\nt\np\ndata` |
//! | `P:{ch}:ph`, `P:{ch}:pz` | hash, sorted set | presence: client to info, client to expiry (ms) |
//! | `P:t:key`, `P:tz` | string, sorted set | tickets, and their expiries (to count them) |
//! | `P:s:id`, `P:sz` | hash, sorted set | detached sessions (`c` client, `g` generation, `d` data), and their expiries |
//!
//! Publishing is one Lua script (loaded once, called by SHA): it reads or sets
//! the epoch, takes the next offset, appends to history (trimmed to
//! `history_size`, expiring `history_ttl` after the last publication) and
//! PUBLISHes, all in one atomic step, so publishers on different nodes never
//! share or skip an offset and every node receives a channel's publications in
//! offset order. When the meta hash is gone (Redis flushed, restarted without
//! persistence, or the channel idle past its TTL), the next publication starts
//! a new epoch and drops whatever history is left, so a recovery across it
//! answers "not complete", truthfully.
//!
//! Each broker holds two connections: one for commands, pipelined by every
//! caller, and one for pub/sub, subscribed only to the channels its nodes have
//! interest in. Both reconnect by themselves (redis-rs's `ConnectionManager`);
//! the pub/sub one subscribes again to everything it had. Publications arrive on
//! the pub/sub connection's reader and are handed to the nodes' sinks there, in
//! order, without a hop through another task.
//!
//! What it must not do: hold a lock across a round trip to Redis, block in the
//! pub/sub reader, or answer a recovery with part of what was missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::broker::{
    Broker, BrokerFuture, BrokerLimits, BrokerUsage, Deliver, DetachedSession, Expired, Expiry,
    History, HistoryQuery, NodeId, NodeInfo, PresenceEntry, Publication, SessionTake, Signal,
    StreamPosition, StreamPublication, StreamRules,
};
use keel::{Error, ErrorKind};
use parking_lot::{Mutex, RwLock};
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use serde_json::value::RawValue;
use tokio::sync::OnceCell;

mod scripts;

/// How long the claim a resume leaves on a session Redis never saw is kept:
/// as long as a reconnect token can be valid (the gateway's default TTL is an
/// hour; a longer one is refused again only for this long).
const CLAIM_TTL: Duration = Duration::from_secs(24 * 3600);

/// Meta hashes outlive history by this much at least, so that an epoch stays
/// while clients may still hold positions in it.
const META_TTL: Duration = Duration::from_secs(24 * 3600);

/// Channels this broker's nodes want, and the Redis subscription behind each.
#[derive(Default)]
struct Interest {
    /// Per channel: each node's count, and the Redis SUBSCRIBE, done once.
    channels: HashMap<Arc<str>, Channel>,
}

/// A channel's position: epoch and offset.
type Seen = (Arc<str>, u64);

/// A channel ready to catch up, and the last position its nodes saw.
type Pending = (Arc<str>, Option<Seen>);

struct Channel {
    nodes: Vec<(NodeId, u32)>,
    subscribed: Arc<OnceCell<()>>,
    /// The last publication handed to the nodes.
    seen: Option<Seen>,
    /// Set while the channel catches up after the pub/sub connection was lost:
    /// live publications wait here until history has filled the gap.
    catching_up: Option<Vec<Arc<StreamPublication>>>,
    /// Whether Redis confirmed the subscription again since it was lost.
    resubscribed: bool,
}

impl Channel {
    fn new() -> Self {
        Channel {
            nodes: Vec::new(),
            subscribed: Arc::default(),
            seen: None,
            catching_up: None,
            resubscribed: false,
        }
    }
}

/// What the pub/sub reader and the broker share.
struct Shared {
    prefix: String,
    nodes: RwLock<HashMap<NodeId, Arc<dyn Deliver>>>,
    interest: Mutex<Interest>,
    /// Set when the pub/sub connection was lost: publications may have been
    /// missed meanwhile.
    disconnections: AtomicU64,
    /// Held across each SUBSCRIBE and UNSUBSCRIBE, with the interest checked
    /// again under it, so that they reach Redis in the order interest changed.
    sub_order: tokio::sync::Mutex<()>,
    /// Woken when the pub/sub connection was lost: the catch-up task fills
    /// the gap from history once Redis has the subscriptions again.
    lost: Arc<tokio::sync::Notify>,
}

/// The [`Broker`] on Redis. See the [crate docs](crate).
pub struct RedisBroker {
    shared: Arc<Shared>,
    cmd: ConnectionManager,
    sub: ConnectionManager,
    next_node: AtomicU64,
    limits: BrokerLimits,
    /// Channels where this broker added presence: where `expire` looks.
    presence_channels: Mutex<HashMap<Arc<str>, ()>>,
    /// Presence entries found expired by the background sweep, for `expire`.
    expired: Arc<Mutex<Vec<Expired>>>,
    scripts: scripts::Scripts,
    /// The background tasks: one pings the pub/sub connection every second (a
    /// command is what makes it reconnect once its own retries are spent, in a
    /// long outage, and the reconnect is what subscribes again); one fills gaps
    /// after a reconnect ([`catch_up`]). Ended with the broker.
    tasks: [tokio::task::AbortHandle; 2],
    /// The TTL of node announcements (the last `announce` said).
    node_ttl_ms: AtomicU64,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> Error {
    Error::new(ErrorKind::Unavailable, format!("redis: {e}"))
}

impl RedisBroker {
    /// Connects to the Redis at `url` (`redis://host:port/db`), with every key
    /// under `prefix`. Fails if Redis cannot be reached now; later outages are
    /// ridden out (calls fail with [`ErrorKind::Unavailable`] meanwhile).
    pub async fn connect(url: &str, prefix: &str) -> keel::Result<Self> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("redis_url: {e}")))?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3)).map_err(unavailable)?;
        let config = || {
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_max_delay(Duration::from_secs(2))
        };
        let shared = Arc::new(Shared {
            prefix: prefix.to_string(),
            nodes: RwLock::default(),
            interest: Mutex::default(),
            disconnections: AtomicU64::new(0),
            sub_order: tokio::sync::Mutex::new(()),
            lost: Arc::default(),
        });
        let cmd = client
            .get_connection_manager_with_config(config())
            .await
            .map_err(unavailable)?;
        let reader = shared.clone();
        let sub = client
            .get_connection_manager_with_config(
                config()
                    .set_automatic_resubscription()
                    .set_push_sender(move |info: PushInfo| {
                        reader.on_push(info);
                        Ok::<(), redis::aio::SendError>(())
                    }),
            )
            .await
            .map_err(unavailable)?;
        let mut signals = sub.clone();
        signals
            .subscribe(shared.signals_channel())
            .await
            .map_err(unavailable)?;
        let mut ping = sub.clone();
        let keepalive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut ping).await;
            }
        })
        .abort_handle();
        let scripts = scripts::Scripts::new();
        let catching_up = tokio::spawn(catch_up(
            Arc::downgrade(&shared),
            cmd.clone(),
            scripts.history.clone(),
        ))
        .abort_handle();
        Ok(RedisBroker {
            tasks: [keepalive, catching_up],
            node_ttl_ms: AtomicU64::new(10_000),
            shared,
            cmd,
            sub,
            next_node: AtomicU64::new(1),
            limits: BrokerLimits::default(),
            presence_channels: Mutex::default(),
            expired: Arc::default(),
            scripts,
        })
    }

    /// The same broker with `limits`. Of them, the Redis broker keeps
    /// `max_tickets`; history, channels, presence and sessions are bounded by
    /// Redis itself here (TTLs, `history_size`, and `maxmemory`).
    pub fn with_limits(mut self, limits: BrokerLimits) -> Self {
        self.limits = limits;
        self
    }

    fn key(&self, channel: &str, what: &str) -> String {
        self.shared.key(channel, what)
    }

    async fn redis_subscribe(&self, channel: &str, cell: Arc<OnceCell<()>>) -> keel::Result<()> {
        let name = self.key(channel, "p");
        let mut sub = self.sub.clone();
        let shared = self.shared.clone();
        cell.get_or_try_init(|| async move {
            let _order = shared.sub_order.lock().await;
            sub.subscribe(name).await.map_err(unavailable)
        })
        .await
        .map(drop)
    }
}

/// Unsubscribes in Redis from `channel` unless a node has taken an interest in
/// it again meanwhile.
async fn redis_unsubscribe(
    shared: &Shared,
    mut sub: ConnectionManager,
    channel: &str,
) -> keel::Result<()> {
    let _order = shared.sub_order.lock().await;
    if shared.interest.lock().channels.contains_key(channel) {
        return Ok(());
    }
    sub.unsubscribe(shared.key(channel, "p"))
        .await
        .map_err(unavailable)
}

impl Shared {
    fn key(&self, channel: &str, what: &str) -> String {
        format!("{}:{{{channel}}}:{what}", self.prefix)
    }

    /// The sorted set of channels by last use (ms), to count them.
    fn channels_key(&self) -> String {
        format!("{}:cz", self.prefix)
    }

    /// The channel a pub/sub channel name is for.
    fn channel_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:p")
    }

    /// The pub/sub channel of signals to every node.
    fn signals_channel(&self) -> String {
        format!("{}:signals", self.prefix)
    }

    /// A message from the pub/sub connection: a publication for the nodes
    /// interested in its channel, a signal for every node, or news of a lost
    /// connection.
    fn on_push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message => {
                let [Value::BulkString(name), Value::BulkString(payload)] = info.data.as_slice()
                else {
                    return;
                };
                if name.as_slice() == self.signals_channel().as_bytes() {
                    match serde_json::from_slice::<Signal>(payload) {
                        Ok(signal) => {
                            for sink in self.nodes.read().values() {
                                sink.signal(&signal);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "redis: a signal that does not parse"),
                    }
                    return;
                }
                let Some(channel) = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| self.channel_of(n))
                else {
                    return;
                };
                let Some(publication) = decode(channel, payload) else {
                    tracing::warn!(channel, "redis: a publication that does not parse");
                    return;
                };
                let publication = Arc::new(publication);
                let mut interest = self.interest.lock();
                let Some(ch) = interest.channels.get_mut(channel) else {
                    return;
                };
                if let Some(waiting) = &mut ch.catching_up {
                    waiting.push(publication);
                    return;
                }
                ch.seen = Some((publication.epoch.clone(), publication.offset));
                // Under the interest lock: the catch-up task delivers under it
                // too, so a channel's publications reach the nodes in order.
                self.deliver(&ch.nodes, &publication);
            }
            PushKind::Subscribe => {
                let Some(Value::BulkString(name)) = info.data.first() else {
                    return;
                };
                let Some(channel) = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| self.channel_of(n))
                else {
                    return;
                };
                if let Some(ch) = self.interest.lock().channels.get_mut(channel) {
                    ch.resubscribed = true;
                }
            }
            PushKind::Disconnection => {
                self.disconnections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "redis: the pub/sub connection was lost; it reconnects, subscribes again \
                     and fills the gap from history"
                );
                for ch in self.interest.lock().channels.values_mut() {
                    ch.catching_up.get_or_insert_with(Vec::new);
                    ch.resubscribed = false;
                }
                self.lost.notify_one();
            }
            _ => {}
        }
    }

    fn deliver(&self, to: &[(NodeId, u32)], publication: &Arc<StreamPublication>) {
        let nodes = self.nodes.read();
        for (n, _) in to {
            if let Some(sink) = nodes.get(n) {
                sink.deliver(publication);
            }
        }
    }

    /// Ends a channel's catch-up: hands the nodes what history had after the
    /// last publication they saw, then what arrived live meanwhile, in offset
    /// order and each once, then lets live publications through again.
    fn finish_catch_up(&self, channel: &str, from_history: Vec<Arc<StreamPublication>>) {
        let mut interest = self.interest.lock();
        let Some(ch) = interest.channels.get_mut(channel) else {
            return;
        };
        let mut all = from_history;
        all.extend(ch.catching_up.take().unwrap_or_default());
        // One epoch: the newest (a stream lost meanwhile starts again).
        if let Some(last) = all.last().map(|p| p.epoch.clone()) {
            all.retain(|p| p.epoch == last);
        }
        all.sort_by_key(|p| p.offset);
        all.dedup_by_key(|p| p.offset);
        for p in all {
            let newer = match &ch.seen {
                Some((e, o)) => *e != p.epoch || p.offset > *o,
                None => true,
            };
            if newer {
                ch.seen = Some((p.epoch.clone(), p.offset));
                self.deliver(&ch.nodes, &p);
            }
        }
    }
}

/// After the pub/sub connection was lost, fills each channel's gap from
/// history once Redis has confirmed its subscription again (so that what is
/// published from then on arrives live, and what was published before is in
/// history). Runs until the broker is dropped; retries while Redis is away.
async fn catch_up(
    shared: std::sync::Weak<Shared>,
    mut cmd: ConnectionManager,
    script: Arc<redis::Script>,
) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let notify = s.lost.clone();
        let lost = notify.notified();
        tokio::pin!(lost);
        lost.as_mut().enable();
        let busy = s
            .interest
            .lock()
            .channels
            .values()
            .any(|c| c.catching_up.is_some());
        drop(s);
        if !busy {
            lost.await;
        }
        loop {
            let Some(s) = shared.upgrade() else { return };
            let (ready, waiting): (Vec<Pending>, bool) = {
                let interest = s.interest.lock();
                let ready = interest
                    .channels
                    .iter()
                    .filter(|(_, c)| c.catching_up.is_some() && c.resubscribed)
                    .map(|(n, c)| (n.clone(), c.seen.clone()))
                    .collect();
                let waiting = interest
                    .channels
                    .values()
                    .any(|c| c.catching_up.is_some() && !c.resubscribed);
                (ready, waiting)
            };
            if ready.is_empty() && !waiting {
                break;
            }
            for (channel, seen) in ready {
                match read_after(&s, &mut cmd, &script, &channel, seen).await {
                    Ok(pubs) => s.finish_catch_up(&channel, pubs),
                    Err(e) => tracing::debug!(%channel, error = %e, "redis: catch-up waits"),
                }
            }
            drop(s);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What history holds after `seen` (all of the stream if its epoch changed).
async fn read_after(
    s: &Shared,
    cmd: &mut ConnectionManager,
    script: &redis::Script,
    channel: &Arc<str>,
    seen: Option<Seen>,
) -> keel::Result<Vec<Arc<StreamPublication>>> {
    let read = |after: u64| {
        let mut inv = script.prepare_invoke();
        inv.key(s.key(channel, "m"))
            .key(s.key(channel, "h"))
            .arg(after)
            .arg(100_000)
            .arg(0);
        inv
    };
    let after = seen.as_ref().map_or(0, |(_, o)| *o);
    let mut reply: Vec<Value> = read(after).invoke_async(cmd).await.map_err(unavailable)?;
    let epoch = string(reply.first().cloned());
    if seen.as_ref().is_some_and(|(e, _)| **e != *epoch) && after > 0 {
        reply = read(0).invoke_async(cmd).await.map_err(unavailable)?;
    }
    if epoch.is_empty() {
        return Ok(Vec::new());
    }
    let epoch: Arc<str> = Arc::from(epoch.as_str());
    Ok(reply
        .into_iter()
        .skip(3)
        .filter_map(|e| entry_publication(channel, &epoch, e))
        .map(Arc::new)
        .collect())
}

/// The pub/sub form of a publication: `offset\nepoch\ntime\npublisher\ndata`,
/// the publisher `-` for none and `p` + client id otherwise.
fn decode(channel: &str, payload: &[u8]) -> Option<StreamPublication> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(5, '\n');
    let offset = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let time_ms = parts.next()?.parse().ok()?;
    let publisher = parts.next()?;
    let data = parts.next()?;
    Some(StreamPublication {
        channel: Arc::from(channel),
        offset,
        epoch: Arc::from(epoch),
        publisher: publisher.strip_prefix('p').map(Arc::from),
        time_ms,
        data: RawValue::from_string(data.to_string()).ok()?,
    })
}

fn publisher_field(publisher: Option<&str>) -> String {
    publisher.map_or_else(|| "-".to_string(), |p| format!("p{p}"))
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn now_ms() -> u64 {
    keel_clock_ms()
}

/// Wall-clock milliseconds since the Unix epoch (Redis's clock is the wall's).
fn keel_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl Broker for RedisBroker {
    fn attach(&self, sink: Arc<dyn Deliver>) -> NodeId {
        let node = NodeId(self.next_node.fetch_add(1, Ordering::Relaxed));
        self.shared.nodes.write().insert(node, sink);
        node
    }

    fn detach(&self, node: NodeId) {
        self.shared.nodes.write().remove(&node);
        let mut gone = Vec::new();
        {
            let mut interest = self.shared.interest.lock();
            interest.channels.retain(|name, ch| {
                ch.nodes.retain(|(n, _)| *n != node);
                if ch.nodes.is_empty() {
                    gone.push(name.clone());
                    false
                } else {
                    true
                }
            });
        }
        if !gone.is_empty() {
            let (sub, shared) = (self.sub.clone(), self.shared.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    for ch in gone {
                        let _ = redis_unsubscribe(&shared, sub.clone(), &ch).await;
                    }
                });
            }
        }
    }

    fn subscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
        let cell = {
            let mut interest = self.shared.interest.lock();
            let ch = interest
                .channels
                .entry(Arc::from(channel))
                .or_insert_with(Channel::new);
            match ch.nodes.iter_mut().find(|(n, _)| *n == node) {
                Some((_, c)) => *c += 1,
                None => ch.nodes.push((node, 1)),
            }
            ch.subscribed.clone()
        };
        let channel = channel.to_string();
        Box::pin(async move {
            self.redis_subscribe(&channel, cell).await?;
            // The stream exists once subscribed: a subscriber's position has an
            // epoch that the first publication keeps.
            let mut inv = self.scripts.ensure.prepare_invoke();
            inv.key(self.key(&channel, "m"))
                .key(self.shared.channels_key())
                .arg(new_epoch())
                .arg(ms(META_TTL))
                .arg(now_ms())
                .arg(&channel);
            let mut cmd = self.cmd.clone();
            let _: String = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(())
        })
    }

    fn unsubscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
        let last = {
            let mut interest = self.shared.interest.lock();
            let Some(ch) = interest.channels.get_mut(channel) else {
                return Box::pin(std::future::ready(Ok(())));
            };
            if let Some(k) = ch.nodes.iter().position(|(n, _)| *n == node) {
                ch.nodes[k].1 -= 1;
                if ch.nodes[k].1 == 0 {
                    ch.nodes.swap_remove(k);
                }
            }
            let last = ch.nodes.is_empty();
            if last {
                interest.channels.remove(channel);
            }
            last
        };
        let channel = channel.to_string();
        Box::pin(async move {
            if last {
                redis_unsubscribe(&self.shared, self.sub.clone(), &channel).await?;
            }
            Ok(())
        })
    }

    fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, Publication> {
        let mut inv = self.scripts.publish.prepare_invoke();
        inv.key(self.key(channel, "m"))
            .key(self.key(channel, "h"))
            .key(self.shared.channels_key())
            .arg(new_epoch())
            .arg(rules.history_size)
            .arg(ms(rules.history_ttl))
            .arg(ms(META_TTL.max(rules.history_ttl)))
            .arg(now_ms())
            .arg(publisher_field(publisher))
            .arg(data.get())
            .arg(self.key(channel, "p"))
            .arg(channel);
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let (offset, epoch): (u64, String) =
                inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(Publication {
                offset,
                epoch,
                delivered: 0,
                dropped: 0,
            })
        })
    }

    fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, History> {
        let mut inv = self.scripts.history.prepare_invoke();
        inv.key(self.key(channel, "m"))
            .key(self.key(channel, "h"))
            .arg(query.after)
            .arg(query.limit.min(1_000_000))
            .arg(now_ms().saturating_sub(ms(rules.history_ttl)));
        let mut cmd = self.cmd.clone();
        let channel: Arc<str> = Arc::from(channel);
        let want_epoch = query.epoch.map(str::to_string);
        let (after, limit) = (query.after, query.limit);
        Box::pin(async move {
            // [epoch or nil, top offset, first kept offset (0: none), entries...]
            let reply: Vec<Value> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            let mut it = reply.into_iter();
            let epoch = match it.next() {
                Some(Value::BulkString(b)) => String::from_utf8(b).unwrap_or_default(),
                _ => {
                    return Ok(History {
                        position: None,
                        complete: want_epoch.is_none() && after == 0,
                        publications: Vec::new(),
                    })
                }
            };
            let top = int(it.next());
            let first_kept = int(it.next());
            let position = StreamPosition {
                offset: top,
                epoch: epoch.clone(),
            };
            let same_epoch = want_epoch.as_deref().is_none_or(|e| e == epoch);
            let wanted = top.saturating_sub(after);
            let complete = same_epoch
                && after <= top
                && (wanted == 0 || (first_kept > 0 && first_kept <= after + 1));
            let publications = if complete || (want_epoch.is_none() && same_epoch) {
                let epoch: Arc<str> = Arc::from(epoch.as_str());
                it.filter_map(|entry| entry_publication(&channel, &epoch, entry))
                    .take(limit)
                    .map(Arc::new)
                    .collect()
            } else {
                Vec::new()
            };
            Ok(History {
                position: Some(position),
                complete,
                publications,
            })
        })
    }

    fn presence_add(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        ttl: Duration,
    ) -> BrokerFuture<'_, bool> {
        self.presence_channels
            .lock()
            .entry(Arc::from(channel))
            .or_default();
        let mut inv = self.scripts.presence_add.prepare_invoke();
        let now = now_ms();
        inv.key(self.key(channel, "ph"))
            .key(self.key(channel, "pz"))
            .key(self.shared.channels_key())
            .arg(&entry.client_id)
            .arg(entry.info.to_string())
            .arg(now + ms(ttl))
            .arg(now)
            .arg(ms(ttl) + 60_000)
            .arg(channel);
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let joined: i64 = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(joined == 1)
        })
    }

    fn presence_remove(
        &self,
        channel: &str,
        client_id: &str,
    ) -> BrokerFuture<'_, Option<PresenceEntry>> {
        let mut inv = self.scripts.presence_remove.prepare_invoke();
        inv.key(self.key(channel, "ph"))
            .key(self.key(channel, "pz"))
            .arg(client_id)
            .arg(now_ms());
        let mut cmd = self.cmd.clone();
        let client_id = client_id.to_string();
        Box::pin(async move {
            let info: Option<String> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(info.map(|info| PresenceEntry {
                client_id,
                info: serde_json::from_str(&info).unwrap_or_default(),
            }))
        })
    }

    fn presence(&self, channel: &str) -> BrokerFuture<'_, Vec<PresenceEntry>> {
        let mut inv = self.scripts.presence_list.prepare_invoke();
        inv.key(self.key(channel, "ph"))
            .key(self.key(channel, "pz"))
            .arg(now_ms());
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let flat: Vec<String> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(flat
                .chunks(2)
                .filter_map(|p| match p {
                    [id, info] => Some(PresenceEntry {
                        client_id: id.clone(),
                        info: serde_json::from_str(info).unwrap_or_default(),
                    }),
                    _ => None,
                })
                .collect())
        })
    }

    fn ticket_put(&self, key: &str, value: &str, ttl: Duration) -> BrokerFuture<'_, ()> {
        let mut inv = self.scripts.ticket_put.prepare_invoke();
        let now = now_ms();
        inv.key(format!("{}:t:{key}", self.shared.prefix))
            .key(format!("{}:tz", self.shared.prefix))
            .arg(value)
            .arg(ms(ttl))
            .arg(now + ms(ttl))
            .arg(now)
            .arg(self.limits.max_tickets)
            .arg(key);
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let ok: i64 = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            if ok == 1 {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::LimitExceeded,
                    "too many outstanding tickets",
                ))
            }
        })
    }

    fn ticket_take(&self, key: &str) -> BrokerFuture<'_, Option<String>> {
        let mut inv = self.scripts.ticket_take.prepare_invoke();
        inv.key(format!("{}:t:{key}", self.shared.prefix))
            .key(format!("{}:tz", self.shared.prefix))
            .arg(key);
        let mut cmd = self.cmd.clone();
        Box::pin(async move { inv.invoke_async(&mut cmd).await.map_err(unavailable) })
    }

    fn session_put(
        &self,
        session_id: &str,
        session: DetachedSession,
        ttl: Duration,
    ) -> BrokerFuture<'_, ()> {
        let data = serde_json::json!({
            "user_data": session.user_data,
            "channels": session.channels,
        })
        .to_string();
        let mut inv = self.scripts.session_put.prepare_invoke();
        let now = now_ms();
        inv.key(format!("{}:s:{session_id}", self.shared.prefix))
            .key(format!("{}:sz", self.shared.prefix))
            .arg(&session.client_id)
            .arg(session.generation)
            .arg(data)
            .arg(ms(ttl))
            .arg(now + ms(ttl))
            .arg(session_id);
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let _: i64 = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(())
        })
    }

    fn session_take(
        &self,
        session_id: &str,
        expect: Option<(&str, u64)>,
    ) -> BrokerFuture<'_, SessionTake> {
        let mut inv = self.scripts.session_take.prepare_invoke();
        let (client, generation) = expect.map_or((String::new(), 0), |(c, g)| (c.to_string(), g));
        inv.key(format!("{}:s:{session_id}", self.shared.prefix))
            .key(format!("{}:sz", self.shared.prefix))
            .arg(&client)
            .arg(generation)
            .arg(session_id)
            .arg(ms(CLAIM_TTL));
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            // [0] missing, [1] mismatch, [2, client, generation, data] taken
            let reply: Vec<Value> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            let mut it = reply.into_iter();
            Ok(match int(it.next()) {
                2 => {
                    let client_id = string(it.next());
                    let generation = string(it.next()).parse().unwrap_or(0);
                    let data: serde_json::Value =
                        serde_json::from_str(&string(it.next())).unwrap_or_default();
                    SessionTake::Taken(DetachedSession {
                        client_id,
                        generation,
                        user_data: serde_json::from_value(data["user_data"].clone())
                            .unwrap_or_default(),
                        channels: serde_json::from_value(data["channels"].clone())
                            .unwrap_or_default(),
                    })
                }
                1 => SessionTake::Mismatch,
                _ => SessionTake::Missing,
            })
        })
    }

    fn usage(&self) -> BrokerFuture<'_, BrokerUsage> {
        let mut pipe = redis::pipe();
        let now = now_ms();
        let since = now.saturating_sub(ms(META_TTL));
        pipe.zcount(
            format!("{}:sz", self.shared.prefix),
            format!("({now}"),
            "+inf",
        )
        .zcount(
            format!("{}:tz", self.shared.prefix),
            format!("({now}"),
            "+inf",
        )
        .zcount(self.shared.channels_key(), format!("({since}"), "+inf");
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let (sessions, tickets, channels): (usize, usize, usize) =
                pipe.query_async(&mut cmd).await.map_err(unavailable)?;
            Ok(BrokerUsage {
                channels,
                history_bytes: 0,
                sessions,
                tickets,
                presence: 0,
            })
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn check(&self) -> BrokerFuture<'_, ()> {
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let pong: String = redis::cmd("PING")
                .query_async(&mut cmd)
                .await
                .map_err(unavailable)?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("redis answered {pong}"),
                ))
            }
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn signal(&self, signal: Signal) -> BrokerFuture<'_, ()> {
        let channel = self.shared.signals_channel();
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let text = serde_json::to_string(&signal)
                .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(text)
                .query_async(&mut cmd)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn announce(&self, name: &str, connections: usize, ttl: Duration) -> BrokerFuture<'_, ()> {
        let mut inv = self.scripts.nodes.prepare_invoke();
        inv.key(format!("{}:nodes", self.shared.prefix))
            .key(format!("{}:nodeconn", self.shared.prefix))
            .arg(now_ms())
            .arg(ms(ttl))
            .arg(name)
            .arg(connections);
        // Remembered for `nodes`, which drops what is older than this.
        self.node_ttl_ms.store(ms(ttl), Ordering::Relaxed);
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let _: Vec<String> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(())
        })
    }

    fn nodes(&self) -> BrokerFuture<'_, Vec<NodeInfo>> {
        let mut inv = self.scripts.nodes.prepare_invoke();
        let now = now_ms();
        inv.key(format!("{}:nodes", self.shared.prefix))
            .key(format!("{}:nodeconn", self.shared.prefix))
            .arg(now)
            .arg(self.node_ttl_ms.load(Ordering::Relaxed));
        let mut cmd = self.cmd.clone();
        Box::pin(async move {
            let flat: Vec<String> = inv.invoke_async(&mut cmd).await.map_err(unavailable)?;
            Ok(flat
                .chunks(3)
                .filter_map(|c| match c {
                    [node, conns, seen] => Some(NodeInfo {
                        node: node.clone(),
                        connections: conns.parse().unwrap_or(0),
                        seen_ms_ago: now.saturating_sub(seen.parse().unwrap_or(now)),
                    }),
                    _ => None,
                })
                .collect())
        })
    }

    fn expire(&self, _rules: &dyn Fn(&str) -> StreamRules) -> Expiry {
        // Presence that ran out, found by a sweep in the background: each entry is
        // removed by one script on one node, so each leave is reported once in
        // the cluster.
        let channels: Vec<Arc<str>> = self.presence_channels.lock().keys().cloned().collect();
        if !channels.is_empty() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let script = self.scripts.presence_expire.clone();
                let mut cmd = self.cmd.clone();
                let shared = self.shared.clone();
                let found = self.expired.clone();
                rt.spawn(async move {
                    for ch in channels {
                        let mut inv = script.prepare_invoke();
                        inv.key(shared.key(&ch, "ph"))
                            .key(shared.key(&ch, "pz"))
                            .arg(now_ms());
                        let Ok(flat) = inv.invoke_async::<Vec<String>>(&mut cmd).await else {
                            return;
                        };
                        let mut found = found.lock();
                        for p in flat.chunks(2) {
                            if let [id, info] = p {
                                found.push(Expired {
                                    channel: ch.clone(),
                                    entry: PresenceEntry {
                                        client_id: id.clone(),
                                        info: serde_json::from_str(info).unwrap_or_default(),
                                    },
                                });
                            }
                        }
                    }
                });
            }
        }
        Expiry {
            presence: std::mem::take(&mut *self.expired.lock()),
            // Redis drops expired sessions by itself; nobody counts them here.
            sessions: 0,
        }
    }
}

fn int(v: Option<Value>) -> u64 {
    match v {
        Some(Value::Int(n)) => n.max(0) as u64,
        Some(Value::BulkString(b)) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn string(v: Option<Value>) -> String {
    match v {
        Some(Value::BulkString(b)) => String::from_utf8(b).unwrap_or_default(),
        Some(Value::SimpleString(s)) => s,
        Some(Value::Int(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// One XRANGE entry (`[id, [field, value, ...]]`) as a publication.
fn entry_publication(
    channel: &Arc<str>,
    epoch: &Arc<str>,
    entry: Value,
) -> Option<StreamPublication> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let mut parts = parts.into_iter();
    let id = string(parts.next());
    let offset = id.split('-').next()?.parse().ok()?;
    let Some(Value::Array(fields)) = parts.next() else {
        return None;
    };
    let (mut time_ms, mut publisher, mut data) = (0, None, None);
    let mut f = fields.into_iter();
    while let (Some(k), Some(v)) = (f.next(), f.next()) {
        match string(Some(k)).as_str() {
            "t" => time_ms = string(Some(v)).parse().unwrap_or(0),
            "p" => publisher = string(Some(v)).strip_prefix('p').map(Arc::from),
            "d" => data = RawValue::from_string(string(Some(v))).ok(),
            _ => {}
        }
    }
    Some(StreamPublication {
        channel: channel.clone(),
        offset,
        epoch: epoch.clone(),
        publisher,
        time_ms,
        data: data?,
    })
}
