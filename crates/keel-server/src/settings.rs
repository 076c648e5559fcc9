//! Where the gateway's [`Config`] comes from: a TOML file (`--config` or
//! `KEEL_CONFIG`), then `KEEL_*` environment variables, then command-line flags,
//! each overriding the one before.
//!
//! All three go through [`Config::set`], so an option is parsed and refused the same
//! way from any source, and the error names the option. This module only reads
//! text; it does not start anything.

use std::path::PathBuf;

use anyhow::{bail, Context};
use keel::config::{Config, OPTIONS};

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
}

/// The usage text.
pub const USAGE: &str = "\
keel: WebSocket gateway

USAGE:
    keel serve [--config FILE] [--OPTION VALUE]...
    keel options        list every option, its default and its KEEL_* variable
    keel --version

Every option can be set in the TOML file, as KEEL_<OPTION> in the environment, or as
--<option> (dashes or underscores) on the command line; later sources win.
Example: keel serve --listen 0.0.0.0:8000 --heartbeat-interval 20s";

/// The result of [`load`].
#[derive(Debug)]
pub struct Loaded {
    /// What to do.
    pub command: Command,
    /// The configuration.
    pub config: Config,
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
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "serve" if command.is_none() => command = Some(Command::Serve),
            "options" if command.is_none() => command = Some(Command::Options),
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
                } else {
                    flags.push((name, value));
                }
            }
            other => bail!("unexpected argument `{other}`\n\n{USAGE}"),
        }
    }
    let command = command.unwrap_or(Command::Help);

    let mut config = Config::default();
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
    for o in OPTIONS {
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
        .filter(|k| !OPTIONS.iter().any(|o| Config::env_name(o.name) == **k))
        .map(|k| format!("ignoring unknown environment variable {k}"))
        .collect();
    Ok(Loaded {
        command,
        config,
        warnings,
    })
}

impl Loaded {
    fn bare(command: Command) -> Self {
        Loaded {
            command,
            config: Config::default(),
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
            config: c,
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
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10)); // file
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(12)); // env over file
        assert_eq!(c.max_connections, Some(7)); // flag over env
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
    fn sections_flatten_with_underscore() {
        let v = flatten_toml("a = 1\n[auth]\njwt_secret = \"s\"\n").unwrap();
        assert!(v.contains(&("auth_jwt_secret".into(), "s".into())));
        assert!(v.contains(&("a".into(), "1".into())));
    }
}
