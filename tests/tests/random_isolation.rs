//! Randomised isolation under churn: hundreds of users connect and disconnect at random
//! while events are published to random users and some connections make their guest fault.
//! Every event must reach only its own user's connections, in `seq` order, with nothing lost
//! on a connection that stays healthy; a fault closes only its own connection (1011); and
//! nothing is left behind once every client is gone.
//!
//! The test's decisions come from a seeded PRNG; the seed is printed, and
//! `RANDOM_ISOLATION_SEED=<seed>` replays the same decisions.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use gateway_tests::{Client, TestGateway, WAIT, config, guests};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::{self, Message};

/// Users who connect (each at least once, in the first round).
const USERS: usize = 200;
/// Users who get events but never connect: every such event must reach no one.
const GHOSTS: usize = 10;
const ROUNDS: usize = 60;
/// New connections per round after the first, each for a random user.
const CONNECTS_PER_ROUND: usize = 25;
/// Connects in flight at once (nothing is published meanwhile).
const CONNECT_CONCURRENCY: usize = 25;
/// Events per round, published as two batches around the round's churn.
const EVENTS_PER_ROUND: usize = 600;
/// Per round, each untouched connection is told to fault with this chance (per mille)...
const FAULT_PER_MILLE: usize = 6;
/// ...or to close, cleanly or by dropping its socket, with this one.
const CLOSE_PER_MILLE: usize = 100;
/// Chaos guest triggers, their weights, and the fault kind each must be reported as.
/// `loop` burns a full CPU budget, so it stays rare.
const TRIGGERS: [(&str, usize, &str); 5] = [
    ("trap", 30, "trap"),
    ("grow", 20, "memory"),
    ("flood", 20, "emit_budget"),
    ("big", 25, "emit_too_large"),
    ("loop", 5, "cpu"),
];
/// Every `kind` label of `gateway_guest_faults_total`.
const FAULT_KINDS: [&str; 7] = [
    "trap",
    "cpu",
    "memory",
    "emit_budget",
    "emit_too_large",
    "unacknowledged",
    "ack_mismatch",
];

/// splitmix64: small, dependency-free and good enough to pick users and fates.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn trigger(&mut self) -> (&'static str, &'static str) {
        let total: usize = TRIGGERS.iter().map(|t| t.1).sum();
        let mut roll = self.below(total);
        for (trigger, weight, kind) in TRIGGERS {
            if roll < weight {
                return (trigger, kind);
            }
            roll -= weight;
        }
        unreachable!()
    }
}

/// What the driver tells a client task; each task gets at most one.
enum Command {
    /// Send this fault trigger, then read until the server closes.
    Fault(&'static str),
    /// Close cleanly (close handshake).
    Close,
    /// Drop the socket without a close frame.
    Drop,
    /// Publishing is over: read up to this seq of the user, then close cleanly.
    Finish(u64),
}

/// What one client saw, checked frame by frame as it arrived.
#[derive(Debug, Default)]
struct Report {
    /// Seqs of this user's events, in arrival order.
    seqs: Vec<u64>,
    /// seq - n of the first event seen (n: the publisher's own count for the user).
    offset: Option<u64>,
    /// Event frames of any user (the guest's own counter must match).
    events: u64,
    /// Frames carrying another user's event.
    misdelivered: Vec<String>,
    /// Out of order, duplicated, malformed or unexpected frames, read errors, timeouts.
    problems: Vec<String>,
    /// The server's close frame, if one arrived: code and reason.
    server_close: Option<(u16, String)>,
    /// The server ended the connection before the test asked anything of it.
    ended_unasked: bool,
}

impl Report {
    /// Takes one read from the socket; false once the connection has ended.
    fn take(&mut self, user: &str, msg: Option<Result<Message, tungstenite::Error>>) -> bool {
        match msg {
            Some(Ok(Message::Text(text))) => {
                self.frame(user, text.as_str());
                true
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => true,
            Some(Ok(Message::Close(frame))) => {
                self.server_close = Some(frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                }));
                false
            }
            Some(Ok(other)) => {
                self.problems.push(format!("unexpected frame {other:?}"));
                true
            }
            Some(Err(err)) => {
                self.problems.push(format!("read error: {err}"));
                false
            }
            None => false,
        }
    }

    fn frame(&mut self, user: &str, text: &str) {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            let head: String = text.chars().take(80).collect();
            self.problems.push(format!("not JSON: {head:?}"));
            return;
        };
        if frame["type"] != "event" {
            self.problems.push(format!("not an event: {frame}"));
            return;
        }
        self.events += 1;
        let (Some(seq), Some(kind), Some(count)) = (
            frame["seq"].as_u64(),
            frame["kind"].as_str(),
            frame["count"].as_u64(),
        ) else {
            self.problems.push(format!("malformed event: {frame}"));
            return;
        };
        // The instance's own counter: it saw exactly the events this client saw.
        if count != self.events {
            self.problems.push(format!(
                "instance count {count} after {} events: {frame}",
                self.events
            ));
        }
        let Some((owner, n)) = kind.strip_prefix("for:").and_then(|k| k.rsplit_once(':')) else {
            self.problems.push(format!("foreign kind: {frame}"));
            return;
        };
        if owner != user {
            self.misdelivered.push(format!("{user} got {frame}"));
            return;
        }
        // The publisher numbered each user's events 1, 2, ...; the gateway's seqs for one
        // user run on by one from a base, so seq - n is the same for every event.
        match n.parse::<u64>().ok().and_then(|n| seq.checked_sub(n)) {
            Some(offset) if *self.offset.get_or_insert(offset) == offset => {}
            _ => self.problems.push(format!("seq {seq} carries {kind}")),
        }
        if let Some(&last) = self.seqs.last()
            && seq <= last
        {
            self.problems.push(format!("seq {seq} after {last}"));
        }
        self.seqs.push(seq);
    }

    /// Reads until the connection ends or the deadline passes.
    async fn read_to_end(&mut self, user: &str, client: &mut Client, deadline: Instant) {
        loop {
            match timeout_at(deadline, client.ws.next()).await {
                Ok(msg) => {
                    if !self.take(user, msg) {
                        return;
                    }
                }
                Err(_) => {
                    self.problems
                        .push("connection did not end within the wait".into());
                    return;
                }
            }
        }
    }

    /// Close handshake, reading (and checking) whatever still arrives before the reply.
    async fn close(&mut self, user: &str, client: &mut Client) {
        if let Err(err) = client.ws.close(None).await {
            self.problems.push(format!("close failed: {err}"));
            return;
        }
        self.read_to_end(user, client, Instant::now() + WAIT).await;
    }
}

/// One client: reads and checks every frame until the driver says what to do.
async fn run_client(
    user: String,
    start: u64,
    mut client: Client,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Report {
    let mut report = Report::default();
    let mut open = true;
    let command = loop {
        tokio::select! {
            command = commands.recv() => break command,
            msg = client.ws.next(), if open => {
                open = report.take(&user, msg);
                report.ended_unasked = !open;
            }
        }
    };
    if !open {
        return report;
    }
    match command {
        None | Some(Command::Drop) => {}
        Some(Command::Close) => report.close(&user, &mut client).await,
        Some(Command::Fault(trigger)) => match client.ws.send(Message::text(trigger)).await {
            Ok(()) => {
                let deadline = Instant::now() + WAIT;
                report.read_to_end(&user, &mut client, deadline).await;
            }
            Err(err) => report.problems.push(format!("sending {trigger}: {err}")),
        },
        Some(Command::Finish(last)) => {
            let deadline = Instant::now() + WAIT;
            while report.seqs.last().copied().unwrap_or(start) < last {
                match timeout_at(deadline, client.ws.next()).await {
                    Ok(msg) => {
                        if !report.take(&user, msg) {
                            report.ended_unasked = true;
                            return report;
                        }
                    }
                    Err(_) => {
                        report
                            .problems
                            .push(format!("seq {last} not received within the wait"));
                        break;
                    }
                }
            }
            report.close(&user, &mut client).await;
        }
    }
    report
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Left alone: must receive every event of its user from its connect to the end.
    Healthy,
    Closed,
    Dropped,
    /// Told to send this trigger; must be closed with 1011 for this fault kind.
    Faulted(&'static str, &'static str),
}

struct Conn {
    user: usize,
    /// The user's latest seq when this connection finished connecting.
    start: u64,
    fate: Fate,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<Report>,
}

/// The driver's bookkeeping.
struct Books {
    names: Vec<String>,
    /// Per user (ghosts included), the latest seq the publish API answered (0: none yet).
    last_seq: Vec<u64>,
    /// Per user, every seq the publish API answered, in order.
    published: Vec<Vec<u64>>,
    /// Per user, events published so far: the `n` in each event's kind.
    counts: Vec<u64>,
    conns: Vec<Conn>,
    events_published: u64,
    /// Sum of the publish answers' `delivered`.
    events_routed: u64,
    failures: Vec<String>,
}

impl Books {
    /// Publishes `count` events to random users (a few to ghosts) in one batch, and checks
    /// each answer's seq and `delivered` against what the test knows of the user's
    /// connections.
    async fn publish(&mut self, gw: &TestGateway, publisher: &str, rng: &mut Rng, count: usize) {
        // Bounds on each user's registered connections, taken before the publish: healthy
        // ones are registered for sure; one whose close the test has seen complete is gone
        // for sure (the gateway unregisters a session before it sends its close frame).
        let mut bounds = vec![(0u64, 0u64); self.names.len()];
        for conn in &self.conns {
            let (lo, hi) = &mut bounds[conn.user];
            match conn.fate {
                Fate::Healthy => {
                    *lo += 1;
                    *hi += 1;
                }
                Fate::Dropped => *hi += 1,
                Fate::Closed | Fate::Faulted(..) => *hi += u64::from(!conn.task.is_finished()),
            }
        }

        let mut next = self.counts.clone();
        let mut targets = Vec::with_capacity(count);
        let mut batch = Vec::with_capacity(count);
        for _ in 0..count {
            let user = if rng.below(100) < 3 {
                USERS + rng.below(GHOSTS)
            } else {
                rng.below(USERS)
            };
            next[user] += 1;
            let name = &self.names[user];
            batch.push(json!({
                "user_id": name,
                "kind": format!("for:{name}:{}", next[user]),
                "payload": {"n": next[user]},
            }));
            targets.push(user);
        }
        self.counts = next;
        let (status, body) = gw.publish_batch(publisher, &batch).await;
        assert_eq!(status, 200, "{body}");
        let results = body["results"].as_array().expect("results");
        assert_eq!(results.len(), batch.len(), "{body}");
        for (&user, result) in targets.iter().zip(results) {
            let name = &self.names[user];
            let (Some(seq), Some(delivered)) = (result["seq"].as_u64(), result["queued"].as_u64())
            else {
                panic!("malformed receipt {result}");
            };
            // A user's first seq is the log's base for it; each next one adds one.
            let first = self.last_seq[user] == 0;
            if result["user_id"] != name.as_str() || (!first && seq != self.last_seq[user] + 1) {
                self.failures.push(format!(
                    "receipt {result}: expected {name} seq {}",
                    self.last_seq[user] + 1
                ));
            }
            self.last_seq[user] = seq;
            self.published[user].push(seq);
            let (lo, hi) = bounds[user];
            if delivered < lo || delivered > hi {
                self.failures.push(format!(
                    "{name} seq {seq} delivered to {delivered}, but {lo}..={hi} connections are live"
                ));
            }
            self.events_routed += delivered;
        }
        self.events_published += count as u64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_churn_delivers_each_event_to_exactly_its_users_live_connections() {
    let seed = std::env::var("RANDOM_ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("random_isolation seed {seed} (replay: RANDOM_ISOLATION_SEED={seed})");
    let mut rng = Rng(seed);
    let started = std::time::Instant::now();

    let mut cfg = config(guests::CHAOS);
    cfg.limits.max_connections_per_user = 50;
    cfg.limits.guest_memory_bytes = 4 << 20;
    // The call bounds are the defaults: on this loaded machine they must not cut a healthy
    // guest (a cut would show as a lost connection).
    let gw = TestGateway::start_with(cfg).await;
    let publisher = gw.publisher_token();

    let mut books = Books {
        names: (0..USERS)
            .map(|u| format!("user-{u:03}"))
            .chain((0..GHOSTS).map(|g| format!("ghost-{g}")))
            .collect(),
        last_seq: vec![0; USERS + GHOSTS],
        published: vec![Vec::new(); USERS + GHOSTS],
        counts: vec![0; USERS + GHOSTS],
        conns: Vec::new(),
        events_published: 0,
        events_routed: 0,
        failures: Vec::new(),
    };
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();

    for round in 0..ROUNDS {
        // Connect. Nothing is published meanwhile, so each new connection's first event is
        // its user's next seq.
        let users: Vec<usize> = if round == 0 {
            (0..USERS).collect()
        } else {
            (0..CONNECTS_PER_ROUND).map(|_| rng.below(USERS)).collect()
        };
        for chunk in users.chunks(CONNECT_CONCURRENCY) {
            let clients = join_all(chunk.iter().map(|&u| gw.connect(&books.names[u]))).await;
            for (&user, client) in chunk.iter().zip(clients) {
                let (tx, rx) = mpsc::unbounded_channel();
                let start = books.last_seq[user];
                let task = tokio::spawn(run_client(books.names[user].clone(), start, client, rx));
                books.conns.push(Conn {
                    user,
                    start,
                    fate: Fate::Healthy,
                    commands: tx,
                    task,
                });
            }
        }

        books
            .publish(&gw, &publisher, &mut rng, EVENTS_PER_ROUND / 2)
            .await;

        // Churn: the clients act on these while the next batch is being published.
        for conn in books.conns.iter_mut().filter(|c| c.fate == Fate::Healthy) {
            let roll = rng.below(1000);
            let (fate, command) = if roll < FAULT_PER_MILLE {
                let (trigger, kind) = rng.trigger();
                *injected.entry(kind).or_default() += 1;
                (Fate::Faulted(trigger, kind), Command::Fault(trigger))
            } else if roll < FAULT_PER_MILLE + CLOSE_PER_MILLE {
                if rng.below(2) == 0 {
                    (Fate::Closed, Command::Close)
                } else {
                    (Fate::Dropped, Command::Drop)
                }
            } else {
                continue;
            };
            conn.fate = fate;
            // A task that died already shows up when it is joined.
            let _ = conn.commands.send(command);
        }

        books
            .publish(&gw, &publisher, &mut rng, EVENTS_PER_ROUND / 2)
            .await;
        // A random pause, not a wait: it varies how far the clients have got with the
        // churn when the next round starts.
        tokio::time::sleep(Duration::from_millis(rng.below(4) as u64)).await;
    }
    let publishing = started.elapsed();

    // Publishing is over: every healthy connection must now get the rest of its user's events.
    for conn in &books.conns {
        if conn.fate == Fate::Healthy {
            let _ = conn
                .commands
                .send(Command::Finish(books.last_seq[conn.user]));
        }
    }

    let connections = books.conns.len();
    let mut distinct_users = [false; USERS];
    let (mut misdelivered, mut lost, mut healthy, mut verified) = (0, 0, 0, 0);
    let mut fates: BTreeMap<&str, usize> = BTreeMap::new();
    let deadline = Instant::now() + WAIT * 3;
    let conns = std::mem::take(&mut books.conns);
    let failures = &mut books.failures;
    for (id, conn) in conns.into_iter().enumerate() {
        let name = &books.names[conn.user];
        distinct_users[conn.user] = true;
        let what = format!(
            "connection {id} ({name}, {:?}, from seq {})",
            conn.fate, conn.start
        );
        let report = match timeout_at(deadline, conn.task).await {
            Ok(Ok(report)) => report,
            Ok(Err(err)) => {
                failures.push(format!("{what}: client task failed: {err}"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{what}: client task did not finish"));
                continue;
            }
        };
        misdelivered += report.misdelivered.len();
        for m in &report.misdelivered {
            failures.push(format!("{what}: MISDELIVERED: {m}"));
        }
        for p in &report.problems {
            failures.push(format!("{what}: {p}"));
        }
        if report.ended_unasked {
            failures.push(format!(
                "{what}: the gateway closed it unasked: {:?}",
                report.server_close
            ));
        }
        // Whatever its fate, a connection gets an unbroken run of its user's seqs, starting
        // right after the one current when it connected.
        let run: Vec<u64> = books.published[conn.user]
            .iter()
            .copied()
            .filter(|&s| s > conn.start)
            .take(report.seqs.len())
            .collect();
        if report.seqs != run {
            failures.push(format!(
                "{what}: seqs not an unbroken run: {:?}",
                report.seqs
            ));
        }
        match conn.fate {
            Fate::Healthy => {
                *fates.entry("healthy").or_default() += 1;
                healthy += 1;
                let want: Vec<u64> = books.published[conn.user]
                    .iter()
                    .copied()
                    .filter(|&s| s > conn.start)
                    .collect();
                verified += want.len();
                if report.seqs != want {
                    let missing = want.iter().filter(|s| !report.seqs.contains(s)).count();
                    lost += missing;
                    failures.push(format!(
                        "{what}: LOST {missing} of seqs {}..={}; got {:?}",
                        conn.start + 1,
                        books.last_seq[conn.user],
                        report.seqs
                    ));
                }
            }
            Fate::Closed => *fates.entry("closed").or_default() += 1,
            Fate::Dropped => *fates.entry("dropped").or_default() += 1,
            Fate::Faulted(trigger, kind) => {
                *fates.entry("faulted").or_default() += 1;
                let want = format!("guest fault: {kind}");
                match &report.server_close {
                    Some((1011, reason)) if reason.contains(&want) => {}
                    other => failures.push(format!(
                        "{what}: after {trigger:?} expected 1011 {want:?}, got {other:?}"
                    )),
                }
            }
        }
    }
    let faults: u64 = injected.values().sum();
    println!(
        "{connections} connections of {} users ({fates:?}); {} events in {} batches, {} routed; \
         {verified} events checked on {healthy} healthy connections; faults injected \
         {injected:?}; publishing took {publishing:?}",
        distinct_users.iter().filter(|&&u| u).count(),
        books.events_published,
        2 * ROUNDS,
        books.events_routed,
    );

    // Nothing left behind, and the gateway's counters agree with what the test did.
    for (name, want) in [
        ("gateway_sessions_live".to_owned(), 0),
        ("gateway_instances_live".to_owned(), 0),
        (
            "gateway_instantiations_total".to_owned(),
            connections as u64,
        ),
        (
            "gateway_events_published_total".to_owned(),
            books.events_published,
        ),
        (
            "gateway_events_routed_total".to_owned(),
            books.events_routed,
        ),
        ("gateway_queue_overflows_total".to_owned(), 0),
        (
            r#"gateway_session_closes_total{reason="guest_fault"}"#.to_owned(),
            faults,
        ),
    ]
    .into_iter()
    .chain(FAULT_KINDS.iter().filter_map(|kind| {
        let injected = injected.get(kind).copied().filter(|&n| n > 0)?;
        Some((
            format!(r#"gateway_guest_faults_total{{kind="{kind}"}}"#),
            injected,
        ))
    })) {
        if let Err(err) = gw.try_wait_metric(&name, want as f64).await {
            failures.push(err);
        }
    }
    // Every kind, counted or never (a kind never counted has no series yet).
    let mut fault_metric = 0.0;
    for kind in FAULT_KINDS {
        let name = format!(r#"gateway_guest_faults_total{{kind="{kind}"}}"#);
        let value = gw.metric_or_zero(&name).await;
        let want = injected.get(kind).copied().unwrap_or(0) as f64;
        if value != want {
            failures.push(format!("{name} is {value}, expected {want}"));
        }
        fault_metric += value;
    }
    gw.stop().await;
    println!("elapsed {:?}", started.elapsed());

    // The worst first: misdeliveries and losses.
    failures.sort_by_key(|f| !(f.contains("MISDELIVERED") || f.contains("LOST")));
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failures ({misdelivered} misdelivered, {lost} lost), first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
    assert_eq!(misdelivered, 0);
    assert_eq!(lost, 0);
    assert_eq!(fault_metric, faults as f64, "faults by the gateway's count");
    assert!(faults > 0, "seed {seed} injected no fault");
    assert!(connections >= 1000, "{connections} connections");
    assert!(distinct_users.iter().all(|&u| u), "every user connected");
}
