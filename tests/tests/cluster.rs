//! Cluster mode against real `nats-server` processes: several gateway nodes share one
//! JetStream stream. A user's connections on different nodes each get every event once, in
//! order, whichever node took the publish; a killed node's clients resume on another; a
//! NATS outage costs publishes (503, never a false 200) and not live connections; an R3
//! stream rides through losing a NATS server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway::auth::Claims;
use gateway::config::{ClusterStorage, Config};
use gateway_tests::nats::NatsServer;
use gateway_tests::node::Node;
use gateway_tests::{
    Client, TestGateway, WAIT, claims, config, guests, join_when_ready, token, wait_until,
};
use serde_json::{Value, json};

fn cluster_config(nats_url: &str) -> Config {
    let mut cfg = config(guests::REFERENCE);
    cfg.cluster.nats_url = Some(nats_url.into());
    cfg.cluster.storage = ClusterStorage::File;
    cfg
}

fn event(user: &str, n: u64) -> Value {
    json!({"user_id": user, "kind": "agent_thinking", "payload": {"n": n}})
}

async fn publish_ok(gw: &TestGateway, body: &Value) -> u64 {
    let (status, reply) = gw.publish(&gw.publisher_token(), body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["queued"].is_null(), "{reply}");
    reply["seq"].as_u64().expect("seq")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_two_nodes_each_get_every_event_once_in_order() {
    let nats = NatsServer::start();
    // Identities spread over three streams.
    let mut cfg = cluster_config(&nats.url());
    cfg.cluster.streams = 3;
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let mut on_a = a.connect("alice").await;
    let mut on_b = b.connect("alice").await;
    let mut bob = b.connect("bob").await;
    // Tenants, dots and wildcards in ids must not meet anyone else's subject.
    let mut tricky = a.connect("alice.>").await;

    let mut seqs = Vec::new();
    for n in 0..40 {
        let node = if n % 2 == 0 { &a } else { &b };
        seqs.push(publish_ok(node, &event("alice", n)).await);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for client in [&mut on_a, &mut on_b] {
        for (n, seq) in seqs.iter().enumerate() {
            assert_eq!(next_event(client).await, (*seq, n as u64));
        }
    }
    // None of alice's for bob or "alice.>": their streams may be others than hers, so a
    // window first; then, in each one's own stream, its marker (or event) is next, so
    // nothing (a duplicate of alice's included) was queued before it.
    tokio::join!(
        bob.expect_silence(Duration::from_millis(300)),
        tricky.expect_silence(Duration::from_millis(300)),
    );
    let marker = b.publish_marker("alice", None).await;
    for client in [&mut on_a, &mut on_b] {
        client.expect_event(marker).await;
    }
    let marker = a.publish_marker("bob", None).await;
    bob.expect_event(marker).await;
    let seq = publish_ok(&b, &event("alice.>", 7)).await;
    assert_eq!(next_event(&mut tricky).await, (seq, 7));
    on_a.expect_silence(Duration::from_millis(300)).await;
    let marker = b.publish_marker("alice", None).await;
    on_a.expect_event(marker).await;

    // An idempotency key is per identity, and holds whichever node sees the repeat.
    let keyed =
        json!({"user_id": "bob", "kind": "k", "payload": {"n": 1}, "idempotency_key": "once"});
    let first = a.publish(&a.publisher_token(), &keyed).await.1;
    let again = b.publish(&b.publisher_token(), &keyed).await.1;
    assert_eq!(again["seq"], first["seq"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(next_event(&mut bob).await.1, 1);
    let marker = b.publish_marker("bob", None).await;
    bob.expect_event(marker).await;

    // A node subscribes to the users it holds, and lets go when their last one leaves.
    a.wait_metric("gateway_cluster_feeds", 2.0).await;
    on_a.close().await;
    tricky.close().await;
    a.wait_metric("gateway_cluster_feeds", 0.0).await;
    b.wait_metric("gateway_cluster_feeds", 2.0).await;
}

/// A node follows all its identities of a stream through one subscription: more
/// identities arriving at once than it reads heads for at a time (their feeds wait their
/// turn before their welcome), events of identities it does not hold, and each connection
/// still gets exactly its own events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_identities_on_one_node_each_get_only_their_own_events() {
    const USERS: u64 = 150;
    const EACH: u64 = 3;
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats.url());
    cfg.cluster.streams = 2;
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let mut clients = futures_util::future::join_all((0..USERS).map(|u| {
        let b = &b;
        async move { b.connect(&format!("many-{u}")).await }
    }))
    .await;
    b.wait_metric("gateway_cluster_feeds", USERS as f64).await;
    // Interleaved across users, with users that no session on b holds among them.
    let events: Vec<Value> = (0..EACH)
        .flat_map(|k| {
            (0..USERS).flat_map(move |u| {
                [
                    event(&format!("many-{u}"), u * 100 + k),
                    event(&format!("absent-{u}"), k),
                ]
            })
        })
        .collect();
    let mut seqs: Vec<Vec<u64>> = vec![Vec::new(); USERS as usize];
    for chunk in events.chunks(100) {
        let (status, body) = a.publish_batch(&a.publisher_token(), chunk).await;
        assert_eq!(status, 200, "{body}");
        for result in body["results"].as_array().unwrap() {
            let user = result["user_id"].as_str().unwrap();
            if let Some(u) = user.strip_prefix("many-") {
                seqs[u.parse::<usize>().unwrap()].push(result["seq"].as_u64().unwrap());
            }
        }
    }
    for (u, client) in clients.iter_mut().enumerate() {
        for (k, seq) in seqs[u].iter().enumerate() {
            assert_eq!(
                next_event(client).await,
                (*seq, u as u64 * 100 + k as u64),
                "many-{u}"
            );
        }
    }
    // Nothing more for anyone: in each user's own stream, its marker is the next frame.
    for (u, client) in clients.iter_mut().enumerate() {
        let marker = a.publish_marker(&format!("many-{u}"), None).await;
        client.expect_event(marker).await;
    }
    for client in clients {
        client.close().await;
    }
    b.wait_metric("gateway_cluster_feeds", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_reads_the_stream_and_detects_foreign_and_evicted_positions() {
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats.url());
    cfg.history.max_events_per_user = 5;
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let mut seqs = Vec::new();
    for n in 0..4 {
        seqs.push(publish_ok(&a, &event("carol", n)).await);
    }
    let foreign = publish_ok(&a, &event("dave", 0)).await;

    // Resumed on the other node: exactly what was missed.
    let (mut client, resumed) = b.resume("carol", seqs[0]).await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["replayed"], 3, "{resumed}");
    for n in 1..4 {
        assert_eq!(next_event(&mut client).await, (seqs[n as usize], n));
    }
    // Then live, whichever node publishes.
    let live = publish_ok(&a, &event("carol", 4)).await;
    assert_eq!(next_event(&mut client).await, (live, 4));
    client.close().await;

    // Everything retained.
    let (mut client, resumed) = b.resume("carol", 0).await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["replayed"], 5, "{resumed}");
    assert_eq!(resumed["earliest"], seqs[0], "{resumed}");
    assert_eq!(next_event(&mut client).await.1, 0);
    client.close().await;

    // Another identity's position, and one the stream never numbered.
    let (_c, resumed) = b.resume("carol", foreign).await;
    assert_eq!(
        (&resumed["recovered"], &resumed["reason"]),
        (&json!(false), &json!("unknown_position")),
        "{resumed}"
    );
    let (_c, resumed) = a.resume("carol", live + 1000).await;
    assert_eq!(resumed["reason"], "unknown_position", "{resumed}");

    // Past the per-user limit the oldest go: never a partial replay.
    for n in 5..8 {
        publish_ok(&b, &event("carol", n)).await;
    }
    let (_c, resumed) = a.resume("carol", seqs[0]).await;
    assert_eq!(
        (
            &resumed["recovered"],
            &resumed["reason"],
            &resumed["replayed"]
        ),
        (&json!(false), &json!("evicted"), &json!(0)),
        "{resumed}"
    );
    let (_c, resumed) = a.resume("carol", 0).await;
    assert_eq!(resumed["reason"], "evicted", "{resumed}");
}

/// An operator's disconnect on one node closes the session on every node, and its
/// revocation holds on every node, including one that starts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_on_one_node_closes_and_revokes_on_every_node() {
    let nats = NatsServer::start();
    let cfg = cluster_config(&nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg.clone()).await;
    let laptop = Claims {
        sid: Some("laptop".into()),
        ..claims("ivy")
    };
    let phone = Claims {
        sid: Some("phone".into()),
        ..claims("ivy")
    };
    let mut on_a = a.connect_with(laptop.clone()).await;
    let mut on_b = b.connect_with(laptop.clone()).await;
    let mut other_session = b.connect_with(phone).await;

    let operator = {
        let mut c = claims("ops-console");
        c.scope = Some(gateway::auth::DISCONNECT_SCOPE.into());
        token(c)
    };
    let body =
        json!({"user_id": "ivy", "sid": "laptop", "reason": "logged out", "revoke_secs": 600});
    let (status, answer) =
        gateway_tests::post(&a.url("/v1/disconnect"), &operator, body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    for client in [&mut on_a, &mut on_b] {
        let closed = client.closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (4001, "disconnected: logged out")
        );
    }
    // The revoked session cannot come back on the other node, nor on one started later.
    let c = TestGateway::start_with(cfg).await;
    for node in [&b, &c] {
        let refused = node.try_connect(&token(laptop.clone())).await;
        assert!(refused.is_err(), "a revoked token must be refused");
    }
    // The user's other session is untouched.
    let seq = publish_ok(&a, &event("ivy", 1)).await;
    assert_eq!(next_event(&mut other_session).await, (seq, 1));
}

/// NATS credentials: a node with the server's token joins; one without it does not start,
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_authenticates_to_nats_and_a_wrong_token_stops_start_up() {
    let nats = NatsServer::start_with_token("s3cret-token");
    let mut cfg = cluster_config(&nats.url());
    cfg.cluster.token = Some("wrong".into());
    let err = gateway::AppState::new(cfg.clone())
        .unwrap()
        .join_cluster()
        .await
        .expect_err("a wrong token is refused");
    assert!(err.to_string().contains("cannot connect to NATS"), "{err}");
    assert!(
        !format!("{:?}", cfg.cluster).contains("wrong"),
        "the token is never printed"
    );
    cfg.cluster.token = Some("s3cret-token".into());
    let gw = TestGateway::start_with(cfg).await;
    let mut client = gw.connect("jack").await;
    let seq = publish_ok(&gw, &event("jack", 1)).await;
    assert_eq!(next_event(&mut client).await, (seq, 1));
}

async fn ws_connect(url: &str, user: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(claims(user))).parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut client = Client { ws };
    assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_resume_on_another_with_every_event_once() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let nats = NatsServer::start();
    let mut doomed = Node::spawn(&nats.url());
    let survivor = Node::spawn(&nats.url());
    let publisher_token = {
        let mut c = claims("backend");
        c.scope = Some(gateway::auth::PUBLISH_SCOPE.into());
        token(c)
    };
    let mut client = ws_connect(&doomed.ws_url(), "erin").await;

    // Events flow through the survivor while the doomed node dies.
    const EVENTS: u64 = 300;
    let publish_url = format!("http://{}/v1/publish", survivor.addr);
    let publisher = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for n in 0..EVENTS {
            let (status, reply) =
                gateway_tests::post(&publish_url, &publisher_token, event("erin", n).to_string())
                    .await;
            assert_eq!(status, 200, "{reply}");
            seqs.push(reply["seq"].as_u64().unwrap());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seqs
    });

    let mut got: Vec<(u64, u64)> = Vec::new();
    while got.len() < 50 {
        got.push(next_event(&mut client).await);
    }
    doomed.kill();
    // The socket ends without a close frame; what arrived before it counts.
    loop {
        match tokio::time::timeout(WAIT, client.ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                got.push((
                    frame["seq"].as_u64().unwrap(),
                    frame["payload"]["n"].as_u64().unwrap(),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    let since = got.last().unwrap().0;
    let url = format!("{}?since={since}", survivor.ws_url());
    let mut client = ws_connect(&url, "erin").await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["type"], "gateway.resumed", "{resumed}");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    while got.last().unwrap().1 < EVENTS - 1 {
        got.push(next_event(&mut client).await);
    }
    let seqs = publisher.await.unwrap();
    let want: Vec<(u64, u64)> = seqs.into_iter().zip(0..EVENTS).collect();
    assert_eq!(got, want, "every event once, in order, across the failover");
    // And nothing after: a marker to erin is the next frame.
    let marker = json!({"user_id": "erin", "kind": "marker", "payload": {}});
    let publisher_token = {
        let mut c = claims("backend");
        c.scope = Some(gateway::auth::PUBLISH_SCOPE.into());
        token(c)
    };
    let publish_url = format!("http://{}/v1/publish", survivor.addr);
    let (status, reply) =
        gateway_tests::post(&publish_url, &publisher_token, marker.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    client.expect_event(reply["seq"].as_u64().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_refuses_publishes_and_live_connections_ride_it_out() {
    let mut nats = NatsServer::start();
    let gw = TestGateway::start_with(cluster_config(&nats.url())).await;
    let mut client = gw.connect("frank").await;
    let before = publish_ok(&gw, &event("frank", 1)).await;
    assert_eq!(next_event(&mut client).await, (before, 1));

    assert_eq!(gw.metric("gateway_nats_reconnects_total").await, 0.0);
    nats.kill();
    gw.wait_metric("gateway_nats_connected", 0.0).await;
    let (status, reply) = gw.publish(&gw.publisher_token(), &event("frank", 2)).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"], "event_log_unavailable", "{reply}");
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let why: Value = ready.json().await.unwrap();
    assert!(
        why["reason"].as_str().unwrap_or_default().contains("NATS"),
        "{why}"
    );
    // A new connection cannot be served without the log: refused before the upgrade.
    let refused = gw.try_connect(&gw.token("frank")).await;
    assert!(
        refused.is_err(),
        "connect during the outage must be refused"
    );

    nats.restart();
    gw.wait_metric("gateway_nats_connected", 1.0).await;
    // The stream is on disk: publishes work again, and the live connection, still up,
    // gets them.
    let mut after = 0;
    wait_until("publishes succeed again", async || {
        let (status, reply) = gw.publish(&gw.publisher_token(), &event("frank", 3)).await;
        if status == 200 {
            after = reply["seq"].as_u64().unwrap();
        }
        status == 200
    })
    .await;
    let (seq, n) = next_event(&mut client).await;
    assert_eq!(n, 3);
    assert_eq!(seq, after);
    assert_eq!(gw.metric("gateway_nats_reconnects_total").await, 1.0);
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_loses_no_acknowledged_event_when_a_nats_server_dies() {
    let mut servers = NatsServer::cluster(3);
    let urls = servers
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut cfg = cluster_config(&urls);
    cfg.cluster.replicas = 3;
    let gw = join_when_ready(cfg).await;
    let mut client = gw.connect("grace").await;
    // The server to kill: the stream's leader, so that JetStream has to elect another.
    let stats = {
        let mut c = claims("ops");
        c.scope = Some(gateway::auth::STATS_SCOPE.into());
        let response = reqwest::Client::new()
            .get(gw.url("/v1/stats"))
            .bearer_auth(token(c))
            .send()
            .await
            .unwrap();
        response.json::<Value>().await.unwrap()
    };
    let leader = stats["cluster"]["streams"][0]["leader"]
        .as_str()
        .unwrap_or_else(|| panic!("no leader in {stats}"));
    let doomed: usize = leader[1..].parse().unwrap();
    let connected_to = stats["cluster"]["nats"]["server"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        stats["cluster"]["streams"][0]["replicas"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{stats}"
    );
    const EVENTS: u64 = 200;
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut stall = Duration::ZERO;
    let mut refusals = 0;
    for n in 0..EVENTS {
        if n == EVENTS / 2 {
            servers[doomed].kill();
        }
        let started = Instant::now();
        let (seq, refused) = publish_until_acked(&gw, "grace", n).await;
        acked.push((seq, n));
        refusals += refused;
        stall = stall.max(started.elapsed());
    }
    println!(
        "R3 stream, its leader {leader} killed (the gateway was connected to {connected_to}): \
         longest publish {stall:?}, {refusals} publishes refused (503) and retried"
    );
    // Every acknowledged event, once, in order: live...
    let mut got = Vec::new();
    while got.len() < acked.len() {
        got.push(next_event(&mut client).await);
    }
    assert_eq!(got, acked);
    // ...and in the stream.
    let mut resumed = gw
        .try_connect_with_query(&gw.token("grace"), "since=0")
        .await
        .unwrap();
    assert_eq!(resumed.next_json().await.unwrap()["type"], "welcome");
    let frame = resumed.next_json().await.unwrap();
    assert_eq!(frame["replayed"], EVENTS, "{frame}");
    let mut replayed = Vec::new();
    while replayed.len() < acked.len() {
        replayed.push(next_event(&mut resumed).await);
    }
    assert_eq!(replayed, acked);
}

/// A node that loses its NATS server reconnects to another of the cluster, and its feeds
/// fetch from the stream whatever was stored while they were away: its client misses
/// nothing, although the events went through another node and another server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_nats_server_dies_catches_up_from_the_stream() {
    let mut servers = NatsServer::cluster(3);
    let mut cfg = cluster_config(&servers[0].url());
    cfg.cluster.replicas = 3;
    let publisher = join_when_ready(cfg.clone()).await;
    // The other node knows only the server that will die; it learns the rest from it.
    cfg.cluster.nats_url = Some(servers[1].url());
    let receiver = join_when_ready(cfg).await;
    let mut client = receiver.connect("henry").await;

    const EVENTS: u64 = 300;
    let mut acked = Vec::new();
    for n in 0..EVENTS {
        if n == EVENTS / 3 {
            servers[1].kill();
        }
        acked.push((publish_until_acked(&publisher, "henry", n).await.0, n));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut got = Vec::new();
    while got.len() < acked.len() {
        got.push(next_event(&mut client).await);
    }
    assert_eq!(
        got, acked,
        "every event once, in order, across the reconnect"
    );
    // And nothing after: a marker to henry is the next frame.
    let marker = publisher.publish_marker("henry", None).await;
    client.expect_event(marker).await;
    assert_eq!(receiver.metric("gateway_nats_reconnects_total").await, 1.0);
    println!(
        "events fetched from the stream to fill the gap: {}",
        receiver.metric("gateway_cluster_gap_events_total").await
    );
}

/// Publishes event `n` for `user` with an idempotency key, retrying while the gateway
/// answers 503 (as a publisher should during a failover); returns its `seq` and how many
/// tries were refused.
async fn publish_until_acked(gw: &TestGateway, user: &str, n: u64) -> (u64, u32) {
    let body = json!({"user_id": user, "kind": "k", "payload": {"n": n},
                      "idempotency_key": format!("{user}-{n}")});
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let (status, reply) = gw.publish(&gw.publisher_token(), &body).await;
        if status == 200 {
            return (reply["seq"].as_u64().unwrap(), refused);
        }
        assert_eq!(status, 503, "{reply}");
        refused += 1;
        assert!(started.elapsed() < WAIT * 3, "no recovery: {reply}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Isolation under churn, in cluster mode: users connect to random nodes and leave at
/// random while batches are published through random nodes. Every connection gets only
/// its user's events, in order, and a connection that stays gets all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_across_nodes_never_misdelivers_and_loses_nothing() {
    const USERS: usize = 40;
    const ROUNDS: usize = 20;
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats.url());
    cfg.cluster.streams = 2;
    let nodes = [
        TestGateway::start_with(cfg.clone()).await,
        TestGateway::start_with(cfg).await,
    ];
    let publisher = nodes[0].publisher_token();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    // Per user: every (seq, n) published; per connection: its user and where it started.
    let mut published: Vec<Vec<(u64, u64)>> = vec![Vec::new(); USERS];
    let mut conns: Vec<(usize, usize, Client)> = Vec::new();
    let mut checked = 0;
    for round in 0..ROUNDS {
        for _ in 0..8 {
            let user = next(USERS);
            let node = &nodes[next(2)];
            conns.push((
                user,
                published[user].len(),
                node.connect(&format!("u{user}")).await,
            ));
        }
        let batch: Vec<Value> = (0..100)
            .map(|_| {
                let user = next(USERS);
                let n = (round * 1000 + published[user].len()) as u64;
                published[user].push((0, n));
                event(&format!("u{user}"), n)
            })
            .collect();
        let (status, body) = nodes[next(2)].publish_batch(&publisher, &batch).await;
        assert_eq!(status, 200, "{body}");
        let mut cursor: BTreeMap<String, usize> = BTreeMap::new();
        for result in body["results"].as_array().unwrap() {
            let user: usize = result["user_id"].as_str().unwrap()[1..].parse().unwrap();
            let i = cursor
                .entry(format!("u{user}"))
                .or_insert_with(|| published[user].iter().position(|(s, _)| *s == 0).unwrap());
            published[user][*i].0 = result["seq"].as_u64().unwrap();
            *i += 1;
        }
        // Some leave, after reading everything they were owed so far.
        let mut kept = Vec::new();
        for (user, start, mut client) in conns {
            for want in &published[user][start..] {
                assert_eq!(next_event(&mut client).await, *want, "u{user}");
                checked += 1;
            }
            let start = published[user].len();
            if next(4) == 0 {
                client.close().await;
            } else {
                kept.push((user, start, client));
            }
        }
        conns = kept;
    }
    // Nothing more anywhere: no other user's event (perhaps from another stream) within a
    // window watched on every connection at once, then in each user's own stream a marker
    // is the next frame (no duplicate or late event before it).
    futures_util::future::join_all(
        conns
            .iter_mut()
            .map(|(_, _, client)| client.expect_silence(Duration::from_millis(300))),
    )
    .await;
    let mut markers = BTreeMap::new();
    for (user, _, _) in &conns {
        if !markers.contains_key(user) {
            let marker = nodes[next(2)]
                .publish_marker(&format!("u{user}"), None)
                .await;
            markers.insert(*user, marker);
        }
    }
    for (user, _, client) in &mut conns {
        client.expect_event(markers[user]).await;
    }
    assert!(checked > 1000, "{checked} deliveries checked");
}

/// A resume whose missed events this node's live subscription carried lately reads them
/// from memory (`cluster.recent_bytes`), and only when the chain of previous-event
/// sequences from the identity's head back to its position is whole: a node that kept too
/// little for that reads the stream, with the same answer, and a position that is not the
/// identity's is never taken for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_reads_recent_events_from_memory_only_when_it_holds_all_of_them() {
    let nats = NatsServer::start();
    let cfg = cluster_config(&nats.url());
    let a = TestGateway::start_with(cfg.clone()).await;
    let b = TestGateway::start_with(cfg.clone()).await;
    let mut small = cfg;
    // Room for two or three events: never the whole chain back to the position.
    small.cluster.recent_bytes = 600;
    let c = TestGateway::start_with(small).await;
    // Someone else's session keeps each node's live subscription open.
    let mut zed_b = b.connect("zed").await;
    let mut zed_c = c.connect("zed").await;
    let since = publish_ok(&a, &event("carol", 0)).await;
    let (mut missed, mut foreign) = (Vec::new(), 0);
    for n in 1..=6 {
        missed.push(publish_ok(&a, &event("carol", n)).await);
        foreign = publish_ok(&a, &event("dave", n)).await;
    }
    // Once zed's event has arrived, each node has carried everything stored before it.
    let marker = publish_ok(&a, &event("zed", 0)).await;
    assert_eq!(next_event(&mut zed_b).await.0, marker);
    assert_eq!(next_event(&mut zed_c).await.0, marker);

    for (gw, from_memory) in [(&b, 1.0), (&c, 0.0)] {
        let (mut client, resumed) = gw.resume("carol", since).await;
        assert_eq!(
            (&resumed["recovered"], &resumed["replayed"]),
            (&json!(true), &json!(6)),
            "{resumed}"
        );
        assert_eq!(
            (&resumed["head"], &resumed["earliest"]),
            (&json!(missed[5]), &json!(since)),
            "{resumed}"
        );
        for (n, seq) in missed.iter().enumerate() {
            assert_eq!(next_event(&mut client).await, (*seq, n as u64 + 1));
        }
        assert_eq!(
            gw.metric("gateway_cluster_recent_reads_total").await,
            from_memory
        );
        client.close().await;
    }
    assert!(b.metric("gateway_cluster_recent_bytes").await > 0.0);

    // Nothing missed: from memory, nothing replayed.
    let (_client, resumed) = b.resume("carol", *missed.last().unwrap()).await;
    assert_eq!(
        (&resumed["recovered"], &resumed["replayed"]),
        (&json!(true), &json!(0)),
        "{resumed}"
    );
    assert_eq!(b.metric("gateway_cluster_recent_reads_total").await, 2.0);
    // Another identity's position, though b carried it: the stream says whose it is.
    let (_client, resumed) = b.resume("carol", foreign).await;
    assert_eq!(resumed["reason"], "unknown_position", "{resumed}");
    assert_eq!(b.metric("gateway_cluster_recent_reads_total").await, 2.0);
}
