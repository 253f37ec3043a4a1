//! The browser client and the demo page in a real headless Chromium: events in order and
//! only the user's own, a dropped connection resumed with every event once, a streamed answer
//! shown whole and once through a reload and a drop mid-stream, a restarted gateway reported
//! as a resume that cannot be trusted, in-band token refresh, and the close codes after which
//! the client must not reconnect.

use std::path::PathBuf;

use gateway::config::Config;
use gateway::web::{DEMO_ANSWER, demo_tokens};
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

/// Publishes one op of a message (`message` as the publish API takes it) for `user`, with the
/// create's `kind`, run and payload; returns its `seq`.
async fn publish_op(gw: &TestGateway, user: &str, message: Value) -> u64 {
    let mut body = json!({ "user_id": user, "message": message });
    if message["op"] == "create" {
        body["kind"] = json!("assistant");
        body["run_id"] = json!("r1");
        body["payload"] = json!({ "model": "m", "api_key": "sk-live-2" });
    }
    let (status, receipt) = gw.publish(&gw.publisher_token(), &body).await;
    assert_eq!(status, 200, "{receipt}");
    receipt["seq"].as_u64().unwrap()
}

/// Appends `tokens[from..to]` to message `id` (indexes count from 1).
async fn append(gw: &TestGateway, user: &str, id: &str, tokens: &[String], from: usize, to: usize) {
    for (i, token) in tokens.iter().enumerate().take(to).skip(from) {
        publish_op(
            gw,
            user,
            json!({ "id": id, "op": "append", "index": i + 1, "text": token }),
        )
        .await;
    }
}

/// A JS expression: the text the page shows for message `id`.
fn shown_text(id: &str) -> String {
    format!(
        "document.querySelector('#messages [data-message-id={}] .text')?.textContent",
        json!(id)
    )
}

/// Waits until the page shows `text` for message `id`, the client holds the same, and the
/// message has `status`.
async fn wait_for_message(page: &mut Browser, what: &str, id: &str, text: &str, status: &str) {
    let (id_js, text_js, status_js) = (json!(id), json!(text), json!(status));
    page.wait_for(
        what,
        &format!(
            "{shown} === {text_js} && window.client.messages.get({id_js})?.text === {text_js} \
             && window.client.messages.get({id_js})?.status === {status_js}",
            shown = shown_text(id)
        ),
    )
    .await
    .unwrap();
}

/// The network goes away under the page (no close frame, no new connection gets through)
/// until the test restores it; returns once the client noticed.
async fn cut(proxy: &Proxy, page: &mut Browser) {
    proxy.cut();
    page.wait_for(
        "the client to notice the drop",
        "window.demo.closes.some(c => c.code === 1006)",
    )
    .await
    .unwrap();
}

/// Three events shown, then the network goes away (no close frame, and no new connection
/// gets through), four are published, and the network comes back: the page resumes, told
/// `recovered`, and shows all seven in order, once. Returns their seqs.
async fn events_survive_a_drop(
    gw: &TestGateway,
    proxy: &Proxy,
    page: &mut Browser,
    user: &str,
) -> Vec<u64> {
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(publish(gw, user, "tool_executing", json!({ "i": i })).await);
    }
    page.wait_for("the first events", "window.demo.events.length === 3")
        .await
        .unwrap();
    cut(proxy, page).await;
    for i in 3..7 {
        published.push(publish(gw, user, "tool_executing", json!({ "i": i })).await);
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
    assert_eq!(shown_seqs(page).await, published);
    published
}

/// Each change to a message the page got, as `(op, text)`, in order.
async fn message_ops(page: &mut Browser) -> Vec<(String, String)> {
    let ops = page
        .eval("JSON.stringify(window.demo.messageOps.map(m => [m.op, m.text]))")
        .await
        .unwrap();
    serde_json::from_str(ops.as_str().unwrap()).unwrap()
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

    // The demo's own run, started from the page: six events, ending completed, and between
    // them the agent's answer streamed token by token as one message.
    page.eval("document.getElementById('run').click()")
        .await
        .unwrap();
    page.wait_for(
        "the demo run to complete",
        "window.demo.events.length === 9 && Object.values(window.demo.runs).includes('completed')",
    )
    .await
    .unwrap();
    let seqs = shown_seqs(&mut page).await;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {seqs:?}"
    );
    let id = page
        .eval("[...window.client.messages.keys()].join()")
        .await
        .unwrap();
    let id = id.as_str().unwrap();
    assert!(id.starts_with("answer-run-"), "one message: {id}");
    wait_for_message(&mut page, "the answer", id, DEMO_ANSWER, "complete").await;
    let ops = message_ops(&mut page).await;
    assert_eq!(ops.first().unwrap().0, "create", "{ops:?}");
    assert_eq!(ops.last().unwrap().0, "end", "{ops:?}");
    // Streamed, not sent whole: appends rolled up within streams.rollup_ms come joined, so
    // there are at most as many as tokens.
    let appends = ops.iter().filter(|(op, _)| op == "append").count();
    assert!(
        (2..=demo_tokens().count()).contains(&appends),
        "{appends} appends: {ops:?}"
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

    let mut published = events_survive_a_drop(&gw, &proxy, &mut page, "carol").await;

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
async fn an_answer_streamed_through_a_reload_and_a_drop_appears_whole_and_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let proxy = Proxy::start(gw.addr).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&proxy.url("/?user=heidi")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    let tokens: Vec<String> = (0..32).map(|i| format!("tok{i} ")).collect();
    let so_far = |n: usize| tokens[..n].concat();

    publish_op(&gw, "heidi", json!({ "id": "m1", "op": "create" })).await;
    append(&gw, "heidi", "m1", &tokens, 0, 4).await;
    let event = publish(&gw, "heidi", "tool_executing", json!({ "step": 1 })).await;
    append(&gw, "heidi", "m1", &tokens, 4, 8).await;
    wait_for_message(&mut page, "the first tokens", "m1", &so_far(8), "streaming").await;

    // A reload mid-stream: the page shows what it kept and resumes after it. Nothing changed
    // meanwhile, so no snapshot: the next appends continue the kept text.
    page.reload().await.unwrap();
    let resume = page
        .wait_for("the reloaded page's resume", "window.demo?.resumes?.[0]")
        .await
        .unwrap();
    assert_eq!(
        (&resume["recovered"], &resume["replayed"]),
        (&json!(true), &json!(0)),
        "{resume}"
    );
    assert_eq!(message_ops(&mut page).await, []);
    assert_eq!(shown_seqs(&mut page).await, [event], "the event once");
    append(&gw, "heidi", "m1", &tokens, 8, 12).await;
    wait_for_message(
        &mut page,
        "the tokens after a reload",
        "m1",
        &so_far(12),
        "streaming",
    )
    .await;

    // The answer goes on while the page has no connection, then the page is reloaded: it
    // gets the answer as one snapshot of its text so far, then only what comes after it.
    page.eval("window.client.close()").await.unwrap();
    append(&gw, "heidi", "m1", &tokens, 12, 16).await;
    page.reload().await.unwrap();
    let resume = page
        .wait_for("the second reload's resume", "window.demo?.resumes?.[0]")
        .await
        .unwrap();
    assert_eq!(
        (&resume["recovered"], &resume["replayed"]),
        (&json!(true), &json!(1)),
        "one entry for the message, however many appends: {resume}"
    );
    wait_for_message(&mut page, "the snapshot", "m1", &so_far(16), "streaming").await;
    assert_eq!(
        message_ops(&mut page).await,
        [("snapshot".to_owned(), so_far(16))],
        "the text so far in one frame"
    );
    append(&gw, "heidi", "m1", &tokens, 16, 20).await;
    wait_for_message(&mut page, "the next tokens", "m1", &so_far(20), "streaming").await;

    // The network drops mid-stream and the answer goes on: on the reconnect the page gets one
    // snapshot with what it missed, then the rest live.
    cut(&proxy, &mut page).await;
    append(&gw, "heidi", "m1", &tokens, 20, 24).await;
    proxy.restore(gw.addr);
    let resume = page
        .wait_for("the resume", "window.demo.resumes[1]")
        .await
        .unwrap();
    assert_eq!(resume["recovered"], json!(true), "{resume}");
    wait_for_message(
        &mut page,
        "the snapshot after the drop",
        "m1",
        &so_far(24),
        "streaming",
    )
    .await;
    append(&gw, "heidi", "m1", &tokens, 24, 32).await;
    publish_op(&gw, "heidi", json!({ "id": "m1", "op": "end" })).await;
    wait_for_message(&mut page, "the whole answer", "m1", &so_far(32), "complete").await;

    let ops = message_ops(&mut page).await;
    let snapshots: Vec<_> = ops.iter().filter(|(op, _)| op == "snapshot").collect();
    assert_eq!(
        snapshots,
        [
            &("snapshot".to_owned(), so_far(16)),
            &("snapshot".to_owned(), so_far(24))
        ],
        "{ops:?}"
    );
    assert_eq!(ops.last().unwrap().0, "end", "{ops:?}");
    let shown = page
        .eval("JSON.stringify([...document.querySelectorAll('#messages [data-message-id]')].map(a => a.querySelector('.text').textContent))")
        .await
        .unwrap();
    assert_eq!(
        shown,
        json!(json!([so_far(32)]).to_string()),
        "one answer, every token once"
    );
    let message = page.eval("window.client.messages.get('m1')").await.unwrap();
    assert_eq!(
        (&message["partial"], &message["payload"]),
        (
            &json!(false),
            &json!({ "model": "m", "api_key": "[redacted]" })
        ),
        "{message}"
    );
    assert_eq!(shown_seqs(&mut page).await, [event]);
    page.screenshot(&artifact("demo-answer.png")).await.unwrap();
    assert!(page.page_errors.is_empty(), "{:?}", page.page_errors);
}

#[tokio::test]
async fn the_demo_runs_answer_survives_a_drop_and_a_reload_mid_stream() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&gw.url("/?user=ivan")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    page.eval("document.getElementById('run').click()")
        .await
        .unwrap();
    let tokens: Vec<&str> = demo_tokens().collect();
    let streaming = |n: usize| {
        format!(
            "[...window.client.messages.values()].some(m => m.status === 'streaming' && m.text.startsWith({}))",
            json!(tokens[..n].concat())
        )
    };
    page.wait_for("the answer's first tokens", &streaming(3))
        .await
        .unwrap();

    // The page's "Drop connection": the client reconnects and resumes where it was.
    page.eval("document.getElementById('drop').click()")
        .await
        .unwrap();
    let resume = page
        .wait_for("the resume", "window.demo.resumes[0]")
        .await
        .unwrap();
    assert_eq!(resume["recovered"], json!(true), "{resume}");
    page.wait_for("more tokens after the drop", &streaming(6))
        .await
        .unwrap();

    page.reload().await.unwrap();
    page.wait_for(
        "the run to complete after the reload",
        "window.demo?.events?.length === 6 && Object.values(window.demo.runs).includes('completed')",
    )
    .await
    .unwrap();
    let id = page
        .eval("[...window.client.messages.keys()].join()")
        .await
        .unwrap();
    let id = id.as_str().unwrap();
    wait_for_message(&mut page, "the whole answer", id, DEMO_ANSWER, "complete").await;
    // Since the reload: a snapshot if the answer changed while the page loaded, then appends
    // and the end; never its create again.
    let ops = message_ops(&mut page).await;
    assert!(ops.iter().all(|(op, _)| op != "create"), "{ops:?}");
    let partial = page
        .eval(&format!(
            "window.client.messages.get({}).partial",
            json!(id)
        ))
        .await
        .unwrap();
    assert_eq!(partial, json!(false));
    let count = page
        .eval("document.querySelectorAll('#messages [data-message-id]').length")
        .await
        .unwrap();
    assert_eq!(count, json!(1));
    let seqs = shown_seqs(&mut page).await;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(page.page_errors.is_empty(), "{:?}", page.page_errors);
}

/// The control path end to end: the page's Stop button is `client.rpc("cancel_run")`; the
/// gateway signs the call and posts it to the demo's backend over HTTP, which cancels the
/// run; the answer comes back to the page, and the streamed answer ends as `cancelled`.
#[tokio::test]
async fn the_demo_pages_stop_button_cancels_the_run_through_a_backend_call() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let mut page = Browser::launch().await.unwrap();
    page.goto(&gw.url("/?user=judy")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    page.eval("document.getElementById('run').click()")
        .await
        .unwrap();
    let tokens: Vec<&str> = demo_tokens().collect();
    page.wait_for(
        "the answer's first tokens",
        &format!(
            "[...window.client.messages.values()].some(m => m.status === 'streaming' && m.text.startsWith({}))",
            json!(tokens[..3].concat())
        ),
    )
    .await
    .unwrap();
    page.eval("document.getElementById('stop').click()")
        .await
        .unwrap();
    let stop = page
        .wait_for("the stop's answer", "window.demo.stops[0]")
        .await
        .unwrap();
    assert_eq!(
        (&stop["ok"], &stop["answer"]["cancelled"]),
        (&json!(true), &json!(true)),
        "{stop}"
    );
    page.wait_for(
        "the answer ended as cancelled, and the run as an error",
        "[...window.client.messages.values()].some(m => m.status === 'cancelled') \
         && Object.values(window.demo.runs).includes('error')",
    )
    .await
    .unwrap();
    let text = page
        .eval("[...window.client.messages.values()][0].text")
        .await
        .unwrap();
    let text = text.as_str().unwrap();
    assert!(
        text.len() < DEMO_ANSWER.len() && DEMO_ANSWER.starts_with(text),
        "the answer stops where it was cancelled: {text:?}"
    );
    // The run is over: a second Stop is the backend's 404, surfaced as an RpcError.
    page.eval("document.getElementById('stop').click()")
        .await
        .unwrap();
    let again = page
        .wait_for("the second stop's answer", "window.demo.stops[1]")
        .await
        .unwrap();
    assert_eq!(
        (&again["ok"], &again["code"]),
        (&json!(false), &json!("backend_error")),
        "{again}"
    );
    let kinds = page
        .eval("JSON.stringify(window.demo.events.map(e => e.kind))")
        .await
        .unwrap();
    let kinds: Vec<String> = serde_json::from_str(kinds.as_str().unwrap()).unwrap();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("agent_error"),
        "{kinds:?}"
    );
    assert!(!kinds.iter().any(|k| k == "agent_completed"), "{kinds:?}");
    assert_eq!(
        gw.metric("gateway_rpc_calls_total{outcome=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        gw.metric("gateway_rpc_calls_total{outcome=\"backend_error\"}")
            .await,
        1.0
    );
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

/// A network that refuses WebSocket upgrades: the page's client falls back to the gateway's
/// SSE stream and still gets every event once, through a drop and a resume, and the demo's
/// streamed answer whole.
#[tokio::test]
async fn behind_a_proxy_that_refuses_upgrades_the_page_gets_every_event_over_sse() {
    let _one = ONE_AT_A_TIME.lock().await;
    let gw = TestGateway::start_with(dev_config()).await;
    let proxy = Proxy::start(gw.addr).await;
    proxy.refuse_upgrades();
    let mut page = Browser::launch().await.unwrap();
    page.goto(&proxy.url("/?user=olga")).await.unwrap();
    page.wait_for("the welcome", "window.demo?.welcome")
        .await
        .unwrap();
    assert_eq!(page.eval("window.demo.transport").await.unwrap(), "sse");
    assert_eq!(gw.metric("gateway_sse_sessions_live").await, 1.0);

    // The network drops the stream; what is published meanwhile comes with the resume.
    events_survive_a_drop(&gw, &proxy, &mut page, "olga").await;
    assert_eq!(page.eval("window.demo.transport").await.unwrap(), "sse");

    // The demo run's answer, token by token over the stream, arrives whole.
    page.eval("document.getElementById('run').click()")
        .await
        .unwrap();
    page.wait_for(
        "the run to complete",
        "Object.values(window.demo.runs).includes('completed')",
    )
    .await
    .unwrap();
    let id = page
        .eval("[...window.client.messages.keys()].join()")
        .await
        .unwrap();
    wait_for_message(
        &mut page,
        "the whole answer",
        id.as_str().unwrap(),
        DEMO_ANSWER,
        "complete",
    )
    .await;
    let seqs = shown_seqs(&mut page).await;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(page.page_errors.is_empty(), "{:?}", page.page_errors);
}
