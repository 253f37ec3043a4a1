//! `[streams]`: AI output streams, messages that grow by appends (see `crate::streams`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Invalid, invalid};

/// Messages published as `create`, `append`s and `end`: how live appends are rolled up, and
/// the bounds on each message and on each user's open ones.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Streams {
    /// Appends that reach one connection within this many milliseconds go to its handler
    /// (and client) as one append, texts joined; 0 hands over each append at once.
    pub rollup_ms: u64,
    /// Bytes of text one message may hold. Its snapshot must also fit one frame
    /// (`limits.max_message_bytes`), whichever is lower.
    pub max_message_bytes: usize,
    /// Appends one message may have.
    pub max_appends_per_message: usize,
    /// Messages one user may have streaming (created, not ended) at once.
    pub max_open_messages_per_user: usize,
    /// A message still streaming this long after its create is ended as `failed`.
    pub max_open_secs: u64,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            rollup_ms: 40,
            max_message_bytes: 1 << 20,
            max_appends_per_message: 10_000,
            max_open_messages_per_user: 32,
            max_open_secs: 600,
        }
    }
}

impl Streams {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.rollup_ms > 1000 {
            return Err(invalid(
                "streams.rollup_ms",
                &self.rollup_ms,
                "at most 1000: rolled-up appends wait that long before the client sees them",
            ));
        }
        for (key, value, max) in [
            (
                "streams.max_message_bytes",
                self.max_message_bytes as u64,
                64 << 20,
            ),
            (
                "streams.max_appends_per_message",
                self.max_appends_per_message as u64,
                1_000_000,
            ),
            (
                "streams.max_open_messages_per_user",
                self.max_open_messages_per_user as u64,
                10_000,
            ),
            ("streams.max_open_secs", self.max_open_secs, 7 * 24 * 3600),
        ] {
            if value == 0 || value > max {
                return Err(invalid(key, &value, &format!("1 to {max}")));
            }
        }
        Ok(())
    }
}
