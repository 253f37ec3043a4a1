//! `[webhooks]`: `user.online` / `user.offline` posted to the application (see
//! `crate::presence`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Invalid, invalid};

/// Where presence changes are posted: `user.online` when an identity's first connection
/// opens, `user.offline` when its last one closed and it stayed away `offline_after_secs`.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Webhooks {
    /// The receiver, `http://host:port/path`. Unset or blank: no webhooks.
    pub url: Option<String>,
    /// Key of the `X-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, body)>` header;
    /// at least 32 bytes, required with `url`.
    pub secret: Option<String>,
    /// An identity whose last connection closed is reported offline only after this long
    /// without a new one, so a reconnect or a page reload does not flap.
    pub offline_after_secs: u64,
    /// A delivery not answered in this many milliseconds counts as failed and is retried.
    pub timeout_ms: u64,
    /// Attempts per webhook (network errors, timeouts, 429 and 5xx are retried; any other
    /// status is the receiver's refusal and is not), then it is given up and counted.
    pub max_attempts: u32,
    /// First wait before a retry, doubled for each further one...
    pub retry_min_ms: u64,
    /// ...up to this.
    pub retry_max_ms: u64,
    /// Webhooks waiting to be delivered; past it the oldest is given up and counted, so a
    /// receiver that is down for long cannot grow the gateway's memory without bound.
    pub max_pending: usize,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            url: None,
            secret: None,
            offline_after_secs: 5,
            timeout_ms: 5_000,
            max_attempts: 8,
            retry_min_ms: 500,
            retry_max_ms: 30_000,
            max_pending: 100_000,
        }
    }
}

impl Webhooks {
    /// The configured url, unless blank.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        for (key, value, min, max) in [
            (
                "webhooks.offline_after_secs",
                self.offline_after_secs,
                0,
                3_600,
            ),
            ("webhooks.timeout_ms", self.timeout_ms, 1, 300_000),
            (
                "webhooks.max_attempts",
                u64::from(self.max_attempts),
                1,
                100,
            ),
            ("webhooks.retry_min_ms", self.retry_min_ms, 1, 3_600_000),
            ("webhooks.retry_max_ms", self.retry_max_ms, 1, 3_600_000),
            (
                "webhooks.max_pending",
                self.max_pending as u64,
                1,
                10_000_000,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return Err(invalid(key, &value, &format!("{min} to {max}")));
            }
        }
        if self.retry_min_ms > self.retry_max_ms {
            return Err(invalid(
                "webhooks.retry_min_ms",
                &self.retry_min_ms,
                &format!("at most webhooks.retry_max_ms ({})", self.retry_max_ms),
            ));
        }
        let Some(url) = self.url() else {
            return Ok(());
        };
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(invalid(
                "webhooks.url",
                &url,
                "must be an http:// url (keep the receiver on a private network, or put a \
                 TLS proxy on this host in front of it)",
            ));
        }
        match self.secret.as_deref() {
            Some(secret) if secret.len() >= 32 => Ok(()),
            _ => Err(invalid(
                "webhooks.secret",
                &"<redacted>",
                "at least 32 bytes are required when webhooks.url is set: the receiver checks \
                 every webhook's signature with it",
            )),
        }
    }
}

impl std::fmt::Debug for Webhooks {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("offline_after_secs", &self.offline_after_secs)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("retry_min_ms", &self.retry_min_ms)
            .field("retry_max_ms", &self.retry_max_ms)
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_needs_a_long_secret_and_plain_http() {
        let mut hooks = Webhooks {
            url: Some("http://127.0.0.1:9000/hooks".into()),
            ..Webhooks::default()
        };
        assert_eq!(hooks.validate().unwrap_err().key, "webhooks.secret");
        hooks.secret = Some("s".repeat(32));
        hooks.validate().unwrap();
        hooks.url = Some("https://receiver/hooks".into());
        assert_eq!(hooks.validate().unwrap_err().key, "webhooks.url");
        hooks.url = None;
        hooks.validate().unwrap();
        hooks.max_attempts = 0;
        assert_eq!(hooks.validate().unwrap_err().key, "webhooks.max_attempts");
        assert!(!format!("{hooks:?}").contains(&"s".repeat(32)));
    }
}
