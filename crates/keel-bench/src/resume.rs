//! The `resume` scenario: how long a dropped Keel client takes to get its session
//! back. One subscriber's socket is reset (no close handshake) `cuts` times; while
//! it is away a publisher adds one message; the subscriber reconnects, sends
//! `resume` with its token and last offset, and must get exactly the missed
//! message replayed before `resume_response`. The figure is the time from the
//! new TCP connect to `resume_response` (connect, upgrade, `welcome`, resume,
//! replay), on loopback, without any client backoff.
//!
//! Keel's protocol only; every loop is bounded by `cuts`.

use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::dialect::{self, Dialect};
use crate::scenarios::Target;
use crate::stats::Histogram;
use crate::wire::{self, Conn};

const CHANNEL: &str = "resume";

async fn next_json(conn: &mut Conn, kind: &str) -> anyhow::Result<Value> {
    let want = format!(r#"{{"type":"{kind}""#);
    let t = dialect::next_text(conn, Dialect::Keel, |t| t.starts_with(want.as_bytes()))
        .await
        .with_context(|| format!("waiting for {kind}"))?;
    Ok(serde_json::from_slice(&t)?)
}

/// Runs the scenario; see the module documentation.
pub(crate) async fn resume(t: &Target, cuts: usize) -> anyhow::Result<Value> {
    if t.dialect != Dialect::Keel {
        bail!("the resume scenario needs --protocol keel");
    }
    let path = t.dialect.path(CHANNEL);
    let mut publisher = wire::connect(t.addr, t.source(1), &path).await?;
    next_json(&mut publisher, "welcome").await?;
    let mut sub = wire::connect(t.addr, t.source(0), &path).await?;
    let welcome = next_json(&mut sub, "welcome").await?;
    let mut token = welcome["payload"]["reconnect_token"]
        .as_str()
        .context("welcome has no reconnect_token: is enable_reconnect on?")?
        .to_string();
    sub.send_text(
        json!({"type": "subscribe", "payload": {"channel": CHANNEL}})
            .to_string()
            .as_bytes(),
    )
    .await?;
    let r = next_json(&mut sub, "subscribe_response").await?;
    let mut offset = r["payload"]["offset"].as_u64().unwrap_or(0);
    let epoch = r["payload"]["epoch"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let mut hist = Histogram::default();
    let (mut unrecovered, mut wrong) = (0usize, 0usize);
    let started = Instant::now();
    for i in 0..cuts {
        // An abrupt cut: RST, no Close frame.
        sub.tcp.set_zero_linger()?;
        drop(sub);
        let publish = json!({"type": "publish", "payload": {"channel": CHANNEL, "data": {"i": i}}});
        publisher.send_text(publish.to_string().as_bytes()).await?;
        next_json(&mut publisher, "publish_response").await?;

        let t0 = Instant::now();
        sub = wire::connect(t.addr, t.source(i), &path).await?;
        next_json(&mut sub, "welcome").await?;
        let resume = json!({"type": "resume", "payload": {
            "reconnect_token": token,
            "positions": {CHANNEL: {"offset": offset, "epoch": epoch}},
        }});
        sub.send_text(resume.to_string().as_bytes()).await?;
        let mut replayed = Vec::new();
        let reply = loop {
            let text = dialect::next_text(&mut sub, Dialect::Keel, |_| true).await?;
            let v: Value = serde_json::from_slice(&text)?;
            match v["type"].as_str() {
                Some("message") => replayed.push(v["payload"]["offset"].as_u64().unwrap_or(0)),
                Some("resume_response") => break v,
                Some("error") => bail!("resume refused at cut {i}: {v}"),
                _ => {}
            }
        };
        hist.record(t0.elapsed().as_nanos() as u64);
        if reply["payload"]["recovered"][CHANNEL] != true {
            unrecovered += 1;
        }
        if replayed != [offset + 1] {
            wrong += 1;
        }
        offset = replayed.last().copied().unwrap_or(offset);
        token = reply["payload"]["reconnect_token"]
            .as_str()
            .context("resume_response without a successor token")?
            .to_string();
    }
    Ok(json!({
        "scenario": "resume", "cuts": cuts, "wall_s": started.elapsed().as_secs_f64(),
        "resume_p50_us": hist.quantile_us(0.5), "resume_p99_us": hist.quantile_us(0.99),
        "resume_p999_us": hist.quantile_us(0.999), "resume_max_us": hist.max_us(),
        "unrecovered": unrecovered, "wrong_replays": wrong,
    }))
}
