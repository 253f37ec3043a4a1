//! Holes an outside security review found, each tried from outside: dev mode with production
//! keys, one tenant exhausting the revocation table, one client address taking every HTTP
//! slot, a reader that stalls a response, metrics and other tenants' users on the public
//! listener, a refresh with another session's token, and protocol errors closed without a
//! code.

use std::time::Duration;

use gateway::auth::{Claims, DISCONNECT_SCOPE, STATS_SCOPE};
use gateway_tests::{TestGateway, WAIT, claims, config, guests, post, token, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn gateway_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("gateway")
}

/// Runs the real binary in a fresh directory with `env`; its status and stderr.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "gateway-security-{}-{}",
        std::process::id(),
        args.join("-").replace(['/', ':', '.'], "_")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = std::process::Command::new(gateway_binary());
    command.args(args).current_dir(&dir).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `--dev` mints tokens for anyone: it never does so with a production secret, JWKS or
/// issuer, nor on a public address unless told.
#[test]
fn dev_mode_never_signs_with_configured_keys() {
    let secret = ("GATEWAY_JWT_SECRET", "production-secret-0123456789abcdef");
    let (ok, stderr) = run_binary(&["serve", "--dev", "--listen", "127.0.0.1:0"], &[secret]);
    assert!(!ok, "serve --dev started with a production secret");
    assert!(stderr.contains("jwt_secret"), "{stderr}");
    let (ok, stderr) = run_binary(&["token", "--dev", "--user", "alice"], &[secret]);
    assert!(!ok, "token --dev signed with a production secret");
    assert!(stderr.contains("own generated secret"), "{stderr}");
    let issuer = ("GATEWAY_AUTH__ISSUER", "https://login.example");
    let (ok, stderr) = run_binary(&["token", "--dev", "--user", "alice"], &[issuer]);
    assert!(!ok && stderr.contains("auth.issuer"), "{stderr}");
    let jwks = ("GATEWAY_AUTH__JWKS_FILE", "/nonexistent/keys.json");
    let (ok, stderr) = run_binary(&["token", "--dev", "--user", "alice"], &[jwks]);
    assert!(!ok && stderr.contains("auth.jwks_file"), "{stderr}");
    // Its own secret works.
    let (ok, stderr) = run_binary(&["token", "--dev", "--user", "alice"], &[]);
    assert!(ok, "{stderr}");
    // A public address needs the explicit override.
    let (ok, stderr) = run_binary(&["serve", "--dev", "--listen", "0.0.0.0:0"], &[]);
    assert!(!ok && stderr.contains("--dev-allow-remote"), "{stderr}");
}

fn operator(tenant: Option<&str>, scope: &str) -> String {
    let mut c = claims("ops-console");
    c.scope = Some(scope.into());
    c.tenant = tenant.map(Into::into);
    token(c)
}

fn in_tenant(user: &str, tenant: &str) -> Claims {
    Claims {
        tenant: Some(tenant.into()),
        ..claims(user)
    }
}

/// One tenant's backend fills its own revocation quota, never the others'; past it, the
/// disconnect still closes the sessions and the answer says the tokens were not revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_exhaust_revocations_and_a_full_quota_still_disconnects() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.max_revocations_per_tenant = 2;
    let gw = TestGateway::start_with(cfg).await;
    let noisy = operator(Some("noisy"), DISCONNECT_SCOPE);
    let url = gw.url("/v1/disconnect");
    for user in ["u1", "u2"] {
        let body = json!({"user_id": user, "revoke_secs": 3600});
        let (status, answer) = post(&url, &noisy, body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut victim = gw.connect_with(in_tenant("u3", "noisy")).await;
    let body = json!({"user_id": "u3", "revoke_secs": 3600, "reason": "suspended"});
    let (status, answer) = post(&url, &noisy, body.to_string()).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"], "revocations_full", "{answer}");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("max_revocations_per_tenant"),
        "{answer}"
    );
    assert_eq!(answer["disconnected"], 1, "{answer}");
    let closed = victim.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4001, "disconnected: suspended"),
        "the disconnect happened"
    );
    // Not revoked: said so, and true.
    assert!(answer["revoked_until"].is_null());
    gw.try_connect(&token(in_tenant("u3", "noisy")))
        .await
        .expect("the token was not revoked");

    // Another tenant revokes as before.
    let quiet = operator(Some("quiet"), DISCONNECT_SCOPE);
    let body = json!({"user_id": "u1", "revoke_secs": 3600});
    let (status, answer) = post(&url, &quiet, body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        gw.refusal(&token(in_tenant("u1", "quiet"))).await,
        (
            401,
            json!({"error": "unauthorized", "reason": "token has been revoked"})
        )
    );
}

/// A connection from `ip` (any 127.x address on loopback).
async fn connect_from(ip: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Connections in the HTTP phase, less the one asking (the metrics request counts itself).
async fn http_connections(gw: &TestGateway) -> f64 {
    gw.metric("gateway_http_connections").await - 1.0
}

/// One address holding its share of idle connections is refused more at once (429), while
/// another address is served, and publishers reach `/v1/*` on the ops listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_http_slot() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.max_http_connections = 6;
    cfg.limits.max_http_connections_per_address = 3;
    cfg.limits.header_read_timeout_secs = 60;
    cfg.limits.shutdown_grace_secs = 1;
    let gw = TestGateway::start_with_ops(cfg).await;
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut hog = connect_from("127.0.0.1", gw.addr).await;
        hog.write_all(b"GET /healthz HT").await.unwrap();
        hogs.push(hog);
    }
    wait_until("the hogs hold their slots", async || {
        http_connections(&gw).await >= 3.0
    })
    .await;
    let mut extra = connect_from("127.0.0.1", gw.addr).await;
    let mut answer = String::new();
    tokio::time::timeout(WAIT, extra.read_to_string(&mut answer))
        .await
        .expect("refused at once, not queued")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("address_limit"), "{answer}");

    let mut other = connect_from("127.0.0.2", gw.addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, other.read_to_string(&mut answer))
        .await
        .expect("another address is served")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The backend's API on the ops listener, beside health and metrics.
    let ops = gw.ops_addr.unwrap();
    let body = json!({"user_id": "alice", "kind": "k", "payload": {}});
    let (status, receipt) = post(
        &format!("http://{ops}/v1/publish"),
        &gw.publisher_token(),
        body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    // Metrics are for the ops listener only, once there is one.
    let mut public = connect_from("127.0.0.3", gw.addr).await;
    public
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    public.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    drop(hogs);
}

/// A client that sends requests and never reads the answers loses its connection once a
/// write has waited `write_timeout_secs`, instead of holding its slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.write_timeout_secs = 1;
    cfg.limits.header_read_timeout_secs = 60;
    let gw = TestGateway::start_with_ops(cfg).await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (_reader, mut writer) = stream.into_split();
    // Pipelined requests whose answers fill the socket buffers; nothing is read.
    let requests = b"GET /client.js HTTP/1.1\r\nhost: x\r\n\r\n".repeat(20_000);
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&requests).await;
        writer
    });
    wait_until("the stalled connection is open", async || {
        http_connections(&gw).await >= 1.0
    })
    .await;
    wait_until("the stalled connection is dropped", async || {
        http_connections(&gw).await <= 0.0
    })
    .await;
    writing.abort();
}

async fn stats(gw: &TestGateway, token: &str) -> Value {
    let response = reqwest::Client::new()
        .get(gw.url("/v1/stats"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A tenant-bound operator's stats name its own tenant's users only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_a_tenant_bound_operator_its_own_users_only() {
    let gw = TestGateway::start().await;
    let _a = gw.connect_with(in_tenant("alice", "acme")).await;
    let _b = gw.connect_with(in_tenant("bob", "globex")).await;
    let _c = gw.connect_with(in_tenant("carol", "globex")).await;
    let body = stats(&gw, &operator(Some("acme"), STATS_SCOPE)).await;
    assert_eq!(body["users_connected"], 1, "{body}");
    let users: Vec<&str> = body["busiest_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice"], "{body}");
    let body = stats(&gw, &operator(None, STATS_SCOPE)).await;
    assert_eq!(body["users_connected"], 3, "{body}");
}

/// An in-band refresh must be for the connection's own token session: a token of another
/// `sid` would outlive that session's revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_another_sessions_token_is_refused() {
    let gw = TestGateway::start().await;
    let laptop = Claims {
        sid: Some("laptop".into()),
        ..claims("ivy")
    };
    let mut client = gw.connect_with(laptop.clone()).await;
    let phone = Claims {
        sid: Some("phone".into()),
        exp: laptop.exp + 600,
        ..claims("ivy")
    };
    client
        .send_json(&json!({"type": "gateway.refresh", "access_token": token(phone)}))
        .await;
    let reply = client.next_json().await.unwrap();
    assert_eq!(reply["type"], "gateway.refresh_failed", "{reply}");
    assert!(reply["reason"].as_str().unwrap().contains("sid"), "{reply}");
    let renewed = Claims {
        exp: laptop.exp + 600,
        ..laptop
    };
    client
        .send_json(&json!({"type": "gateway.refresh", "access_token": token(renewed.clone())}))
        .await;
    let reply = client.next_json().await.unwrap();
    assert_eq!(reply["type"], "gateway.refreshed", "{reply}");
    assert_eq!(reply["expires_at"], renewed.exp);
}

/// Reads one server frame (unmasked): its opcode and payload.
async fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).await.unwrap();
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).await.unwrap();
            u64::from_be_bytes(ext)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

/// A client frame that breaks the protocol (here: not masked) is answered with close code
/// 1002, not a silent drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_error_is_closed_with_1002() {
    let gw = TestGateway::start().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nupgrade: websocket\r\n\
         connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         sec-websocket-version: 13\r\n\r\n",
        gw.token("alice")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    // An unmasked text frame "hi".
    stream.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (opcode, payload) = read_frame(&mut stream).await;
            if opcode == 0x8 {
                return payload;
            }
        }
    })
    .await
    .expect("a close frame");
    assert!(close.len() >= 2, "a close frame without a code");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1002);
}
