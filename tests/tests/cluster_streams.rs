//! AI output streams across cluster nodes (the single-node semantics run on two nodes in
//! `streams.rs`): ops of one message published through either node, retries that land on
//! another node than the first try, the open-message bound under concurrent creates on two
//! nodes, and a node killed mid-stream, with the publisher and the client moving to the
//! other node. Real `nats-server`, real gateway processes where one must die.

use futures_util::StreamExt;
use gateway::config::{ClusterStorage, Config};
use gateway_tests::nats::NatsServer;
use gateway_tests::node::Node;
use gateway_tests::{Client, TestGateway, WAIT, claims, config, guests, join_when_ready, token};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn cluster_config(nats_url: &str) -> Config {
    let mut cfg = config(guests::REFERENCE);
    cfg.cluster.nats_url = Some(nats_url.into());
    cfg.cluster.storage = ClusterStorage::File;
    cfg
}

fn create(user: &str, id: &str) -> Value {
    json!({"user_id": user, "kind": "assistant", "payload": {"model": "m"},
           "message": {"id": id, "op": "create", "text": ""}})
}

fn append(user: &str, id: &str, index: u64, text: &str) -> Value {
    json!({"user_id": user, "message": {"id": id, "op": "append", "index": index, "text": text}})
}

fn end(user: &str, id: &str) -> Value {
    json!({"user_id": user, "message": {"id": id, "op": "end", "status": "complete"}})
}

fn token_text(i: u64) -> String {
    format!("t{i} ")
}

/// A message as a client builds it from frames, checking that `seq`s only increase.
#[derive(Default)]
struct Reader {
    text: String,
    last_seq: u64,
    snapshots: usize,
    ended: bool,
}

impl Reader {
    fn take(&mut self, frame: &Value) {
        let seq = frame["seq"].as_u64().expect("a frame with a seq");
        assert!(
            seq > self.last_seq,
            "seq {seq} after {}: {frame}",
            self.last_seq
        );
        self.last_seq = seq;
        assert_eq!(frame["type"], "message", "{frame}");
        let text = frame["text"].as_str().unwrap();
        match frame["op"].as_str().unwrap() {
            "create" => self.text = text.to_owned(),
            "snapshot" => {
                self.snapshots += 1;
                self.text = text.to_owned();
                self.ended = frame["status"] != "streaming";
            }
            "append" => self.text.push_str(text),
            "end" => self.ended = true,
            other => panic!("op {other}: {frame}"),
        }
    }

    async fn read_to_end(&mut self, client: &mut Client) {
        while !self.ended {
            let frame = client.next_json().await.expect("a message frame");
            self.take(&frame);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_through_either_node_make_one_message_and_retries_answer_their_first_seq() {
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats.url());
    cfg.streams.max_open_messages_per_user = 2;
    let nodes = [
        TestGateway::start_with(cfg.clone()).await,
        TestGateway::start_with(cfg).await,
    ];
    let publish = async |node: usize, body: &Value| {
        let gw = &nodes[node];
        gw.publish(&gw.publisher_token(), body).await
    };
    let mut clients = [nodes[0].connect("ann").await, nodes[1].connect("ann").await];

    let (status, reply) = publish(0, &create("ann", "m")).await;
    assert_eq!(status, 200, "{reply}");
    let mut full = String::new();
    for i in 1..=30 {
        // Each append through the other node than the one before, and every third one
        // retried through the node that did not take it: the first seq, as a duplicate.
        let (status, first) = publish(i as usize % 2, &append("ann", "m", i, &token_text(i))).await;
        assert_eq!(status, 200, "append {i}: {first}");
        full.push_str(&token_text(i));
        if i % 3 == 0 {
            let (status, again) =
                publish((i as usize + 1) % 2, &append("ann", "m", i, &token_text(i))).await;
            assert_eq!(status, 200, "{again}");
            assert_eq!(
                (again["seq"].as_u64(), again["duplicate"].as_bool()),
                (first["seq"].as_u64(), Some(true)),
                "a retry of append {i} on the other node"
            );
        }
    }
    // A gap seen by the node that took none of the recent appends.
    let (status, reply) = publish(1, &append("ann", "m", 32, "x")).await;
    assert_eq!(
        (
            status,
            reply["error"].as_str(),
            reply["expected_index"].as_u64()
        ),
        (409, Some("append_out_of_order"), Some(31)),
        "{reply}"
    );
    let (status, reply) = publish(1, &end("ann", "m")).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = publish(0, &append("ann", "m", 31, "x")).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("message_ended")),
        "{reply}"
    );
    for client in &mut clients {
        let mut reader = Reader::default();
        reader.read_to_end(client).await;
        assert_eq!(reader.text, full, "the appends joined, each once");
    }

    // Four creates at once, two through each node, with room for two open messages: the
    // bound holds across nodes (each create is checked against every op stored before it).
    let bodies: Vec<Value> = (0..4).map(|i| create("ann", &format!("c{i}"))).collect();
    let creates = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| publish(i % 2, body));
    let answers = futures_util::future::join_all(creates).await;
    let taken = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, r)| r)
        .collect();
    assert_eq!((taken, refused.len()), (2, 2), "{answers:?}");
    assert!(
        refused
            .iter()
            .all(|r| r["error"] == "too_many_open_messages")
    );
}

/// Node a takes the ops and serves the client; it is killed mid-stream. The publisher goes
/// on through node b (which folds the message from the stream), the client resumes on b
/// from the last frame it saw, and ends with the whole text once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_nothing_of_the_message() {
    let nats = NatsServer::start();
    let mut doomed = Node::spawn(&nats.url());
    let survivor = Node::spawn(&nats.url());
    let publisher = {
        let mut c = claims("backend");
        c.scope = Some(gateway::auth::PUBLISH_SCOPE.into());
        token(c)
    };
    let post = async |node: &Node, body: &Value| {
        let url = format!("http://{}/v1/publish", node.addr);
        gateway_tests::post(&url, &publisher, body.to_string()).await
    };
    let connect = async |url: String| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token(claims("bo"))).parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut client = Client { ws };
        assert_eq!(client.next_json().await.unwrap()["type"], "welcome");
        client
    };
    let mut client = connect(doomed.ws_url()).await;
    let mut reader = Reader::default();
    const TOKENS: u64 = 60;
    let full: String = (1..=TOKENS).map(token_text).collect();

    assert_eq!(post(&doomed, &create("bo", "answer")).await.0, 200);
    for i in 1..=TOKENS / 2 {
        let (status, reply) = post(&doomed, &append("bo", "answer", i, &token_text(i))).await;
        assert_eq!(status, 200, "{reply}");
    }
    // The client has seen part of it when its node dies.
    while reader.text.len() < token_text(1).len() * 10 {
        let frame = client.next_json().await.unwrap();
        reader.take(&frame);
    }
    doomed.kill();
    loop {
        match tokio::time::timeout(WAIT, client.ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => reader.take(&serde_json::from_str(&text).unwrap()),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }

    // The rest through the survivor: it knows the message only from the stream.
    for i in TOKENS / 2 + 1..=TOKENS {
        let (status, reply) = post(&survivor, &append("bo", "answer", i, &token_text(i))).await;
        assert_eq!(status, 200, "append {i} on the survivor: {reply}");
    }
    // A retry of an append the dead node took: its first seq.
    let (status, reply) = post(&survivor, &append("bo", "answer", 1, &token_text(1))).await;
    assert_eq!(
        (status, reply["duplicate"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );

    let since = reader.last_seq;
    let mut client = connect(format!("{}?since={since}", survivor.ws_url())).await;
    let resumed = client.next_json().await.unwrap();
    assert_eq!(
        (resumed["type"].as_str(), resumed["recovered"].as_bool()),
        (Some("gateway.resumed"), Some(true)),
        "{resumed}"
    );
    let ended = post(&survivor, &end("bo", "answer")).await;
    assert_eq!(ended.0, 200, "{}", ended.1);
    reader.read_to_end(&mut client).await;
    assert_eq!(
        reader.text, full,
        "the whole text, once, across the failover"
    );
    assert_eq!(
        reader.snapshots, 1,
        "one snapshot on resume, never fragments"
    );
    // Nothing after the end.
    let marker = json!({"user_id": "bo", "kind": "marker", "payload": {}});
    let (status, reply) = post(&survivor, &marker).await;
    assert_eq!(status, 200, "{reply}");
    client.expect_event(reply["seq"].as_u64().unwrap()).await;
}

/// On a replicated stream (three NATS servers, R3) a compare-and-set write that meets
/// another write of the same user in flight is refused by the stream in its own way; the
/// node takes that as losing the race, not as an outage: appends through one node while
/// plain events for the same user pour in through the other all succeed, and concurrent
/// creates still keep the open-message bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_racing_other_writes_on_a_replicated_stream_are_retried_not_refused() {
    let servers = NatsServer::cluster(3);
    let urls = servers
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut cfg = cluster_config(&urls);
    cfg.cluster.replicas = 3;
    cfg.streams.max_open_messages_per_user = 2;
    let a = join_when_ready(cfg.clone()).await;
    let b = TestGateway::start_with(cfg).await;
    let mut client = b.connect("cy").await;

    let (status, reply) = a.publish(&a.publisher_token(), &create("cy", "m")).await;
    assert_eq!(status, 200, "{reply}");
    let events = async {
        for n in 0..60 {
            let body = json!({"user_id": "cy", "kind": "tool_executing", "payload": {"n": n}});
            let (status, reply) = b.publish(&b.publisher_token(), &body).await;
            assert_eq!(status, 200, "{reply}");
        }
    };
    let appends = async {
        for i in 1..=60 {
            let (status, reply) = a
                .publish(&a.publisher_token(), &append("cy", "m", i, &token_text(i)))
                .await;
            assert_eq!(status, 200, "append {i} racing plain events: {reply}");
        }
    };
    tokio::join!(events, appends);
    let (status, reply) = b.publish(&b.publisher_token(), &end("cy", "m")).await;
    assert_eq!(status, 200, "{reply}");
    let mut reader = Reader::default();
    while !reader.ended {
        let frame = client.next_json().await.unwrap();
        if frame["type"] == "message" {
            reader.take(&frame);
        }
    }
    assert_eq!(reader.text, (1..=60).map(token_text).collect::<String>());

    let bodies: Vec<Value> = (0..4).map(|i| create("cy", &format!("c{i}"))).collect();
    let publishers = [a.publisher_token(), b.publisher_token()];
    let creates = bodies.iter().enumerate().map(|(i, body)| {
        let gw = if i % 2 == 0 { &a } else { &b };
        gw.publish(&publishers[i % 2], body)
    });
    let answers = futures_util::future::join_all(creates).await;
    let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429, 429], "{answers:?}");
}
