//! Authentication before the upgrade, and publisher authorisation.

use gateway::auth::now_secs;
use gateway::config::PublicKeyConfig;
use gateway_tests::{SECRET, TestGateway, claims, config, guests, token};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn pem_key(alg: Algorithm, file: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(file)).unwrap();
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => unreachable!(),
    }
}

/// The issuer the test key pairs belong to: several keys need one (see `AmbiguousRoots`).
const KEYS_ISSUER: &str = "https://keys.example";

fn user_claims(user: &str) -> Value {
    json!({"sub": user, "exp": now_secs() + 600, "iss": KEYS_ISSUER})
}

/// Asks for an upgrade with `token` and returns the HTTP status and JSON body. A refusal
/// must be a plain HTTP answer, never a 101.
async fn upgrade_status(gw: &TestGateway, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .get(gw.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn assert_refused(gw: &TestGateway, token: Option<&str>, reason: &str) {
    let (status, body) = upgrade_status(gw, token).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthorized", "{body}");
    let got = body["reason"].as_str().unwrap();
    assert!(
        got.contains(reason),
        "reason {got:?} should mention {reason:?}"
    );
    if let Some(token) = token {
        assert!(!got.contains(token), "a refusal must not echo the token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_failures_are_refused_before_the_upgrade() {
    let gw = TestGateway::start().await;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());

    assert_refused(&gw, None, "missing token").await;
    assert_refused(&gw, Some("not-a-jwt"), "malformed").await;

    // alg "none": header {"alg":"none"} and an empty signature.
    let none = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
        base64_url(&user_claims("mallory").to_string())
    );
    // "none" is no algorithm the header parser knows: malformed, never checked unsigned.
    assert_refused(&gw, Some(&none), "malformed token").await;

    let expired = json!({"sub": "alice", "exp": now_secs() - 600});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &expired)),
        "expired",
    )
    .await;

    let early = json!({"sub": "alice", "exp": now_secs() + 1200, "nbf": now_secs() + 600});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &early)),
        "not valid yet",
    )
    .await;

    let no_sub = json!({"exp": now_secs() + 600});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &no_sub)),
        "sub",
    )
    .await;

    let no_exp = json!({"sub": "alice"});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &no_exp)),
        "exp",
    )
    .await;

    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-0123456789");
    let forged = sign(Algorithm::HS256, None, &other_secret, &user_claims("alice"));
    assert_refused(&gw, Some(&forged), "signature").await;

    // Tampered payload: alice's token with the claims swapped for mallory's.
    let good = gw.token("alice");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        base64_url(&user_claims("mallory").to_string()),
        parts[2]
    );
    assert_refused(&gw, Some(&tampered), "signature").await;

    // An algorithm with no configured key.
    let rs = sign(
        Algorithm::RS256,
        None,
        &pem_key(Algorithm::RS256, "rsa_private.pem"),
        &user_claims("alice"),
    );
    assert_refused(&gw, Some(&rs), "algorithm").await;

    // None of these created an instance.
    assert_eq!(gw.metric("gateway_instantiations_total").await, 0.0);
    assert!(
        gw.metric(r#"gateway_refusals_total{reason="expired"}"#)
            .await
            >= 1.0
    );

    // And the good token, by header and by query parameter, is accepted.
    let mut by_header = gw.connect("alice").await;
    let (mut by_query, _) =
        tokio_tungstenite::connect_async(format!("{}?access_token={good}", gw.ws_url()))
            .await
            .expect("query-parameter token accepted");
    by_header.send_json(&json!({"type": "ping"})).await;
    assert_eq!(by_header.next_json().await.unwrap()["user_id"], "alice");
    use futures_util::StreamExt;
    let welcome = by_query.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains(r#""user_id":"alice""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asymmetric_keys_kid_and_no_algorithm_confusion() {
    let mut cfg = config(guests::REFERENCE);
    cfg.jwt_secret = None;
    cfg.auth.issuer = Some(KEYS_ISSUER.into());
    cfg.auth.public_keys = vec![
        PublicKeyConfig {
            alg: "RS256".into(),
            kid: Some("rsa-1".into()),
            pem_file: fixture("rsa_public.pem"),
        },
        PublicKeyConfig {
            alg: "ES256".into(),
            kid: None,
            pem_file: fixture("ec_public.pem"),
        },
        PublicKeyConfig {
            alg: "EdDSA".into(),
            kid: None,
            pem_file: fixture("ed_public.pem"),
        },
    ];
    let gw = TestGateway::start_with(cfg).await;

    let rsa = pem_key(Algorithm::RS256, "rsa_private.pem");
    for (alg, kid, key) in [
        (Algorithm::RS256, Some("rsa-1"), rsa.clone()),
        (
            Algorithm::ES256,
            None,
            pem_key(Algorithm::ES256, "ec_private.pem"),
        ),
        (
            Algorithm::EdDSA,
            None,
            pem_key(Algorithm::EdDSA, "ed_private.pem"),
        ),
    ] {
        let token = sign(alg, kid, &key, &user_claims("alice"));
        let client = gw.try_connect(&token).await;
        assert!(client.is_ok(), "{alg:?} token refused: {:?}", client.err());
    }

    let unknown_kid = sign(Algorithm::RS256, Some("rsa-2"), &rsa, &user_claims("alice"));
    assert_refused(&gw, Some(&unknown_kid), "key id").await;

    // The classic confusion attack: HS256 "signed" with the RSA public key as the secret.
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(&public_pem),
        &user_claims("mallory"),
    );
    assert_refused(&gw, Some(&confused), "algorithm HS256").await;

    // HS256 tokens are not accepted at all when no secret is configured.
    let hs = token(claims("alice"));
    assert_refused(&gw, Some(&hs), "algorithm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let mut cfg = config(guests::REFERENCE);
    cfg.auth.issuer = Some("https://auth.example".into());
    cfg.auth.audience = Some("agent-events".into());
    let gw = TestGateway::start_with(cfg).await;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let exp = now_secs() + 600;

    let good =
        json!({"sub": "a", "exp": exp, "iss": "https://auth.example", "aud": "agent-events"});
    assert!(
        gw.try_connect(&sign(Algorithm::HS256, None, &secret, &good))
            .await
            .is_ok()
    );

    let wrong_iss = json!({"sub": "a", "exp": exp, "iss": "https://evil", "aud": "agent-events"});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &wrong_iss)),
        "issuer",
    )
    .await;
    let wrong_aud = json!({"sub": "a", "exp": exp, "iss": "https://auth.example", "aud": "other"});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &wrong_aud)),
        "audience",
    )
    .await;
    let no_iss = json!({"sub": "a", "exp": exp, "aud": "agent-events"});
    assert_refused(
        &gw,
        Some(&sign(Algorithm::HS256, None, &secret, &no_iss)),
        "iss",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_publisher_tokens_publish_and_bad_bodies_get_reasons() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.max_batch_events = 3;
    cfg.limits.max_body_bytes = 4096;
    let gw = TestGateway::start_with(cfg).await;
    let event = json!({"user_id": "alice", "kind": "agent_started", "payload": {}});

    // A user's connect token cannot publish, not even to itself.
    let (status, body) = gw.publish(&gw.token("alice"), &event).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("events:publish"));
    let (status, body) = gw.publish("", &event).await;
    assert_eq!(status, 401, "{body}");

    let publisher = gw.publisher_token();
    let url = gw.url("/v1/publish");
    for (raw, reason) in [
        ("{not json", "invalid event"),
        (r#"{"user_id":"alice","payload":{}}"#, "kind"),
        (
            r#"{"user_id":"","kind":"k","payload":{}}"#,
            "user_id must not be empty",
        ),
        (
            r#"{"user_id":"a","kind":"k","payload":{},"extra":1}"#,
            "extra",
        ),
    ] {
        let (status, body) = gateway_tests::post(&url, &publisher, raw.into()).await;
        assert_eq!(status, 400, "{raw} -> {body}");
        assert_eq!(body["error"], "bad_request");
        let got = body["reason"].as_str().unwrap();
        assert!(
            got.contains(reason),
            "{raw}: {got:?} should mention {reason:?}"
        );
    }

    let big = json!({"user_id": "a", "kind": "k", "payload": "x".repeat(8192)});
    let (status, body) = gw.publish(&publisher, &big).await;
    assert_eq!(status, 413, "{body}");

    let (status, body) = gw.publish_batch(&publisher, &vec![event.clone(); 4]).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "too_many_events");

    // One bad event in a batch: nothing from the batch is published.
    let (status, before) = gw.publish(&publisher, &event).await;
    assert_eq!(status, 200, "{before}");
    let (status, body) = gw
        .publish_batch(&publisher, &[event.clone(), json!({"user_id": "alice"})])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().starts_with("events[1]"));
    let (status, body) = gw.publish(&publisher, &event).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["seq"].as_u64(),
        before["seq"].as_u64().map(|s| s + 1),
        "the refused batch must not have used a seq: {body}"
    );
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn jwks(keys: &[(&str, Algorithm, &str)]) -> String {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let keys = keys
        .iter()
        .map(|(kid, alg, private)| {
            let mut jwk = Jwk::from_encoding_key(&pem_key(*alg, private), *alg).unwrap();
            jwk.common.key_id = Some((*kid).to_owned());
            jwk
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).unwrap()
}

/// Replaces `path` whole, as a deployment would (write beside it, rename over it), with the
/// given modification time: the poller notices a change by that time, and a file system's
/// clock may be too coarse to move between two writes.
fn replace_file(path: &std::path::Path, text: &str, modified: std::time::SystemTime) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&next)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_when_the_file_changes() {
    let dir = std::env::temp_dir().join(format!("gateway-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(
        &path,
        jwks(&[("2026-10", Algorithm::RS256, "rsa_private.pem")]),
    )
    .unwrap();
    let loaded = std::fs::metadata(&path).unwrap().modified().unwrap();
    let later = |secs| loaded + std::time::Duration::from_secs(secs);

    let mut cfg = config(guests::REFERENCE);
    cfg.jwt_secret = None;
    cfg.auth.jwks_file = Some(path.clone());
    cfg.auth.jwks_poll_secs = 1;
    let gw = TestGateway::start_with(cfg).await;

    let rsa = pem_key(Algorithm::RS256, "rsa_private.pem");
    let ec = pem_key(Algorithm::ES256, "ec_private.pem");
    let old = sign(
        Algorithm::RS256,
        Some("2026-10"),
        &rsa,
        &user_claims("alice"),
    );
    let new = sign(
        Algorithm::ES256,
        Some("2026-11"),
        &ec,
        &user_claims("alice"),
    );
    assert!(gw.try_connect(&old).await.is_ok());
    assert_refused(&gw, Some(&new), "algorithm").await;

    // Rotate, the new key in and the old one out, and leave it to the poller.
    replace_file(
        &path,
        &jwks(&[("2026-11", Algorithm::ES256, "ec_private.pem")]),
        later(60),
    );
    gateway_tests::wait_until("the poller loads the rotated key set", async || {
        gw.state.verifier.verify(&new).is_ok()
    })
    .await;
    assert!(gw.try_connect(&new).await.is_ok());
    assert_refused(&gw, Some(&old), "algorithm").await;

    // A broken file keeps the keys in use.
    replace_file(&path, "{ not json", later(120));
    assert!(gw.state.verifier.reload_jwks(true).is_err());
    assert!(gw.try_connect(&new).await.is_ok());

    // A forced reload (what SIGHUP does) takes the fixed file at once.
    replace_file(
        &path,
        &jwks(&[("2026-10", Algorithm::RS256, "rsa_private.pem")]),
        later(180),
    );
    assert_eq!(gw.state.verifier.reload_jwks(true).unwrap(), Some(1));
    assert!(gw.try_connect(&old).await.is_ok());
    assert_refused(&gw, Some(&new), "algorithm").await;
    let _ = std::fs::remove_dir_all(&dir);
}
