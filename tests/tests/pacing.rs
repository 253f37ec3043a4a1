//! Admission by queue delay (`limits.queue_delay_ms`, `limits.user_queue_delay_ms`):
//! publishers are held to the pace the sessions take events, per node and per user, with
//! a clear 503 when they cannot be, and nothing accepted is lost.
//!
//! The sessions are made slow by their handler (the chaos guest's `slow-events`: every
//! event burns ~10-20 ms of CPU): several of them make the node fall behind on any
//! machine, one of them only its own user.

use std::collections::{BTreeSet, HashMap};
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

async fn wait_for_events<K>(seen: &Arc<Mutex<Vec<(K, Instant)>>>, count: usize) {
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

/// Users whose handlers are slow, one connection each, enough of them that their sessions
/// wait for the node's two worker threads: the node falls behind on any machine.
const SLOW_USERS: u64 = 6;

fn slow_user(n: u64) -> String {
    format!("slow-{}", n % SLOW_USERS)
}

/// An event of one of the slow users: its user and `seq` (each user has its own).
type Key = (String, u64);

/// Connects the slow users; their events as they arrive, all users together.
async fn slow_users(gw: &TestGateway) -> Arc<Mutex<Vec<(Key, Instant)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for n in 0..SLOW_USERS {
        let user = slow_user(n);
        let mut client = connect(gw, &user, true).await;
        let into = seen.clone();
        tokio::spawn(async move {
            while let Ok(frame) = client.next_json().await {
                if frame["type"] == "event" {
                    let seq = frame["seq"].as_u64().unwrap();
                    into.lock()
                        .unwrap()
                        .push(((user.clone(), seq), Instant::now()));
                }
            }
        });
    }
    seen
}

/// The events a batch answer says were published.
fn published(body: &Value) -> Vec<Key> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["seq"].is_u64())
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().to_owned(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A publisher sending batches as fast as it is answered, each many times what the node
/// takes in the time the publisher needs to send the next, is held to the node's pace:
/// an event accepted late in the run reaches its connection soon after its answer, where
/// without the check it would wait behind everything accepted before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_while_the_node_is_behind_and_accepted_events_arrive_soon_after() {
    let mut cfg = slow_config();
    cfg.limits.queue_delay_ms = 20;
    cfg.limits.publish_wait_ms = 30_000;
    cfg.limits.user_queue_delay_ms = 0;
    let gw = TestGateway::start_with(cfg).await;
    let seen = slow_users(&gw).await;

    // Ten events per user a batch: ~900 ms of CPU for the node's two worker threads, where
    // a publish is answered within a turn or two of its sessions (at most 100 ms each).
    const BATCHES: u64 = 8;
    let per_batch = 10 * SLOW_USERS;
    let started = Instant::now();
    let mut answered = Vec::new();
    for b in 0..BATCHES {
        let events: Vec<Value> = (0..per_batch)
            .map(|n| event(&slow_user(n), b * per_batch + n))
            .collect();
        let (status, body, _) = publish(&gw, "/v1/publish/batch", &json!({"events": events})).await;
        assert_eq!(status, 200, "{body}");
        let at = Instant::now();
        answered.extend(published(&body).into_iter().map(|key| (key, at)));
    }
    let total = (BATCHES * per_batch) as usize;
    wait_for_events(&seen, total).await;
    let arrived: HashMap<Key, Instant> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(arrived.len(), total, "every accepted event, once");
    let run = arrived.values().max().unwrap().duration_since(started);
    // From its answer to its arrival, for the second half of the run: without the check
    // the publisher is answered at once and the last events wait most of the run.
    let late = answered[total / 2..]
        .iter()
        .map(|(key, answer)| arrived[key].saturating_duration_since(*answer))
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

/// With no time to wait (`publish_wait_ms = 0`), publishes faster than the sessions take
/// events while the node is behind are refused with 503 `overloaded` and `Retry-After`,
/// and are not published; once the sessions catch up, publishes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_cannot_wait_is_refused_with_retry_after_and_not_published() {
    let mut cfg = slow_config();
    cfg.limits.queue_delay_ms = 20;
    cfg.limits.publish_wait_ms = 0;
    cfg.limits.user_queue_delay_ms = 0;
    let gw = TestGateway::start_with(cfg).await;
    let seen = slow_users(&gw).await;

    let batch: Vec<Value> = (0..4 * SLOW_USERS)
        .map(|n| event(&slow_user(n), n))
        .collect();
    let (status, body, _) = publish(&gw, "/v1/publish/batch", &json!({"events": batch})).await;
    assert_eq!(status, 200, "{body}");
    let mut accepted: BTreeSet<Key> = published(&body).into_iter().collect();
    // Two more per user every 4 ms (each adds ~15 ms of work), far past the pace the
    // sessions take them, until a batch is refused.
    let deadline = Instant::now() + WAIT;
    let mut offer = tokio::time::interval(Duration::from_millis(4));
    let (body, retry_after) = loop {
        offer.tick().await;
        let batch: Vec<Value> = (0..2 * SLOW_USERS)
            .map(|n| event(&slow_user(n), n))
            .collect();
        let (status, body, retry_after) =
            publish(&gw, "/v1/publish/batch", &json!({"events": batch})).await;
        match status {
            200 => accepted.extend(published(&body)),
            503 => break (body, retry_after),
            other => panic!("{other}: {body}"),
        };
        assert!(
            Instant::now() < deadline,
            "never refused while the node is behind"
        );
    };
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
    // Taken again once the sessions caught up.
    let mut taken_again = None;
    wait_until("a publish taken after the backlog drained", async || {
        let (status, body, _) = publish(&gw, "/v1/publish", &event(&slow_user(0), 0)).await;
        if status == 200 {
            taken_again = body["seq"].as_u64();
        }
        status == 200
    })
    .await;
    accepted.insert((slow_user(0), taken_again.unwrap()));
    wait_for_events(&seen, accepted.len()).await;
    let arrived: Vec<Key> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(arrived.len(), accepted.len(), "each once");
    assert_eq!(
        arrived.into_iter().collect::<BTreeSet<_>>(),
        accepted,
        "what was accepted; nothing refused"
    );
}

/// A user whose connections all fall behind has its own events refused (503
/// `user_lagging`, `Retry-After`), one event at a time and within a batch; another user's
/// publishes and deliveries go on meanwhile, and the lagging user is taken again once it
/// caught up, having lost nothing accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_user_is_held_back_and_the_others_are_not() {
    let mut cfg = slow_config();
    // The node's own check keeps its default: one slow user is not the node falling behind.
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
