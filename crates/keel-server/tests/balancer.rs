//! Two nodes on one Redis behind a real nginx, configured with what `keel
//! lb-config --target nginx` prints, with no stickiness: a client whose node
//! drains reconnects through nginx, lands on the other node, and resumes with
//! everything published meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::*;
use keel_testkit::redis::RedisServer;
use serde_json::json;

/// An nginx this test started, stopped by its PID when dropped.
struct Nginx {
    child: Child,
    _dir: TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// Starts nginx with `site` (the `http`-level text lb-config prints) on `port`.
async fn nginx(site: &str, port: u16) -> Nginx {
    let dir = TempDir::new("nginx");
    let d = dir.0.display();
    std::fs::write(dir.0.join("keel.conf"), site).unwrap();
    std::fs::write(
        dir.0.join("nginx.conf"),
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             include {d}/keel.conf;\n}}\n"
        ),
    )
    .unwrap();
    let child = Command::new(nginx_binary())
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .args(["-g", "daemon off; master_process off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx starts (apt-get install nginx-light)");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "nginx did not listen");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Nginx { child, _dir: dir }
}

fn node(redis: &RedisServer, name: &str) -> keel_server::settings::Settings {
    let mut s = config();
    s.set("broker", "redis").unwrap();
    s.set("redis_url", &redis.url()).unwrap();
    s.set("reconnect_secret", "a-cluster-secret-of-32-bytes-long")
        .unwrap();
    s.set("node_id", name).unwrap();
    s.set("drain_timeout", "2s").unwrap();
    s.set("shutdown_reconnect_window", "0s").unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_draining_node_resumes_on_the_other_through_nginx() {
    let redis = RedisServer::start();
    let n1 = gateway(node(&redis, "one")).await;
    let n2 = gateway(node(&redis, "two")).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site = keel_server::lb::render(
        keel_server::lb::Target::Nginx,
        &node(&redis, "any"),
        &[n1.addr.to_string(), n2.addr.to_string()],
        &format!("127.0.0.1:{port}"),
    );
    let _nginx = nginx(&site, port).await;
    let lb = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    let mut a = Client::connect(lb).await;
    let first = a.welcome["payload"]["node"].as_str().unwrap().to_string();
    let tok = a.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();
    let sub = a.subscribe("lb").await;
    let epoch = sub["payload"]["epoch"].as_str().unwrap().to_string();
    let (gone, stays) = if first == "one" { (n1, n2) } else { (n2, n1) };

    // Its node drains: the client is told, and closed with 1012.
    let draining = tokio::spawn(async move { gone.shutdown().await });
    let m = a.recv().await;
    assert_eq!(m["type"], "server_shutdown", "{m}");
    assert_eq!(a.expect_close().await, 1012);
    // Meanwhile the other node publishes.
    for n in 1..=3 {
        let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
        stays.hub.publish("lb", &raw, None).await.unwrap();
    }
    // Reconnecting through nginx lands on the node that stays (the draining
    // one refuses, or is gone), and the session comes back with what it missed.
    let mut b = Client::connect(lb).await;
    assert_ne!(
        b.welcome["payload"]["node"],
        first.as_str(),
        "{}",
        b.welcome
    );
    b.send(json!({"type": "resume", "request_id": "r", "payload": {
        "reconnect_token": tok, "positions": {"lb": {"offset": 0, "epoch": epoch}}}}))
        .await;
    for n in 1..=3u64 {
        let m = b.recv().await;
        assert_eq!(m["payload"]["offset"], n, "{m}");
    }
    let r = b.recv().await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["recovered"], json!({"lb": true}));
    draining.await.unwrap();
    stays.shutdown().await;
}
