//! A gateway in the test's process: `keel serve`'s own start-up on 127.0.0.1
//! port 0 with a known API key.

use keel_server::settings::Settings;
use keel_server::Running;

/// The API key [`settings`] sets.
pub const API_KEY: &str = "test-key";

/// Default settings, listening on 127.0.0.1 port 0, with [`API_KEY`].
pub fn settings() -> Settings {
    let mut s = Settings::default();
    s.set("listen", "127.0.0.1:0").expect("a valid address");
    s.set("api_key", API_KEY).expect("a valid key");
    s
}

/// Starts a gateway with `settings`; panics if it does not start.
pub async fn gateway(settings: Settings) -> Running {
    keel_server::start(settings).await.expect("gateway starts")
}
