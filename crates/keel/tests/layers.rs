//! The crate's modules form layers (the `# Layout` of `lib.rs`): a module's code
//! names only modules of its own layer or above. This test reads the sources and
//! fails on an import that reaches down, so a cycle cannot come back unnoticed.
//! Doc comments are not code: a doc link may point anywhere.

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level modules, by layer (a lower number is above).
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("config", 0),
    ("clock", 0),
    ("listener", 1),
    ("transport", 1),
    ("broker", 2),
    ("conn", 3),
    ("policy", 4),
    ("metrics", 5),
    ("hub", 6),
];

/// Items the crate root re-exports, by the module they come from.
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("ErrorKind", "error"),
    ("Result", "error"),
    ("Config", "config"),
    ("Listener", "listener"),
    ("Peer", "listener"),
    ("Upgrade", "transport"),
    ("UpgradeRejection", "transport"),
    ("Broker", "broker"),
    ("MemoryBroker", "broker"),
    ("History", "broker"),
    ("HistoryQuery", "broker"),
    ("PresenceEntry", "broker"),
    ("Publication", "broker"),
    ("StreamPosition", "broker"),
    ("StreamPublication", "broker"),
    ("Connection", "conn"),
    ("DisconnectReason", "conn"),
    ("Message", "conn"),
    ("Identity", "policy"),
    ("Authenticator", "policy"),
    ("Tickets", "policy"),
    ("Action", "policy"),
    ("ReconnectClaims", "policy"),
    ("MetricsSnapshot", "metrics"),
    ("Hub", "hub"),
    ("BroadcastResult", "hub"),
    ("Subscribed", "hub"),
    ("Handler", "hub"),
    ("NoopHandler", "hub"),
    ("Deferred", "hub"),
    ("Resumed", "hub"),
    ("ShutdownReport", "hub"),
    ("MemoryUsage", "hub"),
    ("RawValue", "error"),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS and lib.rs"))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a line of code names through `crate::`.
fn named(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.chars().next().is_some_and(char::is_uppercase) {
            if let Some((_, m)) = ROOT_ITEMS.iter().find(|(item, _)| *item == name) {
                out.push(m.to_string());
            }
        } else if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[test]
fn no_module_imports_a_layer_below_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for path in &all {
        let rel = path.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a path");
        let module = first.trim_end_matches(".rs");
        if module == "lib" {
            continue;
        }
        let mine = layer(module);
        let text = std::fs::read_to_string(path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for other in named(code) {
                checked += 1;
                if layer(&other) > mine {
                    wrong
                        .entry(format!("{}:{}", rel.display(), n + 1))
                        .or_default()
                        .push(other);
                }
            }
        }
    }
    assert!(
        checked > 50,
        "the scan found almost no imports: is it reading the sources?"
    );
    assert!(wrong.is_empty(), "imports from a lower layer: {wrong:#?}");
}
