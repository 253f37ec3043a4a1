//! Admission by queue delay (`limits.queue_delay_ms`, `limits.user_queue_delay_ms`):
//! publishers are held to the pace the sessions take events, per node and per user, with
//! a clear 503 when they cannot be, and nothing accepted is lost.
//!
//! The sessions are made slow by their handler (the chaos guest's `slow-events`: every
//! event burns ~10-20 ms of CPU), so the node falls behind on any machine.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::config::Config;
use gateway_tests::{Client, TestGateway, WAIT, config, guests, wait_until};
use serde_json::{Value, json};

fn slow_config() -> Config {
    let mut cfg = config(guests::CHAOS);
    // A slow event fits one call's CPU budget.
    cfg.limits.guest_call_ms = 100;
    cfg.limits.guest_call_wall_ms = 2_000;
    cfg
}

/// A connection of `user`, told to make every later event slow when `slow`.
async fn connect(gw: &TestGateway, user: &str, slow: bool) -> Client {
    let mut client = gw.connect(user).await;
    if slow {
        client.send_text("slow-events").await;
        assert_eq!(client.next_json().await.unwrap()["type"], "slow");
    }
    client
}

/// A publish answered: status, body and its `Retry-After` header.
async fn publish(gw: &TestGateway, path: &str, body: &Value) -> (u16, Value, Option<String>) {
    let response = reqwest::Client::new()
        .post(gw.url(path))
        .bearer_auth(gw.publisher_token())
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.json().await.unwrap(), retry_after)
}

fn event(user: &str, n: u64) -> Value {
    json!({"user_id": user, "kind": "k", "payload": {"n": n}})
}

/// Reads a client's event frames in the background: each `seq` with when it arrived.
fn record(mut client: Client) -> Arc<Mutex<Vec<(u64, Instant)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    tokio::spawn(async move {
        while let Ok(frame) = client.next_json().await {
            if frame["type"] == "event" {
                let seq = frame["seq"].as_u64().unwrap();
                into.lock().unwrap().push((seq, Instant::now()));
            }
        }
    });
    seen
}

async fn wait_for_events(seen: &Arc<Mutex<Vec<(u64, Instant)>>>, count: usize) {
    let deadline = Instant::now() + 6 * WAIT;
    while seen.lock().unwrap().len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} events arrived",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publisher offering several times what a session takes is held to the session's pace:
/// an event accepted late in the run reaches its session soon after its answer, where
/// without the check it would wait behind everything accepted before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_while_the_node_is_behind_and_accepted_events_arrive_soon_after() {
    let mut cfg = slow_config();
    cfg.limits.queue_delay_ms = 20;
    cfg.limits.publish_wait_ms = 30_000;
    cfg.limits.user_queue_delay_ms = 0;
    let gw = TestGateway::start_with(cfg).await;
    let seen = record(connect(&gw, "alice", true).await);

    const EVENTS: u64 = 160;
    let started = Instant::now();
    let mut answered = Vec::new();
    // One every 4 ms: 250 events/s offered to a session that takes 50-100.
    let mut offer = tokio::time::interval(Duration::from_millis(4));
    offer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..EVENTS {
        offer.tick().await;
        let (status, body, _) = publish(&gw, "/v1/publish", &event("alice", n)).await;
        assert_eq!(status, 200, "{body}");
        answered.push((body["seq"].as_u64().unwrap(), Instant::now()));
    }
    wait_for_events(&seen, EVENTS as usize).await;
    let arrived = seen.lock().unwrap().clone();
    let run = arrived.last().unwrap().1 - started;
    let seqs: Vec<u64> = arrived.iter().map(|(seq, _)| *seq).collect();
    let published: Vec<u64> = answered.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, published, "every accepted event, once, in order");
    // From its answer to its arrival, for the second half of the run: without the check
    // the publisher is answered at once and the last events wait nearly the whole run.
    let late = answered[EVENTS as usize / 2..]
        .iter()
        .zip(&arrived[EVENTS as usize / 2..])
        .map(|((_, answer), (_, arrival))| arrival.saturating_duration_since(*answer))
        .max()
        .unwrap();
    eprintln!("latest arrival after its answer, second half: {late:?} in a run of {run:?}");
    assert!(
        late < run / 3,
        "an event accepted in the second half waited {late:?} in a run of {run:?}"
    );
    assert!(gw.metric("gateway_publish_waits_total").await >= 1.0);
    assert!(gw.metric("gateway_queue_delay_seconds_count").await >= 1.0);
}

/// With no time to wait (`publish_wait_ms = 0`), a publish while the node is behind is
/// refused with 503 `overloaded` and `Retry-After`, and is not published; once the
/// sessions catch up, publishes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_cannot_wait_is_refused_with_retry_after_and_not_published() {
    let mut cfg = slow_config();
    cfg.limits.queue_delay_ms = 20;
    cfg.limits.publish_wait_ms = 0;
    cfg.limits.user_queue_delay_ms = 0;
    let gw = TestGateway::start_with(cfg).await;
    let seen = record(connect(&gw, "alice", true).await);

    let batch: Vec<Value> = (0..20).map(|n| event("alice", n)).collect();
    let (status, body, _) = publish(&gw, "/v1/publish/batch", &json!({"events": batch})).await;
    assert_eq!(status, 200, "{body}");
    let mut accepted: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    // One more every 5 ms (each adds ~15 ms of work) until one is refused.
    let deadline = Instant::now() + WAIT;
    let mut offer = tokio::time::interval(Duration::from_millis(5));
    let refusal = loop {
        offer.tick().await;
        let (status, body, retry_after) = publish(&gw, "/v1/publish", &event("alice", 99)).await;
        match status {
            200 => accepted.push(body["seq"].as_u64().unwrap()),
            503 => break (body, retry_after),
            other => panic!("{other}: {body}"),
        }
        if Instant::now() > deadline {
            let text = gw.metrics_text().await;
            let delay: Vec<&str> = text.lines().filter(|l| l.contains("queue_delay")).collect();
            panic!("never refused while slow events wait: {delay:#?}");
        }
    };
    let (body, retry_after) = refusal;
    assert_eq!(body["error"], "overloaded", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("limits.queue_delay_ms"),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        gw.metric("gateway_refusals_total{reason=\"overloaded\"}")
            .await
            >= 1.0
    );
    // Taken again once the session caught up.
    let mut taken_again = None;
    wait_until("a publish taken after the backlog drained", async || {
        let (status, body, _) = publish(&gw, "/v1/publish", &event("alice", 100)).await;
        if status == 200 {
            taken_again = body["seq"].as_u64();
        }
        status == 200
    })
    .await;
    accepted.push(taken_again.unwrap());
    wait_for_events(&seen, accepted.len()).await;
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs, accepted,
        "what was accepted, in order; nothing refused"
    );
}

/// A user whose connections all fall behind has its own events refused (503
/// `user_lagging`, `Retry-After`), one event at a time and within a batch; another user's
/// publishes and deliveries go on meanwhile, and the lagging user is taken again once it
/// caught up, having lost nothing accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_user_is_held_back_and_the_others_are_not() {
    let mut cfg = slow_config();
    cfg.limits.queue_delay_ms = 0;
    cfg.limits.user_queue_delay_ms = 200;
    let gw = TestGateway::start_with(cfg).await;
    let bob = record(connect(&gw, "bob", true).await);
    let mut carol = connect(&gw, "carol", false).await;

    let batch: Vec<Value> = (0..40).map(|n| event("bob", n)).collect();
    let (status, body, _) = publish(&gw, "/v1/publish/batch", &json!({"events": batch})).await;
    assert_eq!(status, 200, "{body}");
    let mut accepted: BTreeSet<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    // One more of bob's every 10 ms (each adds ~15 ms of work) until he is held back.
    let deadline = Instant::now() + WAIT;
    let mut offer = tokio::time::interval(Duration::from_millis(10));
    let (body, retry_after) = loop {
        offer.tick().await;
        let (status, body, retry_after) = publish(&gw, "/v1/publish", &event("bob", 99)).await;
        match status {
            200 => accepted.insert(body["seq"].as_u64().unwrap()),
            503 => break (body, retry_after),
            other => panic!("{other}: {body}"),
        };
        assert!(Instant::now() < deadline, "bob never held back");
    };
    assert_eq!(body["error"], "user_lagging", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("limits.user_queue_delay_ms"),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));

    // Carol is not held back, and gets her event while bob's still wait.
    let (status, body, _) = publish(&gw, "/v1/publish", &event("carol", 1)).await;
    assert_eq!(status, 200, "{body}");
    let frame = carol.expect_event(body["seq"].as_u64().unwrap()).await;
    assert_eq!(frame["type"], "event");

    // In a batch: bob's event refused, carol's published; 503 names which.
    let batch = json!({"events": [event("bob", 100), event("carol", 2)]});
    let (status, body, retry_after) = publish(&gw, "/v1/publish/batch", &batch).await;
    if status == 503 {
        assert_eq!(body["error"], "user_lagging", "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["results"][0]["error"], "user_lagging", "{body}");
        let carols = body["results"][1]["seq"]
            .as_u64()
            .expect("carol's published");
        carol.expect_event(carols).await;
    } else {
        // Bob caught up between the two requests: both published.
        assert_eq!(status, 200, "{body}");
        accepted.insert(body["results"][0]["seq"].as_u64().unwrap());
    }
    assert!(
        gw.metric("gateway_refusals_total{reason=\"user_lagging\"}")
            .await
            >= 1.0
    );

    // Bob is taken again once his connection caught up, and lost nothing accepted.
    let mut taken_again = None;
    wait_until("bob's publish taken after he caught up", async || {
        let (status, body, _) = publish(&gw, "/v1/publish", &event("bob", 101)).await;
        if status == 200 {
            taken_again = body["seq"].as_u64();
        }
        status == 200
    })
    .await;
    accepted.insert(taken_again.unwrap());
    wait_for_events(&bob, accepted.len()).await;
    let seqs: Vec<u64> = bob.lock().unwrap().iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.is_sorted(), "in order: {seqs:?}");
    assert_eq!(seqs.into_iter().collect::<BTreeSet<_>>(), accepted);
}
