//! `keel lb-config`: the load balancer's settings that match this gateway's, so
//! operators stop guessing. The idle timeout must outlast a heartbeat round
//! (interval + timeout, plus a margin), and a node's termination grace must
//! outlast its drain. It prints text for nginx, HAProxy, AWS ALB and
//! Kubernetes, computed from the settings; it reads and changes nothing else.
//!
//! No stickiness anywhere: any node resumes any session (with `broker =
//! "redis"`), so a client that reconnects may land on any node.

use std::fmt::Write;
use std::time::Duration;

use crate::settings::Settings;

/// What to print for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// nginx: an `upstream` and a `server` for `conf.d/`.
    Nginx,
    /// HAProxy: a `backend` and its timeouts.
    Haproxy,
    /// AWS Application Load Balancer: its attributes.
    Alb,
    /// Kubernetes: the Deployment's and Ingress's fields that depend on Keel's.
    K8s,
}

impl Target {
    /// Parses `nginx`, `haproxy`, `alb` or `k8s`.
    pub fn parse(s: &str) -> Result<Target, String> {
        Ok(match s {
            "nginx" => Target::Nginx,
            "haproxy" => Target::Haproxy,
            "alb" => Target::Alb,
            "k8s" => Target::K8s,
            _ => return Err(format!("`{s}` is not one of nginx, haproxy, alb, k8s")),
        })
    }
}

/// Margin on top of what Keel itself waits for.
const MARGIN: Duration = Duration::from_secs(10);

/// The timings the balancer must respect, from the gateway's settings.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// A connection may be silent this long before Keel closes it: the
    /// balancer's idle timeout must be longer.
    pub idle: Duration,
    /// How long a node needs from SIGTERM to exit: drain plus margin.
    pub grace: Duration,
}

impl Timings {
    /// From the settings.
    pub fn of(s: &Settings) -> Timings {
        Timings {
            idle: s.keel.heartbeat_interval + s.keel.heartbeat_timeout + MARGIN,
            grace: s.drain_timeout + s.keel.shutdown_reconnect_window + MARGIN,
        }
    }
}

/// The text for `target`, with `upstreams` (host:port of each node) and the
/// balancer listening on `listen` (nginx and HAProxy).
pub fn render(target: Target, s: &Settings, upstreams: &[String], listen: &str) -> String {
    let t = Timings::of(s);
    let (idle, grace) = (t.idle.as_secs(), t.grace.as_secs());
    let hb = (
        s.keel.heartbeat_interval.as_secs(),
        s.keel.heartbeat_timeout.as_secs(),
    );
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# keel lb-config --target {}: heartbeat {}s + {}s, drain {}s, reconnect window {}s.",
        match target {
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
            Target::Alb => "alb",
            Target::K8s => "k8s",
        },
        hb.0,
        hb.1,
        s.drain_timeout.as_secs(),
        s.keel.shutdown_reconnect_window.as_secs(),
    );
    let _ = writeln!(
        o,
        "# Idle timeout {idle}s (above a heartbeat round); no stickiness: any node resumes any session."
    );
    match target {
        Target::Nginx => {
            let _ = writeln!(o, "upstream keel {{");
            for u in upstreams {
                // A node that refuses (draining: 503) or is down is skipped for a while.
                let _ = writeln!(o, "    server {u} max_fails=1 fail_timeout=5s;");
            }
            let _ = writeln!(o, "    keepalive 16;\n}}\n");
            let _ = writeln!(
                o,
                "map $http_upgrade $keel_connection {{\n    default upgrade;\n    ''      \"\";\n}}\n"
            );
            let _ = writeln!(o, "server {{\n    listen {listen};");
            for line in [
                "location / {",
                "    proxy_pass http://keel;",
                "    proxy_http_version 1.1;",
                "    proxy_set_header Upgrade $http_upgrade;",
                "    proxy_set_header Connection $keel_connection;",
                "    proxy_set_header Host $host;",
                "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                "    proxy_buffering off;",
                "    # A refused upgrade (a draining node answers 503) goes to the next node.",
                "    proxy_next_upstream error timeout http_502 http_503;",
                "    proxy_next_upstream_tries 3;",
                "    proxy_connect_timeout 5s;",
            ] {
                let _ = writeln!(o, "    {line}");
            }
            let _ = writeln!(o, "        proxy_read_timeout {idle}s;");
            let _ = writeln!(o, "        proxy_send_timeout {idle}s;");
            let _ = writeln!(
                o,
                "    }}\n    location = /health {{\n        proxy_pass http://keel;\n    }}\n}}"
            );
        }
        Target::Haproxy => {
            let _ = writeln!(
                o,
                "frontend keel\n    bind {listen}\n    mode http\n    timeout client {idle}s\n    default_backend keel_nodes\n"
            );
            let _ = writeln!(
                o,
                "backend keel_nodes\n    mode http\n    balance leastconn\n    option httpchk GET /health\n    timeout server {idle}s\n    timeout tunnel {idle}s\n    retry-on conn-failure 503"
            );
            for (i, u) in upstreams.iter().enumerate() {
                let _ = writeln!(o, "    server node{} {u} check", i + 1);
            }
        }
        Target::Alb => {
            let _ = writeln!(
                o,
                "idle_timeout.timeout_seconds = {idle}\nderegistration_delay.timeout_seconds = {grace}\nhealth_check.path = /health\nstickiness.enabled = false"
            );
        }
        Target::K8s => {
            let _ = writeln!(
                o,
                "# Deployment (pod spec)\nterminationGracePeriodSeconds: {grace}\n# preStop: curl -fsS -X POST -H \"Authorization: Bearer $KEEL_API_KEY\" http://127.0.0.1:8000/admin/drain\n# Ingress (nginx-ingress) annotations\nnginx.ingress.kubernetes.io/proxy-read-timeout: \"{idle}\"\nnginx.ingress.kubernetes.io/proxy-send-timeout: \"{idle}\"\n# Ingress (AWS Load Balancer Controller) annotations\nalb.ingress.kubernetes.io/load-balancer-attributes: idle_timeout.timeout_seconds={idle}"
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_the_heartbeat_and_the_drain() {
        let mut s = Settings::default();
        s.set("heartbeat_interval", "20s").expect("valid");
        s.set("heartbeat_timeout", "10s").expect("valid");
        s.set("drain_timeout", "45s").expect("valid");
        let t = Timings::of(&s);
        assert_eq!(t.idle, Duration::from_secs(40));
        assert_eq!(t.grace, Duration::from_secs(60));
        let nginx = render(Target::Nginx, &s, &["a:1".into(), "b:2".into()], "8080");
        assert!(nginx.contains("proxy_read_timeout 40s;"), "{nginx}");
        assert!(nginx.contains("server a:1 ") && nginx.contains("server b:2 "));
        assert!(!nginx.contains("ip_hash"));
        let alb = render(Target::Alb, &s, &[], "");
        assert!(alb.contains("idle_timeout.timeout_seconds = 40"), "{alb}");
        assert!(
            alb.contains("deregistration_delay.timeout_seconds = 60"),
            "{alb}"
        );
        let k8s = render(Target::K8s, &s, &[], "");
        assert!(k8s.contains("terminationGracePeriodSeconds: 60"), "{k8s}");
    }
}
