//! `POST /v1/disconnect`: an operator closes one token session's connections or all of an
//! identity's, with 4001 and a reason, and can revoke the tokens until a given time.

use gateway::auth::{Claims, DISCONNECT_SCOPE, now_secs};
use gateway_tests::{Client, TestGateway, claims, post, token};
use serde_json::{Value, json};

fn session(user: &str, sid: &str) -> Claims {
    Claims {
        sid: Some(sid.into()),
        ..claims(user)
    }
}

fn operator(tenant: Option<&str>) -> String {
    let mut c = claims("ops-console");
    c.scope = Some(DISCONNECT_SCOPE.into());
    c.tenant = tenant.map(Into::into);
    token(c)
}

async fn disconnect(gw: &TestGateway, operator: &str, body: Value) -> (u16, Value) {
    post(&gw.url("/v1/disconnect"), operator, body.to_string()).await
}

/// The HTTP refusal of a connect with `claims`.
async fn refused(gw: &TestGateway, claims: Claims) -> (u16, Value) {
    gw.refusal(&token(claims)).await
}

/// The refusal of a revoked token, exactly: any other 401 (expired, bad signature) is not it.
fn revoked() -> (u16, Value) {
    (
        401,
        json!({"error": "unauthorized", "reason": "token has been revoked"}),
    )
}

async fn event_reaches(gw: &TestGateway, user: &str, clients: &mut [&mut Client]) {
    let (status, receipt) = gw
        .publish(
            &gw.publisher_token(),
            &json!({ "user_id": user, "kind": "agent_started", "payload": {} }),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    for client in clients {
        let frame = client.next_json().await.unwrap();
        assert_eq!(frame["seq"], receipt["seq"]);
    }
}

#[tokio::test]
async fn one_token_session_is_closed_and_revoked_and_the_others_stay() {
    let gw = TestGateway::start().await;
    let mut laptop = gw.connect_with(session("alice", "laptop")).await;
    let mut phone = gw.connect_with(session("alice", "phone")).await;
    let mut bob = gw.connect_with(session("bob", "laptop")).await;

    let (status, answer) = disconnect(
        &gw,
        &operator(None),
        json!({ "user_id": "alice", "sid": "laptop", "reason": "logged out", "revoke_secs": 600 }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["disconnected"], json!(1));
    assert!(answer["revoked_until"].as_u64().unwrap() >= now_secs() + 599);
    let closed = laptop.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4001, "disconnected: logged out")
    );

    // The same session's token cannot come back before the revocation ends; another
    // session of the same user, and another user with the same sid, are untouched.
    assert_eq!(refused(&gw, session("alice", "laptop")).await, revoked());
    event_reaches(&gw, "alice", &mut [&mut phone]).await;
    event_reaches(&gw, "bob", &mut [&mut bob]).await;
    let mut tablet = gw.connect_with(session("alice", "tablet")).await;
    event_reaches(&gw, "alice", &mut [&mut phone, &mut tablet]).await;
    gw.wait_metric(r#"gateway_refusals_total{reason="revoked"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn an_identity_wide_revocation_refuses_tokens_issued_before_it_only() {
    let gw = TestGateway::start().await;
    let mut first = gw.connect("carol").await;
    let mut second = gw.connect("carol").await;
    let (status, answer) = disconnect(
        &gw,
        &operator(None),
        json!({ "user_id": "carol", "revoke_secs": 600 }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["disconnected"], json!(2));
    for client in [&mut first, &mut second] {
        let closed = client.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (4001, "disconnected: by the operator")
        );
    }
    // Every token issued up to the revocation is refused, with or without `iat`...
    assert_eq!(refused(&gw, claims("carol")).await, revoked());
    let without_iat = Claims {
        iat: None,
        ..claims("carol")
    };
    assert_eq!(refused(&gw, without_iat).await, revoked());
    gw.wait_metric(r#"gateway_refusals_total{reason="revoked"}"#, 2.0)
        .await;
    // ...and a token issued after it (a new login) connects.
    let mut after = gw
        .connect_with(Claims {
            iat: Some(now_secs() + 1),
            ..claims("carol")
        })
        .await;
    event_reaches(&gw, "carol", &mut [&mut after]).await;

    // Without revoke_secs it only disconnects: the same token may connect again.
    let (status, answer) = disconnect(&gw, &operator(None), json!({ "user_id": "dave" })).await;
    assert_eq!((status, answer["disconnected"].clone()), (200, json!(0)));
    let _dave = gw.connect("dave").await;
}

#[tokio::test]
async fn only_operators_disconnect_and_bad_requests_are_named() {
    let gw = TestGateway::start().await;
    let mut acme_erin = gw
        .connect_with(Claims {
            tenant: Some("acme".into()),
            ..claims("erin")
        })
        .await;

    let (status, _) = disconnect(&gw, &gw.publisher_token(), json!({ "user_id": "erin" })).await;
    assert_eq!(status, 403, "a publisher token lacks the scope");
    let (status, _) = disconnect(&gw, &gw.token("erin"), json!({ "user_id": "erin" })).await;
    assert_eq!(status, 403, "a user's own connect token lacks the scope");

    // A tenant-bound operator acts within its tenant only.
    let (status, body) = disconnect(
        &gw,
        &operator(Some("globex")),
        json!({ "user_id": "erin", "tenant_id": "acme" }),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, answer) =
        disconnect(&gw, &operator(Some("acme")), json!({ "user_id": "erin" })).await;
    assert_eq!((status, answer["disconnected"].clone()), (200, json!(1)));
    assert_eq!(acme_erin.closed().await.code, 4001);

    for (body, names) in [
        (json!({ "user_id": "" }), "user_id"),
        (
            json!({ "user_id": "x", "reason": "r".repeat(101) }),
            "reason",
        ),
        (json!({ "user_id": "x", "reason": "a\nb" }), "reason"),
        (json!({ "user_id": "x", "revoke_secs": 0 }), "revoke_secs"),
        (
            json!({ "user_id": "x", "revoke_secs": 31 * 24 * 3600 }),
            "revoke_secs",
        ),
        (json!({ "user_id": "x", "everyone": true }), "everyone"),
    ] {
        let (status, answer) = disconnect(&gw, &operator(None), body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["reason"].as_str().unwrap().contains(names),
            "{body}: {answer}"
        );
    }
}
