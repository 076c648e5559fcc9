//! Per-connection message rate limiting: a token bucket (`rate_limit_messages`
//! per second, `rate_limit_burst` deep) in front of the handler.
//!
//! A message over the limit is dropped before the handler sees it; the client is
//! told with `error rate_limited` (once when a streak of refusals starts, then at
//! most once a second, so the errors cannot become a flood of their own). A streak
//! ends after a second without refusals; one that lasts `rate_limit_close_after`
//! closes the connection with 4003. The bucket lives in the connection's task and
//! is touched only by it: no lock, no atomic. Time is the Hub's millisecond clock.

use std::time::Duration;

/// What the bucket says about one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the handler.
    Pass,
    /// Drop it; `notify` says whether to send `error rate_limited` now.
    Drop { notify: bool },
    /// Drop it and close with 4003: refusals went on for too long.
    Close,
}

/// A token bucket with a refusal streak.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    /// Hub milliseconds at the last refill.
    refilled_ms: u64,
    /// Start of the current refusal streak, if one is running.
    streak_since_ms: Option<u64>,
    last_refusal_ms: u64,
    last_notice_ms: Option<u64>,
}

/// The limits, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateLimit {
    pub(crate) per_second: f64,
    pub(crate) burst: f64,
    pub(crate) close_after_ms: u64,
}

impl RateLimit {
    /// The configured limit, or `None` when it is off.
    pub(crate) fn from_config(c: &crate::Config) -> Option<Self> {
        (c.rate_limit_messages > 0).then(|| RateLimit {
            per_second: c.rate_limit_messages as f64,
            burst: c.rate_limit_burst.max(1) as f64,
            close_after_ms: duration_ms(c.rate_limit_close_after),
        })
    }
}

fn duration_ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Refusals closer together than this belong to one streak.
const STREAK_GAP_MS: u64 = 1000;
/// At most one `rate_limited` error per this.
const NOTICE_EVERY_MS: u64 = 1000;

impl Bucket {
    /// A full bucket at `now_ms`.
    pub(crate) fn new(limit: &RateLimit, now_ms: u64) -> Self {
        Bucket {
            tokens: limit.burst,
            refilled_ms: now_ms,
            streak_since_ms: None,
            last_refusal_ms: 0,
            last_notice_ms: None,
        }
    }

    /// Takes a token for one message arriving at `now_ms`.
    pub(crate) fn check(&mut self, limit: &RateLimit, now_ms: u64) -> Verdict {
        let elapsed = now_ms.saturating_sub(self.refilled_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.refilled_ms = now_ms;
        if self.streak_since_ms.is_some()
            && now_ms.saturating_sub(self.last_refusal_ms) > STREAK_GAP_MS
        {
            self.streak_since_ms = None;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Pass;
        }
        self.last_refusal_ms = now_ms;
        let since = *self.streak_since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) >= limit.close_after_ms {
            return Verdict::Close;
        }
        let notify = self
            .last_notice_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= NOTICE_EVERY_MS);
        if notify {
            self.last_notice_ms = Some(now_ms);
        }
        Verdict::Drop { notify }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> RateLimit {
        RateLimit {
            per_second: 10.0,
            burst: 5.0,
            close_after_ms: 3000,
        }
    }

    #[test]
    fn burst_then_the_sustained_rate() {
        let l = limit();
        let mut b = Bucket::new(&l, 0);
        for _ in 0..5 {
            assert_eq!(b.check(&l, 0), Verdict::Pass);
        }
        assert_eq!(b.check(&l, 0), Verdict::Drop { notify: true });
        assert_eq!(b.check(&l, 1), Verdict::Drop { notify: false });
        // 100 ms later one token has come back.
        assert_eq!(b.check(&l, 101), Verdict::Pass);
        assert!(matches!(b.check(&l, 102), Verdict::Drop { .. }));
    }

    #[test]
    fn a_well_behaved_client_is_never_refused() {
        let l = limit();
        let mut b = Bucket::new(&l, 0);
        for i in 0..10_000u64 {
            assert_eq!(b.check(&l, i * 100), Verdict::Pass, "message {i}");
        }
    }

    #[test]
    fn a_flood_that_persists_is_closed_and_a_pause_forgives() {
        let l = limit();
        let mut b = Bucket::new(&l, 0);
        let mut notices = 0;
        let mut t = 0;
        let closed_at = loop {
            match b.check(&l, t) {
                Verdict::Close => break t,
                Verdict::Drop { notify: true } => notices += 1,
                _ => {}
            }
            t += 1; // 1000 messages a second against 10 allowed
        };
        assert!((3000..3100).contains(&closed_at), "{closed_at}");
        assert!((3..=4).contains(&notices), "one notice a second: {notices}");
        // A fresh flood after a quiet second starts a new streak.
        let mut b = Bucket::new(&l, 0);
        for t in 0..2000 {
            assert_ne!(b.check(&l, t), Verdict::Close);
        }
        let quiet = 2000 + STREAK_GAP_MS + 1;
        for t in quiet..quiet + 2000 {
            assert_ne!(b.check(&l, t), Verdict::Close);
        }
    }
}
