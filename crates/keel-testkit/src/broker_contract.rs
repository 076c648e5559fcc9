//! The broker contract: what every [`Broker`] must do, whatever it stores
//! streams in. Each function takes a factory (`make`) that returns a fresh broker
//! with no channels, and panics on the first broken promise.
//!
//! A broker under test may deliver asynchronously (over the network): the
//! functions wait for deliveries with deadlines, never sleep and hope. Where the
//! subject is time (history TTL), the caller runs the function on tokio's paused
//! clock; a broker that keeps its own clock elsewhere (Redis) passes a TTL long
//! enough to observe and runs the TTL functions ([`history_expires_after_its_ttl`],
//! [`presence_expires_after_its_ttl`], [`a_ticket_expires`]) its own way.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel::broker::{
    Broker, BrokerLimits, DetachedSession, HistoryQuery, PresenceEntry, SessionTake, StreamRules,
};
use serde_json::value::RawValue;

use crate::Recorder;

/// A factory of fresh brokers.
pub type Make<'a> = &'a (dyn Fn() -> Arc<dyn Broker> + Sync);

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).unwrap()
}

fn keep(n: usize) -> StreamRules {
    StreamRules {
        history_size: n,
        history_ttl: Duration::from_secs(300),
        history_bytes: 0,
    }
}

fn all_after(after: u64, epoch: Option<&str>) -> HistoryQuery<'_> {
    HistoryQuery {
        after,
        epoch,
        limit: usize::MAX,
    }
}

/// Concurrent publishers on one channel get distinct offsets 1..=N with none
/// skipped, and an interested node sees them all once, in offset order.
pub async fn concurrent_publishers_get_contiguous_offsets(make: Make<'_>) {
    let broker = make();
    let rec = Recorder::new();
    let node = broker.attach(rec.clone());
    broker.subscribe(node, "race").await.unwrap();
    const TASKS: u64 = 8;
    const EACH: u64 = 250;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let broker = broker.clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..EACH {
                let data = raw(&format!(r#"{{"t":{t},"i":{i}}}"#));
                let p = broker.publish("race", &data, None, keep(10)).await.unwrap();
                got.push(p.offset);
            }
            got
        }));
    }
    let mut assigned = HashSet::new();
    for h in handles {
        let got = h.await.unwrap();
        // One publisher's own publications come back in increasing order.
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        for o in got {
            assert!(assigned.insert(o), "offset {o} assigned twice");
        }
    }
    let n = TASKS * EACH;
    assert_eq!(assigned, (1..=n).collect::<HashSet<_>>());
    let seen = rec.wait_for("race", n as usize).await;
    assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "delivered out of order");
}

/// A recovery read after a position answers every publication after it, or
/// none: never a partial replay. The head comes back either way.
pub async fn history_is_complete_or_nothing(make: Make<'_>) {
    let broker = make();
    for n in 1..=10 {
        broker
            .publish("h", &raw(&format!("{n}")), None, keep(5))
            .await
            .unwrap();
    }
    let head = broker
        .history("h", all_after(0, None), keep(5))
        .await
        .unwrap();
    let pos = head.position.clone().expect("the stream exists");
    assert_eq!(pos.offset, 10);
    // A browse returns what is kept (6..=10) and says it is not all.
    assert!(!head.complete);
    let kept: Vec<u64> = head.publications.iter().map(|p| p.offset).collect();
    assert_eq!(kept, vec![6, 7, 8, 9, 10]);

    let epoch = Some(pos.epoch.as_str());
    // 6..=10 kept: after 5 is complete, after 4 is not (5 is gone).
    let r = broker
        .history("h", all_after(5, epoch), keep(5))
        .await
        .unwrap();
    assert!(r.complete);
    let got: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(got, vec![6, 7, 8, 9, 10]);
    let r = broker
        .history("h", all_after(4, epoch), keep(5))
        .await
        .unwrap();
    assert!(!r.complete);
    assert!(r.publications.is_empty(), "a partial replay");
    assert_eq!(r.position, Some(pos.clone()));
    // At the head: complete and empty.
    let r = broker
        .history("h", all_after(10, epoch), keep(5))
        .await
        .unwrap();
    assert!(r.complete && r.publications.is_empty());
    // Another epoch, or a position past the head: not recoverable.
    let r = broker
        .history("h", all_after(8, Some("not-the-epoch")), keep(5))
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty());
    let r = broker
        .history("h", all_after(11, epoch), keep(5))
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty());
    // `limit` takes the oldest first.
    let r = broker
        .history(
            "h",
            HistoryQuery {
                after: 6,
                epoch,
                limit: 2,
            },
            keep(5),
        )
        .await
        .unwrap();
    assert!(r.complete);
    let got: Vec<u64> = r.publications.iter().map(|p| p.offset).collect();
    assert_eq!(got, vec![7, 8]);
    // A channel nobody published to or subscribed has no stream, and reading
    // does not make one.
    let none = broker
        .history("never", all_after(0, None), keep(5))
        .await
        .unwrap();
    assert_eq!(none.position, None);
    assert_eq!(broker.usage().await.unwrap().channels, 1);
}

/// Publications keep their data byte for byte, and their publisher.
pub async fn data_is_kept_byte_for_byte(make: Make<'_>) {
    let broker = make();
    let data =
        r#"{"n": 1.00000000000000000001, "big": 123456789012345678901234567890, "s":"\u00e9"}"#;
    broker
        .publish("bytes", &raw(data), Some("alice"), keep(5))
        .await
        .unwrap();
    let r = broker
        .history("bytes", all_after(0, None), keep(5))
        .await
        .unwrap();
    assert_eq!(r.publications.len(), 1);
    assert_eq!(r.publications[0].data.get(), data);
    assert_eq!(r.publications[0].publisher.as_deref(), Some("alice"));
    assert!(r.publications[0].time_ms > 0);
}

/// A subscriber that reads history after `since` while a publisher keeps going
/// can rebuild the stream without a gap: what history returned, followed by what
/// reached its sink after it subscribed, covers every offset after `since`.
pub async fn since_while_publishing_leaves_no_gap(make: Make<'_>) {
    let broker = make();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Publishes until told to stop (at most 100,000); returns the last offset.
    let publisher = {
        let (broker, stop) = (broker.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = 0;
            for n in 1..=100_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let p = broker
                    .publish("live", &raw(&n.to_string()), None, keep(100_000))
                    .await
                    .unwrap();
                last = p.offset;
                if n % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            last
        })
    };
    // Join somewhere in the middle of it.
    let since = loop {
        let h = broker
            .history("live", all_after(0, None), keep(100_000))
            .await
            .unwrap();
        if let Some(p) = h.position.filter(|p| p.offset >= 100) {
            break p;
        }
        tokio::task::yield_now().await;
    };
    let rec = Recorder::new();
    let node = broker.attach(rec.clone());
    broker.subscribe(node, "live").await.unwrap();
    let h = broker
        .history(
            "live",
            all_after(since.offset, Some(&since.epoch)),
            keep(100_000),
        )
        .await
        .unwrap();
    assert!(h.complete);
    // Let the live stream run a while past the subscribe, then stop it.
    rec.wait_for("live", 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = publisher.await.unwrap();
    let first_live = rec.offsets("live")[0];
    let live = rec.wait_for("live", (last - first_live + 1) as usize).await;
    assert_eq!(live, (first_live..=last).collect::<Vec<_>>());
    let mut stream: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    let upto = stream.last().copied().unwrap_or(since.offset);
    assert!(
        first_live <= upto + 1,
        "a gap between history and live: {upto} then {first_live}"
    );
    stream.extend(live.iter().copied().filter(|o| *o > upto));
    assert_eq!(stream, ((since.offset + 1)..=last).collect::<Vec<_>>());
}

/// A stream that nobody holds and whose history is gone is forgotten; when the
/// channel comes back its epoch differs and a recovery against the old one says
/// so. While a node holds interest, the epoch stays.
pub async fn epoch_changes_when_the_stream_is_lost(make: Make<'_>) {
    let broker = make();
    let rec = Recorder::new();
    let node = broker.attach(rec.clone());
    broker.subscribe(node, "e").await.unwrap();
    let no_history = StreamRules {
        history_size: 0,
        history_ttl: Duration::from_secs(300),
        history_bytes: 0,
    };
    let first = broker
        .publish("e", &raw("1"), None, no_history)
        .await
        .unwrap();
    broker.expire(&|_| no_history);
    let second = broker
        .publish("e", &raw("2"), None, no_history)
        .await
        .unwrap();
    assert_eq!(second.epoch, first.epoch, "interest keeps the epoch");
    assert_eq!(second.offset, 2);

    broker.unsubscribe(node, "e").await.unwrap();
    broker.expire(&|_| no_history);
    let again = broker
        .publish("e", &raw("3"), None, no_history)
        .await
        .unwrap();
    assert_ne!(again.epoch, first.epoch, "a lost stream must change epoch");
    assert_eq!(again.offset, 1);
    let r = broker
        .history("e", all_after(2, Some(&first.epoch)), no_history)
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty());
    assert_eq!(r.position.map(|p| p.epoch), Some(again.epoch));
}

/// Interest is counted: a node gets a channel's publications until it withdraws
/// as often as it subscribed, and no longer after that, nor after it detaches.
pub async fn interest_is_counted_per_node(make: Make<'_>) {
    let broker = make();
    let (a, b) = (Recorder::new(), Recorder::new());
    let na = broker.attach(a.clone());
    let nb = broker.attach(b.clone());
    broker.subscribe(na, "c").await.unwrap();
    broker.subscribe(na, "c").await.unwrap();
    broker.subscribe(nb, "c").await.unwrap();
    broker
        .publish("c", &raw("1"), None, keep(10))
        .await
        .unwrap();
    assert_eq!(a.wait_for("c", 1).await, vec![1]);
    assert_eq!(b.wait_for("c", 1).await, vec![1]);

    broker.unsubscribe(na, "c").await.unwrap();
    broker
        .publish("c", &raw("2"), None, keep(10))
        .await
        .unwrap();
    assert_eq!(a.wait_for("c", 2).await, vec![1, 2], "one interest is left");

    broker.unsubscribe(na, "c").await.unwrap();
    broker.detach(nb);
    // A third node, to know when publication 3 has been delivered everywhere.
    let c = Recorder::new();
    let nc = broker.attach(c.clone());
    broker.subscribe(nc, "c").await.unwrap();
    broker
        .publish("c", &raw("3"), None, keep(10))
        .await
        .unwrap();
    assert_eq!(c.wait_for("c", 1).await, vec![3]);
    assert_eq!(a.offsets("c"), vec![1, 2], "withdrawn, still delivered");
    assert_eq!(b.offsets("c"), vec![1, 2], "detached, still delivered");
}

/// Two nodes interested in one channel see the same publications in the same
/// order, whichever of them the publishers call.
pub async fn every_node_sees_one_order(make: Make<'_>) {
    let broker = make();
    let (a, b) = (Recorder::new(), Recorder::new());
    let na = broker.attach(a.clone());
    let nb = broker.attach(b.clone());
    broker.subscribe(na, "o").await.unwrap();
    broker.subscribe(nb, "o").await.unwrap();
    let mut handles = Vec::new();
    for t in 0..4 {
        let broker = broker.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..100 {
                let data = raw(&format!("[{t},{i}]"));
                broker.publish("o", &data, None, keep(0)).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let seen_a = a.wait_for("o", 400).await;
    let seen_b = b.wait_for("o", 400).await;
    assert_eq!(seen_a, (1..=400).collect::<Vec<_>>());
    assert_eq!(seen_a, seen_b);
    let data_a: Vec<String> = a.seen().iter().map(|p| p.data.get().to_string()).collect();
    let data_b: Vec<String> = b.seen().iter().map(|p| p.data.get().to_string()).collect();
    assert_eq!(data_a, data_b);
}

/// Publications past their `history_ttl` are not returned, and a recovery that
/// needed them answers "not complete". Run on tokio's paused clock.
pub async fn history_expires_after_its_ttl(make: Make<'_>) {
    let broker = make();
    let rules = StreamRules {
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        history_bytes: 0,
    };
    let first = broker.publish("t", &raw("1"), None, rules).await.unwrap();
    tokio::time::advance(Duration::from_secs(45)).await;
    broker.publish("t", &raw("2"), None, rules).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    // 1 is 75 s old (gone), 2 is 30 s old (kept).
    let r = broker
        .history("t", all_after(0, Some(&first.epoch)), rules)
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty());
    let r = broker
        .history("t", all_after(1, Some(&first.epoch)), rules)
        .await
        .unwrap();
    assert!(r.complete);
    assert_eq!(r.publications.len(), 1);
    assert_eq!(r.publications[0].offset, 2);
    tokio::time::advance(Duration::from_secs(31)).await;
    broker.expire(&|_| rules);
    let r = broker
        .history("t", all_after(0, None), rules)
        .await
        .unwrap();
    assert!(r.publications.is_empty());
}

fn entry(client_id: &str, info: serde_json::Value) -> PresenceEntry {
    PresenceEntry {
        client_id: client_id.into(),
        info,
    }
}

/// Presence: an add says whether it was a join, a refresh keeps one entry and
/// takes the newer info, a remove says whether it was a leave and returns the
/// entry; presence keeps the channel's stream (and its epoch) when nothing else
/// does.
pub async fn presence_joins_refreshes_and_leaves(make: Make<'_>) {
    let broker = make();
    let ttl = Duration::from_secs(60);
    let alice = entry("alice", serde_json::json!({"n": 1}));
    assert!(
        broker.presence_add("room", &alice, ttl).await.unwrap(),
        "a join"
    );
    let again = entry("alice", serde_json::json!({"n": 2}));
    assert!(
        !broker.presence_add("room", &again, ttl).await.unwrap(),
        "a refresh"
    );
    broker
        .presence_add("room", &entry("bob", serde_json::Value::Null), ttl)
        .await
        .unwrap();
    let mut now = broker.presence("room").await.unwrap();
    now.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    assert_eq!(
        now,
        vec![again.clone(), entry("bob", serde_json::Value::Null)]
    );
    // A stream exists for the channel and keeps its epoch while anyone is there.
    let first = broker
        .publish("room", &raw("1"), None, keep(0))
        .await
        .unwrap();
    broker.expire(&|_| keep(0));
    let second = broker
        .publish("room", &raw("2"), None, keep(0))
        .await
        .unwrap();
    assert_eq!((second.epoch, second.offset), (first.epoch, 2));
    assert_eq!(
        broker.presence_remove("room", "alice").await.unwrap(),
        Some(again)
    );
    assert_eq!(broker.presence_remove("room", "alice").await.unwrap(), None);
    assert_eq!(
        broker.presence_remove("elsewhere", "bob").await.unwrap(),
        None
    );
    assert_eq!(broker.presence("room").await.unwrap().len(), 1);
}

/// Presence entries end at their TTL unless refreshed, and `expire` reports
/// each one once, for its leave event. Run on tokio's paused clock.
pub async fn presence_expires_after_its_ttl(make: Make<'_>) {
    let broker = make();
    let short = Duration::from_secs(30);
    broker
        .presence_add("p", &entry("gone", serde_json::Value::Null), short)
        .await
        .unwrap();
    broker
        .presence_add("p", &entry("kept", serde_json::Value::Null), short)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    // A refresh moves `kept` on by a full TTL from now.
    broker
        .presence_add("p", &entry("kept", serde_json::Value::Null), short)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(15)).await;
    let ids: Vec<String> = broker
        .presence("p")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.client_id)
        .collect();
    assert_eq!(ids, vec!["kept".to_string()], "past its TTL is not present");
    let expired = broker.expire(&|_| keep(0)).presence;
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (&*expired[0].channel, expired[0].entry.client_id.as_str()),
        ("p", "gone")
    );
    assert!(
        broker.expire(&|_| keep(0)).presence.is_empty(),
        "reported once"
    );
    // A join after expiry is a join again.
    assert!(broker
        .presence_add("p", &entry("gone", serde_json::Value::Null), short)
        .await
        .unwrap());
}

/// Tickets: taken once, by exactly one of many concurrent takers; unknown keys
/// and keys past their TTL give nothing.
pub async fn a_ticket_is_taken_once(make: Make<'_>) {
    let broker = make();
    broker
        .ticket_put("t1", "value-1", Duration::from_secs(60))
        .await
        .unwrap();
    let takers: Vec<_> = (0..8)
        .map(|_| {
            let broker = broker.clone();
            tokio::spawn(async move { broker.ticket_take("t1").await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for t in takers {
        if let Some(v) = t.await.unwrap() {
            got.push(v);
        }
    }
    assert_eq!(got, vec!["value-1".to_string()]);
    assert_eq!(broker.ticket_take("t1").await.unwrap(), None);
    assert_eq!(broker.ticket_take("never").await.unwrap(), None);
}

/// A ticket past its TTL cannot be taken. Run on tokio's paused clock.
pub async fn a_ticket_expires(make: Make<'_>) {
    let broker = make();
    broker
        .ticket_put("t2", "v", Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(broker.ticket_take("t2").await.unwrap(), None);
}

fn session(client_id: &str, generation: u64) -> DetachedSession {
    DetachedSession {
        client_id: client_id.into(),
        generation,
        user_data: [("theme".to_string(), serde_json::json!("dark"))].into(),
        channels: vec!["lobby".into()],
    }
}

/// A detached session is taken once, whole, by the client and generation its
/// token names; a take that names another leaves it in place; concurrent takes
/// have one winner.
pub async fn a_session_is_resumed_once(make: Make<'_>) {
    let broker = make();
    let ttl = Duration::from_secs(60);
    broker
        .session_put("s1", session("alice", 3), ttl)
        .await
        .unwrap();
    assert_eq!(broker.usage().await.unwrap().sessions, 1);
    let wrong = broker.session_take("s1", Some(("alice", 2))).await.unwrap();
    assert_eq!(wrong, SessionTake::Mismatch, "an old token's generation");
    let other = broker
        .session_take("s1", Some(("mallory", 3)))
        .await
        .unwrap();
    assert_eq!(other, SessionTake::Mismatch, "another client");
    assert_eq!(
        broker.usage().await.unwrap().sessions,
        1,
        "a mismatch leaves it"
    );
    let takers: Vec<_> = (0..8)
        .map(|_| {
            let broker = broker.clone();
            tokio::spawn(
                async move { broker.session_take("s1", Some(("alice", 3))).await.unwrap() },
            )
        })
        .collect();
    let mut won = Vec::new();
    for t in takers {
        if let SessionTake::Taken(s) = t.await.unwrap() {
            won.push(s);
        }
    }
    assert_eq!(won, vec![session("alice", 3)]);
    assert_eq!(broker.usage().await.unwrap().sessions, 0);
    assert_eq!(
        broker.session_take("s1", None).await.unwrap(),
        SessionTake::Missing
    );
    // Without an expectation, whatever is there is taken.
    broker
        .session_put("s2", session("bob", 0), ttl)
        .await
        .unwrap();
    assert_eq!(
        broker.session_take("s2", None).await.unwrap(),
        SessionTake::Taken(session("bob", 0))
    );
}

/// A detached session past its TTL is gone, and `expire` counts it. Run on
/// tokio's paused clock.
pub async fn a_session_expires(make: Make<'_>) {
    let broker = make();
    broker
        .session_put("s3", session("carol", 1), Duration::from_secs(30))
        .await
        .unwrap();
    broker
        .session_put("s4", session("dave", 1), Duration::from_secs(90))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(broker.expire(&|_| keep(0)).sessions, 1);
    assert_eq!(
        broker.session_take("s3", Some(("carol", 1))).await.unwrap(),
        SessionTake::Missing
    );
    assert_eq!(broker.usage().await.unwrap().sessions, 1);
}

/// A channel keeps at most `history_bytes` of history: its oldest publications
/// go first, a recovery that needed them says so, and a publication larger than
/// the bound is not kept at all.
pub async fn history_stays_within_its_bytes_per_channel(make: Make<'_>) {
    let broker = make();
    let rules = StreamRules {
        history_bytes: 5_000,
        ..keep(100)
    };
    let kb = raw(&format!("\"{}\"", "x".repeat(1_000)));
    let mut last = None;
    for _ in 0..10 {
        last = Some(broker.publish("b", &kb, None, rules).await.unwrap());
    }
    let last = last.unwrap();
    let kept = broker
        .history("b", all_after(0, None), rules)
        .await
        .unwrap();
    let n = kept.publications.len();
    assert!((2..=4).contains(&n), "{n} of 1 KB each within 5,000 bytes");
    assert_eq!(
        kept.publications.last().unwrap().offset,
        10,
        "the newest stay"
    );
    let r = broker
        .history("b", all_after(0, Some(&last.epoch)), rules)
        .await
        .unwrap();
    assert!(!r.complete, "a recovery from the start needed what went");
    let r = broker
        .history("b", all_after(9, Some(&last.epoch)), rules)
        .await
        .unwrap();
    assert!(r.complete);
    assert_eq!(r.publications.len(), 1);
    // Larger than the bound: not kept, and a recovery across it says so.
    let huge = raw(&format!("\"{}\"", "y".repeat(6_000)));
    broker.publish("b", &huge, None, rules).await.unwrap();
    let r = broker
        .history("b", all_after(10, Some(&last.epoch)), rules)
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty(), "{r:?}");
}

/// A factory of fresh brokers with the given limits.
pub type MakeLimited<'a> = &'a (dyn Fn(BrokerLimits) -> Arc<dyn Broker> + Sync);

/// History stays within `max_history_bytes` however many channels publish: the
/// oldest publications of the channels holding most go first, a recovery that
/// needed them says so, and channels left with nothing are forgotten.
pub async fn history_stays_within_its_bound(make: MakeLimited<'_>) {
    let max = 1 << 20;
    let broker = make(BrokerLimits {
        max_history_bytes: Some(max),
        ..BrokerLimits::default()
    });
    let big = raw(&format!("\"{}\"", "x".repeat(10_000)));
    let first = broker.publish("c0", &big, None, keep(100)).await.unwrap();
    // 2,000 channels x 10 KB: 20 MB offered against a 1 MiB bound.
    for i in 1..2000 {
        broker
            .publish(&format!("c{i}"), &big, None, keep(100))
            .await
            .unwrap();
        assert!(
            broker.usage().await.unwrap().history_bytes <= max + 20_000,
            "over the bound at {i}"
        );
    }
    let usage = broker.usage().await.unwrap();
    assert!(usage.history_bytes <= max, "{usage:?}");
    assert!(
        usage.history_bytes > max / 2,
        "evicted far more than needed: {usage:?}"
    );
    // The newest is kept, the oldest is gone, and a recovery says so.
    let newest = broker
        .history("c1999", all_after(0, None), keep(100))
        .await
        .unwrap();
    assert_eq!(newest.publications.len(), 1);
    let r = broker
        .history("c0", all_after(0, Some(&first.epoch)), keep(100))
        .await
        .unwrap();
    assert!(!r.complete && r.publications.is_empty());
    assert!(
        usage.channels < 2000,
        "emptied channels are forgotten: {usage:?}"
    );
    // A channel holding many goes before one holding few.
    let broker = make(BrokerLimits {
        max_history_bytes: Some(max),
        ..BrokerLimits::default()
    });
    broker.publish("few", &big, None, keep(100)).await.unwrap();
    for _ in 0..200 {
        broker
            .publish("many", &big, None, keep(1000))
            .await
            .unwrap();
    }
    let few = broker
        .history("few", all_after(0, None), keep(100))
        .await
        .unwrap();
    assert_eq!(few.publications.len(), 1, "the small channel kept its one");
}

/// No more than `max_channels` channels: a publish, subscribe or presence that
/// would create one more is refused with `LimitExceeded`; existing channels go
/// on, and a forgotten one makes room.
pub async fn channels_stay_within_their_bound(make: MakeLimited<'_>) {
    let broker = make(BrokerLimits {
        max_channels: Some(3),
        ..BrokerLimits::default()
    });
    let rec = Recorder::new();
    let node = broker.attach(rec.clone());
    broker
        .publish("a", &raw("1"), None, keep(10))
        .await
        .unwrap();
    broker.subscribe(node, "b").await.unwrap();
    broker
        .presence_add(
            "c",
            &entry("x", serde_json::Value::Null),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(broker.usage().await.unwrap().channels, 3);
    let limited = |e: keel::Error| assert_eq!(e.kind(), &keel::ErrorKind::LimitExceeded);
    limited(
        broker
            .publish("d", &raw("1"), None, keep(10))
            .await
            .unwrap_err(),
    );
    limited(broker.subscribe(node, "d").await.unwrap_err());
    limited(
        broker
            .presence_add(
                "d",
                &entry("x", serde_json::Value::Null),
                Duration::from_secs(60),
            )
            .await
            .unwrap_err(),
    );
    // Existing channels go on (this one keeps no history, so it can go).
    broker.publish("b", &raw("2"), None, keep(0)).await.unwrap();
    assert_eq!(rec.wait_for("b", 1).await, vec![1]);
    // When one is forgotten, there is room again.
    broker.unsubscribe(node, "b").await.unwrap();
    broker.expire(&|_| keep(0));
    assert_eq!(broker.usage().await.unwrap().channels, 2);
    broker
        .publish("d", &raw("1"), None, keep(10))
        .await
        .unwrap();
}

/// No more than `max_sessions` detached sessions: past it the ones closest to
/// expiry go first, and the newest is always kept.
pub async fn sessions_stay_within_their_bound(make: MakeLimited<'_>) {
    let broker = make(BrokerLimits {
        max_sessions: Some(10),
        ..BrokerLimits::default()
    });
    for i in 0..25u64 {
        broker
            .session_put(
                &format!("s{i}"),
                session("alice", i),
                Duration::from_secs(600 + i),
            )
            .await
            .unwrap();
        assert!(
            broker.usage().await.unwrap().sessions <= 10,
            "over the bound at {i}"
        );
    }
    assert_eq!(
        broker.session_take("s24", None).await.unwrap(),
        SessionTake::Taken(session("alice", 24)),
        "the newest is kept"
    );
    assert_eq!(
        broker.session_take("s0", None).await.unwrap(),
        SessionTake::Missing,
        "the one closest to expiry went"
    );
}

/// No more than `max_presence` presence entries in all channels: a new entry
/// past it is refused with `LimitExceeded`; refreshing one is not; a leave makes
/// room.
pub async fn presence_stays_within_its_bound(make: MakeLimited<'_>) {
    let broker = make(BrokerLimits {
        max_presence: Some(3),
        ..BrokerLimits::default()
    });
    let ttl = Duration::from_secs(60);
    let v = serde_json::Value::Null;
    for (ch, id) in [("p1", "a"), ("p1", "b"), ("p2", "a")] {
        assert!(broker
            .presence_add(ch, &entry(id, v.clone()), ttl)
            .await
            .unwrap());
    }
    assert_eq!(broker.usage().await.unwrap().presence, 3);
    let e = broker
        .presence_add("p2", &entry("c", v.clone()), ttl)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &keel::ErrorKind::LimitExceeded);
    assert!(
        !broker
            .presence_add("p1", &entry("a", v.clone()), ttl)
            .await
            .unwrap(),
        "a refresh is not refused"
    );
    broker.presence_remove("p1", "b").await.unwrap();
    assert_eq!(broker.usage().await.unwrap().presence, 2);
    assert!(broker
        .presence_add("p2", &entry("c", v), ttl)
        .await
        .unwrap());
    assert_eq!(broker.usage().await.unwrap().presence, 3);
}
