//! The `abuse` scenario: what a hostile client does to a server at its defaults,
//! and what a well-behaved client notices meanwhile.
//!
//! A probe (one subscriber, one publisher, 20 messages a second into room
//! `probe`) runs from start to end and its delivery latency is measured per
//! phase. The phases, each `--phase` long (15 s by default: longer than Keel's
//! `handshake_timeout` and `rate_limit_close_after`, so their effect shows):
//!
//! - `before`: the probe alone.
//! - `spray`: `--spray-conns` connections publish `--spray-size`-byte messages,
//!   each to a channel of its own, as fast as the server answers (Keel only: the
//!   peers keep no history and make no channel of a publication).
//! - `slowloris`: `--slow` TCP connections that send nothing, or half a request
//!   line, and wait; the figure is how many the server closed within the phase.
//! - `flood`: one connection sends small messages to a room nobody else is in,
//!   as fast as it can write them.
//! - `nesting`: fifty messages whose data nests 5,000 arrays deep are published
//!   into the probe's room; the figure is how many reached the probe.
//! - `after`: the probe alone again: does the server come back?
//!
//! Each phase reports the server's RSS (at its end and its peak, sampled every
//! 100 ms), its CPU, and the probe's p50/p99/max latency and losses. Every loop
//! is bounded by the phase's deadline; every socket is closed at its end.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dialect::{Answer, Dialect};
use crate::scenarios::Target;
use crate::stats::{self, Histogram};
use crate::wire;

/// The scenario's knobs.
pub(crate) struct Abuse {
    pub(crate) phase: Duration,
    pub(crate) spray_conns: usize,
    pub(crate) spray_size: usize,
    pub(crate) slow: usize,
}

/// What the probe saw in the current phase.
#[derive(Default)]
struct ProbeStats {
    hist: Histogram,
    sent: u64,
    received: u64,
    /// Messages nested past what a parser takes, seen by the probe's subscriber.
    deep: u64,
    /// Set when either probe connection was closed.
    lost: Option<String>,
}

type Shared = Rc<RefCell<ProbeStats>>;

/// Runs the scenario; see the module documentation.
pub(crate) async fn abuse(t: &Target, a: &Abuse) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let shared: Shared = Rc::default();
    let probe = tokio::task::spawn_local(probe(t.clone(), shared.clone(), t0));
    let mut phases = Vec::new();
    for name in ["before", "spray", "slowloris", "flood", "nesting", "after"] {
        let window = crate::scenarios::Window::start(t.pid);
        let until = Instant::now() + a.phase;
        // The phase lasts its whole length even when the server ended the
        // attack early (it closed every socket): the probe is measured alike.
        let attack = async {
            let r = attack(t, a, name, until).await;
            tokio::time::sleep_until(until.into()).await;
            r
        };
        let (result, peak) = sample_peak(t.pid, attack).await;
        let (wall, _, cpu_pct, _) = window.finish();
        let p = std::mem::take(&mut *shared.borrow_mut());
        let mut row = json!({
            "phase": name,
            "wall_s": wall,
            "rss_mb_end": t.pid.and_then(stats::rss).map(mb),
            "rss_mb_peak": peak.map(mb),
            "cpu_pct": cpu_pct,
            "probe_sent": p.sent,
            "probe_received": p.received,
            "probe_p50_us": p.hist.quantile_us(0.5),
            "probe_p99_us": p.hist.quantile_us(0.99),
            "probe_max_us": p.hist.max_us(),
            "probe_deep_received": p.deep,
            "probe_lost": p.lost,
        });
        match result {
            Ok(Value::Object(m)) => {
                for (k, v) in m {
                    row[k] = v;
                }
            }
            Ok(_) => {}
            Err(e) => row["attack_error"] = json!(format!("{e:#}")),
        }
        eprintln!("{row}");
        phases.push(row);
    }
    probe.abort();
    Ok(json!({
        "scenario": "abuse",
        "phase_s": a.phase.as_secs_f64(),
        "spray_conns": a.spray_conns,
        "spray_size": a.spray_size,
        "slow": a.slow,
        "phases": phases,
    }))
}

fn mb(b: u64) -> f64 {
    (b as f64 / 1e6 * 10.0).round() / 10.0
}

/// Runs `f`, sampling the server's RSS every 100 ms; returns its result and the
/// peak.
async fn sample_peak<F: std::future::Future>(pid: Option<u32>, f: F) -> (F::Output, Option<u64>) {
    let mut peak = pid.and_then(stats::rss);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(f);
    loop {
        tokio::select! {
            out = &mut f => {
                let last = pid.and_then(stats::rss);
                return (out, peak.max(last));
            }
            _ = tick.tick() => peak = peak.max(pid.and_then(stats::rss)),
        }
    }
}

async fn attack(t: &Target, a: &Abuse, name: &str, until: Instant) -> anyhow::Result<Value> {
    let rest = || tokio::time::sleep_until(until.into());
    match name {
        "spray" if t.dialect == Dialect::Keel => {
            let mut runs = tokio::task::JoinSet::new();
            for i in 0..a.spray_conns {
                runs.spawn_local(spray(t.clone(), i, a.spray_size, until));
            }
            let (mut ok, mut refused, mut failed) = (0u64, Value::Object(Default::default()), 0);
            while let Some(r) = runs.join_next().await {
                match r? {
                    Ok((n, by_code)) => {
                        ok += n;
                        for (code, c) in by_code {
                            let was = refused[&code].as_u64().unwrap_or(0);
                            refused[code] = json!(was + c);
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            Ok(json!({"accepted": ok, "refused": refused, "attackers_closed": failed}))
        }
        "spray" => {
            rest().await;
            Ok(json!({"attack": "n/a: no history, publishing makes no channel"}))
        }
        "slowloris" => slowloris(t, a.slow, until).await,
        "flood" => flood(t, until).await,
        "nesting" => {
            let r = nesting(t).await;
            rest().await;
            r
        }
        _ => {
            rest().await;
            Ok(json!({}))
        }
    }
}

/// 20 messages a second from a publisher to a subscriber through room `probe`.
async fn probe(t: Target, shared: Shared, t0: Instant) -> anyhow::Result<()> {
    let d = t.dialect;
    let path = d.path("probe");
    let mut sub = wire::connect(t.addr, t.source(0), &path).await?;
    d.setup(&mut sub, "probe", true).await?;
    let mut publ = wire::connect(t.addr, t.source(1), &path).await?;
    d.setup(&mut publ, "probe", d != Dialect::Keel).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    // A tick the thread was too busy for is skipped, not sent late in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let pad = "p".repeat(60);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = t0.elapsed().as_nanos() as u64;
                if publ.send_text(&d.publication("probe", now, &pad)).await.is_err() {
                    shared.borrow_mut().lost.get_or_insert("publisher closed".into());
                    return Ok(());
                }
                shared.borrow_mut().sent += 1;
            }
            open = sub.fill() => {
                if !open.unwrap_or(false) {
                    shared.borrow_mut().lost.get_or_insert("subscriber closed".into());
                    return Ok(());
                }
                answer_and_read(&mut sub, d, |text| {
                    if text.windows(8).any(|w| w == b"[[[[[[[[") {
                        shared.borrow_mut().deep += 1;
                    } else if let Some(at) = wire::find_timestamp(text) {
                        let now = t0.elapsed().as_nanos() as u64;
                        let mut s = shared.borrow_mut();
                        s.hist.record(now.saturating_sub(at));
                        s.received += 1;
                    }
                })
                .await?;
            }
            open = publ.fill() => {
                if !open.unwrap_or(false) {
                    shared.borrow_mut().lost.get_or_insert("publisher closed".into());
                    return Ok(());
                }
                answer_and_read(&mut publ, d, |_| {}).await?;
            }
        }
    }
}

/// Hands every whole text frame in `c`'s buffer to `each`, and answers the
/// WebSocket Pings and the dialect's own pings among them.
async fn answer_and_read(
    c: &mut wire::Conn,
    d: Dialect,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut out = Vec::new();
    while let Some(f) = c.next_frame() {
        match f.opcode {
            9 => wire::encode(&mut out, 10, f.payload),
            1 => {
                each(f.payload);
                if let Answer::Text(a) = d.answer(f.payload) {
                    wire::encode(&mut out, 1, a);
                }
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    c.tcp.write_all(&out).await
}

/// Publishes `size`-byte messages to new channels until `until`, keeping 16 in
/// flight; returns how many were accepted and how many refused, by error code.
async fn spray(
    t: Target,
    i: usize,
    size: usize,
    until: Instant,
) -> anyhow::Result<(u64, Vec<(String, u64)>)> {
    let mut c = wire::connect(t.addr, t.source(10 + i), "/ws").await?;
    t.dialect.setup(&mut c, "", false).await?;
    let pad = "x".repeat(size);
    let (mut sent, mut answered, mut ok) = (0u64, 0u64, 0u64);
    let mut refused: Vec<(String, u64)> = Vec::new();
    while Instant::now() < until {
        let mut out = Vec::new();
        while sent - answered < 16 {
            let msg = format!(
                r#"{{"type":"publish","payload":{{"channel":"spray-{i}-{sent}","data":"{pad}"}}}}"#
            );
            wire::encode(&mut out, 1, msg.as_bytes());
            sent += 1;
        }
        if !out.is_empty() {
            c.tcp.write_all(&out).await?;
        }
        let filled = tokio::time::timeout_at(until.into(), c.fill()).await;
        let Ok(open) = filled else { break };
        if !open? {
            anyhow::bail!("closed by the server");
        }
        let mut reply = Vec::new();
        while let Some(f) = c.next_frame() {
            match f.opcode {
                9 => wire::encode(&mut reply, 10, f.payload),
                8 => anyhow::bail!("closed by the server"),
                1 if f.payload.starts_with(br#"{"type":"publish_response""#) => {
                    answered += 1;
                    ok += 1;
                }
                1 if f.payload.starts_with(br#"{"type":"error""#) => {
                    // Dropped messages get one `rate_limited` per streak, not one
                    // each: count the error, and stop waiting for the rest.
                    answered = sent;
                    let v: Value = serde_json::from_slice(f.payload).unwrap_or_default();
                    let code = v["payload"]["code"].as_str().unwrap_or("?").to_string();
                    match refused.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, n)) => *n += 1,
                        None => refused.push((code, 1)),
                    }
                }
                1 => {
                    if let Answer::Text(a) = Dialect::Keel.answer(f.payload) {
                        wire::encode(&mut reply, 1, a);
                    }
                }
                _ => {}
            }
        }
        if !reply.is_empty() {
            c.tcp.write_all(&reply).await?;
        }
    }
    Ok((ok, refused))
}

/// Opens `n` connections that never finish a request; returns how many the
/// server closed before `until`.
async fn slowloris(t: &Target, n: usize, until: Instant) -> anyhow::Result<Value> {
    let mut held = tokio::task::JoinSet::new();
    let mut opened = 0usize;
    let mut failed = 0usize;
    for i in 0..n {
        if Instant::now() >= until {
            break;
        }
        tokio::task::yield_now().await;
        let addr = t.addr;
        let source = t.source(100 + i);
        let connected = async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(ip) = source {
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
            }
            let mut tcp = socket.connect(addr).await?;
            if i % 2 == 1 {
                tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")
                    .await?;
            }
            anyhow::Ok(tcp)
        };
        match tokio::time::timeout(Duration::from_secs(1), connected).await {
            Ok(Ok(mut tcp)) => {
                opened += 1;
                let at = Instant::now();
                held.spawn_local(async move {
                    let mut buf = [0u8; 256];
                    let read = tokio::time::timeout_at(until.into(), async {
                        loop {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => continue,
                            }
                        }
                    })
                    .await;
                    read.ok().map(|()| at.elapsed())
                });
            }
            _ => failed += 1,
        }
    }
    let (mut closed, mut slowest) = (0usize, Duration::ZERO);
    while let Some(r) = held.join_next().await {
        if let Ok(Some(after)) = r {
            closed += 1;
            slowest = slowest.max(after);
        }
    }
    Ok(json!({
        "slow_opened": opened,
        "slow_connect_failed": failed,
        "slow_closed_by_server": closed,
        "slow_closed_after_max_s": (closed > 0).then_some(slowest.as_secs_f64()),
    }))
}

/// One connection writing small messages to room `flood` as fast as it can,
/// reading whatever comes back; returns what it sent and how it ended.
async fn flood(t: &Target, until: Instant) -> anyhow::Result<Value> {
    let d = t.dialect;
    let mut c = wire::connect(t.addr, t.source(5), &d.path("flood")).await?;
    d.setup(&mut c, "flood", d != Dialect::Keel).await?;
    let one = match d {
        Dialect::Keel => br#"{"type":"publish","payload":{"channel":"flood","data":1}}"#.to_vec(),
        Dialect::Trivial => b"1".to_vec(),
        Dialect::SocketIo => br#"42["msg",1]"#.to_vec(),
    };
    let mut batch = Vec::new();
    for _ in 0..256 {
        wire::encode(&mut batch, 1, &one);
    }
    let (mut sent, mut accepted, mut rate_limited) = (0u64, 0u64, 0u64);
    let mut ended = "deadline".to_string();
    let mut scratch = Vec::new();
    'flood: while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), c.tcp.write_all(&batch)).await {
            Err(_) => break,
            Ok(Err(_)) => {
                ended = "write failed (closed by the server)".into();
                break;
            }
            Ok(Ok(())) => sent += 256,
        }
        // The probe shares this thread: let it keep its schedule.
        tokio::task::yield_now().await;
        // Whatever came back, without waiting for more.
        let mut close = None;
        let open = c.read_frames(&mut scratch, |f| {
            match f.opcode {
                8 => {
                    close = Some(
                        (f.payload.len() >= 2)
                            .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]])),
                    )
                }
                1 if f.payload.starts_with(br#"{"type":"publish_response""#) => accepted += 1,
                1 if f.payload.windows(12).any(|w| w == b"rate_limited") => rate_limited += 1,
                _ => {}
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Some(code) = close {
            ended = format!("close {}", code.map_or("-".into(), |c| c.to_string()));
            break 'flood;
        }
        if !open.unwrap_or(false) {
            ended = "closed by the server".into();
            break;
        }
    }
    Ok(json!({
        "flood_sent": sent,
        "flood_accepted": (d == Dialect::Keel).then_some(accepted),
        "flood_rate_limited_errors": (d == Dialect::Keel).then_some(rate_limited),
        "flood_ended": ended,
    }))
}

/// Publishes 50 messages nested 5,000 arrays deep into room `probe`.
async fn nesting(t: &Target) -> anyhow::Result<Value> {
    let d = t.dialect;
    let mut c = wire::connect(t.addr, t.source(6), &d.path("probe"))
        .await
        .context("nesting: connect")?;
    d.setup(&mut c, "probe", d != Dialect::Keel).await?;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let msg = match d {
        Dialect::Keel => {
            format!(r#"{{"type":"publish","payload":{{"channel":"probe","data":{deep}}}}}"#)
        }
        Dialect::Trivial => deep,
        Dialect::SocketIo => format!(r#"42["msg",{deep}]"#),
    };
    let mut out = Vec::new();
    for _ in 0..50 {
        wire::encode(&mut out, 1, msg.as_bytes());
    }
    c.tcp.write_all(&out).await?;
    // Keel answers each; read the answers for a second.
    let mut refused = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while c.fill().await.unwrap_or(false) {
            while let Some(f) = c.next_frame() {
                if f.opcode == 1 && f.payload.windows(15).any(|w| w == b"invalid_message") {
                    refused += 1;
                }
            }
        }
    })
    .await;
    Ok(json!({"deep_sent": 50, "deep_refused": (d == Dialect::Keel).then_some(refused)}))
}
