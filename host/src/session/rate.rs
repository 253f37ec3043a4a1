//! The rate limit on client messages.

use tokio::time::Instant;

/// Token bucket over client messages.
pub(super) struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit {
            per_sec: f64::from(per_sec),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
