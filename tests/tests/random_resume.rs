//! Clients that disconnect and resume at random while events flow: across its reconnects,
//! every client sees every event of its user exactly once, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::{Client, TestGateway, WAIT};
use serde_json::{Value, json};

const USERS: usize = 20;
const CLIENTS_PER_USER: usize = 2;
const BATCHES: usize = 100;
const BATCH: usize = 20;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn connect(gw: &TestGateway, user: &str, since: u64) -> Client {
    let (client, resumed) = gw.resume(user, since).await;
    assert_eq!(resumed["recovered"], true, "{user}: {resumed}");
    client
}

/// One logical client: reads, drops its connection now and then, resumes from the last
/// `seq` it saw, until it has seen `last` (sent on `done`). Returns the seqs it saw and its
/// last connection, still open, for the caller to prove nothing follows `last`.
async fn run_client(
    gw: Arc<TestGateway>,
    user: String,
    start: u64,
    seed: u64,
    mut done: tokio::sync::watch::Receiver<Option<Arc<HashMap<String, u64>>>>,
) -> (Vec<u64>, Client) {
    let mut rng = Rng(seed);
    let mut seen = Vec::new();
    let mut last = start;
    loop {
        let mut client = connect(&gw, &user, last).await;
        let mut budget = 5 + rng.below(60);
        loop {
            let end = done.borrow().as_ref().map(|ends| ends[&user]);
            if end.is_some_and(|end| last >= end) {
                return (seen, client);
            }
            let frame = tokio::select! {
                frame = client.next_json() => frame.unwrap(),
                _ = done.changed() => continue,
            };
            assert_eq!(frame["type"], "event", "{frame}");
            let seq = frame["seq"].as_u64().unwrap();
            seen.push(seq);
            last = seq;
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
        // Half the time a clean close, half the time the socket just goes away.
        if rng.below(2) == 0 {
            client.close().await;
        } else {
            drop(client);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resuming_at_random_see_each_event_of_their_user_exactly_once() {
    let gw = Arc::new(TestGateway::start().await);
    let publisher = gw.publisher_token();
    let user = |u: usize| format!("user-{u}");
    // A first event per user gives each client its starting position.
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    let mut start = HashMap::new();
    for u in 0..USERS {
        let (status, reply) = gw
            .publish(
                &publisher,
                &json!({"user_id": user(u), "kind": "start", "payload": 0}),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        start.insert(user(u), reply["seq"].as_u64().unwrap());
        expected.insert(user(u), Vec::new());
    }
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut clients = Vec::new();
    for u in 0..USERS {
        for c in 0..CLIENTS_PER_USER {
            let seed = (u * CLIENTS_PER_USER + c) as u64 + 1;
            clients.push((
                user(u),
                tokio::spawn(run_client(
                    gw.clone(),
                    user(u),
                    start[&user(u)],
                    seed,
                    rx.clone(),
                )),
            ));
        }
    }
    let mut rng = Rng(7);
    for _ in 0..BATCHES {
        let events: Vec<Value> = (0..BATCH)
            .map(|_| json!({"user_id": user(rng.below(USERS as u64) as usize), "kind": "k", "payload": 1}))
            .collect();
        let (status, reply) = gw.publish_batch(&publisher, &events).await;
        assert_eq!(status, 200, "{reply}");
        for (event, result) in events.iter().zip(reply["results"].as_array().unwrap()) {
            let user = event["user_id"].as_str().unwrap();
            expected
                .get_mut(user)
                .unwrap()
                .push(result["seq"].as_u64().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
    }
    // Each client is done once it has seen its user's last event (or its start, if none).
    let ends: HashMap<String, u64> = expected
        .iter()
        .map(|(u, seqs)| (u.clone(), seqs.last().copied().unwrap_or(start[u])))
        .collect();
    tx.send(Some(Arc::new(ends))).unwrap();
    let mut finished = Vec::new();
    for (user, client) in clients {
        let (seen, connection) = tokio::time::timeout(WAIT * 3, client)
            .await
            .expect("client finished")
            .unwrap();
        assert_eq!(seen, expected[&user], "{user}: every event once, in order");
        finished.push((user, connection));
    }
    // Nothing after the last event either (a duplicate replayed or delivered late): a marker
    // published to each user now is the next frame of both of its last connections.
    let mut markers = HashMap::new();
    for u in 0..USERS {
        markers.insert(user(u), gw.publish_marker(&user(u), None).await);
    }
    for (user, mut connection) in finished {
        connection.expect_event(markers[&user]).await;
    }
}
