//! A real HTTP backend on port 0 for the gateway's outgoing requests (client RPC at `/rpc`,
//! presence webhooks at `/hooks`): it checks every request's signature on its own
//! (HMAC-SHA256 from the `hmac` crate, not the gateway's code), records what it received,
//! and answers calls by their `method`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::Mac as _;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The secret the backend checks signatures with.
pub const BACKEND_SECRET: &str = "backend-tests-secret-0123456789abcdef";

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Value,
    pub signature: Option<String>,
    /// Whether `signature` is `sha256=<hex HMAC-SHA256(BACKEND_SECRET, body)>`.
    pub signed: bool,
    /// The `X-Gateway-Webhook-Id` header, on webhooks.
    pub webhook_id: Option<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    gate: watch::Receiver<bool>,
    answer_bytes: usize,
    hooks: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicUsize>,
    fail_status: Arc<AtomicU16>,
}

pub struct Backend {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    hooks: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicUsize>,
    fail_status: Arc<AtomicU16>,
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Methods the backend knows:
/// - `echo`: 200 with the whole request body as the answer;
/// - `fail`: 409 `{"reason":"run already finished","run_id":<data.run_id>}`;
/// - `html`: 200 with a body that is not JSON;
/// - `big`: 200 with a JSON string of `answer_bytes` bytes;
/// - `hold`: answers like `echo` once [`Backend::open_gate`] is called, never before;
/// - `delay`: answers like `echo` after `data.ms` milliseconds (to interleave answers).
impl Backend {
    pub async fn start(answer_bytes: usize) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, gate_rx) = watch::channel(false);
        let received = Arc::new(Mutex::new(Vec::new()));
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicUsize::new(0));
        let fail_status = Arc::new(AtomicU16::new(503));
        let shared = Shared {
            received: received.clone(),
            gate: gate_rx,
            answer_bytes,
            hooks: hooks.clone(),
            failing: failing.clone(),
            fail_status: fail_status.clone(),
        };
        let app = axum::Router::new()
            .route("/rpc", axum::routing::post(answer))
            .route("/hooks", axum::routing::post(hook))
            .with_state(shared);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend {
            addr,
            received,
            hooks,
            failing,
            fail_status,
            gate,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/rpc", self.addr)
    }

    pub fn hooks_url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Every webhook attempt received so far, failed ones included.
    pub fn hooks(&self) -> Vec<Received> {
        self.hooks.lock().unwrap().clone()
    }

    /// The next `n` webhook attempts are answered with `status` (and recorded).
    pub fn fail_hooks(&self, n: usize, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
        self.failing.store(n, Ordering::SeqCst);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Lets every `hold` call (waiting or to come) answer.
    pub fn open_gate(&self) {
        let _ = self.gate.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What arrived, its signature checked independently of the gateway's code.
fn receive(headers: &HeaderMap, body: &[u8]) -> Received {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let signature = header("x-gateway-signature");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(BACKEND_SECRET.as_bytes()).unwrap();
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Received {
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        signed: signature.as_deref() == Some(&format!("sha256={expected}")),
        signature,
        webhook_id: header("x-gateway-webhook-id"),
        at: std::time::Instant::now(),
    }
}

async fn hook(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let received = receive(&headers, &body);
    let signed = received.signed;
    shared.hooks.lock().unwrap().push(received);
    let failing = shared
        .failing
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::from_u16(shared.fail_status.load(Ordering::SeqCst)).unwrap();
    }
    if signed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    }
}

async fn answer(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let received = receive(&headers, &body);
    let (request, signed) = (received.body.clone(), received.signed);
    shared.received.lock().unwrap().push(received);
    if !signed {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let echo = || axum::Json(request.clone()).into_response();
    match request["method"].as_str().unwrap_or_default() {
        "echo" => echo(),
        "fail" => (
            StatusCode::CONFLICT,
            axum::Json(
                json!({"reason": "run already finished", "run_id": request["data"]["run_id"]}),
            ),
        )
            .into_response(),
        "html" => "<html>not json</html>".into_response(),
        "big" => axum::Json(Value::String("x".repeat(shared.answer_bytes))).into_response(),
        "hold" => {
            let mut gate = shared.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            echo()
        }
        "delay" => {
            let ms = request["data"]["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo()
        }
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "no such method"})),
        )
            .into_response(),
    }
}
