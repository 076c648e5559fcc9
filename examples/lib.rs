//! Examples of the keel library, run with `cargo run -p keel-examples --example NAME`:
//!
//! - `chat`: the quick start. Every client joins `lobby`; what one sends, all see.
//! - `echo`: echoes every text and binary message; the server the Autobahn
//!   conformance suite runs against.
//!
//! This crate has no library code of its own; it exists so the examples build (and
//! are checked) with the workspace.
