//! Per-address admission: how many connections one client address may hold
//! (`max_connections_per_ip`, answered 503) and how fast it may open new ones
//! (`connection_rate_per_ip` with `connection_burst_per_ip`, answered 429).
//!
//! The client address is the TCP peer, unless the peer is one of the
//! `trusted_proxies`: then it is the right-most address in `X-Forwarded-For` that
//! is not itself a trusted proxy. A header from anyone else is ignored, so a
//! client cannot pick its own address. State is one map under one lock, touched
//! at connect and disconnect only (never on the message path); the sweeper drops
//! entries with no connections whose bucket has refilled, so the map holds only
//! addresses active within the last burst window.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use tokio::time::Instant;

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};

pub use crate::config::Cidr;

/// The client's address: see the module documentation.
pub(crate) fn client_ip(
    trusted: &[Cidr],
    peer: Option<SocketAddr>,
    forwarded: Option<&str>,
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let hops: Vec<IpAddr> = forwarded
        .unwrap_or("")
        .split(',')
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    Some(
        hops.iter()
            .rev()
            .copied()
            .find(|ip| !is_trusted(*ip))
            .or_else(|| hops.first().copied())
            .unwrap_or(peer),
    )
}

struct Entry {
    conns: u32,
    tokens: f64,
    refilled: Instant,
}

/// The per-address counters of one Hub.
pub(crate) struct IpLimits {
    map: Mutex<HashMap<IpAddr, Entry>>,
    max_conns: Option<u32>,
    /// New connections per second, and the bucket depth; `None`: no rate limit.
    rate: Option<(f64, f64)>,
}

impl IpLimits {
    /// The limits `config` sets, or `None` when both are off.
    pub(crate) fn from_config(c: &crate::Config) -> Option<Self> {
        let max_conns = c
            .max_connections_per_ip
            .map(|n| n.min(u32::MAX as usize) as u32);
        let rate = (c.connection_rate_per_ip > 0).then(|| {
            (
                c.connection_rate_per_ip as f64,
                c.connection_burst_per_ip.max(1) as f64,
            )
        });
        (max_conns.is_some() || rate.is_some()).then(|| IpLimits {
            map: Mutex::new(HashMap::new()),
            max_conns,
            rate,
        })
    }

    /// Counts a new connection from `ip`, or refuses it: [`ErrorKind::RateLimited`]
    /// (429) over the connect rate, [`ErrorKind::ConnectionLimitExceeded`] (503) at
    /// the concurrent cap.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<()> {
        let now = Instant::now();
        let mut map = self.map.lock();
        let burst = self.rate.map_or(0.0, |(_, b)| b);
        let e = map.entry(ip).or_insert(Entry {
            conns: 0,
            tokens: burst,
            refilled: now,
        });
        if let Some((rate, burst)) = self.rate {
            let dt = now.duration_since(e.refilled).as_secs_f64();
            e.tokens = (e.tokens + dt * rate).min(burst);
            e.refilled = now;
            if e.tokens < 1.0 {
                return Err(Error::new(
                    ErrorKind::RateLimited,
                    "too many new connections from this address",
                ));
            }
        }
        if self.max_conns.is_some_and(|max| e.conns >= max) {
            return Err(Error::new(
                ErrorKind::ConnectionLimitExceeded,
                "too many connections from this address",
            ));
        }
        if self.rate.is_some() {
            e.tokens -= 1.0;
        }
        e.conns += 1;
        Ok(())
    }

    /// A connection from `ip` ended (or never got going).
    pub(crate) fn release(&self, ip: IpAddr) {
        if let Some(e) = self.map.lock().get_mut(&ip) {
            e.conns = e.conns.saturating_sub(1);
        }
    }

    /// Drops entries with no connections and a full bucket.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let rate = self.rate;
        self.map.lock().retain(|_, e| {
            e.conns > 0
                || rate.is_some_and(|(r, b)| {
                    e.tokens + now.duration_since(e.refilled).as_secs_f64() * r < b
                })
        });
    }

    /// Addresses tracked (for tests and metrics).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.3.4")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "1.2.3.4/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let trusted = vec![
            Cidr::parse("127.0.0.1").unwrap(),
            Cidr::parse("10.0.0.0/8").unwrap(),
        ];
        let peer = |s: &str| Some(SocketAddr::new(ip(s), 1234));
        // From a trusted proxy: the right-most untrusted hop.
        assert_eq!(
            client_ip(
                &trusted,
                peer("127.0.0.1"),
                Some("6.6.6.6, 1.2.3.4, 10.1.1.1")
            ),
            Some(ip("1.2.3.4"))
        );
        // From anyone else: the header is ignored.
        assert_eq!(
            client_ip(&trusted, peer("5.5.5.5"), Some("1.2.3.4")),
            Some(ip("5.5.5.5"))
        );
        // Trusted proxy, no header: the proxy itself.
        assert_eq!(
            client_ip(&trusted, peer("10.0.0.9"), None),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(
            client_ip(&[], peer("127.0.0.1"), Some("1.2.3.4")),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(&trusted, None, Some("1.2.3.4")), None);
    }

    #[test]
    fn caps_and_rates_per_address() {
        let c = crate::Config {
            max_connections_per_ip: Some(2),
            connection_rate_per_ip: 1000,
            connection_burst_per_ip: 3,
            ..Default::default()
        };
        let l = IpLimits::from_config(&c).unwrap();
        let a = ip("1.1.1.1");
        l.admit(a).unwrap();
        l.admit(a).unwrap();
        assert_eq!(
            l.admit(a).unwrap_err().kind(),
            &ErrorKind::ConnectionLimitExceeded
        );
        l.admit(ip("2.2.2.2")).unwrap();
        l.release(a);
        l.admit(a).unwrap();
        // The bucket (3 deep) is spent for `a` now: the next is over the rate.
        l.release(a);
        assert_eq!(l.admit(a).unwrap_err().kind(), &ErrorKind::RateLimited);
        l.release(a);
        l.release(a);
        l.release(ip("2.2.2.2"));
        std::thread::sleep(std::time::Duration::from_millis(10));
        l.sweep();
        assert_eq!(l.len(), 0, "idle addresses with full buckets are forgotten");
    }
}
