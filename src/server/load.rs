//! How busy the event loop is, and so whether broadcasts should be held (`WRITE_DELAY_MS`).
//!
//! Holding a broadcast saves writes only when the loop is short of time: then one `writev`
//! per client per window carries many lines and the CPU saved goes to more deliveries. When
//! the loop mostly sleeps in `poll`, a line held is only a line late (at 300 msg/s in
//! scenario (a) a 10 ms hold was most of the latency). So the loop measures its own share of
//! busy time over short samples, and holds broadcasts only while that share is high.
//!
//! The decision does not depend on a turn fitting a window (what sank the earlier attempts,
//! docs/BENCHMARKS-LOG.md "Not done"): a saturated loop is busy in every sample, so it keeps
//! holding whatever its turns last. Hysteresis keeps a loop near the threshold from flapping:
//! holding starts above `HOLD_ABOVE` and stops only below `RELEASE_BELOW` (holding itself
//! lowers the busy share, which must not switch it straight off again).

use std::time::{Duration, Instant};

/// Broadcasts held for the next deferred flush, and what decides whether to hold them.
pub(super) struct WriteDelay {
    /// Connections holding broadcasts for the next deferred flush, and when it is due
    /// (`WRITE_DELAY_MS`): one write per connection then carries every line the delay
    /// gathered. One flush for all of them, not a clock per connection: measured, the shared
    /// tick costs less CPU for the same latency (docs/BENCHMARKS-LOG.md).
    pub(super) deferred: Vec<mio::Token>,
    pub(super) flush_at: Option<Instant>,
    /// The loop's busy share: broadcasts are held only while it is high.
    pub(super) load: LoopLoad,
}

/// How long one busy-share sample runs.
const SAMPLE: Duration = Duration::from_millis(50);
/// Busy share from which broadcasts are held.
const HOLD_ABOVE: f64 = 0.5;
/// Busy share below which holding stops.
const RELEASE_BELOW: f64 = 0.2;

/// The loop's busy share and the hold decision.
#[derive(Debug)]
pub struct LoopLoad {
    sample_start: Instant,
    busy: Duration,
    holding: bool,
}

impl LoopLoad {
    pub fn new(now: Instant) -> LoopLoad {
        LoopLoad {
            sample_start: now,
            busy: Duration::ZERO,
            holding: false,
        }
    }

    /// One loop turn ran from `woke` (poll returned) to `done`.
    pub fn turn(&mut self, woke: Instant, done: Instant) {
        self.busy += done.saturating_duration_since(woke);
        let elapsed = done.saturating_duration_since(self.sample_start);
        if elapsed < SAMPLE {
            return;
        }
        let share = self.busy.as_secs_f64() / elapsed.as_secs_f64();
        self.holding = if self.holding {
            share >= RELEASE_BELOW
        } else {
            share > HOLD_ABOVE
        };
        self.sample_start = done;
        self.busy = Duration::ZERO;
    }

    /// Whether broadcasts are held for the shared write now.
    pub fn holding(&self) -> bool {
        self.holding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_only_while_busy_with_hysteresis() {
        let start = Instant::now();
        let mut load = LoopLoad::new(start);
        assert!(!load.holding(), "a new loop writes at once");
        // 60 ms of which 45 busy: 75%.
        load.turn(
            start + Duration::from_millis(15),
            start + Duration::from_millis(60),
        );
        assert!(load.holding());
        // Next sample 30% busy: above the release threshold, still holding.
        let t = start + Duration::from_millis(60);
        load.turn(t + Duration::from_millis(35), t + Duration::from_millis(50));
        assert!(load.holding(), "hysteresis");
        // 10% busy: released.
        let t = t + Duration::from_millis(50);
        load.turn(t + Duration::from_millis(45), t + Duration::from_millis(50));
        assert!(!load.holding());
        // 30% busy while not holding: stays released.
        let t = t + Duration::from_millis(50);
        load.turn(t + Duration::from_millis(35), t + Duration::from_millis(50));
        assert!(!load.holding());
    }

    #[test]
    fn a_long_busy_turn_counts_whole() {
        let start = Instant::now();
        let mut load = LoopLoad::new(start);
        // One saturated turn longer than a sample (a turn outlasting any window).
        load.turn(start, start + Duration::from_millis(200));
        assert!(load.holding());
        load.turn(
            start + Duration::from_millis(200),
            start + Duration::from_millis(400),
        );
        assert!(load.holding(), "a saturated loop keeps holding");
    }
}
