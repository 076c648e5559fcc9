//! `keel-bench`: load and chaos scenarios against Keel or a peer server.
//!
//! ```text
//! keel-bench idle   --addr 127.0.0.1:8000 --protocol keel --pid PID --conns 10000 --hold 60s
//! keel-bench fanout --addr ... --subs 10000 --rate 100 --size 100 --duration 20s
//! keel-bench slow   --addr ... --subs 1000 --rate 100 --slow-fraction 0.1
//! keel-bench rooms  --addr ... --rooms 100 --per-room 10 --rate 1
//! keel-bench churn  --addr ... --rate 2000 --total 100000
//! keel-bench resume --addr ... --cuts 1000
//! keel-bench abuse  --addr ... --phase 15s --spray-conns 20 --spray-size 60000 --slow 2000
//! ```
//!
//! Each run prints one JSON object (and appends it to `--json FILE`, tagged with
//! `--label`). The server's CPU and RSS come from `/proc/<pid>`: pass `--pid`. The
//! runner script `bench/run.sh` pins the server and this tool to different cores
//! and runs every scenario against every server. This tool only generates load and
//! measures; it never starts or stops a server.

mod abuse;
mod dialect;
mod resume;
mod scenarios;
mod stats;
mod wire;

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};

const USAGE: &str = "usage: keel-bench <idle|fanout|slow|rooms|churn|resume|abuse> --addr HOST:PORT [--protocol keel|trivial|socketio] [--pid PID] [options]
  common:  --sources N (spread over 127.0.0.2..; default 64)  --ramp-rate N/s (default 5000)  --json FILE  --label NAME
  idle:    --conns N (1000)  --hold DURATION (30s)
  fanout:  --subs N (1000)  --rate MSG/S (100)  --size BYTES (100)  --duration D (10s)
  slow:    as fanout, plus --slow-fraction F (0.1)
  rooms:   --rooms R (100)  --per-room K (10)  --rate MSG/S per member (1)  --duration D (10s)
  churn:   --rate CYCLES/S (2000)  --total N (100000); the storm runs twice (a leak grows both times)
  resume:  --cuts N (1000): reset a subscriber, reconnect, resume; time to resume_response (keel only)
  abuse:   --phase D (15s)  --spray-conns N (20)  --spray-size BYTES (60000)  --slow N (2000): a hostile client's
           phases (spray, slowloris, flood, nesting) between a before and an after, a well-behaved probe throughout";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(scenario) = args.next() else {
        bail!("{USAGE}");
    };
    let help = |a: &str| a == "--help" || a == "-h";
    if help(&scenario) || std::env::args().skip(2).any(|a| help(&a)) {
        println!("{USAGE}");
        return Ok(());
    }
    let mut opts: HashMap<String, String> = HashMap::new();
    while let Some(a) = args.next() {
        let Some(name) = a.strip_prefix("--") else {
            bail!("unexpected argument `{a}`\n{USAGE}");
        };
        let (k, v) = match name.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (
                name.to_string(),
                args.next()
                    .with_context(|| format!("--{name} needs a value"))?,
            ),
        };
        opts.insert(k, v);
    }
    let get = |k: &str, d: &str| opts.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: &str| -> anyhow::Result<f64> {
        get(k, d)
            .parse::<f64>()
            .with_context(|| format!("--{k} must be a number"))
    };
    let dur = |k: &str, d: &str| -> anyhow::Result<Duration> {
        let v = get(k, d);
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n
            .parse()
            .with_context(|| format!("--{k}: `{v}` is not a duration like 10s"))?;
        Ok(Duration::from_secs_f64(match unit {
            "ms" => n / 1000.0,
            "s" | "" => n,
            "m" => n * 60.0,
            _ => bail!("--{k}: unknown unit in `{v}`"),
        }))
    };

    let target = scenarios::Target {
        addr: get("addr", "127.0.0.1:8000")
            .parse()
            .context("--addr must be HOST:PORT")?,
        dialect: dialect::Dialect::parse(&get("protocol", "keel"))?,
        pid: opts
            .get("pid")
            .map(|p| p.parse())
            .transpose()
            .context("--pid")?,
        sources: scenarios::loopback_sources(num("sources", "64")? as usize),
        ramp_rate: num("ramp-rate", "5000")? as u32,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The readers share a read buffer and a histogram (`scenarios::Shared`), so
    // they run as local tasks of this one thread.
    let report = tokio::task::LocalSet::new().block_on(&runtime, async {
        match scenario.as_str() {
            "idle" => {
                scenarios::idle(&target, num("conns", "1000")? as usize, dur("hold", "30s")?).await
            }
            "fanout" | "slow" => {
                let frac = if scenario == "slow" {
                    num("slow-fraction", "0.1")?
                } else {
                    0.0
                };
                scenarios::fanout(
                    &target,
                    num("subs", "1000")? as usize,
                    num("rate", "100")? as u32,
                    num("size", "100")? as usize,
                    dur("duration", "10s")?,
                    frac,
                )
                .await
            }
            "rooms" => {
                scenarios::rooms(
                    &target,
                    num("rooms", "100")? as usize,
                    num("per-room", "10")? as usize,
                    num("rate", "1")? as u32,
                    dur("duration", "10s")?,
                    num("size", "100")? as usize,
                )
                .await
            }
            "churn" => {
                scenarios::churn(
                    &target,
                    num("rate", "2000")? as u32,
                    num("total", "100000")? as usize,
                )
                .await
            }
            "resume" => resume::resume(&target, num("cuts", "1000")? as usize).await,
            "abuse" => {
                abuse::abuse(
                    &target,
                    &abuse::Abuse {
                        phase: dur("phase", "15s")?,
                        spray_conns: num("spray-conns", "20")? as usize,
                        spray_size: num("spray-size", "60000")? as usize,
                        slow: num("slow", "2000")? as usize,
                    },
                )
                .await
            }
            other => bail!("unknown scenario `{other}`\n{USAGE}"),
        }
    })?;
    let mut report = report;
    if let Some(label) = opts.get("label") {
        report["label"] = serde_json::Value::String(label.clone());
    }
    report["protocol"] = serde_json::Value::String(get("protocol", "keel"));
    let line = serde_json::to_string(&report)?;
    println!("{line}");
    if let Some(path) = opts.get("json") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
