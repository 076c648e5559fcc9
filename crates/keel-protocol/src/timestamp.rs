//! RFC 3339 UTC timestamps with milliseconds (`2026-11-22T10:30:00.123Z`), the
//! `timestamp` field of every server envelope.
//!
//! Written by hand (civil-from-days) to keep the protocol crate free of a date
//! library; it formats, it does not parse.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time, formatted.
pub fn now() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format_millis(ms)
}

/// Formats milliseconds since the Unix epoch.
pub fn format_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-22T10:30:00.123Z
        assert_eq!(format_millis(1_795_343_400_123), "2026-11-22T10:30:00.123Z");
        // a leap day
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
