//! The reconnect loop on tokio's paused clock: the waits between attempts are
//! the delays the client announced, each inside the configured curve's jitter
//! bounds, and the client gives up after `max_attempts`. No real time passes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_client::{Client, ClientOptions, Event};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn waits_between_attempts_follow_the_curve_with_jitter() {
    // A port nothing listens on: every attempt is refused at once (loopback).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut o = ClientOptions::default();
    o.reconnect.max_attempts = Some(8);
    // A connect that hung would show as an hour on the paused clock.
    o.connect_timeout = Duration::from_secs(3600);
    let (_client, mut events) =
        Client::connect(&format!("ws://127.0.0.1:{port}/ws"), o.clone()).unwrap();

    let started = Instant::now();
    let mut last: Option<(Instant, Duration)> = None;
    let mut delays = Vec::new();
    let reason = loop {
        let ev = events.next().await.expect("events until Closed");
        let now = Instant::now();
        if let Some((at, delay)) = last {
            let waited = now - at;
            assert!(
                waited >= delay && waited < delay + Duration::from_millis(50),
                "announced {delay:?}, waited {waited:?}"
            );
        }
        match ev {
            Event::Reconnecting { attempt, delay } => {
                assert_eq!(attempt as usize, delays.len() + 1);
                let (low, high) = o.reconnect.bounds(attempt);
                assert!(
                    delay >= low && delay <= high,
                    "attempt {attempt}: {delay:?} outside {low:?}..={high:?}"
                );
                delays.push(delay);
                last = Some((now, delay));
            }
            Event::Closed { reason } => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(delays.len(), 8);
    assert!(reason.contains("gave up after 8 attempts"), "{reason}");
    // The bases were 1, 2, 4, 8, 16, 30, 30, 30 s; with randomization 0.5 the sum
    // lies between half and all of their 121 s, and the draws are not all equal.
    let total = Instant::now() - started;
    assert!(
        total >= Duration::from_secs_f64(60.5) && total < Duration::from_secs(122),
        "{total:?}"
    );
    // At the cap the bases are equal; jitter still spreads the waits.
    assert!(delays[5..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
}
