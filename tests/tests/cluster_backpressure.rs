//! Cluster mode, issue 19 item 4: backpressure does not stop at the node boundary. A node
//! whose sessions fall behind holds at most `limits.max_queued_bytes` of their events,
//! whatever the other nodes accept: the rest stays in the stream, and the node's feed reads
//! it from there once its sessions have taken what they hold. Against real `nats-server`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use gateway::config::{ClusterStorage, Config};
use gateway_tests::nats::NatsServer;
use gateway_tests::{Client, TestGateway, WAIT, config, guests};
use serde_json::{Value, json};

fn cluster_config(nats_url: &str) -> Config {
    let mut cfg = config(guests::REFERENCE);
    cfg.cluster.nats_url = Some(nats_url.into());
    cfg.cluster.storage = ClusterStorage::File;
    cfg.history.max_events_per_user = 10_000;
    cfg.history.max_replay_events = 2_000;
    cfg.limits.max_body_bytes = 8 << 20;
    cfg
}

/// The next event frame's (seq, n).
async fn next_event(client: &mut Client) -> (u64, u64) {
    let frame = client.next_json().await.expect("an event");
    assert_eq!(frame["type"], "event", "{frame}");
    (
        frame["seq"].as_u64().unwrap(),
        frame["payload"]["n"].as_u64().unwrap(),
    )
}

/// Publishes events `ns` for `user`, each with `pad` bytes of padding, in one batch;
/// their `seq`s, as the stream acknowledged them.
async fn publish(gw: &TestGateway, user: &str, ns: std::ops::Range<u64>, pad: usize) -> Vec<u64> {
    let events: Vec<Value> = ns
        .map(|n| {
            json!({"user_id": user, "kind": "agent_thinking",
                   "payload": {"n": n, "pad": "x".repeat(pad)}})
        })
        .collect();
    let (status, body) = gw.publish_batch(&gw.publisher_token(), &events).await;
    assert_eq!(status, 200, "{body}");
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

/// Node A takes the publishes; node B holds a session whose client stops reading. Its
/// session's own queue would take 64 MiB, so only the node's bound (256 KiB) can stop B
/// from holding a copy of everything A accepts. B's backlog stays at that bound (one
/// event over at most) while 30 MiB are stored; once the client reads again, the session,
/// open all along, gets every acknowledged event once, in order, read from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_sessions_fall_behind_holds_no_more_than_its_bound() {
    const PAD: usize = 20_000;
    const BATCH: u64 = 100;
    const BATCHES: u64 = 15;
    const BOUND: usize = 256 << 10;
    let nats = NatsServer::start();
    let a = TestGateway::start_with(cluster_config(&nats.url())).await;
    let mut cfg = cluster_config(&nats.url());
    cfg.limits.max_queued_bytes = BOUND;
    // The session's own bounds would let it hold all of it, and a client that does not
    // read is not cut off for its stalled writes while the test runs.
    cfg.limits.outbound_queue_bytes = 64 << 20;
    cfg.limits.event_queue = 100_000;
    cfg.limits.write_timeout_secs = 300;
    let b = TestGateway::start_with(cfg).await;

    let mut client = b.connect("slow").await;
    // B's feed is live: an event published through A arrives.
    let first = publish(&a, "slow", 0..1, 0).await;
    assert_eq!(next_event(&mut client).await, (first[0], 0));

    // B's backlog, sampled all along.
    let peak = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (router, peak, sampling) = (b.state.router.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(router.queued_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // The client reads nothing while 30 MiB of events are stored through A.
    let mut seqs = first;
    for i in 0..BATCHES {
        seqs.extend(publish(&a, "slow", 1 + i * BATCH..1 + (i + 1) * BATCH, PAD).await);
    }
    let total = seqs.len() as u64;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // One event past the bound at most: the one that crossed it.
    let slack = PAD + 1024;
    // B stopped at its bound: its feed left the rest in the stream (or, without a bound,
    // went past it).
    gateway_tests::wait_until("B's feed to stop at its bound", async || {
        b.metric("gateway_cluster_feed_pauses_total").await > 0.0
            || b.state.router.queued_bytes() > BOUND + slack
    })
    .await;
    let held = b.state.router.queued_bytes();
    let peak_before = peak.load(Ordering::Relaxed).max(held);
    assert!(
        peak_before <= BOUND + slack && held <= BOUND + slack,
        "B held {held} bytes (peak {peak_before}) for a client that reads nothing; bound {BOUND}"
    );

    // The client reads again: everything, once, in order, without reconnecting.
    for (i, seq) in seqs.iter().enumerate().skip(1) {
        let got = tokio::time::timeout(WAIT, next_event(&mut client))
            .await
            .unwrap_or_else(|_| panic!("event {i} of {total} did not arrive"));
        assert_eq!(got, (*seq, i as u64), "event {i} of {total}");
    }
    // And nothing after: a marker to the same identity is the next frame.
    let marker = a.publish_marker("slow", None).await;
    client.expect_event(marker).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= BOUND + slack,
        "B's backlog reached {peak} bytes; bound {BOUND}"
    );
    // What B left in the stream it read from there.
    assert!(b.metric("gateway_cluster_gap_events_total").await > 0.0);
    b.wait_metric("gateway_queued_bytes", 0.0).await;
    eprintln!(
        "{total} events of {PAD} bytes; B's backlog peaked at {peak} bytes (bound {BOUND}); \
         feed pauses {}; events read from the stream {}",
        b.metric("gateway_cluster_feed_pauses_total").await,
        b.metric("gateway_cluster_gap_events_total").await,
    );
}
