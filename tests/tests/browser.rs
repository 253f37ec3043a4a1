//! The browser client and the demo page in a real headless Chromium: events in order and
//! only the user's own, a dropped connection resumed with every event once, a restarted
//! gateway reported as a resume that cannot be trusted, in-band token refresh, and the close
//! codes after which the client must not reconnect.

use std::path::PathBuf;

use gateway::config::Config;
use gateway_tests::browser::{Browser, ONE_AT_A_TIME, Proxy};
use gateway_tests::{TestGateway, config, guests};
use serde_json::{Value, json};

fn dev_config() -> Config {
    Config {
        dev: true,
        ..config(guests::REFERENCE)
    }
}

/// Publishes one event for `user` and returns its `seq`.
async fn publish(gw: &TestGateway, user: &str, kind: &str, payload: Value) -> u64 {
    let (status, receipt) = gw
        .publish(
            &gw.publisher_token(),
            &json!({ "user_id": user, "kind": kind, "payload": payload, "run_id": "r1" }),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].as_u64().unwrap()
}

/// The `seq` of every event the page shows, in the order shown.
async fn shown_seqs(page: &mut Browser) -> Vec<u64> {
    let seqs = page
        .eval("JSON.stringify([...document.querySelectorAll('#events li[data-seq]')].map(li => Number(li.dataset.seq)))")
        .await
        .unwrap();
    serde_json::from_str(seqs.as_str().unwrap()).unwrap()
}

fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(name)
}

#[tokio::test]
async fn the_demo_page_shows_its_users_events_in_order_and_no_one_elses() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&gw.url("/?user=alice")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome?.user_id === 'alice'")
        .await
        .unwrap();

    let mut published = Vec::new();
    for (i, kind) in ["agent_started", "tool_executing", "tool_completed"]
        .iter()
        .enumerate()
    {
        published.push(
            publish(
                &gw,
                "alice",
                kind,
                json!({ "step": i, "api_key": "sk-live-1" }),
            )
            .await,
        );
        // Another user's event between each of alice's: it must never reach her page.
        publish(
            &gw,
            "mallory",
            "agent_started",
            json!({ "secret_of": "mallory" }),
        )
        .await;
    }
    page.wait_for("alice's three events", "window.demo.events.length >= 3")
        .await
        .unwrap();
    assert_eq!(shown_seqs(&mut page).await, published);
    let text = page.eval("document.body.innerText").await.unwrap();
    let text = text.as_str().unwrap();
    assert!(!text.contains("mallory"), "another user's event was shown");
    assert!(!text.contains("sk-live-1"), "a secret was shown: {text}");
    let marked = page
        .eval("document.querySelectorAll('#events .redacted').length")
        .await
        .unwrap();
    assert_eq!(marked, json!(3), "each event's api_key shown as redacted");

    // The demo's own run, started from the page: seven events, ending completed.
    page.eval("document.getElementById('run').click()")
        .await
        .unwrap();
    page.wait_for(
        "the demo run to complete",
        "window.demo.events.length === 10 && Object.values(window.demo.runs).includes('completed')",
    )
    .await
    .unwrap();
    let seqs = shown_seqs(&mut page).await;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {seqs:?}"
    );
    page.screenshot(&artifact("demo-page.png")).await.unwrap();
    assert!(page.page_errors.is_empty(), "{:?}", page.page_errors);
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_every_event_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let proxy = Proxy::start(gw.addr).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&proxy.url("/?user=carol")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();

    let mut published = Vec::new();
    for i in 0..3 {
        published.push(publish(&gw, "carol", "tool_executing", json!({ "i": i })).await);
    }
    page.wait_for("the first events", "window.demo.events.length === 3")
        .await
        .unwrap();

    // The network goes away: no close frame, and no new connection gets through.
    proxy.cut();
    page.wait_for(
        "the client to notice the drop",
        "window.demo.closes.some(c => c.code === 1006)",
    )
    .await
    .unwrap();
    for i in 3..7 {
        published.push(publish(&gw, "carol", "tool_executing", json!({ "i": i })).await);
    }
    proxy.restore(gw.addr);
    let resume = page
        .wait_for("the resume", "window.demo.resumes[0]")
        .await
        .unwrap();
    assert_eq!(resume["recovered"], json!(true), "{resume}");
    assert_eq!(resume["replayed"], json!(4), "{resume}");
    page.wait_for("the missed events", "window.demo.events.length === 7")
        .await
        .unwrap();
    assert_eq!(shown_seqs(&mut page).await, published);

    // The client's own reconnect (the page's "Drop connection") resumes too, with nothing
    // missed and nothing repeated.
    page.eval("document.getElementById('drop').click()")
        .await
        .unwrap();
    let resume = page
        .wait_for("the second resume", "window.demo.resumes[1]")
        .await
        .unwrap();
    assert_eq!(resume["recovered"], json!(true), "{resume}");
    assert_eq!(resume["replayed"], json!(0), "{resume}");
    published.push(publish(&gw, "carol", "agent_completed", json!({})).await);
    page.wait_for("the live event", "window.demo.events.length === 8")
        .await
        .unwrap();
    assert_eq!(shown_seqs(&mut page).await, published);
    assert!(page.page_errors.is_empty(), "{:?}", page.page_errors);
}

#[tokio::test]
async fn a_restarted_gateway_is_a_resume_the_page_cannot_trust() {
    let _one = ONE_AT_A_TIME.lock().await;
    let first = TestGateway::start_with(dev_config()).await;
    let proxy = Proxy::start(first.addr).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&proxy.url("/?user=erin")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    let before = publish(&first, "erin", "agent_started", json!({})).await;
    page.wait_for("the first event", "window.demo.events.length === 1")
        .await
        .unwrap();

    // A drain closes with 1001, and the client reconnects, as through a load balancer, to
    // another node: one with no history of this user.
    let second = TestGateway::start_with(dev_config()).await;
    proxy.restore(second.addr);
    first.stop().await;
    page.wait_for(
        "the drain's close code",
        "window.demo.closes.some(c => c.code === 1001)",
    )
    .await
    .unwrap();
    let resume = page
        .wait_for("the resume", "window.demo.resumes[0]")
        .await
        .unwrap();
    assert_eq!(resume["recovered"], json!(false), "{resume}");
    assert_eq!(page.eval("window.demo.reloads").await.unwrap(), json!(1));
    let log = page
        .eval("document.getElementById('log').innerText")
        .await
        .unwrap();
    assert!(log.as_str().unwrap().contains("NOT recovered"), "{log}");

    // The new node's numbers continue above the old one's, so live events still show.
    let after = publish(&second, "erin", "agent_completed", json!({})).await;
    assert!(after > before);
    page.wait_for("the new node's event", "window.demo.events.length === 2")
        .await
        .unwrap();
    assert_eq!(shown_seqs(&mut page).await, vec![before, after]);
}

#[tokio::test]
async fn an_expiring_token_is_refreshed_in_band_without_a_reconnect() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut config = dev_config();
    config.auth.leeway_secs = 0;
    let gw = TestGateway::start_with(config).await;
    let mut page = Browser::launch().await.unwrap();
    // Tokens of 4 s from /dev/token: the first expires long before the test ends.
    page.goto(&gw.url("/?user=dave&ttl=4")).await.unwrap();
    let welcome = page
        .wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    let first_expiry = welcome["expires_at"].as_u64().unwrap();
    page.wait_for("three in-band refreshes", "window.demo.refreshes >= 3")
        .await
        .unwrap();
    assert!(
        gateway::auth::now_secs() > first_expiry,
        "the first token has expired by now"
    );
    let seq = publish(&gw, "dave", "agent_started", json!({})).await;
    page.wait_for(
        "an event on the same connection",
        "window.demo.events.length === 1",
    )
    .await
    .unwrap();
    assert_eq!(shown_seqs(&mut page).await, vec![seq]);
    assert_eq!(page.eval("window.demo.reconnects").await.unwrap(), json!(0));
    assert_eq!(
        page.eval("window.demo.welcome.connection_id")
            .await
            .unwrap(),
        welcome["connection_id"],
        "still the first connection"
    );
}

#[tokio::test]
async fn a_token_that_cannot_be_refreshed_ends_with_1008_and_no_reconnect() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut config = dev_config();
    config.auth.leeway_secs = 0;
    let gw = TestGateway::start_with(config).await;
    let mut page = Browser::launch().await.unwrap();
    let mut claims = gateway_tests::claims("frank");
    claims.exp = gateway::auth::now_secs() + 4;
    let token = gateway_tests::token(claims);
    // A fixed token in the URL: the client has no newer one to send.
    page.goto(&gw.url(&format!("/?token={token}")))
        .await
        .unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    let close = page
        .wait_for(
            "the final close",
            "window.demo.status === 'closed' && window.demo.closes.at(-1)",
        )
        .await
        .unwrap();
    assert_eq!(close, json!({ "code": 1008, "reason": "token expired" }));
    let failures = page.eval("window.demo.refreshFailures").await.unwrap();
    assert!(
        failures.to_string().contains("no newer token"),
        "{failures}"
    );
    assert_eq!(page.eval("window.demo.reconnects").await.unwrap(), json!(0));
    gw.wait_metric("gateway_sessions_live", 0.0).await;
}

#[tokio::test]
async fn the_client_is_served_cacheable_and_dev_endpoints_only_in_dev_mode() {
    let dev = TestGateway::start_with(dev_config()).await;
    let http = reqwest::Client::new();
    let answer = http.get(dev.url("/client.js")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let headers = answer.headers().clone();
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let version = headers["x-gateway-client-version"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = answer.text().await.unwrap();
    assert!(body.contains(&format!("export const VERSION = \"{version}\"")));
    let etag = headers["etag"].clone();
    let again = http
        .get(dev.url("/client.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.text().await.unwrap().is_empty());

    let bad = http.get(dev.url("/dev/token?user=")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let reason: Value = bad.json().await.unwrap();
    assert_eq!(reason["error"], "bad_request");
    let refused = http.post(dev.url("/dev/run")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "a demo run needs the page's token");

    let production = TestGateway::start().await;
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/dev/token?user=a"),
        ("POST", "/dev/run"),
    ] {
        let answer = http
            .request(method.parse().unwrap(), production.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{method} {path} outside dev mode");
    }
    let client = http.get(production.url("/client.js")).send().await.unwrap();
    assert_eq!(client.status(), 200, "the client is served in every mode");
}

/// The client's state machine under races a browser cannot time (a scripted WebSocket):
/// `tests/client/client.test.mjs` under `node --test`.
#[test]
fn the_client_passes_its_state_machine_tests_in_node() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("client");
    let out = std::process::Command::new("node")
        .args(["--test", "client.test.mjs"])
        .current_dir(&dir)
        .output()
        .expect("node, which this machine's image has, on PATH");
    assert!(
        out.status.success(),
        "node --test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
