//! Measurement: a log-linear latency histogram, and readers for a process's CPU
//! time and resident memory from `/proc`.

use std::time::Duration;

/// Sub-buckets per power of two: 8 gives about 9% resolution.
const SUB: usize = 8;
/// Powers of two covered, from 1 µs up (2^36 µs is about 19 hours).
const POWERS: usize = 36;

/// Latency histogram in microseconds; cheap to record.
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; SUB * POWERS],
            total: 0,
            max_us: 0,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let p = 63 - us.leading_zeros() as usize; // floor(log2)
    let shift = p - 3; // keep 3 bits after the leading one
    let sub = ((us >> shift) & (SUB as u64 - 1)) as usize;
    ((p - 2) * SUB + sub).min(SUB * POWERS - 1)
}

fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64 + 1;
    }
    let p = b / SUB + 2;
    let sub = (b % SUB) as u64;
    ((SUB as u64 + sub + 1) << (p - 3)).saturating_sub(1)
}

impl Histogram {
    /// Records one latency.
    pub(crate) fn record(&mut self, d_ns: u64) {
        let us = d_ns / 1000;
        self.counts[bucket(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Values recorded.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The latency at quantile `q` (upper edge of its bucket), in microseconds.
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(b).min(self.max_us);
            }
        }
        self.max_us
    }

    /// The largest value, in microseconds.
    pub(crate) fn max_us(&self) -> u64 {
        self.max_us
    }
}

/// CPU time (user + system) a process has used.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / clock_ticks() as f64,
    ))
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Resident memory of a process, in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_bucket_resolution() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(us * 1000);
        }
        for (q, want) in [(0.5, 5000.0), (0.99, 9900.0), (0.999, 9990.0)] {
            let got = h.quantile_us(q) as f64;
            assert!((got - want).abs() / want < 0.13, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max_us(), 10_000);
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = bucket(us);
            assert!(b >= last);
            assert!(
                bucket_high(b) >= us,
                "{us} above its bucket's top {}",
                bucket_high(b)
            );
            last = b;
        }
    }
}
