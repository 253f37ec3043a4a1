//! Cluster mode: gateway nodes share one event log, a NATS JetStream stream, so any node
//! accepts publishes and any node accepts connections.
//!
//! - **Publish**: the event goes to `<prefix>.ev.<tenant>.<user>`; the publish answers only
//!   after the stream acknowledged it. Its `seq` is the stream sequence: assigned by the
//!   stream's leader as it stores the event, the same on every node, and increasing for each
//!   identity (with gaps, which clients never interpret). A per-identity counter would need
//!   a compare-and-set round trip per event and would serialise each user's publishers.
//! - **Live fan-out**: the stream republishes every stored event, with its sequence and the
//!   sequence of the identity's previous event, to `<prefix>.live.<tenant>.<user>`. A node
//!   subscribes to that subject for each identity it holds sessions of ([`feed`]), so it
//!   receives only its own users' events, and fills any gap (a reconnect, a subscription
//!   still propagating) from the stream. Every session of an identity on every node gets its
//!   events in stream order, each once.
//! - **Resume**: `since` is a stream sequence. If the event at `since` is still stored and is
//!   the identity's, everything after it is too (JetStream's limits only ever remove an
//!   identity's oldest events), and the replay is read with direct gets.
//! - **Idempotency**: `Nats-Msg-Id` is a digest of the identity and the key, so keys stay
//!   per identity, within the stream's duplicate window.

pub mod feed;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};

use crate::auth::Identity;
use crate::config::{ClusterConfig, ClusterStorage, History};
use crate::event_log::{NotRecovered, Replay};
use crate::metrics::Metrics;
use crate::router::Publication;
use crate::sandbox::Event;

/// Why the stream could not be used; publishes answer 503 with it, resumes close with 1013.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event log unavailable: {0}")]
pub struct Unavailable(pub String);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cluster.nats_url = {url}: cannot connect to NATS: {reason}")]
    Connect { url: String, reason: String },
    #[error("cluster.stream = {stream}: cannot create or update the JetStream stream: {reason}")]
    Stream { stream: String, reason: String },
    #[error("cluster: {0}")]
    Options(String),
}

/// What a cluster publish did.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub seq: u64,
    pub duplicate: bool,
}

/// The NATS connection's state, shared with its event callback.
#[derive(Debug)]
struct Link {
    connected: AtomicBool,
    /// Bumped on every (re)connection and every slow-consumer report: each feed then checks
    /// the stream for events live delivery may have skipped.
    epoch: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Link {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                self.connected.store(true, Ordering::Release);
                self.metrics.nats_connected.set(1);
                self.metrics.nats_reconnects.inc();
                tracing::warn!("NATS connection re-established; live feeds catch up");
                self.epoch.send_modify(|e| *e += 1);
            }
            async_nats::Event::Disconnected => {
                self.connected.store(false, Ordering::Release);
                self.metrics.nats_connected.set(0);
                tracing::error!(
                    "NATS connection lost: publishes answer 503 until it is back; \
                     live connections stay up"
                );
            }
            async_nats::Event::SlowConsumer(sid) => {
                tracing::warn!(sid, "a live feed fell behind; catching up from the stream");
                self.epoch.send_modify(|e| *e += 1);
            }
            other => tracing::warn!(event = %other, "NATS"),
        }
    }
}

/// This node's membership: its NATS connection, the stream, and what it needs to read it.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    history: History,
    request_timeout: Duration,
    pub subscribe_timeout: Duration,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    /// Catch-ups after a reconnect run a few at a time, not one per identity at once.
    catch_ups: Semaphore,
    pub node: String,
}

/// An event as stored in the stream: the publication, its payload kept as the publisher's
/// JSON text, and when the publishing node sent it.
#[derive(Serialize)]
struct StoredEvent<'a> {
    kind: &'a str,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thread_id: Option<&'a str>,
    /// Microseconds since the epoch, for the lag metric.
    at: u64,
}

#[derive(Deserialize)]
struct StoredEventOwned<'a> {
    kind: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    run_id: Option<String>,
    thread_id: Option<String>,
    #[serde(default)]
    at: u64,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An identity as subject tokens: each part base64url-encoded (no `.`, `*`, `>` or spaces
/// can reach a subject) behind a marker letter, so an absent tenant, an empty one and any
/// user id map to distinct, valid tokens.
pub fn identity_tokens(identity: &Identity) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let tenant = match &identity.tenant {
        None => "_".to_owned(),
        Some(t) => format!("t{}", b64.encode(t)),
    };
    format!("{tenant}.u{}", b64.encode(&identity.user))
}

impl Cluster {
    /// Connects to NATS and creates the stream, or updates it to the configured settings.
    pub async fn join(
        config: &ClusterConfig,
        history: &History,
        max_event_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, JoinError> {
        let url = config.nats_url.clone().unwrap_or_default();
        let node = config.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "gateway".into());
            format!("{host}-{}", std::process::id())
        });
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let link = Arc::new(Link {
            connected: AtomicBool::new(false),
            epoch: watch::channel(0).0,
            metrics: metrics.clone(),
        });
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("gateway {node}"))
            .request_timeout(Some(request_timeout))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            // Bounded per live feed; one that falls behind is caught up from the stream.
            .subscription_capacity(4096)
            .require_tls(config.tls_required);
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                JoinError::Options(format!("credentials_file {}: {e}", path.display()))
            })?;
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &config.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let callback = link.clone();
        options = options.event_callback(move |event| {
            let link = callback.clone();
            async move { link.on_event(event) }
        });
        let servers: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| JoinError::Connect {
                url: url.clone(),
                reason: format!("{e}"),
            })?;
        let client = options
            .connect(servers)
            .await
            .map_err(|e| JoinError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        link.connected.store(true, Ordering::Release);
        metrics.nats_connected.set(1);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(request_timeout);
        let prefix = config.subject_prefix.clone();
        let stream_config = stream::Config {
            name: config.stream.clone(),
            description: Some("gateway events, per identity".into()),
            subjects: vec![format!("{prefix}.ev.>")],
            // One more than the limit: with at most the limit stored, an identity has
            // provably lost nothing to this bound (see `read`).
            max_messages_per_subject: history.max_events_per_user as i64 + 1,
            max_age: Duration::from_secs(history.max_age_secs),
            max_bytes: i64::try_from(config.max_bytes).unwrap_or(i64::MAX),
            // The stored body is the payload plus ids and a little JSON.
            max_message_size: i32::try_from(max_event_bytes + 4096).unwrap_or(i32::MAX),
            duplicate_window: Duration::from_secs(history.idempotency_window_secs),
            storage: match config.storage {
                ClusterStorage::File => stream::StorageType::File,
                ClusterStorage::Memory => stream::StorageType::Memory,
            },
            num_replicas: config.replicas,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: format!("{prefix}.ev.>"),
                destination: format!("{prefix}.live.>"),
                headers_only: false,
            }),
            ..Default::default()
        };
        let stream_err = |reason: String| JoinError::Stream {
            stream: config.stream.clone(),
            reason,
        };
        js.create_or_update_stream(stream_config)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        tracing::info!(
            %url,
            stream = %config.stream,
            replicas = config.replicas,
            %node,
            "cluster mode: events are stored in JetStream"
        );
        Ok(Arc::new(Cluster {
            client,
            js,
            stream,
            prefix,
            history: history.clone(),
            request_timeout,
            subscribe_timeout: Duration::from_millis(config.subscribe_timeout_ms),
            link,
            metrics,
            catch_ups: Semaphore::new(64),
            node,
        }))
    }

    /// Whether the NATS connection is up; why not, when it is not.
    pub fn trouble(&self) -> Option<String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => None,
            state => Some(format!("NATS connection {state}; reconnecting")),
        }
    }

    /// For `/v1/stats`: this node, its NATS server, and the stream's state and replicas.
    pub async fn describe(&self) -> serde_json::Value {
        let server = self.client.server_info();
        let stream = match tokio::time::timeout(self.request_timeout, self.stream.get_info()).await
        {
            Ok(Ok(info)) => {
                let cluster = info.cluster.as_ref();
                serde_json::json!({
                    "name": info.config.name,
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_seq": info.state.first_sequence,
                    "last_seq": info.state.last_sequence,
                    "leader": cluster.and_then(|c| c.leader.clone()),
                    "replicas": cluster.map(|c| c.replicas.iter().map(|p| serde_json::json!({
                        "name": p.name, "current": p.current, "offline": p.offline,
                    })).collect::<Vec<_>>()),
                })
            }
            Ok(Err(e)) => serde_json::json!({"error": e.to_string()}),
            Err(_) => serde_json::json!({"error": "no answer from the stream in time"}),
        };
        serde_json::json!({
            "node": self.node,
            "nats": {
                "connected": self.trouble().is_none(),
                "server": server.server_name,
            },
            "stream": stream,
        })
    }

    fn event_subject(&self, identity: &Identity) -> String {
        format!("{}.ev.{}", self.prefix, identity_tokens(identity))
    }

    fn live_subject(&self, identity: &Identity) -> String {
        format!("{}.live.{}", self.prefix, identity_tokens(identity))
    }

    /// Stores the event; answers once the stream has it.
    pub async fn publish(
        &self,
        publication: &Publication,
        idempotency_key: Option<&str>,
    ) -> Result<Stored, Unavailable> {
        let ack = self.send(publication, idempotency_key).await?;
        self.acked(ack).await
    }

    /// Sends the event without waiting for the stream's answer: a batch sends every event,
    /// then waits for the answers in order.
    pub async fn send(
        &self,
        publication: &Publication,
        idempotency_key: Option<&str>,
    ) -> Result<(Instant, jetstream::context::PublishAckFuture), Unavailable> {
        // Sent now, it would wait in the client's buffer for the reconnection and time out.
        if !self.link.connected.load(Ordering::Acquire) {
            return Err(Unavailable("the NATS connection is down".into()));
        }
        let payload = RawValue::from_string(publication.payload.clone())
            .map_err(|e| Unavailable(format!("payload: {e}")))?;
        let body = serde_json::to_vec(&StoredEvent {
            kind: &publication.kind,
            payload: &payload,
            run_id: publication.run_id.as_deref(),
            thread_id: publication.thread_id.as_deref(),
            at: now_micros(),
        })
        .map_err(|e| Unavailable(format!("encoding: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(key) = idempotency_key {
            headers.insert("Nats-Msg-Id", msg_id(&publication.identity, key).as_str());
        }
        let started = Instant::now();
        let ack = self
            .js
            .publish_with_headers(
                self.event_subject(&publication.identity),
                headers,
                body.into(),
            )
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok((started, ack))
    }

    /// The stream's answer to a sent event.
    pub async fn acked(
        &self,
        (started, ack): (Instant, jetstream::context::PublishAckFuture),
    ) -> Result<Stored, Unavailable> {
        let ack = ack.await.map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("publish", started.elapsed().as_secs_f64());
        Ok(Stored {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// A direct get, timed; `None` when there is no such message.
    async fn get(
        &self,
        request: impl std::future::Future<
            Output = Result<jetstream::message::StreamMessage, stream::DirectGetError>,
        >,
    ) -> Result<Option<jetstream::message::StreamMessage>, Unavailable> {
        let started = Instant::now();
        let got = tokio::time::timeout(self.request_timeout, request)
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?;
        self.metrics
            .nats_round_trip("get", started.elapsed().as_secs_f64());
        match got {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), stream::DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(Unavailable(e.to_string())),
        }
    }

    /// The identity's first stored message at or after `seq`: its sequence, and the event
    /// unless its body is unreadable (then it is skipped, and logged).
    async fn next_of(
        &self,
        identity: &Identity,
        seq: u64,
    ) -> Result<Option<(u64, Option<Event>)>, Unavailable> {
        let subject = self.event_subject(identity);
        let message = self
            .get(
                self.stream
                    .direct_get_next_for_subject(subject, Some(seq.max(1))),
            )
            .await?;
        Ok(message.map(|m| (m.sequence, decode(m.sequence, &m.payload).map(|(e, _)| e))))
    }

    /// The identity's latest `seq`, 0 when the stream holds none of its events.
    async fn head_of(&self, identity: &Identity) -> Result<u64, Unavailable> {
        let subject = self.event_subject(identity);
        let message = self
            .get(self.stream.direct_get_last_for_subject(subject))
            .await?;
        Ok(message.map_or(0, |m| m.sequence))
    }

    /// Events after `since`, or why they cannot be proven complete: the embedded log's
    /// answers, read from the stream.
    pub async fn read(&self, identity: &Identity, since: u64) -> Result<Replay, Unavailable> {
        let subject = self.event_subject(identity);
        let earliest = self
            .get(self.stream.direct_get_first_for_subject(subject.clone()))
            .await?
            .map(|m| m.sequence);
        let not = |reason, head| Replay {
            events: Vec::new(),
            recovered: false,
            reason: Some(reason),
            earliest,
            head,
        };
        if since > 0 {
            match self.get(self.stream.direct_get(since)).await? {
                // Still stored and this identity's: limits remove an identity's oldest
                // events first, so everything after it is stored too.
                Some(m) if m.subject.as_str() == subject => {}
                Some(_) => {
                    return Ok(not(NotRecovered::UnknownPosition, None));
                }
                None => {
                    let head = self.head_of(identity).await?;
                    let last = self.last_seq().await?;
                    let reason = if since > last {
                        NotRecovered::UnknownPosition
                    } else {
                        NotRecovered::Evicted
                    };
                    return Ok(not(reason, Some(head).filter(|h| *h > 0)));
                }
            }
        }
        let max = self.history.max_replay_events;
        let mut events = Vec::new();
        let mut next = since + 1;
        while let Some((seq, event)) = self.next_of(identity, next).await? {
            next = seq + 1;
            let Some(event) = event else { continue };
            if events.len() == max {
                let head = self.head_of(identity).await?;
                return Ok(not(NotRecovered::TooMany, Some(head)));
            }
            events.push(Arc::new(event));
        }
        let head = events
            .last()
            .map(|e| e.seq)
            .or((since > 0).then_some(since));
        // Everything retained: complete unless this identity lost events to its count
        // limit (the stream keeps one more than the limit, so that holding at most the
        // limit proves nothing was dropped: an identity's count shrinks below it again only
        // by age, which takes the oldest first), or the stream lost events younger than the
        // age limit to its byte bound.
        if since == 0
            && (events.len() > self.history.max_events_per_user
                || !self.nothing_discarded_within_age().await?)
        {
            return Ok(not(NotRecovered::Evicted, head));
        }
        Ok(Replay {
            events,
            recovered: true,
            reason: None,
            earliest,
            head,
        })
    }

    async fn stream_state(&self) -> Result<stream::State, Unavailable> {
        let started = Instant::now();
        let info = tokio::time::timeout(self.request_timeout, self.stream.get_info())
            .await
            .map_err(|_| Unavailable("no answer from the stream in time".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
        self.metrics
            .nats_round_trip("info", started.elapsed().as_secs_f64());
        Ok(info.state)
    }

    async fn last_seq(&self) -> Result<u64, Unavailable> {
        Ok(self.stream_state().await?.last_sequence)
    }

    /// Whether every event younger than the age limit is still stored: the stream never
    /// discarded anything, or its oldest event is already past the age limit.
    async fn nothing_discarded_within_age(&self) -> Result<bool, Unavailable> {
        let state = self.stream_state().await?;
        if state.first_sequence <= 1 || state.messages == 0 {
            return Ok(true);
        }
        let oldest = state.first_timestamp.unix_timestamp_nanos() / 1000;
        let horizon = now_micros() as i128 - self.history.max_age_secs as i128 * 1_000_000;
        Ok(oldest <= horizon)
    }
}

/// A stored event's body as an [`Event`] with its `seq`, and when it was published.
fn decode(seq: u64, body: &[u8]) -> Option<(Event, u64)> {
    let stored: StoredEventOwned = serde_json::from_slice(body)
        .inspect_err(
            |e| tracing::error!(seq, error = %e, "unreadable event in the stream; skipped"),
        )
        .ok()?;
    Some((
        Event {
            seq,
            kind: stored.kind,
            payload: stored.payload.get().to_owned(),
            run_id: stored.run_id,
            thread_id: stored.thread_id,
        },
        stored.at,
    ))
}

/// The stream's deduplication id for an identity's idempotency key: a digest, so any key
/// is a valid header value and keys of different identities never collide.
fn msg_id(identity: &Identity, key: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(identity_tokens(identity).as_bytes());
    digest.update([0]);
    digest.update(key.as_bytes());
    format!("{:x}", digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(tenant: Option<&str>, user: &str) -> Identity {
        Identity {
            tenant: tenant.map(str::to_owned),
            user: user.into(),
        }
    }

    #[test]
    fn identities_map_to_distinct_valid_subject_tokens() {
        let ids = [
            who(None, "alice"),
            who(Some(""), "alice"),
            who(Some("acme"), "alice"),
            who(None, "a.b"),
            who(None, "a*>"),
            who(None, "with space"),
            who(None, "ünïcødé ✓"),
            who(Some("a.b"), "c"),
            who(Some("a"), "b.c"),
        ];
        let tokens: Vec<String> = ids.iter().map(identity_tokens).collect();
        for t in &tokens {
            assert_eq!(t.split('.').count(), 2, "{t}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "{t}"
            );
            assert!(t.split('.').all(|part| !part.is_empty()), "{t}");
        }
        let mut unique = tokens.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tokens.len(), "{tokens:?}");
    }

    #[test]
    fn idempotency_ids_are_per_identity() {
        let a = msg_id(&who(None, "alice"), "k\r\n1");
        assert_eq!(a.len(), 64);
        assert_ne!(a, msg_id(&who(Some("t"), "alice"), "k\r\n1"));
        assert_eq!(a, msg_id(&who(None, "alice"), "k\r\n1"));
    }

    #[test]
    fn stored_events_decode_with_their_payload_text() {
        let payload = RawValue::from_string(r#"{"a": [1, 2.50]}"#.into()).unwrap();
        let body = serde_json::to_vec(&StoredEvent {
            kind: "tool",
            payload: &payload,
            run_id: Some("r"),
            thread_id: None,
            at: 7,
        })
        .unwrap();
        let (event, at) = decode(42, &body).unwrap();
        assert_eq!((event.seq, at), (42, 7));
        assert_eq!(event.payload, r#"{"a": [1, 2.50]}"#);
        assert_eq!(event.run_id.as_deref(), Some("r"));
        assert!(decode(1, b"not json").is_none());
    }
}
