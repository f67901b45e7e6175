//! Write limits: per credential and per client address, on the requests
//! that create rows (mutations, first sightings of a device). Reads are not
//! limited here; their cost is bounded by complexity and size caps.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::RwLock,
};

use axum::{extract::ConnectInfo, http::HeaderMap, http::HeaderName};
use governor::{
    DefaultKeyedRateLimiter, Quota,
    clock::{Clock, DefaultClock},
};

use crate::{auth::Principal, config::RateLimitConfig, error::AppError};

/// One keyed limiter whose key set stays bounded: past `max_keys`, keys back
/// at a full allowance are dropped first, and if that is not enough the
/// whole set starts afresh (memory is bounded; the worst case is a reset).
struct Bounded<K: std::hash::Hash + Eq + Clone> {
    quota: Quota,
    max_keys: usize,
    limiter: RwLock<DefaultKeyedRateLimiter<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Bounded<K> {
    fn new(per_minute: u32, burst: u32, max_keys: usize) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Bounded {
            quota,
            max_keys: max_keys.max(1),
            limiter: RwLock::new(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }

    /// `Err(seconds to wait)` when `key` is over its allowance.
    fn check(&self, key: &K) -> Result<(), u64> {
        let over = {
            let limiter = self.limiter.read().expect("rate limiter");
            let res = limiter.check_key(key).map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            });
            (limiter.len() > self.max_keys, res)
        };
        if over.0 {
            let mut limiter = self.limiter.write().expect("rate limiter");
            limiter.retain_recent();
            if limiter.len() > self.max_keys {
                *limiter = DefaultKeyedRateLimiter::keyed(self.quota);
            }
        }
        over.1.map_err(|s| s.max(1))
    }
}

pub struct WriteLimiter {
    by_key: Bounded<String>,
    by_ip: Bounded<IpAddr>,
    proxy_header: Option<HeaderName>,
}

impl WriteLimiter {
    /// `None` when rate limiting is switched off.
    pub fn new(cfg: &RateLimitConfig) -> anyhow::Result<Option<WriteLimiter>> {
        if !cfg.enabled {
            return Ok(None);
        }
        let proxy_header = cfg
            .trusted_proxy_header
            .as_deref()
            .map(|h| {
                HeaderName::try_from(h.to_ascii_lowercase()).map_err(|_| {
                    anyhow::anyhow!(
                        "invalid configuration: rate_limit.trusted_proxy_header is not a header name"
                    )
                })
            })
            .transpose()?;
        Ok(Some(WriteLimiter {
            by_key: Bounded::new(
                cfg.per_key_per_minute,
                cfg.per_key_burst,
                cfg.max_tracked_keys,
            ),
            by_ip: Bounded::new(
                cfg.per_ip_per_minute,
                cfg.per_ip_burst,
                cfg.max_tracked_keys,
            ),
            proxy_header,
        }))
    }

    /// The client's address: the trusted proxy's header when configured and
    /// present, else the connection's peer. IPv6 clients are keyed by their
    /// /64, which one subscriber usually holds whole.
    pub fn client_ip(
        &self,
        headers: &HeaderMap,
        peer: Option<&ConnectInfo<SocketAddr>>,
    ) -> Option<IpAddr> {
        let from_header = self.proxy_header.as_ref().and_then(|h| {
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
        });
        from_header.or(peer.map(|c| c.0.ip())).map(|ip| match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            v4 => v4,
        })
    }

    /// Counts one write by `principal` from `ip`; `RateLimited` when either
    /// is over its allowance. Admins (operators) are not limited.
    pub fn check(&self, principal: &Principal, ip: Option<IpAddr>) -> Result<(), AppError> {
        if crate::policy::Credential::of(principal, None) == crate::policy::Credential::Admin {
            return Ok(());
        }
        let key = match principal {
            Principal::ApiKey { id, .. } => Some(format!("k:{id}")),
            Principal::Customer(sub) | Principal::AdminToken(sub) => Some(format!("c:{sub}")),
            Principal::Anonymous => None,
        };
        let mut wait = 0;
        if let Some(ip) = ip
            && let Err(s) = self.by_ip.check(&ip)
        {
            wait = s;
        }
        if let Some(key) = key
            && let Err(s) = self.by_key.check(&key)
        {
            wait = wait.max(s);
        }
        if wait > 0 {
            Err(AppError::RateLimited {
                retry_after_secs: wait,
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_limiter_refuses_past_the_burst_and_stays_bounded() {
        let b = Bounded::<u32>::new(60, 3, 100);
        for _ in 0..3 {
            assert!(b.check(&1).is_ok());
        }
        let wait = b.check(&1).unwrap_err();
        assert!((1..=2).contains(&wait), "{wait}");
        // Another key has its own allowance.
        assert!(b.check(&2).is_ok());
        for k in 0..10_000 {
            let _ = b.check(&k);
        }
        assert!(b.limiter.read().unwrap().len() <= 101);
    }

    #[test]
    fn client_ip_prefers_the_trusted_header_only_when_configured() {
        let peer = ConnectInfo("10.0.0.1:5000".parse::<SocketAddr>().unwrap());
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        let off = WriteLimiter::new(&RateLimitConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            off.client_ip(&headers, Some(&peer)),
            Some("10.0.0.1".parse().unwrap())
        );
        let on = WriteLimiter::new(&RateLimitConfig {
            trusted_proxy_header: Some("X-Forwarded-For".into()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            on.client_ip(&headers, Some(&peer)),
            Some("203.0.113.7".parse().unwrap())
        );
        let v6 = ConnectInfo("[2001:db8:1:2:3:4:5:6]:1".parse::<SocketAddr>().unwrap());
        assert_eq!(
            on.client_ip(&HeaderMap::new(), Some(&v6)),
            Some("2001:db8:1:2::".parse().unwrap())
        );
    }
}
