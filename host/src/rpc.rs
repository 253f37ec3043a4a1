//! The control path from a browser to the backend ("stop this run").
//!
//! A client frame `{"type":"rpc","id":"1","method":"cancel_run","data":{...}}` is taken by
//! the host, never by the guest: the gateway POSTs
//! `{"method","data","tenant_id","user_id","sid","connection_id"}` to `[rpc] url`, the
//! identity being the connection's verified one, signed with
//! `X-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, and answers that
//! connection only: `{"type":"rpc_result","id","data"}` or
//! `{"type":"rpc_error","id","code","reason"}` (plus `status` and `data` when the backend
//! answered with an error). The calls run beside the session, so a slow backend holds
//! neither the socket nor the guest; they end with the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::Mac as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{self, Invalid};
use crate::metrics::Metrics;
use crate::sandbox::Context;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-gateway-signature";

/// Longest `id` a call may carry (it is echoed back in the answer).
const MAX_ID_BYTES: usize = 128;
/// Longest `method` name.
const MAX_METHOD_BYTES: usize = 128;
/// Longest `reason` taken from a backend's error answer.
const MAX_REASON_BYTES: usize = 256;

/// A client frame the host takes instead of the guest.
#[derive(Debug)]
pub enum Request {
    Call(Call),
    /// `type` is `rpc`, but the frame cannot be a call; answered `invalid_rpc`.
    Invalid {
        id: Option<Box<RawValue>>,
        reason: &'static str,
    },
}

/// One call as the client made it.
#[derive(Debug)]
pub struct Call {
    pub id: Box<RawValue>,
    pub method: String,
    pub data: Box<RawValue>,
}

/// Every field as raw JSON, so that a field of the wrong type is a clear `invalid_rpc`
/// rather than a frame silently passed to the guest.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

impl Request {
    /// The call in `text`, or `None` for a frame meant for the guest.
    pub fn parse(text: &str) -> Option<Request> {
        // Cheap test first: most client frames are for the guest and are not parsed here.
        if !text.contains("\"rpc\"") {
            return None;
        }
        let Ok(probe) = serde_json::from_str::<Probe>(text) else {
            // Meant as a call but unreadable (a repeated key, nesting past serde's limit,
            // broken JSON): answered, not passed to the guest.
            return text.contains("\"type\"").then_some(Request::Invalid {
                id: None,
                reason: "a call must be one JSON object with type, id, method and data",
            });
        };
        if probe.kind.map(RawValue::get) != Some("\"rpc\"") {
            return None;
        }
        let id = match probe.id {
            Some(id) if valid_id(id) => id.to_owned(),
            _ => {
                return Some(Request::Invalid {
                    id: None,
                    reason: "id must be a string of 1 to 128 bytes or an integer",
                });
            }
        };
        let method = probe
            .method
            .and_then(|m| serde_json::from_str::<String>(m.get()).ok())
            .filter(|m| valid_method(m));
        let Some(method) = method else {
            return Some(Request::Invalid {
                id: Some(id),
                reason: "method must be 1 to 128 bytes of letters, digits and _ . : / -",
            });
        };
        let data = match probe.data {
            Some(data) => data.to_owned(),
            None => RawValue::NULL.to_owned(),
        };
        Some(Request::Call(Call { id, method, data }))
    }
}

fn valid_id(id: &RawValue) -> bool {
    // The raw text is echoed in the answer: escapes count too.
    if id.get().len() > MAX_ID_BYTES + 2 {
        return false;
    }
    match serde_json::from_str::<serde_json::Value>(id.get()) {
        Ok(serde_json::Value::String(s)) => !s.is_empty() && s.len() <= MAX_ID_BYTES,
        Ok(serde_json::Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

fn valid_method(method: &str) -> bool {
    (1..=MAX_METHOD_BYTES).contains(&method.len())
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
}

/// What became of a call, as the client is told and the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    Invalid,
    TooLarge,
    RateLimited,
    TooManyCalls,
    Busy,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Disabled => "rpc_disabled",
            Refusal::Invalid => "invalid_rpc",
            Refusal::TooLarge => "too_large",
            Refusal::RateLimited => "rate_limited",
            Refusal::TooManyCalls => "too_many_calls",
            Refusal::Busy => "busy",
        }
    }
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Option<&'a RawValue>,
    code: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

/// `{"type":"rpc_error",...}`; `id` is null when the frame had no usable one.
pub fn error_frame(id: Option<&RawValue>, code: &str, reason: &str) -> String {
    error_frame_with(id, code, reason, None, None)
}

fn error_frame_with(
    id: Option<&RawValue>,
    code: &str,
    reason: &str,
    status: Option<u16>,
    data: Option<&RawValue>,
) -> String {
    let frame = ErrorFrame {
        kind: "rpc_error",
        id,
        code,
        reason,
        status,
        data,
    };
    serde_json::to_string(&frame).unwrap_or_default()
}

fn result_frame(id: &RawValue, data: &RawValue) -> String {
    format!(
        r#"{{"type":"rpc_result","id":{},"data":{}}}"#,
        id.get(),
        data.get()
    )
}

/// The body POSTed to the backend: the call, and who made it (from the verified token,
/// never from the client's frame).
pub fn request_body(call: &Call, ctx: &Context) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        method: &'a str,
        data: &'a RawValue,
        tenant_id: Option<&'a str>,
        user_id: &'a str,
        sid: Option<&'a str>,
        connection_id: &'a str,
    }
    serde_json::to_vec(&Body {
        method: &call.method,
        data: &call.data,
        tenant_id: ctx.tenant_id.as_deref(),
        user_id: &ctx.user_id,
        sid: ctx.session_id.as_deref(),
        connection_id: &ctx.connection_id,
    })
    .unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256(key, body)>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The configured backend: one HTTP client (pooled connections) for the whole node.
pub struct Backend {
    client: reqwest::Client,
    url: reqwest::Url,
    key: Box<[u8]>,
    timeout: Duration,
    max_answer_bytes: usize,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A call's place in the node's bound, held until it is answered or abandoned (its task
/// dropped with the session).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.rpc_in_flight.dec();
    }
}

/// Why an exchange with the backend gave no answer to pass on.
enum Failure {
    Unreachable(reqwest::Error),
    TooLarge,
}

impl Backend {
    /// The backend `[rpc]` names, or `None` when calls are off.
    pub fn new(config: &config::Rpc, metrics: Arc<Metrics>) -> Result<Option<Self>, Invalid> {
        let Some(url) = config.url() else {
            return Ok(None);
        };
        let refuse = |reason: String| Invalid {
            key: "rpc.url",
            value: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| refuse(e.to_string()))?;
        let client = reqwest::Client::builder()
            // A redirect would turn the POST into a GET elsewhere; the backend's own 3xx is
            // passed on as an error instead. Proxies from the environment are not the
            // backend's path either.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| refuse(e.to_string()))?;
        Ok(Some(Backend {
            client,
            url: parsed,
            key: config
                .secret
                .as_deref()
                .unwrap_or_default()
                .as_bytes()
                .into(),
            timeout: Duration::from_millis(config.timeout_ms),
            max_answer_bytes: config.max_answer_bytes,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            metrics,
        }))
    }

    /// Whether `header` is this backend's signature of `body` (compared in constant time):
    /// for a backend served by this process, the demo's.
    pub fn signed(&self, body: &[u8], header: Option<&str>) -> bool {
        let Some(hex) = header.and_then(|h| h.strip_prefix("sha256=")) else {
            return false;
        };
        let Some(tag) = decode_hex(hex) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }

    /// A slot in the node's bound on calls in flight, if one is free.
    pub fn slot(&self) -> Option<Slot> {
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        self.metrics.rpc_in_flight.inc();
        Some(Slot {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    /// Makes the call and returns the frame that answers it.
    pub async fn call(self: Arc<Self>, id: Box<RawValue>, body: Vec<u8>, _slot: Slot) -> String {
        let started = Instant::now();
        let exchange = tokio::time::timeout(self.timeout, self.exchange(body)).await;
        let (outcome, frame) = match exchange {
            Err(_) => (
                "timeout",
                error_frame(
                    Some(&id),
                    "timeout",
                    &format!(
                        "the backend did not answer within {} ms",
                        self.timeout.as_millis()
                    ),
                ),
            ),
            Ok(Err(Failure::Unreachable(err))) => {
                tracing::warn!(error = %err, url = %self.url, "rpc: backend unreachable");
                (
                    "unavailable",
                    error_frame(Some(&id), "unavailable", "the backend could not be reached"),
                )
            }
            Ok(Err(Failure::TooLarge)) => (
                "answer_too_large",
                error_frame(
                    Some(&id),
                    "answer_too_large",
                    &format!(
                        "the backend's answer is over {} bytes",
                        self.max_answer_bytes
                    ),
                ),
            ),
            Ok(Ok((status, answer))) => answer_frame(&id, status, &answer),
        };
        self.metrics
            .rpc_call(outcome, started.elapsed().as_secs_f64());
        frame
    }

    async fn exchange(&self, body: Vec<u8>) -> Result<(u16, Vec<u8>), Failure> {
        let mut response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.key, &body))
            .body(body)
            .send()
            .await
            .map_err(Failure::Unreachable)?;
        if response
            .content_length()
            .is_some_and(|len| len > self.max_answer_bytes as u64)
        {
            return Err(Failure::TooLarge);
        }
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(Failure::Unreachable)? {
            if answer.len() + chunk.len() > self.max_answer_bytes {
                return Err(Failure::TooLarge);
            }
            answer.extend_from_slice(&chunk);
        }
        Ok((response.status().as_u16(), answer))
    }
}

/// The client's answer to what the backend said: its JSON as `data` on success; on any
/// other status an `rpc_error` with the status, the backend's `reason` (or `error`) when
/// its body has one, and its JSON body as `data`.
fn answer_frame(id: &RawValue, status: u16, answer: &[u8]) -> (&'static str, String) {
    let json = if answer.iter().all(u8::is_ascii_whitespace) {
        Some(RawValue::NULL.to_owned())
    } else {
        serde_json::from_slice::<&RawValue>(answer)
            .ok()
            .map(ToOwned::to_owned)
    };
    if (200..300).contains(&status) {
        return match json {
            Some(data) => ("ok", result_frame(id, &data)),
            None => (
                "bad_answer",
                error_frame_with(
                    Some(id),
                    "bad_answer",
                    "the backend's answer is not JSON",
                    Some(status),
                    None,
                ),
            ),
        };
    }
    let reason = json
        .as_deref()
        .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
        .and_then(|v| {
            ["reason", "error"]
                .iter()
                .find_map(|k| v.get(k).and_then(|r| r.as_str()).map(str::to_owned))
        })
        .map(|r| truncate(r, MAX_REASON_BYTES))
        .unwrap_or_else(|| format!("the backend answered {status}"));
    (
        "backend_error",
        error_frame_with(
            Some(id),
            "backend_error",
            &reason,
            Some(status),
            json.as_deref(),
        ),
    )
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(text: &str) -> Call {
        match Request::parse(text) {
            Some(Request::Call(call)) => call,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn invalid(text: &str) -> (Option<String>, &'static str) {
        match Request::parse(text) {
            Some(Request::Invalid { id, reason }) => (id.map(|id| id.get().to_owned()), reason),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn calls_are_told_from_guest_frames() {
        let c = call(r#"{"type":"rpc","id":"1","method":"cancel_run","data":{"run_id":"r"}}"#);
        assert_eq!((c.id.get(), c.method.as_str()), ("\"1\"", "cancel_run"));
        assert_eq!(c.data.get(), r#"{"run_id":"r"}"#);
        assert_eq!(
            call(r#"{"type":"rpc","id":7,"method":"m"}"#).data.get(),
            "null"
        );
        for guest in [
            r#"{"type":"subscribe","thread_id":"rpc"}"#,
            r#"{"type":"chat","text":"\"rpc\""}"#,
            "hello",
        ] {
            assert!(Request::parse(guest).is_none(), "{guest}");
        }
        assert_eq!(invalid(r#"{"type":"rpc","method":"m"}"#).0, None);
        // Unreadable as a call, yet meant as one: answered, not the guest's.
        assert_eq!(
            invalid(r#"{"type":"rpc","type":"rpc","id":"1","method":"m"}"#).0,
            None
        );
        assert_eq!(invalid(r#"{"type":"rpc", broken"#).0, None);
        let escaped = format!(
            r#"{{"type":"rpc","id":"{}","method":"m"}}"#,
            "\\u0041".repeat(40)
        );
        assert_eq!(invalid(&escaped).0, None);
        assert_eq!(invalid(r#"{"type":"rpc","id":{},"method":"m"}"#).0, None);
        assert_eq!(invalid(r#"{"type":"rpc","id":1.5,"method":"m"}"#).0, None);
        let long = format!(
            r#"{{"type":"rpc","id":"{}","method":"m"}}"#,
            "i".repeat(129)
        );
        assert_eq!(invalid(&long).0, None);
        for method in [r#""""#, r#""a b""#, "3", r#""é""#] {
            let text = format!(r#"{{"type":"rpc","id":"2","method":{method}}}"#);
            assert_eq!(invalid(&text).0.as_deref(), Some("\"2\""), "{text}");
        }
    }

    #[test]
    fn answers_carry_the_backends_json_or_say_why_not() {
        let id = RawValue::from_string("\"9\"".into()).unwrap();
        let (outcome, frame) = answer_frame(&id, 200, br#"{"stopped":true}"#);
        assert_eq!(outcome, "ok");
        assert_eq!(
            frame,
            r#"{"type":"rpc_result","id":"9","data":{"stopped":true}}"#
        );
        assert_eq!(
            answer_frame(&id, 204, b"").1,
            r#"{"type":"rpc_result","id":"9","data":null}"#
        );
        let (outcome, frame) = answer_frame(&id, 200, b"<html>");
        assert_eq!(outcome, "bad_answer");
        assert!(frame.contains(r#""code":"bad_answer""#), "{frame}");
        let (outcome, frame) = answer_frame(&id, 409, br#"{"reason":"run already ended"}"#);
        assert_eq!(outcome, "backend_error");
        let frame: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(frame["reason"], "run already ended");
        assert_eq!(frame["status"], 409);
        assert_eq!(frame["data"]["reason"], "run already ended");
        let frame: serde_json::Value =
            serde_json::from_str(&answer_frame(&id, 502, b"Bad Gateway").1).unwrap();
        assert_eq!(frame["reason"], "the backend answered 502");
        assert!(frame.get("data").is_none());
    }

    #[test]
    fn a_backend_checks_its_own_signature_and_nothing_else() {
        let config = config::Rpc {
            url: Some("http://127.0.0.1:9/rpc".into()),
            secret: Some("k".repeat(32)),
            ..config::Rpc::default()
        };
        let backend = Backend::new(&config, Arc::new(Metrics::new()))
            .unwrap()
            .unwrap();
        let body = br#"{"method":"cancel_run"}"#;
        let good = signature("k".repeat(32).as_bytes(), body);
        assert!(backend.signed(body, Some(&good)));
        assert!(!backend.signed(br#"{"method":"cancel_rum"}"#, Some(&good)));
        assert!(!backend.signed(body, Some(&signature(b"another key", body))));
        assert!(!backend.signed(body, Some(good.trim_start_matches("sha256="))));
        assert!(!backend.signed(body, Some(&good[..good.len() - 1])));
        assert!(!backend.signed(body, None));
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
