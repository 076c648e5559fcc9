//! The Hub on its broker, over real sockets: concurrent publishers on one channel,
//! Hubs that share one broker as the nodes of a cluster do, and the last hop
//! holding the stream guarantee when a broker delivers twice or while a joiner's
//! history is read.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use keel::broker::{
    Broker, BrokerFuture, Deliver, Delivered, History, HistoryQuery, NodeId, Publication,
    StreamPublication, StreamRules,
};
use keel::{Config, Hub, MemoryBroker, NoopHandler, RawValue, StreamPosition};

/// The `(offset, data)` of a `message` frame.
fn message(text: &str) -> (u64, serde_json::Value) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["type"], "message", "{text}");
    (
        v["payload"]["offset"].as_u64().unwrap(),
        v["payload"]["data"].clone(),
    )
}

fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap()
}

fn big_queues() -> Config {
    let mut c = Config::default();
    c.set("send_queue_max_messages", "100000").unwrap();
    c.set("send_queue_max_bytes", "100000000").unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_one_channel_reach_every_subscriber_once_in_order() {
    let hub = Hub::new(big_queues());
    let addr = serve(&hub).await;
    let mut subs = Vec::new();
    for id in ["s1", "s2", "s3"] {
        subs.push(connect(addr, id).await);
    }
    eventually("registered", || hub.connection_count() == 3).await;
    for id in ["s1", "s2", "s3"] {
        hub.join_room(id, "chat").await.unwrap();
    }
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 250;
    const N: u64 = PUBLISHERS * EACH;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..N {
                    got.push(message(&recv(&mut ws).await));
                }
                got
            })
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let data = raw(format!("[{p},{i}]"));
                    hub.publish("chat", &data, None).await.unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut first: Option<Vec<(u64, serde_json::Value)>> = None;
    for r in readers {
        let got = tokio::time::timeout(WAIT, r).await.unwrap().unwrap();
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "contiguous, in order");
        // Each publisher's messages in its own order, all of them.
        for p in 0..PUBLISHERS {
            let mine: Vec<u64> = got
                .iter()
                .filter(|(_, d)| d[0] == p)
                .map(|(_, d)| d[1].as_u64().unwrap())
                .collect();
            assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
        }
        // Every subscriber sees the same offset carry the same data.
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_sharing_a_broker_share_channels_like_nodes_of_a_cluster() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(4));
    let a = Hub::with_broker(Config::default(), NoopHandler, broker.clone());
    let b = Hub::with_broker(Config::default(), NoopHandler, broker.clone());
    let (addr_a, addr_b) = (serve(&a).await, serve(&b).await);
    let mut on_a = connect(addr_a, "alice").await;
    eventually("alice on a", || a.connection("alice").is_some()).await;
    let joined = a.join_room("alice", "news").await.unwrap();

    // Published on b, delivered on a, offsets from the one stream.
    for n in 1..=3 {
        let p = b.publish("news", &raw(format!("{n}")), None).await.unwrap();
        assert_eq!(p.offset, n);
        assert_eq!(p.epoch, joined.epoch);
    }
    for n in 1..=3 {
        assert_eq!(message(&recv(&mut on_a).await), (n, serde_json::json!(n)));
    }
    // A client on b recovers from a position it got on a: history is the broker's.
    let mut on_b = connect(addr_b, "bob").await;
    eventually("bob on b", || b.connection("bob").is_some()).await;
    let bob = b.connection("bob").unwrap();
    let since = StreamPosition {
        offset: 1,
        epoch: joined.epoch.clone(),
    };
    let s = b.subscribe(&bob, "news", Some(&since)).await.unwrap();
    assert!(s.recovered);
    assert_eq!(s.replayed, 2);
    assert_eq!(s.position.offset, 3);
    for n in 2..=3 {
        assert_eq!(message(&recv(&mut on_b).await).0, n);
    }
    // Both nodes get the next one.
    a.publish("news", &raw("4".into()), None).await.unwrap();
    assert_eq!(message(&recv(&mut on_a).await).0, 4);
    assert_eq!(message(&recv(&mut on_b).await).0, 4);
    // The stream is counted once, however many nodes use it.
    assert_eq!(broker.usage().await.unwrap().channels, 1);
    // A Hub that goes away leaves the broker.
    drop(on_b);
    b.graceful_shutdown(std::time::Duration::from_secs(1)).await;
    drop(b);
    let p = a.publish("news", &raw("5".into()), None).await.unwrap();
    assert_eq!(p.delivered, 1, "only alice on a is left");
}

/// Every `Broker` method but `attach` and `history`, passed unchanged to the
/// memory broker a test broker wraps (`$inner`): each test broker changes one of
/// those two and writes both.
macro_rules! delegate_rest {
    ($inner:tt) => {
        fn detach(&self, node: NodeId) {
            self.$inner.detach(node)
        }
        fn subscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
            self.$inner.subscribe(node, channel)
        }
        fn unsubscribe(&self, node: NodeId, channel: &str) -> BrokerFuture<'_, ()> {
            self.$inner.unsubscribe(node, channel)
        }
        fn publish(
            &self,
            channel: &str,
            data: &RawValue,
            publisher: Option<&str>,
            rules: StreamRules,
        ) -> BrokerFuture<'_, Publication> {
            self.$inner.publish(channel, data, publisher, rules)
        }
        fn presence_add(
            &self,
            channel: &str,
            entry: &keel::PresenceEntry,
            ttl: std::time::Duration,
        ) -> BrokerFuture<'_, bool> {
            self.$inner.presence_add(channel, entry, ttl)
        }
        fn presence_remove(
            &self,
            channel: &str,
            client_id: &str,
        ) -> BrokerFuture<'_, Option<keel::PresenceEntry>> {
            self.$inner.presence_remove(channel, client_id)
        }
        fn presence(&self, channel: &str) -> BrokerFuture<'_, Vec<keel::PresenceEntry>> {
            self.$inner.presence(channel)
        }
        fn ticket_put(
            &self,
            key: &str,
            value: &str,
            ttl: std::time::Duration,
        ) -> BrokerFuture<'_, ()> {
            self.$inner.ticket_put(key, value, ttl)
        }
        fn ticket_take(&self, key: &str) -> BrokerFuture<'_, Option<String>> {
            self.$inner.ticket_take(key)
        }
        fn session_put(
            &self,
            session_id: &str,
            session: keel::broker::DetachedSession,
            ttl: std::time::Duration,
        ) -> BrokerFuture<'_, ()> {
            self.$inner.session_put(session_id, session, ttl)
        }
        fn session_take(
            &self,
            session_id: &str,
            expect: Option<(&str, u64)>,
        ) -> BrokerFuture<'_, keel::broker::SessionTake> {
            self.$inner.session_take(session_id, expect)
        }
        fn usage(&self) -> BrokerFuture<'_, keel::broker::BrokerUsage> {
            self.$inner.usage()
        }
        fn expire(&self, rules: &dyn Fn(&str) -> StreamRules) -> keel::broker::Expiry {
            self.$inner.expire(rules)
        }
        fn signal(&self, signal: keel::broker::Signal) -> BrokerFuture<'_, ()> {
            self.$inner.signal(signal)
        }
    };
}

/// A broker that hands every publication to a node twice, and once more the one
/// before it: what a redelivery after a reconnect looks like from a node.
struct Stutter(MemoryBroker);

struct StutterSink {
    inner: Arc<dyn Deliver>,
    previous: parking_lot::Mutex<Option<Arc<StreamPublication>>>,
}

impl Deliver for StutterSink {
    fn deliver(&self, p: &Arc<StreamPublication>) -> Delivered {
        let d = self.inner.deliver(p);
        self.inner.deliver(p);
        if let Some(old) = self.previous.lock().replace(p.clone()) {
            self.inner.deliver(&old);
        }
        d
    }
}

impl Broker for Stutter {
    fn attach(&self, sink: Arc<dyn Deliver>) -> NodeId {
        self.0.attach(Arc::new(StutterSink {
            inner: sink,
            previous: Default::default(),
        }))
    }
    fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, History> {
        self.0.history(channel, query, rules)
    }
    delegate_rest!(0);
}

#[tokio::test]
async fn the_last_hop_drops_what_a_broker_delivers_twice() {
    let hub = Hub::with_broker(
        Config::default(),
        NoopHandler,
        Arc::new(Stutter(MemoryBroker::new(1))),
    );
    let addr = serve(&hub).await;
    let mut ws = connect(addr, "c").await;
    eventually("registered", || hub.connection("c").is_some()).await;
    hub.join_room("c", "x").await.unwrap();
    for n in 1..=5 {
        hub.publish("x", &raw(format!("{n}")), None).await.unwrap();
    }
    // A marker through another path (not the stream) closes the sequence: had
    // a duplicate been queued, it would come before it.
    hub.send_to_client("c", bytes::Bytes::from_static(b"{\"type\":\"end\"}"));
    for n in 1..=5 {
        assert_eq!(message(&recv(&mut ws).await).0, n);
    }
    assert_eq!(recv(&mut ws).await, "{\"type\":\"end\"}");
}

/// A broker whose next history read (once `armed`) lets `during` more
/// publications through: after it has read (it answers with what it read
/// first), or, with `first`, before it reads. The live stream racing a
/// subscriber's history read.
struct RacingHistory {
    inner: MemoryBroker,
    during: u64,
    armed: AtomicBool,
    first: bool,
}

impl RacingHistory {
    async fn race(&self, channel: &str, rules: StreamRules) -> keel::Result<()> {
        if self.armed.swap(false, Ordering::AcqRel) {
            for n in 0..self.during {
                let data = raw(format!("\"during {n}\""));
                self.inner.publish(channel, &data, None, rules).await?;
            }
        }
        Ok(())
    }
}

impl Broker for RacingHistory {
    fn attach(&self, sink: Arc<dyn Deliver>) -> NodeId {
        self.inner.attach(sink)
    }
    fn history(
        &self,
        channel: &str,
        query: HistoryQuery<'_>,
        rules: StreamRules,
    ) -> BrokerFuture<'_, History> {
        let channel = channel.to_string();
        let (after, epoch, limit) = (query.after, query.epoch.map(str::to_string), query.limit);
        Box::pin(async move {
            let query = HistoryQuery {
                after,
                epoch: epoch.as_deref(),
                limit,
            };
            if self.first {
                self.race(&channel, rules).await?;
            }
            let read = self.inner.history(&channel, query, rules).await?;
            if !self.first {
                self.race(&channel, rules).await?;
            }
            Ok(read)
        })
    }
    delegate_rest!(inner);
}

#[tokio::test]
async fn a_joiner_gets_the_replay_then_what_was_published_while_it_was_read() {
    let broker = Arc::new(RacingHistory {
        inner: MemoryBroker::new(1),
        during: 4,
        armed: AtomicBool::new(false),
        first: false,
    });
    let hub = Hub::with_broker(Config::default(), NoopHandler, broker.clone());
    let addr = serve(&hub).await;
    // Someone else keeps the stream (and its epoch) alive.
    let _other = connect(addr, "other").await;
    eventually("other", || hub.connection("other").is_some()).await;
    let start = hub.join_room("other", "s").await.unwrap();
    for n in 1..=6 {
        hub.publish("s", &raw(format!("{n}")), None).await.unwrap();
    }
    let mut ws = connect(addr, "late").await;
    eventually("late", || hub.connection("late").is_some()).await;
    let late = hub.connection("late").unwrap();
    broker.armed.store(true, Ordering::Release);
    let since = StreamPosition {
        offset: 2,
        epoch: start.epoch,
    };
    let s = hub.subscribe(&late, "s", Some(&since)).await.unwrap();
    assert!(s.recovered);
    assert_eq!(s.replayed, 4, "3..=6 from history");
    assert_eq!(s.position.offset, 10, "and 7..=10 that came meanwhile");
    let mut seen = Vec::new();
    for _ in 3..=10 {
        seen.push(message(&recv(&mut ws).await).0);
    }
    assert_eq!(seen, (3..=10).collect::<Vec<_>>());
    // Live from here, nothing twice.
    hub.publish("s", &raw("11".into()), None).await.unwrap();
    assert_eq!(message(&recv(&mut ws).await).0, 11);
    let distinct: HashSet<u64> = seen.into_iter().collect();
    assert_eq!(distinct.len(), 8);
}

// Regression: subscribing again to a channel one is in took the member out of
// the live stream while history was read, and what was published meanwhile at
// or below the head it read was never sent to it.
#[tokio::test]
async fn subscribing_again_to_a_channel_loses_nothing() {
    let broker = Arc::new(RacingHistory {
        inner: MemoryBroker::new(1),
        during: 3,
        armed: AtomicBool::new(false),
        first: true,
    });
    let hub = Hub::with_broker(Config::default(), NoopHandler, broker.clone());
    let addr = serve(&hub).await;
    let mut ws = connect(addr, "c").await;
    eventually("registered", || hub.connection("c").is_some()).await;
    let c = hub.connection("c").unwrap();
    hub.subscribe(&c, "s", None).await.unwrap();
    for n in 1..=2 {
        hub.publish("s", &raw(format!("{n}")), None).await.unwrap();
    }
    for n in 1..=2 {
        assert_eq!(message(&recv(&mut ws).await).0, n);
    }
    // 3, 4 and 5 go out while the second subscribe reads history.
    broker.armed.store(true, Ordering::Release);
    let again = hub.subscribe(&c, "s", None).await.unwrap();
    assert_eq!(again.position.offset, 5);
    hub.publish("s", &raw("6".into()), None).await.unwrap();
    for n in 3..=6 {
        assert_eq!(message(&recv(&mut ws).await).0, n);
    }
}
