//! Per-source limits of a decision server (protocol.md §7.4), sans-IO: how
//! many connections one source may hold open, and how fast its requests
//! are answered.
//!
//! A *source* is an IPv4 address, or the /64 prefix of an IPv6 address (one
//! subscriber's allocation; an IPv4-mapped IPv6 address counts as its IPv4
//! address). Each source has an open-connection count and a token bucket
//! for requests: `rate` tokens a second up to `burst`, one taken per
//! request. The server asks [`Sources::open`] at accept and
//! [`Sources::take`] before answering each request; what it does over a
//! limit (refuse the connection, stop reading it until a token is due) is
//! the server's business, not this table's.
//!
//! Time comes in as `now`; nothing here reads a clock or touches a socket.
//! The table stays bounded: a source with no open connection is forgotten
//! once its bucket is full again ([`Sources::sweep`]), so it holds at most
//! the sources with open connections plus those seen in the last
//! `burst / rate` seconds, and never more than [`MAX_SOURCES`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most sources remembered at once. Sources with open connections are
/// never dropped (there are at most as many as connections); when the table
/// is full, sources without any are forgotten early.
pub const MAX_SOURCES: usize = 65_536;

/// The limits; zero turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// Most connections open at once from one source (0: no limit).
    pub max_conns: u32,
    /// Requests answered per second per source, sustained (0: no limit).
    pub rate: u32,
    /// Requests a source may have answered at once after being quiet.
    pub burst: u32,
}

/// Where a connection comes from, as the limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 address.
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl SourceKey {
    /// The source an address belongs to.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(a) => SourceKey::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// One source's counters.
#[derive(Debug, Clone, Copy)]
struct Source {
    conns: u32,
    /// Tokens in the bucket at `at`.
    tokens: f64,
    at: Instant,
}

/// The per-source table.
#[derive(Debug)]
pub struct Sources {
    limits: SourceLimits,
    map: HashMap<SourceKey, Source>,
}

/// A connection over [`SourceLimits::max_conns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConns {
    /// The source's open connections (the limit).
    pub open: u32,
}

impl Sources {
    /// An empty table.
    pub fn new(limits: SourceLimits) -> Sources {
        Sources { limits, map: HashMap::new() }
    }

    /// The limits in force.
    pub fn limits(&self) -> SourceLimits {
        self.limits
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Open connections of `key`.
    pub fn conns(&self, key: SourceKey) -> u32 {
        self.map.get(&key).map_or(0, |s| s.conns)
    }

    fn full_bucket(&self) -> f64 {
        f64::from(self.limits.burst.max(1))
    }

    fn entry(&mut self, key: SourceKey, now: Instant) -> &mut Source {
        if self.map.len() >= MAX_SOURCES && !self.map.contains_key(&key) {
            self.map.retain(|_, s| s.conns > 0);
        }
        let full = self.full_bucket();
        self.map.entry(key).or_insert(Source { conns: 0, tokens: full, at: now })
    }

    /// A connection from `key` is accepted: counted, or refused if the
    /// source already holds [`SourceLimits::max_conns`].
    pub fn open(&mut self, key: SourceKey, now: Instant) -> Result<(), TooManyConns> {
        let max = self.limits.max_conns;
        let s = self.entry(key, now);
        if max > 0 && s.conns >= max {
            return Err(TooManyConns { open: s.conns });
        }
        s.conns += 1;
        Ok(())
    }

    /// A connection [`Sources::open`] counted has closed.
    pub fn close(&mut self, key: SourceKey) {
        if let Some(s) = self.map.get_mut(&key) {
            s.conns = s.conns.saturating_sub(1);
        }
    }

    /// Takes one request token of `key`: Ok, or how long until one is due.
    pub fn take(&mut self, key: SourceKey, now: Instant) -> Result<(), Duration> {
        let SourceLimits { rate, .. } = self.limits;
        if rate == 0 {
            return Ok(());
        }
        let full = self.full_bucket();
        let s = self.entry(key, now);
        let dt = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + dt * f64::from(rate)).min(full);
        s.at = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.tokens) / f64::from(rate)))
        }
    }

    /// Forgets sources with no open connection whose bucket has refilled
    /// (they are as good as new). Call now and then.
    pub fn sweep(&mut self, now: Instant) {
        let rate = f64::from(self.limits.rate);
        let full = self.full_bucket();
        self.map.retain(|_, s| {
            s.conns > 0
                || (rate > 0.0 && s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * rate < full)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SourceKey {
        SourceKey::of(s.parse().unwrap())
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(v4("127.0.0.2"), SourceKey::V4(0x7f00_0002));
        assert_ne!(v4("127.0.0.2"), v4("127.0.0.3"));
        assert_eq!(v4("::ffff:127.0.0.2"), v4("127.0.0.2"));
        assert_eq!(v4("2001:db8:1:2::1"), v4("2001:db8:1:2:ffff::9"));
        assert_ne!(v4("2001:db8:1:2::1"), v4("2001:db8:1:3::1"));
    }

    #[test]
    fn connections_are_capped_per_source() {
        let now = Instant::now();
        let mut s = Sources::new(SourceLimits { max_conns: 2, rate: 0, burst: 0 });
        let (a, b) = (v4("10.0.0.1"), v4("10.0.0.2"));
        assert!(s.open(a, now).is_ok());
        assert!(s.open(a, now).is_ok());
        assert_eq!(s.open(a, now), Err(TooManyConns { open: 2 }));
        assert!(s.open(b, now).is_ok(), "another source is not affected");
        s.close(a);
        assert!(s.open(a, now).is_ok());
        let mut free = Sources::new(SourceLimits { max_conns: 0, rate: 0, burst: 0 });
        for _ in 0..1000 {
            assert!(free.open(a, now).is_ok());
        }
    }

    #[test]
    fn requests_follow_the_token_bucket() {
        let t0 = Instant::now();
        let mut s = Sources::new(SourceLimits { max_conns: 0, rate: 10, burst: 5 });
        let a = v4("10.0.0.1");
        for _ in 0..5 {
            assert!(s.take(a, t0).is_ok());
        }
        let wait = s.take(a, t0).unwrap_err();
        assert!((Duration::from_millis(99)..=Duration::from_millis(101)).contains(&wait), "{wait:?}");
        assert!(s.take(v4("10.0.0.2"), t0).is_ok(), "another source has its own bucket");
        assert!(s.take(a, t0 + Duration::from_millis(100)).is_ok());
        assert!(s.take(a, t0 + Duration::from_millis(100)).is_err());
        // A long pause refills the bucket to `burst`, not more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(s.take(a, later).is_ok());
        }
        assert!(s.take(a, later).is_err());
    }

    #[test]
    fn idle_sources_are_forgotten_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut s = Sources::new(SourceLimits { max_conns: 4, rate: 10, burst: 10 });
        let (a, b) = (v4("10.0.0.1"), v4("10.0.0.2"));
        s.open(a, t0).unwrap();
        s.take(b, t0).unwrap();
        s.sweep(t0);
        assert_eq!(s.len(), 2, "b's bucket is not full yet");
        s.sweep(t0 + Duration::from_secs(1));
        assert_eq!(s.len(), 1, "b refilled and has no connection: forgotten");
        assert_eq!(s.conns(a), 1);
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let _ = s.take(SourceKey::V4(0x0a01_0000 + i), t0);
        }
        assert!(s.len() <= MAX_SOURCES, "{}", s.len());
        assert_eq!(s.conns(a), 1, "a source with a connection is kept");
    }
}
