//! The `keel` binary as an operator runs it: config sources and their precedence,
//! refused values, JSON logs, and SIGTERM's graceful shutdown ending in exit 0.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Proc {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

fn keel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Starts `keel serve` with `args`/`env` and waits for `listening on ADDR`.
async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = keel();
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    start(cmd).await
}

/// Starts `cmd` (a `keel serve`) and waits for `listening on ADDR`.
async fn start(mut cmd: Command) -> Proc {
    let mut child = cmd.spawn().expect("keel starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stream).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    if let Ok(a) = addr.parse() {
                        let _ = tx.send(a);
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let addr = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no `listening on` line; output: {:?}",
                lines.lock().unwrap()
            )
        })
        .expect("address");
    Proc { child, addr, lines }
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero_with_a_report() {
    let mut p = spawn(
        &[
            "--api-key",
            "k",
            "--drain-timeout",
            "2s",
            "--shutdown-reconnect-window",
            "1s",
        ],
        &[],
    )
    .await;
    let mut polite = Client::connect(p.addr).await;
    // A client that never reads holds the drain open until the deadline.
    let _stubborn = Raw::connect(p.addr).await;
    let (s, _) = http(p.addr, "GET", "/health", None, None).await;
    assert_eq!(s, 200);

    sigterm(&p.child);
    let m = polite.recv().await;
    assert_eq!(m["type"], "server_shutdown");
    assert_eq!(m["payload"]["reconnect"], true);
    assert!(m["payload"]["delay_ms"].as_u64().unwrap() <= 1000);
    assert_eq!(polite.expect_close().await, 1012);
    // Still draining (the stubborn client holds it): not ready, no new upgrades.
    let (s, body) = http(p.addr, "GET", "/health", None, None).await;
    assert_eq!(s, 503, "{body}");
    let refused = Raw::connect_with(p.addr, "")
        .await
        .err()
        .expect("refused while draining");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");

    let status = tokio::time::timeout(WAIT, p.child.wait())
        .await
        .expect("exits after the drain deadline")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Give the output readers a moment to see EOF.
    eventually("report logged", || {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("shutdown report"))
    })
    .await;
    let lines = p.lines.lock().unwrap();
    let report = lines
        .iter()
        .find(|l| l.contains("shutdown report"))
        .unwrap();
    assert!(report.contains("connections_at_start=2"), "{report}");
    assert!(report.contains("force_closed=1"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_stop_startup_naming_the_option() {
    for (env, flag, needle) in [
        (
            Some(("KEEL_HEARTBEAT_INTERVAL", "soon")),
            None,
            "heartbeat_interval",
        ),
        (
            None,
            Some("--slow-consumer-policy=maybe"),
            "slow_consumer_policy",
        ),
        (
            Some(("KEEL_MAX_CONNECTIONS", "-1")),
            None,
            "max_connections",
        ),
        (None, Some("--listen=nowhere"), "listen"),
        (None, Some("--no-such-thing=1"), "no_such_thing"),
    ] {
        let mut cmd = keel();
        cmd.arg("serve").args(["--listen", "127.0.0.1:0"]);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        if let Some(f) = flag {
            cmd.arg(f);
        }
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("exits")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{needle}: started anyway");
        assert!(err.contains(needle), "{needle} not named in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_then_env_then_flags() {
    let dir = common::TempDir::new("proc");
    let file = dir.0.join("keel.toml");
    std::fs::write(
        &file,
        "heartbeat_interval = \"11s\"\nheartbeat_timeout = \"21s\"\napi_key = \"k\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();

    let p = spawn(&["--config", f], &[]).await;
    let c = Client::connect(p.addr).await;
    assert_eq!(c.welcome["payload"]["heartbeat"]["interval_ms"], 11_000);
    assert_eq!(c.welcome["payload"]["heartbeat"]["timeout_ms"], 21_000);
    drop(p);

    let p = spawn(&["--config", f], &[("KEEL_HEARTBEAT_INTERVAL", "12s")]).await;
    let c = Client::connect(p.addr).await;
    assert_eq!(c.welcome["payload"]["heartbeat"]["interval_ms"], 12_000);
    assert_eq!(c.welcome["payload"]["heartbeat"]["timeout_ms"], 21_000);
    drop(p);

    let p = spawn(
        &["--config", f, "--heartbeat-interval", "13s"],
        &[
            ("KEEL_HEARTBEAT_INTERVAL", "12s"),
            ("KEEL_HEARTBEAT_MODE", "json"),
        ],
    )
    .await;
    let c = Client::connect(p.addr).await;
    assert_eq!(c.welcome["payload"]["heartbeat"]["interval_ms"], 13_000);
    assert_eq!(c.welcome["payload"]["heartbeat"]["mode"], "json");
    let (s, _) = http(p.addr, "GET", "/api/stats", Some("k"), None).await;
    assert_eq!(s, 200, "api_key from the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_event_per_connect_and_disconnect_and_no_secrets() {
    let p = spawn(
        &[],
        &[
            ("KEEL_LOG_FORMAT", "json"),
            ("KEEL_API_KEY", "sekret-api-key"),
        ],
    )
    .await;
    let mut c = Client::connect(p.addr).await;
    let id = c.client_id();
    c.request("publish", json!({"channel": "x", "data": 1}))
        .await;
    let (s, _) = http(
        p.addr,
        "POST",
        "/api/disconnect",
        Some("sekret-api-key"),
        Some(json!({"client_id": id, "code": 4100})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(c.expect_close().await, 4100);
    eventually("disconnect logged", || {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"disconnect\""))
    })
    .await;
    let lines = p.lines.lock().unwrap();
    let events: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!events.is_empty(), "{lines:?}");
    let connect: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "connect")
        .collect();
    let disconnect: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "disconnect")
        .collect();
    assert_eq!(connect.len(), 1);
    assert_eq!(disconnect.len(), 1);
    assert_eq!(connect[0]["client_id"], id.as_str());
    assert_eq!(disconnect[0]["client_id"], id.as_str());
    assert_eq!(disconnect[0]["reason"], "server_closed");
    assert_eq!(disconnect[0]["code"], 4100);
    assert!(
        lines.iter().all(|l| !l.contains("sekret-api-key")),
        "the api key leaked into the output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_api_key_is_printed_once_and_works() {
    let p = spawn(&[], &[]).await;
    eventually("key printed", || {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("generated one"))
    })
    .await;
    let key = {
        let lines = p.lines.lock().unwrap();
        let printed: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("generated one"))
            .collect();
        assert_eq!(printed.len(), 1);
        printed[0].rsplit(' ').next().unwrap().to_string()
    };
    let (s, _) = http(p.addr, "GET", "/api/stats", Some(&key), None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_warns_loudly_when_auth_is_not_configured() {
    let warned = |p: &Proc| {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("AUTH IS NOT CONFIGURED"))
    };
    let open = spawn(&[], &[("KEEL_API_KEY", "k")]).await;
    eventually("the warning", || warned(&open)).await;
    // Configured: no warning (the line after it, "listening on", has come).
    let closed = spawn(
        &[],
        &[
            ("KEEL_API_KEY", "k"),
            ("KEEL_AUTH_JWT_SECRET", "a-configured-secret-0123"),
        ],
    )
    .await;
    let (s, _) = http(closed.addr, "GET", "/health/live", None, None).await;
    assert_eq!(s, 200);
    assert!(!warned(&closed), "{:?}", closed.lines.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tickets_never_reach_the_logs_at_any_level() {
    let secret = "log-test-jwt-secret-0123456789";
    let p = spawn(
        &[],
        &[
            ("KEEL_LOG_LEVEL", "trace"),
            ("KEEL_LOG_FORMAT", "json"),
            ("KEEL_API_KEY", "log-test-api-key"),
            ("KEEL_AUTH_JWT_SECRET", secret),
            ("KEEL_AUTH_ALLOW_ANONYMOUS", "false"),
        ],
    )
    .await;
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "logged-user", "exp": exp}),
        &key,
    )
    .unwrap();
    let refreshed = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "logged-user", "exp": exp + 1}),
        &key,
    )
    .unwrap();
    let (_, body) = http(
        p.addr,
        "POST",
        "/api/ticket",
        Some("log-test-api-key"),
        Some(json!({"client_id": "ticket-user"})),
    )
    .await;
    let ticket = serde_json::from_str::<Value>(&body).unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let mut a = Client::connect_url(&format!("ws://{}/ws?token={token}", p.addr)).await;
    let r = a.request("refresh", json!({"token": refreshed})).await;
    assert_eq!(r["type"], "refresh_response", "{r}");
    let mut b = Client::connect_url(&format!("ws://{}/ws?ticket={ticket}", p.addr)).await;
    let reconnect = b.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();
    // Refused credentials are not logged either.
    assert!(Raw::connect_to(p.addr, &format!("/ws?ticket={ticket}"), "")
        .await
        .is_err());
    let forged = format!("{token}x");
    assert!(Raw::connect_to(p.addr, &format!("/ws?token={forged}"), "")
        .await
        .is_err());
    let r = b
        .request(
            "resume",
            json!({"reconnect_token": reconnect, "positions": {}}),
        )
        .await;
    assert_eq!(r["type"], "error");
    drop(a);
    drop(b);
    eventually("both disconnects logged", || {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"disconnect\""))
            .count()
            >= 2
    })
    .await;
    let lines = p.lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"level\":\"DEBUG\"") || l.contains("\"level\":\"TRACE\"")),
        "verbose levels are on: {lines:?}"
    );
    // JWT signatures and tickets are long random strings: any of them in a
    // line means a credential leaked.
    let signature = |t: &str| t.rsplit('.').next().unwrap().to_string();
    for secret_part in [
        signature(&token),
        signature(&refreshed),
        ticket.clone(),
        signature(&reconnect),
        secret.to_string(),
        "log-test-api-key".to_string(),
    ] {
        assert!(
            lines.iter().all(|l| !l.contains(&secret_part)),
            "a credential leaked into the logs"
        );
    }
}

/// CPU time (user + system) of process `pid`, from `/proc/PID/stat`, in clock
/// ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start after its ')'.
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_it_logs_once_counts_backs_off_and_serves_again() {
    // 64 descriptors: a few for the runtime and the listener, the rest for sockets.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" serve --listen 127.0.0.1:0 --api-key k",
        env!("CARGO_BIN_EXE_keel"),
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    // Long enough that the held sockets stay for the whole test; no cap, so that
    // they reach the descriptor limit.
    .env("KEEL_HANDSHAKE_TIMEOUT", "60s")
    .env("KEEL_MAX_PENDING_CONNECTIONS", "0")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let p = start(cmd).await;
    let pid = p.child.id().unwrap();

    // Hold more sockets than the process has descriptors: the kernel completes
    // the connections (the backlog), the gateway cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tokio::net::TcpStream::connect(p.addr).await.unwrap());
    }
    eventually("the failed accept is logged", || {
        p.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("accept failed"))
    })
    .await;
    // Out of descriptors, it waits instead of spinning on accept: over a second
    // (100 ticks) it spends a small part of one.
    let before = cpu_ticks(pid);
    let t0 = std::time::Instant::now();
    // One more connection waiting meanwhile: accept keeps failing on it.
    let probe = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let ticks_per_s = 100.0 * t0.elapsed().as_secs_f64();
    let spent = cpu_ticks(pid) - before;
    assert!(
        (spent as f64) < 0.2 * ticks_per_s,
        "{spent} ticks of CPU in {ticks_per_s:.0} while out of descriptors"
    );
    let logged = p
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert_eq!(logged, 1, "one line for many failed accepts");

    // Descriptors free up: it serves again, with no restart.
    drop(held);
    drop(probe);
    let (s, body) = tokio::time::timeout(WAIT, async {
        loop {
            let (s, body) = http(p.addr, "GET", "/metrics", None, None).await;
            if s == 200 {
                return (s, body);
            }
        }
    })
    .await
    .expect("served again once descriptors are free");
    assert_eq!(s, 200);
    let errors: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("keel_accept_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no keel_accept_errors_total in {body}"));
    assert!(errors >= 1, "{body}");
    let mut c = Client::connect(p.addr).await;
    let r = c.subscribe("after").await;
    assert_eq!(r["type"], "subscribe_response", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_config_prints_settings_that_match_the_options_and_refuses_an_unknown_target() {
    let out = keel()
        .args([
            "lb-config",
            "--target",
            "alb",
            "--heartbeat-interval",
            "20s",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // 20 s + the default 25 s heartbeat timeout + 10 s of margin.
    assert!(text.contains("idle_timeout.timeout_seconds = 55"), "{text}");
    let out = keel()
        .args(["lb-config", "--target", "traefik"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--target") && err.contains("traefik"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_after_its_node_was_killed_with_sigkill() {
    let redis = keel_testkit::redis::RedisServer::start();
    let url = redis.url();
    let env = [
        ("KEEL_BROKER", "redis"),
        ("KEEL_REDIS_URL", url.as_str()),
        ("KEEL_RECONNECT_SECRET", "a-cluster-secret-of-32-bytes-long"),
    ];
    let mut one = spawn(&["--api-key", "k", "--node-id", "one"], &env).await;
    let two = spawn(&["--api-key", "k", "--node-id", "two"], &env).await;
    let mut a = Client::connect(one.addr).await;
    let id = a.client_id();
    let tok = a.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();
    let sub = a.subscribe("k9").await;
    let epoch = sub["payload"]["epoch"].as_str().unwrap().to_string();
    // Node one dies without a word: it writes nothing on its way out.
    one.child.start_kill().unwrap();
    one.child.wait().await.unwrap();
    drop(a);
    for n in 1..=3 {
        let (s, body) = http(
            two.addr,
            "POST",
            "/api/publish",
            Some("k"),
            Some(json!({"channel": "k9", "data": {"n": n}})),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let mut b = Client::connect(two.addr).await;
    b.send(json!({"type": "resume", "request_id": "r", "payload": {
        "reconnect_token": tok, "positions": {"k9": {"offset": 0, "epoch": epoch}}}}))
        .await;
    for n in 1..=3u64 {
        let m = b.recv().await;
        assert_eq!(m["payload"]["offset"], n, "{m}");
    }
    let r = b.recv().await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["client_id"], id.as_str());
    assert_eq!(r["payload"]["recovered"], json!({"k9": true}));
    // The token is spent, on every node.
    let mut c = Client::connect(two.addr).await;
    let again = c
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(again["type"], "error", "{again}");
    assert_eq!(again["payload"]["code"], "invalid_token");
}
