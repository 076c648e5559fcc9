//! The gateway's [`Settings`]: its own options (listen address, TLS, API key,
//! logs, broker) beside the library's [`Config`], each declared once; and where
//! they come from: a TOML file (`--config` or `KEEL_CONFIG`), then `KEEL_*`
//! environment variables, then command-line flags, each overriding the one
//! before.
//!
//! All three go through [`Settings::set`], so an option is parsed and refused the
//! same way from any source, and the error names the option. This module only
//! reads text; it does not start anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use keel::config::{parse, Config, ConfigError, OptionInfo};

/// Log output format of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Which broker carries publications, history and presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// In-process, one node (the default).
    Memory,
    /// Redis, for clusters.
    Redis,
}

fn socket_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("`{v}` is not an address like 127.0.0.1:8000"))
}

fn ws_path(v: &str) -> Result<String, String> {
    if !v.starts_with('/') {
        return Err(format!("`{v}` must start with `/`"));
    }
    Ok(v.into())
}

fn log_level(v: &str) -> Result<String, String> {
    if v.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(v.to_ascii_lowercase())
}

fn log_format(v: &str) -> Result<LogFormat, String> {
    parse::one_of(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
}

fn origins(v: &str) -> Result<Vec<String>, String> {
    Ok(parse::list(v)?
        .iter()
        .map(|s| s.trim_end_matches('/').to_ascii_lowercase())
        .collect())
}

fn cookie_name(v: &str) -> Result<String, String> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("`{v}` is not a cookie name"));
    }
    Ok(v.into())
}

fn broker_kind(v: &str) -> Result<BrokerKind, String> {
    parse::one_of(
        v,
        &[("memory", BrokerKind::Memory), ("redis", BrokerKind::Redis)],
    )
}

fn redis_url(v: &str) -> Result<String, String> {
    if !(v.starts_with("redis://") || v.starts_with("rediss://")) {
        return Err(format!("`{v}` is not a redis:// URL"));
    }
    Ok(v.into())
}

keel::declare_options! {
    /// Every option of the gateway: its own, and the library's in `keel`.
    #[derive(Debug, Clone, PartialEq)]
    #[non_exhaustive]
    pub struct Settings {
        options {
            /// Address the gateway listens on; port 0 picks a free one (logged as `listening on ADDR`).
            listen: SocketAddr = "127.0.0.1:8000", socket_addr;
            /// Path of the WebSocket endpoint.
            ws_path: String = "/ws", ws_path;
            /// This node's name in `welcome` and `/api/stats`; empty means `keel-<random>`.
            node_id: String = "", parse::text;
            /// Bearer key for `/api/*` and `/admin/*`; empty means one is generated at start and printed once.
            api_key: Option<String> = "", parse::optional_text;
            /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing env-filter string.
            log_level: String = "info", log_level;
            /// `text` or `json`.
            log_format: LogFormat = "text", log_format;
            /// Whether `/metrics` is served.
            enable_metrics: bool = "true", parse::boolean;
            /// Comma-separated origins allowed to connect (`https://*.example.com` matches subdomains); empty allows same-origin and no Origin.
            allowed_origins: Vec<String> = "", origins;
            /// `[auth] allow_anonymous`: clients without credentials connect with a generated client_id; false answers them 401 (unless `first_message`).
            auth_allow_anonymous: bool = "true", parse::boolean;
            /// `[auth] cookie_name`: cookie whose value is checked like a `?token=` JWT.
            auth_cookie_name: String = "keel_token", cookie_name;
            /// `[auth] ticket_ttl`: lifetime of a one-time ticket from `POST /api/ticket`.
            auth_ticket_ttl: Duration = "30s", parse::positive_duration;
            /// PEM certificate chain: the gateway serves `wss://` and `https://` itself (with `tls_key`). Empty: plain TCP (TLS at a proxy).
            tls_cert: Option<PathBuf> = "", parse::optional_path;
            /// PEM private key of `tls_cert`.
            tls_key: Option<PathBuf> = "", parse::optional_path;
            /// `memory` (one node) or `redis` (nodes sharing streams, presence, tickets and sessions through `redis_url`).
            broker: BrokerKind = "memory", broker_kind;
            /// Redis URL for `broker = "redis"`.
            redis_url: String = "redis://127.0.0.1:6379", redis_url;
            /// How long a graceful shutdown waits before force-closing.
            drain_timeout: Duration = "30s", parse::positive_duration;
            /// Gateway runtime threads; 0 is one per core the process may use (taskset, cgroup), and one means tokio's current-thread scheduler.
            worker_threads: usize = "0", parse::count;
        }
        extra {
            /// The library's options.
            keel: Config = Config::default();
        }
    }
}

impl Settings {
    /// Sets option `name` (the gateway's or the library's) from its text form.
    /// Unknown names and bad values are refused, naming the option.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        match self.set_declared(name, value) {
            Some(done) => done,
            None => self.keel.set(name, value),
        }
    }

    /// Every option, the gateway's first: what `keel options` prints and the
    /// docs table is made from.
    pub fn options() -> impl Iterator<Item = &'static OptionInfo> {
        Settings::OPTIONS.iter().chain(Config::OPTIONS.iter())
    }

    /// Checks relations between options that no single value can break alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError {
                option: "tls_cert".into(),
                message: "tls_cert and tls_key go together".into(),
            });
        }
        self.keel.validate()
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Print the options with their defaults and environment names.
    Options,
    /// Print usage.
    Help,
    /// Print the version.
    Version,
    /// Print load-balancer settings that match these (`keel lb-config`).
    LbConfig {
        /// For which balancer.
        target: crate::lb::Target,
        /// The nodes, host:port each.
        upstreams: Vec<String>,
        /// Where the balancer listens.
        listen: String,
    },
}

/// The usage text.
pub const USAGE: &str = "\
keel: WebSocket gateway

USAGE:
    keel serve [--config FILE] [--OPTION VALUE]...
    keel options        list every option, its default and its KEEL_* variable
    keel lb-config --target nginx|haproxy|alb|k8s [--upstream HOST:PORT]... [--lb-listen ADDR]
                        print the balancer's settings matching these options
    keel --version

Every option can be set in the TOML file, as KEEL_<OPTION> in the environment, or as
--<option> (dashes or underscores) on the command line; later sources win.
Example: keel serve --listen 0.0.0.0:8000 --heartbeat-interval 20s";

/// The result of [`load`].
#[derive(Debug)]
pub struct Loaded {
    /// What to do.
    pub command: Command,
    /// The settings.
    pub settings: Settings,
    /// Things worth telling the operator that did not stop start-up (unknown
    /// `KEEL_*` variables, which may be typos).
    pub warnings: Vec<String>,
}

/// Builds the config from `args` (without the program name) and `env`.
pub fn load(
    args: &[String],
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Loaded> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut command = None;
    let mut config_file: Option<PathBuf> = env
        .iter()
        .find(|(k, _)| k == "KEEL_CONFIG")
        .map(|(_, v)| PathBuf::from(v));
    let mut flags: Vec<(String, String)> = Vec::new();
    let (mut lb_target, mut upstreams, mut lb_listen) = (None, Vec::new(), "80".to_string());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "serve" if command.is_none() => command = Some(Command::Serve),
            "options" if command.is_none() => command = Some(Command::Options),
            "lb-config" if command.is_none() => {
                command = Some(Command::LbConfig {
                    target: crate::lb::Target::Nginx,
                    upstreams: Vec::new(),
                    listen: String::new(),
                })
            }
            "-h" | "--help" | "help" => return Ok(Loaded::bare(Command::Help)),
            "-V" | "--version" => return Ok(Loaded::bare(Command::Version)),
            flag if flag.starts_with("--") => {
                let body = &flag[2..];
                let (name, value) = match body.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => {
                        let v = it
                            .next()
                            .with_context(|| format!("flag --{body} needs a value"))?;
                        (body.to_string(), v.clone())
                    }
                };
                let name = name.replace('-', "_");
                if name == "config" {
                    config_file = Some(PathBuf::from(value));
                } else if name == "target" {
                    lb_target = Some(
                        crate::lb::Target::parse(&value)
                            .map_err(|e| anyhow::anyhow!("--target: {e}"))?,
                    );
                } else if name == "upstream" {
                    upstreams.push(value);
                } else if name == "lb_listen" {
                    lb_listen = value;
                } else {
                    flags.push((name, value));
                }
            }
            other => bail!("unexpected argument `{other}`\n\n{USAGE}"),
        }
    }
    let command = match command.unwrap_or(Command::Help) {
        Command::LbConfig { .. } => Command::LbConfig {
            target: lb_target.context("lb-config needs --target nginx|haproxy|alb|k8s")?,
            upstreams: if upstreams.is_empty() {
                vec!["127.0.0.1:8000".to_string()]
            } else {
                upstreams
            },
            listen: lb_listen,
        },
        other => other,
    };

    let mut config = Settings::default();
    if let Some(path) = config_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        for (name, value) in flatten_toml(&text)
            .with_context(|| format!("config file {} is not valid TOML", path.display()))?
        {
            config
                .set(&name, &value)
                .with_context(|| format!("in config file {}", path.display()))?;
        }
    }
    for o in Settings::options() {
        if let Some((_, v)) = env.iter().find(|(k, _)| *k == Config::env_name(o.name)) {
            config
                .set(o.name, v)
                .with_context(|| format!("in environment variable {}", Config::env_name(o.name)))?;
        }
    }
    // The stabilizer's name for heartbeat_mode, accepted from the environment too.
    if let Some((_, v)) = env.iter().find(|(k, _)| k == "KEEL_HEARTBEAT_TYPE") {
        config.set("heartbeat_type", v)?;
    }
    for (name, value) in flags {
        config
            .set(&name, &value)
            .with_context(|| format!("in flag --{}", name.replace('_', "-")))?;
    }
    config.validate()?;
    // Unknown KEEL_* variables are reported, not refused: Kubernetes injects
    // KEEL_SERVICE_HOST, KEEL_PORT_... for a Service named `keel`.
    let warnings = env
        .iter()
        .map(|(k, _)| k)
        .filter(|k| {
            k.starts_with("KEEL_")
                && k.as_str() != "KEEL_CONFIG"
                && k.as_str() != "KEEL_HEARTBEAT_TYPE"
        })
        .filter(|k| !k.contains("_SERVICE_") && !k.starts_with("KEEL_PORT"))
        .filter(|k| !Settings::options().any(|o| Config::env_name(o.name) == **k))
        .map(|k| format!("ignoring unknown environment variable {k}"))
        .collect();
    Ok(Loaded {
        command,
        settings: config,
        warnings,
    })
}

impl Loaded {
    fn bare(command: Command) -> Self {
        Loaded {
            command,
            settings: Settings::default(),
            warnings: Vec::new(),
        }
    }
}

/// Flattens a TOML document into (option, text value) pairs: `key = v` at the top
/// level is `key`; `[section] key = v` is `section_key`; arrays become
/// comma-separated lists.
pub fn flatten_toml(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let table: toml::Table = text.parse()?;
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            // [[namespaces]] name = "chat" ... becomes namespaces.chat.KEY.
            toml::Value::Array(items) if k == "namespaces" => {
                for item in items {
                    let toml::Value::Table(t) = item else {
                        bail!("`namespaces` must be an array of tables ([[namespaces]])");
                    };
                    let Some(toml::Value::String(name)) = t.get("name") else {
                        bail!("every [[namespaces]] entry needs a `name`");
                    };
                    let name = name.clone();
                    out.push((format!("namespaces.{name}"), String::new()));
                    for (k2, v2) in t {
                        if k2 != "name" {
                            let opt = format!("namespaces.{name}.{k2}");
                            out.push((opt.clone(), scalar(&opt, v2)?));
                        }
                    }
                }
            }
            toml::Value::Table(t) => {
                for (k2, v2) in t {
                    out.push((format!("{k}_{k2}"), scalar(&format!("{k}.{k2}"), v2)?));
                }
            }
            v => out.push((k.clone(), scalar(&k, v)?)),
        }
    }
    Ok(out)
}

fn scalar(name: &str, v: toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(a) => a
            .into_iter()
            .map(|x| scalar(name, x))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        _ => bail!("option `{name}` must be a string, number, boolean or list"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("keel-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Removed at the end of the test, also when it fails.
        struct Cleanup<'a>(&'a std::path::Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _cleanup = Cleanup(&dir);
        let file = dir.join("keel.toml");
        std::fs::write(
            &file,
            "heartbeat_interval = \"10s\"\nheartbeat_timeout = \"11s\"\nmax_connections = 5\nallowed_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        let env = vec![
            ("KEEL_HEARTBEAT_TIMEOUT".to_string(), "12s".to_string()),
            ("KEEL_MAX_CONNECTIONS".to_string(), "6".to_string()),
        ];
        let Loaded {
            command: cmd,
            settings: c,
            warnings,
        } = load(
            &args(&[
                "serve",
                "--config",
                file.to_str().unwrap(),
                "--max-connections",
                "7",
            ]),
            env,
        )
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(cmd, Command::Serve);
        assert_eq!(c.keel.heartbeat_interval, Duration::from_secs(10)); // file
        assert_eq!(c.keel.heartbeat_timeout, Duration::from_secs(12)); // env over file
        assert_eq!(c.keel.max_connections, Some(7)); // flag over env
        assert_eq!(c.allowed_origins, vec!["https://a.example"]);
    }

    #[test]
    fn bad_values_name_their_source_and_option() {
        let e = load(
            &args(&["serve"]),
            vec![("KEEL_HEARTBEAT_INTERVAL".into(), "often".into())],
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("KEEL_HEARTBEAT_INTERVAL"), "{msg}");
        assert!(msg.contains("heartbeat_interval"), "{msg}");
        let e = load(&args(&["serve", "--no-such-option=1"]), vec![]).unwrap_err();
        assert!(format!("{e:#}").contains("no_such_option"));
        assert!(load(&args(&["serve", "--listen"]), vec![]).is_err());
    }

    #[test]
    fn unknown_env_vars_warn_but_kubernetes_service_vars_do_not() {
        let env = vec![
            ("KEEL_HEARTBEAT_INTERVL".to_string(), "5s".to_string()),
            ("KEEL_SERVICE_HOST".to_string(), "10.0.0.1".to_string()),
            (
                "KEEL_PORT_8000_TCP".to_string(),
                "tcp://10.0.0.1:8000".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let loaded = load(&args(&["serve"]), env).unwrap();
        assert_eq!(
            loaded.warnings,
            vec!["ignoring unknown environment variable KEEL_HEARTBEAT_INTERVL"]
        );
    }

    #[test]
    fn namespaces_are_an_array_of_tables() {
        let v = flatten_toml(
            "[[namespaces]]\nname = \"chat\"\npublish = true\nhistory_size = 10\n\
             [[namespaces]]\nname = \"feed\"\n",
        )
        .unwrap();
        let mut c = Config::default();
        for (k, val) in &v {
            c.set(k, val).unwrap();
        }
        assert_eq!(c.namespaces.len(), 2);
        assert_eq!(c.namespaces[0].name, "chat");
        assert!(c.namespaces[0].publish);
        assert_eq!(c.namespaces[0].history_size, Some(10));
        assert!(
            !c.namespaces[1].publish,
            "namespaces default to no client publishing"
        );
        assert!(flatten_toml("[[namespaces]]\npublish = true\n").is_err());
        let mut c = Config::default();
        assert!(c.set("namespaces.chat.subscribe", "everyone").is_err());
        assert!(c.set("namespaces.chat.colour", "red").is_err());
    }

    #[test]
    fn documented_defaults_are_the_real_defaults() {
        let mut s = Settings::default();
        for o in Settings::options() {
            s.set(o.name, o.default)
                .unwrap_or_else(|e| panic!("default of {} does not parse: {e}", o.name));
        }
        assert_eq!(s, Settings::default());
        assert!(Settings::default().validate().is_ok());
        // Each option is declared once: no name in both tables.
        let mut names: Vec<&str> = Settings::options().map(|o| o.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "an option declared twice");
    }

    #[test]
    fn gateway_options_parse_and_refuse() {
        let mut s = Settings::default();
        s.set("allowed_origins", "https://A.example.com/, https://*.x.org")
            .expect("list");
        assert_eq!(
            s.allowed_origins,
            vec!["https://a.example.com", "https://*.x.org"]
        );
        let e = s.set("ws_path", "ws").unwrap_err();
        assert_eq!(e.option, "ws_path");
        assert!(s.set("broker", "etcd").is_err());
        assert!(s.set("redis_url", "http://x").is_err());
        assert!(s.set("auth_cookie_name", "a b").is_err());
        s.set("tls_cert", "/tmp/cert.pem").unwrap();
        assert_eq!(s.validate().unwrap_err().option, "tls_cert");
        // A library option goes to `keel`.
        s.set("history_size", "7").unwrap();
        assert_eq!(s.keel.history_size, 7);
        assert_eq!(s.set("nope", "1").unwrap_err().message, "unknown option");
    }

    #[test]
    fn sections_flatten_with_underscore() {
        let v = flatten_toml("a = 1\n[auth]\njwt_secret = \"s\"\n").unwrap();
        assert!(v.contains(&("auth_jwt_secret".into(), "s".into())));
        assert!(v.contains(&("a".into(), "1".into())));
    }
}
