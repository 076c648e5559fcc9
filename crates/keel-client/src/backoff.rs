//! Reconnect delays: exponential backoff with jitter.
//!
//! The delay before reconnect attempt `n` (from 1) is drawn uniformly from
//! `[base * (1 - randomization), base]`, where `base = min(max_delay,
//! initial_delay * factor^(n-1))`. With `randomization = 1` that is "full jitter"
//! (uniform in `[0, base]`); the default 0.5 keeps every delay at least half its
//! base, so a large fleet spreads out without anyone retrying at once. Pure
//! arithmetic on an injected random source: tests check the curve without clocks.

use std::time::Duration;

use rand::Rng;

/// How reconnect delays grow.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectOptions {
    /// Delay base of the first attempt.
    pub initial_delay: Duration,
    /// Growth of the base per attempt.
    pub factor: f64,
    /// Largest base (and so largest delay).
    pub max_delay: Duration,
    /// Fraction of the base that is randomized away (0: no jitter, 1: full jitter).
    pub randomization: f64,
    /// Attempts before giving up; `None`: never give up.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            randomization: 0.5,
            max_attempts: None,
        }
    }
}

impl ReconnectOptions {
    /// The base (largest possible delay) of attempt `attempt` (from 1).
    pub fn base(&self, attempt: u32) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial_delay.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The bounds `[low, high]` a delay of attempt `attempt` falls in.
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let base = self.base(attempt);
        let r = self.randomization.clamp(0.0, 1.0);
        (base.mul_f64(1.0 - r), base)
    }

    /// A delay for attempt `attempt`, drawn with `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let (low, high) = self.bounds(attempt);
        if high <= low {
            return high;
        }
        Duration::from_secs_f64(rng.gen_range(low.as_secs_f64()..=high.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_follow_the_curve_inside_the_jitter_bounds() {
        let o = ReconnectOptions::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let expected_bases = [1, 2, 4, 8, 16, 30, 30, 30];
        for (i, base) in expected_bases.iter().enumerate() {
            let attempt = i as u32 + 1;
            assert_eq!(o.base(attempt), Duration::from_secs(*base));
            let mut seen_low = Duration::MAX;
            let mut seen_high = Duration::ZERO;
            for _ in 0..2000 {
                let d = o.delay(attempt, &mut rng);
                assert!(
                    d >= Duration::from_secs(*base) / 2,
                    "{d:?} under half of {base}s"
                );
                assert!(d <= Duration::from_secs(*base), "{d:?} over {base}s");
                seen_low = seen_low.min(d);
                seen_high = seen_high.max(d);
            }
            // Jitter actually spreads: the draws cover most of the interval.
            let span = Duration::from_secs(*base) / 2;
            assert!(
                seen_high - seen_low > span.mul_f64(0.9),
                "draws for attempt {attempt} are not spread: {seen_low:?}..{seen_high:?}"
            );
        }
        // Far attempts neither overflow nor pass the cap.
        assert_eq!(o.base(10_000), Duration::from_secs(30));
    }

    #[test]
    fn full_and_no_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let full = ReconnectOptions {
            randomization: 1.0,
            ..Default::default()
        };
        assert_eq!(full.bounds(3), (Duration::ZERO, Duration::from_secs(4)));
        let none = ReconnectOptions {
            randomization: 0.0,
            ..Default::default()
        };
        assert_eq!(none.delay(3, &mut rng), Duration::from_secs(4));
    }
}
