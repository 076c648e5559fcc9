//! The scenarios: idle, fanout (and slow, its variant with stalled readers), rooms
//! and churn. Each opens real connections to a running server, drives it, reads
//! the server's CPU time and RSS from `/proc`, and returns a JSON report.
//!
//! Every loop here is bounded by a count or a duration and stops by itself.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::dialect::{Answer, Dialect};
use crate::stats::{self, Histogram};
use crate::wire::{self, Conn};

/// Where and how to reach the server under test.
#[derive(Clone)]
pub(crate) struct Target {
    /// Server address.
    pub(crate) addr: SocketAddr,
    /// Protocol.
    pub(crate) dialect: Dialect,
    /// Server process, for CPU and RSS; None skips those figures.
    pub(crate) pid: Option<u32>,
    /// Source addresses connections are spread over (ephemeral ports per address
    /// are limited).
    pub(crate) sources: Vec<IpAddr>,
    /// Most connection attempts per second while ramping up.
    pub(crate) ramp_rate: u32,
}

impl Target {
    pub(crate) fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

/// `127.0.0.2 ..= 127.0.0.(n+1)`.
pub(crate) fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                (((i + 2) >> 8) & 0xff) as u8,
                ((i + 2) & 0xff) as u8,
            ))
        })
        .collect()
}

/// The run's clock: timestamps in publications are ns since this instant.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Opens `n` connections (with `setup`), at most `ramp_rate` per second.
async fn open_many(t: &Target, n: usize, room: &str, join: bool) -> anyhow::Result<Vec<Conn>> {
    let mut out = Vec::with_capacity(n);
    let started = Instant::now();
    let in_flight = 64usize;
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while out.len() < n {
        while next < n && pending.len() < in_flight {
            let due = started + Duration::from_secs_f64(next as f64 / t.ramp_rate.max(1) as f64);
            tokio::time::sleep_until(due.into()).await;
            let (addr, src, d, path, room) = (
                t.addr,
                t.source(next),
                t.dialect,
                t.dialect.path(room),
                room.to_string(),
            );
            pending.spawn(async move {
                let mut c = wire::connect(addr, src, &path).await?;
                d.setup(&mut c, &room, join).await?;
                anyhow::Ok(c)
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(r) => out.push(
                r.context("connect task")?
                    .with_context(|| format!("connection {}", out.len()))?,
            ),
            None => break,
        }
    }
    Ok(out)
}

/// What the readers of the load generator's one thread share: they run one at a
/// time (local tasks of a current-thread runtime), so a `RefCell` serves. One read
/// buffer and one histogram stay in the cache, where one of each per connection
/// (10 k of them, 2.3 KB a histogram) would be cold by the time a socket is
/// readable again.
#[derive(Default)]
struct Shared {
    /// Where every read lands ([`Conn::read_frames`]).
    buf: Vec<u8>,
    /// Every reader's latencies.
    latency: Histogram,
}

/// Reads until `stop`, counting messages with a timestamp (their latencies go to
/// `shared`) and answering heartbeats; returns how many it counted. A `stalled`
/// reader never reads (a slow consumer) and only holds the socket.
async fn reader(
    mut c: Conn,
    d: Dialect,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
    live: Arc<AtomicU64>,
    stalled: bool,
    shared: Rc<RefCell<Shared>>,
) -> u64 {
    if stalled {
        let _ = stop.changed().await;
        return 0;
    }
    let (mut messages, mut got) = (0, 0);
    let mut out = Vec::new();
    // One wait for the stop, made once: a new one per read would join and leave
    // the watch's waiter list every time (5% of the load generator's samples).
    let stopped = stop.changed();
    tokio::pin!(stopped);
    // The first read does not wait for the socket: it also hands over the frames
    // that came with the handshake's read (the welcome, say).
    loop {
        // The shared state is borrowed for this read only, never across an await.
        let mut open = true;
        let read = {
            let mut now = None;
            let mut guard = shared.borrow_mut();
            let Shared { buf, latency } = &mut *guard;
            c.read_frames(buf, |f| {
                let now = *now.get_or_insert_with(|| clock.now_ns());
                let step = take(f, d, now, latency, &mut got, &mut out);
                open &= step.is_continue();
                step
            })
        };
        if got > 0 {
            messages += got;
            live.fetch_add(got, Ordering::Relaxed);
            got = 0;
        }
        if !open || !matches!(read, Ok(true)) {
            break;
        }
        if !out.is_empty() {
            if c.tcp.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        tokio::select! {
            biased;
            // Stop first: a server that is behind keeps sending after the stop.
            _ = &mut stopped => break,
            res = c.tcp.readable() => if res.is_err() {
                break;
            },
        }
    }
    messages
}

/// What a reader does with one frame: counts a timestamped message (its latency
/// against `now`), queues answers to pings into `out`, and breaks on a Close.
fn take(
    f: wire::Frame<'_>,
    d: Dialect,
    now: u64,
    latency: &mut Histogram,
    got: &mut u64,
    out: &mut Vec<u8>,
) -> ControlFlow<()> {
    match f.opcode {
        1 | 2 => {
            if let Some(t) = wire::find_timestamp(f.payload) {
                latency.record(now.saturating_sub(t));
                *got += 1;
            } else if let Answer::Text(a) = d.answer(f.payload) {
                wire::encode(out, 1, a);
            }
        }
        9 => wire::encode(out, 10, f.payload),
        8 => return ControlFlow::Break(()),
        _ => {}
    }
    ControlFlow::Continue(())
}

/// Publishes `rate` messages per second for `duration` on `c`, reading (and
/// discarding) whatever comes back. Returns how many it sent.
async fn publisher(
    mut c: Conn,
    d: Dialect,
    room: String,
    clock: Clock,
    rate: u32,
    duration: Duration,
    size: usize,
) -> anyhow::Result<(u64, Conn)> {
    let pad = "x".repeat(size.saturating_sub(40));
    let tick = Duration::from_millis(5).max(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut out = Vec::new();
    while Instant::now() < end {
        tokio::select! {
            _ = ticker.tick() => {
                // Catch up to the schedule: sent so far vs. due by now.
                let due = (started.elapsed().as_secs_f64() * rate as f64).ceil() as u64;
                let n = due.saturating_sub(sent).min(per_tick.ceil() as u64 * 4);
                for _ in 0..n {
                    wire::encode(&mut out, 1, &d.publication(&room, clock.now_ns(), &pad));
                }
                sent += n;
                c.tcp.write_all(&out).await?;
                out.clear();
            }
            res = c.fill() => {
                if !res? { anyhow::bail!("server closed the publisher"); }
                while let Some(f) = c.next_frame() {
                    match f.opcode {
                        9 => wire::encode(&mut out, 10, f.payload),
                        1 => {
                            if f.payload.windows(12).any(|w| w == b"rate_limited") {
                                // Keel's default per-connection rate (100/s) would
                                // drop most of the load and measure nothing.
                                anyhow::bail!(
                                    "the server rate-limits the publisher: start keel with \
                                     KEEL_RATE_LIMIT_MESSAGES=0 (bench/run.sh does)"
                                );
                            }
                            if let Answer::Text(a) = d.answer(f.payload) { wire::encode(&mut out, 1, a) }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    // The connection is handed back, not dropped: closing it with replies unread
    // (Keel answers every publish) makes the kernel send RST, and the server then
    // loses the publications still in its receive buffer. Keep it open until the
    // deliveries are counted.
    Ok((sent, c))
}

/// CPU and RSS of the server over a window.
pub(crate) struct Window {
    pid: Option<u32>,
    cpu0: Option<Duration>,
    me0: Option<Duration>,
    t0: Instant,
}

impl Window {
    pub(crate) fn start(pid: Option<u32>) -> Self {
        Window {
            pid,
            cpu0: pid.and_then(stats::cpu_time),
            me0: stats::cpu_time(std::process::id()),
            t0: Instant::now(),
        }
    }

    /// (wall seconds, server CPU seconds, server CPU %, load generator CPU %)
    pub(crate) fn finish(&self) -> (f64, Option<f64>, Option<f64>, Option<f64>) {
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = match (self.pid.and_then(stats::cpu_time), self.cpu0) {
            (Some(a), Some(b)) => Some((a - b).as_secs_f64()),
            _ => None,
        };
        let me = match (stats::cpu_time(std::process::id()), self.me0) {
            (Some(a), Some(b)) => Some((a - b).as_secs_f64() / wall * 100.0),
            _ => None,
        };
        (wall, cpu, cpu.map(|c| c / wall * 100.0), me)
    }
}

fn saturation_note(loadgen_pct: Option<f64>) -> Option<String> {
    loadgen_pct.filter(|p| *p > 90.0).map(|p| {
        format!(
            "load generator at {p:.0}% of a core: figures may be limited by it, not by the server"
        )
    })
}

/// Says so when deliveries went on well after publishing stopped: the server
/// (or the load generator) did not keep up with the offered rate, and the
/// rate reported is what it managed, not what was offered.
fn behind_note(publish_s: f64, delivery_s: f64) -> Option<String> {
    let late = delivery_s - publish_s;
    (late > 0.5_f64.max(publish_s * 0.05)).then(|| {
        format!("fell behind: deliveries went on {late:.1} s after {publish_s:.1} s of publishing")
    })
}

/// Joins the notes that apply, if any.
fn notes<const N: usize>(notes: [Option<String>; N]) -> Option<String> {
    let all: Vec<String> = notes.into_iter().flatten().collect();
    (!all.is_empty()).then(|| all.join("; "))
}

/// Opens `conns` connections, holds them through `hold` (heartbeats answered), and
/// reports server RSS per connection and CPU while idle.
pub(crate) async fn idle(t: &Target, conns: usize, hold: Duration) -> anyhow::Result<Value> {
    let rss0 = t.pid.and_then(stats::rss);
    let ramp = Instant::now();
    let opened = open_many(t, conns, "idle", false).await?;
    let ramp_s = ramp.elapsed().as_secs_f64();
    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Arc::new(AtomicU64::new(0));
    let clock = Clock(Instant::now());
    let shared = Rc::new(RefCell::new(Shared::default()));
    let mut readers = Vec::with_capacity(conns);
    for c in opened {
        readers.push(tokio::task::spawn_local(reader(
            c,
            t.dialect,
            clock,
            stop_rx.clone(),
            live.clone(),
            false,
            shared.clone(),
        )));
    }
    let w = Window::start(t.pid);
    tokio::time::sleep(hold).await;
    let (wall, _cpu, cpu_pct, me) = w.finish();
    let rss1 = t.pid.and_then(stats::rss);
    let _ = stop_tx.send(true);
    let mut alive = 0;
    for r in readers {
        if r.await.is_ok() {
            alive += 1;
        }
    }
    let per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / conns as f64),
        _ => None,
    };
    Ok(json!({
        "scenario": "idle", "connections": conns, "held_s": wall, "ramp_s": ramp_s,
        "still_open": alive,
        "server_rss_before": rss0, "server_rss_after": rss1,
        "rss_per_connection_bytes": per_conn,
        "server_cpu_pct_idle": cpu_pct, "loadgen_cpu_pct": me,
        "note": saturation_note(me),
    }))
}

/// One publisher, `subs` subscribers on one room; `slow_fraction` of them never read.
pub(crate) async fn fanout(
    t: &Target,
    subs: usize,
    rate: u32,
    size: usize,
    duration: Duration,
    slow_fraction: f64,
) -> anyhow::Result<Value> {
    let room = "bench";
    let conns = open_many(t, subs, room, true).await?;
    let mut publisher_conn = wire::connect(t.addr, t.source(subs), &t.dialect.path(room)).await?;
    t.dialect
        .setup(&mut publisher_conn, room, t.dialect == Dialect::SocketIo)
        .await?;
    let slow = ((subs as f64) * slow_fraction).round() as usize;
    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Arc::new(AtomicU64::new(0));
    let clock = Clock(Instant::now());
    let shared = Rc::new(RefCell::new(Shared::default()));
    let mut readers = Vec::with_capacity(subs);
    for (i, c) in conns.into_iter().enumerate() {
        readers.push(tokio::task::spawn_local(reader(
            c,
            t.dialect,
            clock,
            stop_rx.clone(),
            live.clone(),
            i < slow,
            shared.clone(),
        )));
    }
    let fast = subs - slow;
    let w = Window::start(t.pid);
    let (sent, held) = publisher(
        publisher_conn,
        t.dialect,
        room.into(),
        clock,
        rate,
        duration,
        size,
    )
    .await?;
    let publish_s = w.t0.elapsed().as_secs_f64();
    // Drain: until everything expected arrived, or nothing arrived for a second.
    let expected = sent * fast as u64;
    let mut last = live.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while last < expected
        && quiet_since.elapsed() < Duration::from_secs(1)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = live.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    // Until the last delivery seen (20 ms resolution): a server that fell behind
    // delivers after publishing stopped, and dividing by the publishing time alone
    // would credit it with a rate it never sustained.
    let delivery_s = (quiet_since - w.t0).as_secs_f64().max(publish_s);
    let (wall, cpu, cpu_pct, me) = w.finish();
    let rss = t.pid.and_then(stats::rss);
    let _ = stop_tx.send(true);
    let mut received = 0;
    for r in readers {
        received += r.await.unwrap_or(0);
    }
    let hist = std::mem::take(&mut shared.borrow_mut().latency);
    drop(held);
    let loss = if expected == 0 {
        0.0
    } else {
        1.0 - received as f64 / expected as f64
    };
    Ok(json!({
        "scenario": if slow > 0 { "slow" } else { "fanout" },
        "subscribers": subs, "slow_subscribers": slow, "rate": rate, "size": size,
        "published": sent, "expected_deliveries": expected, "delivered": received,
        "loss": loss, "latency_samples": hist.count(),
        "deliveries_per_s": received as f64 / delivery_s,
        "publish_s": publish_s, "delivery_s": delivery_s,
        "latency_us": {"p50": hist.quantile_us(0.5), "p99": hist.quantile_us(0.99), "p999": hist.quantile_us(0.999), "max": hist.max_us()},
        "server_cpu_s": cpu, "server_cpu_pct": cpu_pct,
        "server_cpu_s_per_million_deliveries": cpu.map(|c| if received == 0 { f64::NAN } else { c / received as f64 * 1e6 }),
        "server_rss": rss, "wall_s": wall, "loadgen_cpu_pct": me,
        "note": notes([saturation_note(me), behind_note(publish_s, delivery_s)]),
    }))
}

/// `rooms` rooms of `per_room` members; every member publishes `rate` msg/s to its room.
pub(crate) async fn rooms(
    t: &Target,
    rooms: usize,
    per_room: usize,
    rate: u32,
    duration: Duration,
    size: usize,
) -> anyhow::Result<Value> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Arc::new(AtomicU64::new(0));
    let clock = Clock(Instant::now());
    let shared = Rc::new(RefCell::new(Shared::default()));
    let mut members = Vec::new();
    for r in 0..rooms {
        let room = format!("room{r}");
        for c in open_many(t, per_room, &room, true).await? {
            members.push((room.clone(), c));
        }
    }
    let w = Window::start(t.pid);
    let mut tasks = Vec::new();
    for (room, c) in members {
        // Each member is a publisher; a second connection reads for it, so reading
        // and writing do not wait on each other.
        let reader_conn = {
            let mut rc =
                wire::connect(t.addr, t.source(tasks.len()), &t.dialect.path(&room)).await?;
            t.dialect.setup(&mut rc, &room, true).await?;
            rc
        };
        tasks.push(tokio::task::spawn_local(reader(
            reader_conn,
            t.dialect,
            clock,
            stop_rx.clone(),
            live.clone(),
            false,
            shared.clone(),
        )));
        let d = t.dialect;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let held = publisher(c, d, room, clock, rate, duration, size).await;
            // Hold the connection until the readers stop (see `publisher`).
            let _ = stop.changed().await;
            drop(held);
        });
    }
    tokio::time::sleep(duration + Duration::from_secs(1)).await;
    let (wall, cpu, cpu_pct, me) = w.finish();
    let _ = stop_tx.send(true);
    let mut received = 0;
    for r in tasks {
        received += r.await.unwrap_or(0);
    }
    let hist = std::mem::take(&mut shared.borrow_mut().latency);
    let sent_expected = (rooms * per_room) as f64 * rate as f64 * duration.as_secs_f64();
    Ok(json!({
        "scenario": "rooms", "rooms": rooms, "per_room": per_room, "rate_per_member": rate,
        "publications_expected": sent_expected,
        "delivered": received, "deliveries_per_s": received as f64 / duration.as_secs_f64(),
        "latency_us": {"p50": hist.quantile_us(0.5), "p99": hist.quantile_us(0.99), "p999": hist.quantile_us(0.999), "max": hist.max_us()},
        "server_cpu_s": cpu, "server_cpu_pct": cpu_pct, "wall_s": wall, "loadgen_cpu_pct": me,
        "server_cpu_s_per_million_deliveries": cpu.map(|c| if received == 0 { f64::NAN } else { c / received as f64 * 1e6 }),
        "note": saturation_note(me),
    }))
}

/// `total` connect/disconnect cycles as fast as `rate` allows (64 in flight);
/// reports the rate reached and server RSS after against before.
pub(crate) async fn churn(t: &Target, rate: u32, total: usize) -> anyhow::Result<Value> {
    // Warm up: a first round so allocator pools exist before the baseline.
    churn_round(t, rate, total.min(2000)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = t.pid.and_then(stats::rss);
    let w = Window::start(t.pid);
    let (done, failed) = churn_round(t, rate, total).await?;
    let (wall, cpu, cpu_pct, me) = w.finish();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = t.pid.and_then(stats::rss);
    // The same storm again: pools that grew to the first storm's peak do not grow
    // again, a leak does. The first figure is against the warmed-up baseline (what
    // target 4 asks for), the second tells the two apart.
    let (done2, failed2) = churn_round(t, rate, total).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss2 = t.pid.and_then(stats::rss);
    let growth = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / a as f64 * 100.0),
        _ => None,
    };
    Ok(json!({
        "scenario": "churn", "rate": rate, "cycles": done, "failed": failed + failed2,
        "cycles_per_s": done as f64 / wall,
        "server_cpu_us_per_cycle": cpu.map(|c| c * 1e6 / done.max(1) as f64),
        "server_rss_before": rss0, "server_rss_after": rss1, "rss_growth_pct": growth(rss0, rss1),
        "repeat_cycles": done2, "server_rss_after_repeat": rss2,
        "rss_growth_repeat_pct": growth(rss1, rss2),
        "server_cpu_s": cpu, "server_cpu_pct": cpu_pct, "loadgen_cpu_pct": me,
        "note": saturation_note(me),
    }))
}

async fn churn_round(t: &Target, rate: u32, total: usize) -> anyhow::Result<(usize, usize)> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let (mut done, mut failed) = (0usize, 0usize);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        while set.len() >= 64 {
            match set.join_next().await {
                Some(Ok(true)) => done += 1,
                _ => failed += 1,
            }
        }
        let (addr, src, d) = (t.addr, t.source(i), t.dialect);
        set.spawn(async move {
            let Ok(mut c) = wire::connect(addr, src, &d.path("churn")).await else {
                return false;
            };
            if d.setup(&mut c, "churn", false).await.is_err() {
                return false;
            }
            // A clean close: Close frame, then drop.
            let mut out = Vec::new();
            wire::encode(&mut out, 8, &1000u16.to_be_bytes());
            let _ = c.tcp.write_all(&out).await;
            true
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(true) => done += 1,
            _ => failed += 1,
        }
    }
    Ok((done, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_kept_up_gets_no_note_and_one_that_fell_behind_does() {
        assert_eq!(behind_note(10.0, 10.02), None);
        assert_eq!(
            behind_note(10.0, 10.4),
            None,
            "within the half-second slack"
        );
        let note = behind_note(10.0, 12.5).expect("2.5 s late");
        assert!(note.contains("2.5 s after 10.0 s"), "{note}");
        // Long runs get 5% slack: 3 s late after 100 s is still keeping up.
        assert_eq!(behind_note(100.0, 103.0), None);
        assert!(behind_note(100.0, 106.0).is_some());
    }

    #[test]
    fn notes_are_joined_and_absent_when_none_apply() {
        assert_eq!(notes([None, None]), None);
        assert_eq!(
            notes([Some("a".into()), None, Some("b".into())]),
            Some("a; b".into())
        );
    }
}
