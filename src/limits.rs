//! Abuse limits: a token bucket per connection for store-bound requests, and a count of open
//! connections per IP address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Allows `rate` requests per second on average and `burst` at once; rate 0 allows everything.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Open connections per IP address, against a cap (0: unlimited).
#[derive(Debug, Default)]
pub struct PerIp {
    open: HashMap<IpAddr, usize>,
}

impl PerIp {
    /// Counts a new connection from `ip` unless that would pass `cap`.
    pub fn admit(&mut self, ip: IpAddr, cap: usize) -> bool {
        let open = self.open.entry(ip).or_default();
        if cap > 0 && *open >= cap {
            return false;
        }
        *open += 1;
        true
    }

    pub fn release(&mut self, ip: IpAddr) {
        if let Some(open) = self.open.get_mut(&ip) {
            *open -= 1;
            if *open == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(3.0, start);
        assert!((0..3).all(|_| bucket.take(start, 10.0, 3.0)));
        assert!(!bucket.take(start, 10.0, 3.0));
        assert!(bucket.take(start + Duration::from_millis(100), 10.0, 3.0));
        assert!(!bucket.take(start + Duration::from_millis(100), 10.0, 3.0));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let now = Instant::now();
        let mut bucket = TokenBucket::full(1.0, now);
        assert!((0..1000).all(|_| bucket.take(now, 0.0, 1.0)));
    }

    #[test]
    fn per_ip_cap_counts_open_connections() {
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut per_ip = PerIp::default();
        assert!(per_ip.admit(ip, 2) && per_ip.admit(ip, 2));
        assert!(!per_ip.admit(ip, 2));
        per_ip.release(ip);
        assert!(per_ip.admit(ip, 2));
    }
}
