//! A plain HTTP client of `GET /sse`: reads the response body chunk by chunk and parses the
//! server-sent events by the specification's rules (fields, comments, blank-line ends), with
//! nothing of the gateway's own code.

use std::collections::VecDeque;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::WAIT;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `message` unless the event named another (`close`, `binary`).
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
    ready: VecDeque<SseEvent>,
    /// Comment lines seen (the gateway's heartbeats).
    pub comments: usize,
    /// The response's `Access-Control-Allow-Origin`.
    pub allow_origin: Option<String>,
    ended: bool,
}

/// How to open a stream: the token in a header or the query, and the rest of the query.
pub struct Open<'a> {
    pub token: &'a str,
    pub token_in_query: bool,
    pub query: &'a str,
    pub last_event_id: Option<&'a str>,
}

impl<'a> Open<'a> {
    pub fn bearer(token: &'a str) -> Self {
        Open {
            token,
            token_in_query: false,
            query: "",
            last_event_id: None,
        }
    }
}

impl SseClient {
    /// Opens `base` (e.g. `http://127.0.0.1:1234/sse`); a refusal comes back as its status
    /// and JSON body.
    pub async fn open(base: &str, open: Open<'_>) -> Result<SseClient, (u16, Value)> {
        let mut query = open.query.to_owned();
        if open.token_in_query {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(&format!("access_token={}", open.token));
        }
        let url = match query.as_str() {
            "" => base.to_owned(),
            q => format!("{base}?{q}"),
        };
        let mut request = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if !open.token_in_query {
            request = request.bearer_auth(open.token);
        }
        if let Some(id) = open.last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("the stream answers within the wait")
            .expect("the request reaches the gateway");
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err((
                status,
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            ));
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(content_type, "text/event-stream");
        let allow_origin = response
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(SseClient {
            allow_origin,
            response,
            buffer: String::new(),
            ready: VecDeque::new(),
            comments: 0,
            ended: false,
        })
    }

    /// The next event (comments skipped); fails when the stream ends or nothing comes
    /// within the wait.
    pub async fn next_event(&mut self) -> anyhow::Result<SseEvent> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(event) = self.ready.pop_front() {
                    return Ok(event);
                }
                if !self.read().await? {
                    bail!("the stream ended");
                }
            }
        })
        .await
        .context("no event within the wait")?
    }

    /// The next event's data as JSON, which must be a plain (`message`) event.
    pub async fn next_json(&mut self) -> anyhow::Result<Value> {
        let event = self.next_event().await?;
        if event.event != "message" {
            bail!("expected a message event, got {event:?}");
        }
        Ok(event.json())
    }

    /// Reads until the stream ends; returns the events before the end.
    pub async fn until_end(&mut self) -> Vec<SseEvent> {
        tokio::time::timeout(WAIT, async {
            while self.read().await.expect("reading the stream") {}
        })
        .await
        .unwrap_or_else(|_| panic!("the stream should end within the wait: {:?}", self.ready));
        self.ready.drain(..).collect()
    }

    /// Waits for `count` comments (heartbeats) in all; events read meanwhile stay queued.
    pub async fn wait_comments(&mut self, count: usize) {
        tokio::time::timeout(WAIT, async {
            while self.comments < count {
                assert!(
                    self.read().await.expect("reading the stream"),
                    "stream ended"
                );
            }
        })
        .await
        .expect("heartbeats within the wait");
    }

    /// One chunk more; false once the body ended.
    async fn read(&mut self) -> anyhow::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        match self.response.chunk().await? {
            None => {
                self.ended = true;
                Ok(false)
            }
            Some(chunk) => {
                self.buffer.push_str(std::str::from_utf8(&chunk)?);
                self.parse();
                Ok(true)
            }
        }
    }

    /// Moves every complete event out of the buffer.
    fn parse(&mut self) {
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = ("message".to_owned(), None, Vec::new());
            let mut fields = 0;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                fields += 1;
                match name {
                    "event" => event = value.to_owned(),
                    "id" => id = Some(value.to_owned()),
                    "data" => data.push(value.to_owned()),
                    _ => {}
                }
            }
            if fields > 0 {
                self.ready.push_back(SseEvent {
                    event,
                    id,
                    data: data.join("\n"),
                });
            }
        }
    }
}
