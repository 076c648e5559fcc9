//! Examples live in this folder as `examples/*.rs`; this crate has no library of its own.
