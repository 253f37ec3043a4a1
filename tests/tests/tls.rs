//! `wss://` and `https://` with rustls: clients that verify the certificate, a certificate
//! replaced on disk while connections stay up, a bad one refused, and handshakes that cannot
//! hold the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use gateway::config::Config;
use gateway_tests::{TestGateway, config, guests};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A certificate authority and a leaf it signed for `localhost` and 127.0.0.1.
struct Pki {
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    leaf_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    Pki {
        ca: ca.der().clone(),
        leaf: leaf.der().clone(),
        leaf_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// Writes the leaf and key the way an operator should: beside the target, then renamed.
fn install(pki: &Pki, dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    for (path, text) in [(&cert, &pki.leaf_pem), (&key, &pki.key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tls_config(cert: PathBuf, key: PathBuf) -> Config {
    let mut config = config(guests::REFERENCE);
    config.tls.cert_file = Some(cert);
    config.tls.key_file = Some(key);
    config.tls.reload_poll_secs = 1;
    config
}

/// A client that trusts exactly `roots`.
fn connector(roots: &[&CertificateDer<'static>]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(client))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 request over a verified TLS connection; the status and JSON body.
async fn https(
    addr: SocketAddr,
    connector: &TlsConnector,
    request: &str,
    body: &str,
) -> (u16, Value) {
    let mut stream = tls_connect(addr, connector).await.unwrap();
    let head = format!(
        "{request}\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    stream
        .write_all(format!("{head}\r\n{body}").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer[9..12].parse().unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn wss(gw: &TestGateway, connector: &TlsConnector, user: &str) -> Wss {
    let stream = tls_connect(gw.addr, connector).await.unwrap();
    let url = format!(
        "wss://localhost:{}/ws?access_token={}",
        gw.addr.port(),
        gw.token(user)
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    ws
}

async fn next_json(ws: &mut Wss) -> Value {
    loop {
        let frame = tokio::time::timeout(gateway_tests::WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn publish(gw: &TestGateway, connector: &TlsConnector, user: &str, n: u64) -> u64 {
    let body = json!({ "user_id": user, "kind": "agent_started", "payload": { "n": n } });
    let (status, receipt) = https(
        gw.addr,
        connector,
        &format!(
            "POST /v1/publish HTTP/1.1\r\nauthorization: Bearer {}",
            gw.publisher_token()
        ),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn wss_and_https_with_a_certificate_the_client_verifies() {
    let ours = pki();
    let (cert, key) = install(&ours, &temp_dir("serve"));
    let gw = TestGateway::start_with_ops(tls_config(cert, key)).await;
    let trusting = connector(&[&ours.ca]);

    let mut ws = wss(&gw, &trusting, "alice").await;
    let seq = publish(&gw, &trusting, "alice", 1).await;
    let event = next_json(&mut ws).await;
    assert_eq!(event["seq"], json!(seq));
    assert_eq!(event["payload"]["n"], json!(1));

    // A client that does not trust the certificate gets no connection.
    let other = pki();
    let distrusting = connector(&[&other.ca]);
    let refused = tls_connect(gw.addr, &distrusting).await;
    assert!(
        refused.is_err(),
        "a certificate the client cannot verify was accepted"
    );
    // Plain HTTP on the TLS port is a failed handshake, not a request.
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    gw.wait_metric(r#"gateway_tls_handshakes_total{result="failed"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn a_replaced_certificate_serves_new_handshakes_and_live_connections_stay() {
    let first = pki();
    let dir = temp_dir("reload");
    let (cert, key) = install(&first, &dir);
    let gw = TestGateway::start_with_ops(tls_config(cert.clone(), key)).await;
    let second = pki();
    let trusting_both = connector(&[&first.ca, &second.ca]);
    let mut live = wss(&gw, &trusting_both, "bob").await;
    assert_eq!(
        presented(&tls_connect(gw.addr, &trusting_both).await.unwrap()),
        first.leaf
    );

    install(&second, &dir);
    gw.wait_metric(r#"gateway_tls_reloads_total{result="ok"}"#, 1.0)
        .await;
    assert_eq!(
        presented(&tls_connect(gw.addr, &trusting_both).await.unwrap()),
        second.leaf,
        "new handshakes get the new certificate"
    );
    let seq = publish(&gw, &trusting_both, "bob", 2).await;
    assert_eq!(
        next_json(&mut live).await["seq"],
        json!(seq),
        "the connection made under the old certificate is still served"
    );

    // A broken file is refused; the certificate in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    gw.wait_metric(r#"gateway_tls_reloads_total{result="refused"}"#, 1.0)
        .await;
    assert_eq!(
        presented(&tls_connect(gw.addr, &trusting_both).await.unwrap()),
        second.leaf
    );
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_and_holds_no_one_else() {
    let ours = pki();
    let (cert, key) = install(&ours, &temp_dir("stall"));
    let mut config = tls_config(cert, key);
    config.tls.handshake_timeout_secs = 3;
    let gw = TestGateway::start_with_ops(config).await;
    let trusting = connector(&[&ours.ca]);

    // Connections that never say hello: each is waited for in its own task.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let _ws = wss(&gw, &trusting, "carol").await;
    assert_eq!(
        gw.metric_or_zero(r#"gateway_tls_handshakes_total{result="timeout"}"#)
            .await,
        0.0,
        "the good client got through while the stalled ones waited"
    );
    gw.wait_metric(r#"gateway_tls_handshakes_total{result="timeout"}"#, 8.0)
        .await;
    for mut socket in stalled {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the server closed the stalled connection"
        );
    }
}

#[test]
fn a_key_that_is_not_the_certificates_stops_start_up() {
    let (a, b) = (pki(), pki());
    let dir = temp_dir("mismatch");
    std::fs::write(dir.join("cert.pem"), &a.leaf_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &b.key_pem).unwrap();
    let config = tls_config(dir.join("cert.pem"), dir.join("key.pem"));
    let err = gateway::tls::Tls::load(&config.tls).unwrap_err();
    assert!(err.to_string().contains("tls:"), "{err}");

    std::fs::write(dir.join("key.pem"), "garbage").unwrap();
    let err = gateway::tls::Tls::load(&config.tls).unwrap_err();
    assert!(err.to_string().contains("key.pem"), "{err}");
}
