//! Abuse limits: a token bucket per connection for store-bound requests, and counts of open
//! connections in all and per IP address, shared by every event loop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
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

/// Why a connection was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `MAX_CONNECTIONS` are open.
    Full,
    /// `MAX_CONNECTIONS_PER_IP` are open from this address.
    PerIp,
}

/// Open connections, in all and per IP address, against their caps (per-IP cap 0: unlimited).
///
/// One `Admission` is shared by every event loop of the process (`IO_THREADS`): the kernel
/// spreads connections over the loops, and the limits are what one server allows, not what
/// each loop allows (a count per loop let one address open `IO_THREADS` times its cap, and
/// refused a client on a full loop while another had room). A mutex is enough: it is taken
/// once per accept and once per close.
#[derive(Debug, Default)]
pub struct Admission {
    open: Mutex<OpenCounts>,
}

#[derive(Debug, Default)]
struct OpenCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    fn counts(&self) -> MutexGuard<'_, OpenCounts> {
        // The counts stay consistent under every step below, so a panicked holder left them
        // usable.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `ip` unless that would pass `max_total` or `cap_per_ip`.
    pub fn admit(&self, ip: IpAddr, max_total: usize, cap_per_ip: usize) -> Result<(), Refusal> {
        let mut counts = self.counts();
        if counts.total >= max_total {
            return Err(Refusal::Full);
        }
        let from_ip = counts.per_ip.entry(ip).or_default();
        if cap_per_ip > 0 && *from_ip >= cap_per_ip {
            return Err(Refusal::PerIp);
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(())
    }

    /// A connection admitted from `ip` is gone.
    pub fn release(&self, ip: IpAddr) {
        let mut counts = self.counts();
        if let Some(open) = counts.per_ip.get_mut(&ip) {
            *open -= 1;
            if *open == 0 {
                counts.per_ip.remove(&ip);
            }
            counts.total = counts.total.saturating_sub(1);
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
    fn caps_count_open_connections_in_all_and_per_address() {
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let admission = Admission::default();
        assert!(admission.admit(ip, 3, 2).is_ok() && admission.admit(ip, 3, 2).is_ok());
        assert_eq!(admission.admit(ip, 3, 2), Err(Refusal::PerIp));
        assert!(admission.admit(other, 3, 2).is_ok());
        assert_eq!(admission.admit(other, 3, 2), Err(Refusal::Full));
        admission.release(ip);
        assert!(admission.admit(other, 3, 2).is_ok());
        // Releasing an address never admitted changes nothing.
        admission.release("10.0.0.9".parse().expect("ip"));
        assert_eq!(admission.admit(ip, 3, 0), Err(Refusal::Full));
    }
}
