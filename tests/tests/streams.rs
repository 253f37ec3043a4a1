//! AI output streams: a message published as `create`, `append`s and `end`, rolled up live,
//! one `snapshot` on resume, one history entry; every refusal with its reason. The real
//! gateway on port 0, the reference guest built from source, real sockets. Each test runs
//! twice: on one node, and on two cluster nodes sharing a real `nats-server`, with every op
//! published to one node and every client on the other.

use gateway::config::{ClusterStorage, Config};
use gateway_tests::nats::NatsServer;
use gateway_tests::{Client, TestGateway, claims, config, guests, token};
use serde_json::{Value, json};

fn gateway_config() -> Config {
    let mut config = config(guests::REFERENCE);
    // Wide enough that a batch of appends lands in one window however loaded the machine.
    config.streams.rollup_ms = 300;
    config
}

/// Where a test publishes and where its clients connect.
struct Stage {
    /// Takes every publish.
    publish: TestGateway,
    /// Serves every client: in cluster mode another node than `publish`.
    read: Option<TestGateway>,
    _nats: Option<NatsServer>,
}

impl Stage {
    async fn embedded(config: Config) -> Stage {
        Stage {
            publish: TestGateway::start_with(config).await,
            read: None,
            _nats: None,
        }
    }

    async fn cluster(mut config: Config) -> Stage {
        let nats = NatsServer::start();
        config.cluster.nats_url = Some(nats.url());
        config.cluster.storage = ClusterStorage::File;
        Stage {
            publish: TestGateway::start_with(config.clone()).await,
            read: Some(TestGateway::start_with(config).await),
            _nats: Some(nats),
        }
    }

    fn reader(&self) -> &TestGateway {
        self.read.as_ref().unwrap_or(&self.publish)
    }

    fn is_cluster(&self) -> bool {
        self.read.is_some()
    }

    /// A position from before the identity's first event `first`: the one before it on one
    /// node (a new node vouches for no `since=0`), 0 in a cluster (whose positions are the
    /// stream's, shared by every identity).
    fn before(&self, first: u64) -> u64 {
        if self.is_cluster() { 0 } else { first - 1 }
    }
}

/// Runs `$test(stage)` on one node (`embedded`) and on two cluster nodes (`cluster`), with
/// the config `$config` makes.
macro_rules! in_both_modes {
    ($test:ident, $config:expr) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$test(super::Stage::embedded($config).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$test(super::Stage::cluster($config).await).await;
            }
        }
    };
}

async fn connect(stage: &Stage, user: &str, since: Option<u64>) -> Client {
    let gw = stage.reader();
    let query = since.map_or(String::new(), |s| format!("since={s}"));
    let mut client = gw
        .try_connect_with_query(&token(claims(user)), &query)
        .await
        .unwrap();
    assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
    client
}

fn create(user: &str, id: &str, text: &str) -> Value {
    json!({"user_id": user, "kind": "assistant", "run_id": "r1", "payload": {"model": "m"},
           "message": {"id": id, "op": "create", "text": text}})
}

fn append(user: &str, id: &str, index: u64, text: &str) -> Value {
    json!({"user_id": user, "message": {"id": id, "op": "append", "index": index, "text": text}})
}

fn end(user: &str, id: &str, status: &str) -> Value {
    json!({"user_id": user, "message": {"id": id, "op": "end", "status": status}})
}

async fn publish(stage: &Stage, body: &Value) -> Value {
    let gw = &stage.publish;
    let (status, reply) = gw.publish(&gw.publisher_token(), body).await;
    assert_eq!(status, 200, "{body} -> {reply}");
    reply
}

async fn seq_of(stage: &Stage, body: &Value) -> u64 {
    publish(stage, body).await["seq"].as_u64().unwrap()
}

/// The tokens of a scripted answer: 40 appends.
fn tokens() -> Vec<String> {
    (0..40).map(|i| format!("tok{i} ")).collect()
}

/// Reads message frames of `id` until its `end`, checking `seq`s strictly increase, and
/// builds the text as a client does: a snapshot replaces it, an append adds to it. Plain
/// event frames in between are returned by their `seq`.
async fn read_message(client: &mut Client, id: &str) -> (String, Vec<Value>, Vec<u64>) {
    let (mut text, mut frames, mut events, mut last) = (String::new(), Vec::new(), Vec::new(), 0);
    loop {
        let frame = client.next_json().await.unwrap();
        let seq = frame["seq"].as_u64().expect("a frame with a seq");
        assert!(seq > last, "seq went from {last} to {seq}: {frame}");
        last = seq;
        if frame["type"] == "event" {
            events.push(seq);
            continue;
        }
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["message_id"], id, "{frame}");
        let part = frame["text"].as_str().unwrap();
        match frame["op"].as_str().unwrap() {
            "create" | "snapshot" => text = part.to_owned(),
            "append" => text.push_str(part),
            "end" => {
                assert_eq!(part, "", "{frame}");
                frames.push(frame);
                return (text, frames, events);
            }
            other => panic!("unknown op {other}: {frame}"),
        }
        let ended = frame["op"] == "snapshot" && frame["status"] != "streaming";
        frames.push(frame);
        if ended {
            return (text, frames, events);
        }
    }
}

in_both_modes!(
    appends_are_rolled_up_live_and_the_final_text_is_the_appends_joined,
    super::gateway_config()
);
async fn appends_are_rolled_up_live_and_the_final_text_is_the_appends_joined(stage: Stage) {
    let gw = &stage.publish;
    let mut client = connect(&stage, "alice", None).await;
    let created = seq_of(&stage, &create("alice", "m1", "Hi. ")).await;
    let tokens = tokens();
    let batch: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| append("alice", "m1", i as u64 + 1, t))
        .collect();
    let (status, reply) = gw.publish_batch(&gw.publisher_token(), &batch).await;
    assert_eq!(status, 200, "{reply}");
    let last_append = reply["results"][39]["seq"].as_u64().unwrap();
    let ended = seq_of(&stage, &end("alice", "m1", "complete")).await;

    let (text, frames, _) = read_message(&mut client, "m1").await;
    assert_eq!(text, format!("Hi. {}", tokens.concat()));
    let appends: Vec<&Value> = frames.iter().filter(|f| f["op"] == "append").collect();
    assert!(
        appends.len() < tokens.len() / 4,
        "40 appends published in one batch reached the client as {} append frames",
        appends.len()
    );
    assert_eq!(frames[0]["seq"], created);
    assert_eq!(frames[0]["payload"], json!({"model": "m"}));
    assert_eq!(
        (frames[0]["kind"].as_str(), frames[0]["run_id"].as_str()),
        (Some("assistant"), Some("r1"))
    );
    assert_eq!(
        appends.last().unwrap()["seq"],
        last_append,
        "a rolled-up append carries its last seq"
    );
    assert_eq!(appends.last().unwrap()["kind"], "assistant");
    let last = frames.last().unwrap();
    assert_eq!(
        (last["seq"].as_u64(), last["status"].as_str()),
        (Some(ended), Some("complete"))
    );
    let folded = stage
        .reader()
        .metric("gateway_appends_rolled_up_total")
        .await;
    assert_eq!(folded as usize, tokens.len() - appends.len());
    // Nothing after the end: the next frame is a marker.
    let marker = gw.publish_marker("alice", None).await;
    client.expect_event(marker).await;
}

in_both_modes!(
    clients_that_join_or_resume_mid_stream_get_one_snapshot_then_the_rest_once,
    super::gateway_config()
);
async fn clients_that_join_or_resume_mid_stream_get_one_snapshot_then_the_rest_once(stage: Stage) {
    let gw = &stage.publish;
    let tokens = tokens();
    let live = connect(&stage, "alice", None).await;
    let created = seq_of(&stage, &create("alice", "m1", "")).await;
    let mut seqs = Vec::new();
    for (i, t) in tokens[..20].iter().enumerate() {
        seqs.push(seq_of(&stage, &append("alice", "m1", i as u64 + 1, t)).await);
    }
    // A plain event between appends keeps its place.
    let plain = json!({"user_id": "alice", "kind": "tool_executing", "payload": {}});
    let event_seq = seq_of(&stage, &plain).await;

    // One client joins late (the whole history), one resumes after append 10.
    let from = stage.before(created);
    let mut joined = connect(&stage, "alice", Some(from)).await;
    let mut resumed = connect(&stage, "alice", Some(seqs[9])).await;
    for (client, since) in [(&mut joined, from), (&mut resumed, seqs[9])] {
        let frame = client.next_json().await.unwrap();
        assert_eq!(frame["type"], "gateway.resumed", "{frame}");
        assert_eq!(frame["recovered"], true, "{frame}");
        assert_eq!(frame["since"], since);
        // The message, touched last before the plain event: its snapshot, then the event.
        assert_eq!(
            frame["replayed"], 2,
            "one snapshot and one event, never fragments: {frame}"
        );
    }
    for (i, t) in tokens[20..].iter().enumerate() {
        seq_of(&stage, &append("alice", "m1", i as u64 + 21, t)).await;
    }
    seq_of(&stage, &end("alice", "m1", "complete")).await;

    let full = tokens.concat();
    let mut clients = [live, joined, resumed];
    let mut read = Vec::new();
    for client in &mut clients {
        read.push(read_message(client, "m1").await);
    }
    // Nothing after the end (no trailing duplicate): the next frame is a marker.
    let marker = gw.publish_marker("alice", None).await;
    for (client, (text, frames, events)) in clients.iter_mut().zip(read) {
        client.expect_event(marker).await;
        assert_eq!(text, full, "exactly the full text, once");
        assert_eq!(events, [event_seq]);
        let snapshots = frames.iter().filter(|f| f["op"] == "snapshot").count();
        if frames[0]["op"] == "snapshot" {
            assert_eq!(snapshots, 1);
            assert_eq!(
                frames[0]["seq"], seqs[19],
                "the snapshot sits at its latest append"
            );
            assert_eq!(frames[0]["text"], tokens[..20].concat());
            assert_eq!(frames[0]["status"], "streaming");
            assert_eq!(frames[0]["payload"], json!({"model": "m"}));
        } else {
            assert_eq!(snapshots, 0, "a live client never gets a snapshot");
        }
    }

    // After the end, a late join gets the finished message as one snapshot.
    let mut late = connect(&stage, "alice", Some(from)).await;
    assert_eq!(late.next_json().await.unwrap()["recovered"], true);
    let (text, frames, events) = read_message(&mut late, "m1").await;
    assert_eq!(
        (text, frames.len(), frames[0]["status"].as_str()),
        (full, 1, Some("complete"))
    );
    assert_eq!(
        events,
        [event_seq],
        "the event before the message's end comes first"
    );
}

fn three_entries() -> Config {
    let mut config = gateway_config();
    config.history.max_events_per_user = 3;
    config
}

in_both_modes!(
    a_message_is_one_history_entry_however_many_appends_it_had,
    super::three_entries()
);
async fn a_message_is_one_history_entry_however_many_appends_it_had(stage: Stage) {
    let gw = &stage.publish;
    let created = seq_of(&stage, &create("bob", "long", "")).await;
    for i in 1..=50 {
        seq_of(&stage, &append("bob", "long", i, "x")).await;
    }
    seq_of(&stage, &end("bob", "long", "complete")).await;
    let plain = json!({"user_id": "bob", "kind": "k", "payload": {}});
    let e1 = seq_of(&stage, &plain).await;
    let e2 = seq_of(&stage, &plain).await;
    // 53 ops and 2 events in a history of 3 entries: nothing evicted.
    let mut client = connect(&stage, "bob", Some(stage.before(created))).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(
        (resumed["recovered"].as_bool(), resumed["replayed"].as_u64()),
        (Some(true), Some(3)),
        "{resumed}"
    );
    let (text, frames, events) = read_message(&mut client, "long").await;
    assert_eq!((text.len(), frames.len()), (50, 1));
    assert_eq!(client.next_json().await.unwrap()["seq"], e1);
    assert_eq!(client.next_json().await.unwrap()["seq"], e2);
    assert!(events.is_empty());
    // One more event evicts the message, whole: a late join is not complete.
    seq_of(&stage, &plain).await;
    let mut client = connect(&stage, "bob", Some(stage.before(created))).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(
        (resumed["recovered"].as_bool(), resumed["reason"].as_str()),
        (Some(false), Some("evicted")),
        "{resumed}"
    );
    let (status, reply) = gw
        .publish(&gw.publisher_token(), &append("bob", "long", 51, "x"))
        .await;
    if stage.is_cluster() {
        // The stream still holds the message's records (its bound is in records, see the
        // README): the message ended, so it takes no more appends.
        assert_eq!(
            (status, reply["error"].as_str()),
            (409, Some("message_ended")),
            "{reply}"
        );
    } else {
        assert_eq!(
            (status, reply["error"].as_str()),
            (409, Some("message_not_found")),
            "{reply}"
        );
    }
}

in_both_modes!(
    retried_out_of_order_and_late_ops_get_their_own_answers,
    super::gateway_config()
);
async fn retried_out_of_order_and_late_ops_get_their_own_answers(stage: Stage) {
    let gw = &stage.publish;
    let publisher = gw.publisher_token();
    let try_publish = async |body: Value| gw.publish(&publisher, &body).await;

    let (status, reply) = try_publish(append("carol", "m", 1, "x")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("message_not_found")),
        "{reply}"
    );
    let created = seq_of(&stage, &create("carol", "m", "a")).await;
    let again = publish(&stage, &create("carol", "m", "a")).await;
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(created), Some(true))
    );
    let first = seq_of(&stage, &append("carol", "m", 1, "b")).await;
    let retried = publish(&stage, &append("carol", "m", 1, "b")).await;
    assert_eq!(
        (retried["seq"].as_u64(), retried["duplicate"].as_bool()),
        (Some(first), Some(true))
    );
    let (status, reply) = try_publish(append("carol", "m", 3, "d")).await;
    assert_eq!(
        (
            status,
            reply["error"].as_str(),
            reply["expected_index"].as_u64()
        ),
        (409, Some("append_out_of_order"), Some(2)),
        "{reply}"
    );
    let mut wrong_run = append("carol", "m", 2, "c");
    wrong_run["run_id"] = "other".into();
    let (status, reply) = try_publish(wrong_run).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("message_mismatch")),
        "{reply}"
    );
    let mut with_payload = append("carol", "m", 2, "c");
    with_payload["payload"] = json!({});
    assert_eq!(try_publish(with_payload).await.0, 400);
    let (status, reply) =
        try_publish(json!({"user_id": "carol", "kind": "gateway.message", "payload": {}})).await;
    assert_eq!(status, 400, "the envelope kind is reserved: {reply}");
    let (status, reply) = try_publish(
        json!({"user_id": "carol", "message": {"id": "m", "op": "append", "text": "c"}}),
    )
    .await;
    assert_eq!(status, 400, "an append without index: {reply}");
    let (status, reply) = try_publish(
        json!({"user_id": "carol", "message": {"id": "m", "op": "end", "status": "streaming"}}),
    )
    .await;
    assert_eq!(status, 400, "{reply}");

    // A batch is applied in order: the bad op is refused, the others are published.
    let (status, reply) = gw
        .publish_batch(
            &publisher,
            &[
                append("carol", "m", 2, "c"),
                append("carol", "m", 4, "e"),
                append("carol", "m", 3, "d"),
            ],
        )
        .await;
    assert_eq!(status, 409, "{reply}");
    let results = reply["results"].as_array().unwrap();
    assert!(
        results[0]["seq"].is_u64() && results[2]["seq"].is_u64(),
        "{reply}"
    );
    assert_eq!(
        (
            results[1]["error"].as_str(),
            results[1]["expected_index"].as_u64()
        ),
        (Some("append_out_of_order"), Some(3)),
        "{reply}"
    );

    let ended = seq_of(&stage, &end("carol", "m", "cancelled")).await;
    let again = publish(&stage, &end("carol", "m", "cancelled")).await;
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(ended), Some(true))
    );
    let (status, reply) = try_publish(end("carol", "m", "complete")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("message_ended")),
        "{reply}"
    );
    let (status, reply) = try_publish(append("carol", "m", 4, "e")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("message_ended")),
        "{reply}"
    );

    // What the client sees: the text of the ops that were taken, once.
    let mut client = connect(&stage, "carol", Some(stage.before(created))).await;
    assert_eq!(client.next_json().await.unwrap()["recovered"], true);
    let (text, frames, _) = read_message(&mut client, "m").await;
    assert_eq!(
        (text.as_str(), frames[0]["status"].as_str()),
        ("abcd", Some("cancelled"))
    );
}

fn small_limits() -> Config {
    let mut config = gateway_config();
    config.streams.max_open_messages_per_user = 2;
    config.streams.max_appends_per_message = 3;
    config.streams.max_message_bytes = 100;
    config
}

in_both_modes!(
    every_message_limit_refuses_with_its_reason,
    super::small_limits()
);
async fn every_message_limit_refuses_with_its_reason(stage: Stage) {
    let gw = &stage.publish;
    let publisher = gw.publisher_token();
    let try_publish = async |body: Value| gw.publish(&publisher, &body).await;

    seq_of(&stage, &create("dave", "a", "")).await;
    seq_of(&stage, &create("dave", "b", "")).await;
    let (status, reply) = try_publish(create("dave", "c", "")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (429, Some("too_many_open_messages")),
        "{reply}"
    );
    // Another user has their own allowance.
    seq_of(&stage, &create("erin", "c", "")).await;

    let (status, reply) = try_publish(append("dave", "a", 1, &"x".repeat(101))).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (413, Some("message_too_large")),
        "{reply}"
    );
    for i in 1..=3 {
        seq_of(&stage, &append("dave", "a", i, "x")).await;
    }
    let (status, reply) = try_publish(append("dave", "a", 4, "x")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (413, Some("too_many_appends")),
        "{reply}"
    );
    seq_of(&stage, &end("dave", "a", "complete")).await;
    seq_of(&stage, &create("dave", "c", "")).await;
}

fn short_lived() -> Config {
    let mut config = gateway_config();
    config.streams.max_open_messages_per_user = 2;
    config.streams.max_open_secs = 1;
    config
}

in_both_modes!(
    a_message_left_open_past_its_bound_is_ended_as_failed,
    super::short_lived()
);
async fn a_message_left_open_past_its_bound_is_ended_as_failed(stage: Stage) {
    let gw = &stage.publish;
    let mut client = connect(&stage, "dave", None).await;
    seq_of(&stage, &create("dave", "a", "")).await;
    seq_of(&stage, &create("dave", "b", "")).await;
    seq_of(&stage, &create("erin", "c", "")).await;
    // Left open past `max_open_secs`: ended as failed, and the client is told.
    let mut failed = Vec::new();
    while failed.len() < 2 {
        let frame = client.next_json().await.unwrap();
        if frame["op"] == "end" {
            assert_eq!(frame["status"], "failed", "{frame}");
            failed.push(frame["message_id"].as_str().unwrap().to_owned());
        }
    }
    failed.sort();
    assert_eq!(failed, ["a", "b"]);
    gw.wait_metric("gateway_messages_expired_total", 3.0).await;
    // Ended: there is room for new ones.
    seq_of(&stage, &create("dave", "c", "")).await;
}

fn small_frames() -> Config {
    let mut config = gateway_config();
    config.limits.max_message_bytes = 4096;
    config
}

in_both_modes!(
    a_snapshot_larger_than_a_frame_is_refused_before_it_is_stored,
    super::small_frames()
);
async fn a_snapshot_larger_than_a_frame_is_refused_before_it_is_stored(stage: Stage) {
    let gw = &stage.publish;
    let created = seq_of(&stage, &create("frank", "m", "")).await;
    let chunk = "y".repeat(1000);
    let mut index = 1;
    let refused = loop {
        let (status, reply) = gw
            .publish(&gw.publisher_token(), &append("frank", "m", index, &chunk))
            .await;
        if status != 200 {
            break (status, reply);
        }
        index += 1;
    };
    assert_eq!(
        (refused.0, refused.1["error"].as_str()),
        (413, Some("message_too_large")),
        "{}",
        refused.1
    );
    assert!(
        refused.1["reason"]
            .as_str()
            .unwrap()
            .contains("limits.max_message_bytes")
    );
    // What was stored still reaches a late client as one frame.
    let mut client = connect(&stage, "frank", Some(stage.before(created))).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(resumed["recovered"], true, "{resumed}");
    let snapshot = client.next_json().await.unwrap();
    assert_eq!(snapshot["op"], "snapshot", "{snapshot}");
    assert_eq!(
        snapshot["text"].as_str().unwrap().len(),
        1000 * (index as usize - 1)
    );
    assert!(index > 2, "some appends fit before the bound");
}
