//! `[rpc]`: the control path from a browser to the backend (see `crate::rpc`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Invalid, invalid};

/// Where a client's `{"type":"rpc"}` frames go: the gateway POSTs each call, signed and
/// with the connection's verified identity, to `url`, and sends the answer to that
/// connection only. The guest never sees these frames.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Rpc {
    /// The backend's endpoint, `http://host:port/path`. Unset or blank: calls are answered
    /// with `rpc_error` `rpc_disabled`.
    pub url: Option<String>,
    /// Key of the `X-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, body)>` header on
    /// every call; at least 32 bytes, required with `url`.
    pub secret: Option<String>,
    /// A call the backend has not answered in this many milliseconds is answered with
    /// `rpc_error` `timeout` (the request is abandoned).
    pub timeout_ms: u64,
    /// Calls one connection may have in flight; past it, `too_many_calls`.
    pub max_in_flight_per_connection: usize,
    /// Calls this node may have in flight, all connections together; past it, `busy`.
    pub max_in_flight: usize,
    /// Calls one connection may start per second on average (past it, `rate_limited`)...
    pub calls_per_sec: u32,
    /// ...and in a burst.
    pub call_burst: u32,
    /// Largest call frame (`type`, `id`, `method` and `data` together); past it, `too_large`.
    pub max_request_bytes: usize,
    /// Largest backend answer body; past it, `answer_too_large`. At most
    /// `limits.max_message_bytes`, less room for the frame around it.
    pub max_answer_bytes: usize,
}

impl Default for Rpc {
    fn default() -> Self {
        Rpc {
            url: None,
            secret: None,
            timeout_ms: 5_000,
            max_in_flight_per_connection: 4,
            max_in_flight: 1_024,
            calls_per_sec: 5,
            call_burst: 10,
            max_request_bytes: 16 << 10,
            max_answer_bytes: 32 << 10,
        }
    }
}

/// Bytes an answer frame adds around the backend's body: type, code, an id of at most 130
/// bytes as sent, and a reason of at most 256 bytes that JSON escaping can make six times
/// longer.
pub const ANSWER_FRAME_OVERHEAD: usize = 2 << 10;

impl Rpc {
    /// The configured url, unless blank.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    pub fn validate(&self, max_message_bytes: usize) -> Result<(), Invalid> {
        for (key, value, max) in [
            ("rpc.timeout_ms", self.timeout_ms, 300_000),
            (
                "rpc.max_in_flight_per_connection",
                self.max_in_flight_per_connection as u64,
                1_000,
            ),
            ("rpc.max_in_flight", self.max_in_flight as u64, 1_000_000),
            ("rpc.calls_per_sec", u64::from(self.calls_per_sec), 10_000),
            ("rpc.call_burst", u64::from(self.call_burst), 10_000),
            (
                "rpc.max_request_bytes",
                self.max_request_bytes as u64,
                16 << 20,
            ),
        ] {
            if value == 0 || value > max {
                return Err(invalid(key, &value, &format!("1 to {max}")));
            }
        }
        if self.max_answer_bytes == 0 {
            return Err(invalid("rpc.max_answer_bytes", &0, "at least 1"));
        }
        let Some(url) = self.url() else {
            return Ok(());
        };
        // Only with a backend: a node without one never sends an answer, whatever its frame
        // size.
        let answer_max = max_message_bytes.saturating_sub(ANSWER_FRAME_OVERHEAD);
        if self.max_answer_bytes > answer_max {
            return Err(invalid(
                "rpc.max_answer_bytes",
                &self.max_answer_bytes,
                &format!(
                    "at most {answer_max} with limits.max_message_bytes = {max_message_bytes}: \
                     an answer is sent as one frame"
                ),
            ));
        }
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(invalid(
                "rpc.url",
                &url,
                "must be an http:// url (keep the backend on a private network, or put a \
                 TLS proxy on this host in front of it)",
            ));
        }
        match self.secret.as_deref() {
            Some(secret) if secret.len() >= 32 => Ok(()),
            _ => Err(invalid(
                "rpc.secret",
                &"<redacted>",
                "at least 32 bytes are required when rpc.url is set: the backend checks \
                 every call's signature with it",
            )),
        }
    }
}

impl std::fmt::Debug for Rpc {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .field(
                "max_in_flight_per_connection",
                &self.max_in_flight_per_connection,
            )
            .field("max_in_flight", &self.max_in_flight)
            .field("calls_per_sec", &self.calls_per_sec)
            .field("call_burst", &self.call_burst)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_answer_bytes", &self.max_answer_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_needs_a_long_secret_and_plain_http() {
        let mut rpc = Rpc {
            url: Some("http://127.0.0.1:9000/rpc".into()),
            ..Rpc::default()
        };
        assert_eq!(rpc.validate(1 << 20).unwrap_err().key, "rpc.secret");
        rpc.secret = Some("short".into());
        assert_eq!(rpc.validate(1 << 20).unwrap_err().key, "rpc.secret");
        rpc.secret = Some("x".repeat(32));
        rpc.validate(1 << 20).unwrap();
        rpc.url = Some("ftp://backend/rpc".into());
        assert_eq!(rpc.validate(1 << 20).unwrap_err().key, "rpc.url");
        rpc.url = Some("  ".into());
        rpc.validate(1 << 20).unwrap();
        assert!(!format!("{rpc:?}").contains(&"x".repeat(32)));
    }

    #[test]
    fn an_answer_must_fit_one_frame_when_there_is_a_backend() {
        let mut rpc = Rpc::default();
        // Without a backend the frame size is no concern of this section.
        rpc.validate(16 << 10).unwrap();
        rpc.url = Some("http://127.0.0.1:9000/rpc".into());
        rpc.secret = Some("x".repeat(32));
        assert_eq!(
            rpc.validate(16 << 10).unwrap_err().key,
            "rpc.max_answer_bytes"
        );
        rpc.validate(1 << 20).unwrap();
    }
}
