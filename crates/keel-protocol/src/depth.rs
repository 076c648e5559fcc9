//! How deeply a JSON text nests: the guard against a publication whose `data` is
//! thousands of arrays inside one another, which many clients' parsers refuse
//! (serde_json's and Python's stop at about 100) and so could never read.
//!
//! It scans bytes once, skipping strings (with their escapes), and stops as soon
//! as the limit is passed. It does not validate: the text has been parsed before.

/// Whether `json` nests arrays and objects more than `max` levels deep
/// (`[]` and `{}` are one level; a scalar is none).
pub fn nests_deeper_than(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::nests_deeper_than;

    #[test]
    fn counts_arrays_and_objects_and_skips_strings() {
        assert!(!nests_deeper_than("1", 0));
        assert!(nests_deeper_than("[]", 0));
        assert!(!nests_deeper_than("[]", 1));
        assert!(nests_deeper_than(r#"{"a":[1,{"b":2}]}"#, 2));
        assert!(!nests_deeper_than(r#"{"a":[1,{"b":2}]}"#, 3));
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(!nests_deeper_than(r#"{"a":"[[[[\"[[[["}"#, 1));
        // Siblings do not add up.
        assert!(!nests_deeper_than("[[1],[2],[3]]", 2));
        let deep = "[".repeat(5000) + &"]".repeat(5000);
        assert!(nests_deeper_than(&deep, 64));
        let at_limit = "[".repeat(64) + &"]".repeat(64);
        assert!(!nests_deeper_than(&at_limit, 64));
        assert!(nests_deeper_than(&at_limit, 63));
    }
}
