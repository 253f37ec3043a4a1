//! The transport under a session: a WebSocket, or a server-sent event stream (`GET /sse`) for
//! networks that refuse upgrades. The session's loop is the same for both; only how frames,
//! heartbeats and the goodbye are written differs.
//!
//! An SSE stream is one-way: the client sends nothing after its request (its frames for the
//! handler come in the query string, see `admit.rs`), so reading it only tells whether the
//! client went away. Each frame the handler emits is one event, `data: <frame>`, with
//! `id: <seq>` when the frame is a JSON object with a numeric `seq` (what a client resumes
//! from with `Last-Event-ID`); a binary frame is `event: binary` with base64 data. The close
//! a WebSocket would get is an `event: close` with `{"code","reason"}`, then the stream ends.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::Engine;
use futures_util::{SinkExt, Stream};
use tokio::sync::{Semaphore, mpsc};

use crate::sandbox::Frame;

/// The session's end of an SSE response body. A write waits while the bytes the HTTP layer
/// has not taken yet reach the budget, as a WebSocket write waits on its full write buffer;
/// with the write timeout, this is what bounds a slow SSE reader's memory.
pub(super) struct SseSender {
    chunks: mpsc::UnboundedSender<Bytes>,
    room: Arc<Semaphore>,
    budget: usize,
}

impl SseSender {
    async fn send(&self, chunk: Bytes) -> Result<(), Broken> {
        let permits = permits(chunk.len(), self.budget);
        self.room
            .acquire_many(permits)
            .await
            .map_err(|_| Broken)?
            .forget();
        self.chunks.send(chunk).map_err(|_| Broken)
    }
}

/// A chunk's share of the budget: its length, at most the whole budget (a frame larger than
/// the budget waits for an empty queue instead of forever).
fn permits(len: usize, budget: usize) -> u32 {
    u32::try_from(len.clamp(1, budget.max(1))).unwrap_or(u32::MAX)
}

/// An SSE stream: the sender the session writes to, and the body the response reads from
/// (`budget` bytes at most queued between them).
pub(super) fn sse_stream(
    budget: usize,
) -> (
    SseSender,
    impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) {
    let budget = budget.clamp(1, u32::MAX as usize);
    let (chunks, taken) = mpsc::unbounded_channel::<Bytes>();
    let room = Arc::new(Semaphore::new(budget));
    let body =
        futures_util::stream::unfold((taken, room.clone()), move |(mut taken, room)| async move {
            let chunk = taken.recv().await?;
            room.add_permits(permits(chunk.len(), budget) as usize);
            Some((Ok(chunk), (taken, room)))
        });
    (
        SseSender {
            chunks,
            room,
            budget,
        },
        body,
    )
}

// Unboxed: the WebSocket is the common case, and boxing it would cost every connection an
// allocation to save an SSE session a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub(super) enum Link {
    WebSocket(WebSocket),
    /// The response body reads from the other end; it is dropped when the client goes.
    Sse(SseSender),
}

/// The transport failed; the session ends as `End::Transport`.
pub(super) struct Broken;

impl Link {
    /// The client's next message; `None` once it went away. An SSE client only goes away.
    pub(super) async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        match self {
            Link::WebSocket(socket) => socket.recv().await,
            Link::Sse(stream) => {
                stream.chunks.closed().await;
                None
            }
        }
    }

    pub(super) fn is_sse(&self) -> bool {
        matches!(self, Link::Sse(_))
    }

    /// Writes frames with one flush (one write to the body for SSE).
    pub(super) async fn send(&mut self, frames: Vec<Frame>) -> Result<(), Broken> {
        match self {
            Link::WebSocket(socket) => {
                for frame in frames {
                    let msg = match frame {
                        Frame::Text(text) => Message::Text(text.into()),
                        Frame::Binary(bytes) => Message::Binary(bytes.into()),
                    };
                    socket.feed(msg).await.map_err(|_| Broken)?;
                }
                socket.flush().await.map_err(|_| Broken)
            }
            Link::Sse(stream) => {
                let mut out = String::new();
                for frame in &frames {
                    encode(frame, &mut out);
                }
                stream.send(Bytes::from(out)).await.map_err(|_| Broken)
            }
        }
    }

    /// A WebSocket ping, or an SSE comment that keeps proxies from timing the stream out.
    pub(super) async fn ping(&mut self) -> Result<(), Broken> {
        match self {
            Link::WebSocket(socket) => socket
                .send(Message::Ping(Default::default()))
                .await
                .map_err(|_| Broken),
            Link::Sse(stream) => stream
                .send(Bytes::from_static(b": ping\n\n"))
                .await
                .map_err(|_| Broken),
        }
    }

    /// The goodbye: a close frame, or an SSE `close` event (the stream ends when the session
    /// drops its sender).
    pub(super) async fn close(&mut self, code: u16, reason: String) -> Result<(), Broken> {
        match self {
            Link::WebSocket(socket) => socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await
                .map_err(|_| Broken),
            Link::Sse(stream) => {
                let data = serde_json::json!({ "code": code, "reason": reason });
                let event = format!("event: close\ndata: {data}\n\n");
                stream.send(Bytes::from(event)).await.map_err(|_| Broken)
            }
        }
    }

    /// Flushes what the transport still holds (a WebSocket's reply to the client's Close).
    pub(super) async fn flush(&mut self) -> Result<(), Broken> {
        match self {
            Link::WebSocket(socket) => socket.flush().await.map_err(|_| Broken),
            Link::Sse(_) => Ok(()),
        }
    }
}

/// One frame as one SSE event.
pub(super) fn encode(frame: &Frame, out: &mut String) {
    match frame {
        Frame::Text(text) => {
            if let Some(seq) = seq_of(text) {
                out.push_str("id: ");
                out.push_str(&seq.to_string());
                out.push('\n');
            }
            // A line break would end the field: each line is a `data` field of its own, and
            // the client joins them with "\n" (a JSON frame has no raw line breaks).
            for line in text.split("\r\n").flat_map(|part| part.split(['\n', '\r'])) {
                out.push_str("data: ");
                out.push_str(line);
                out.push('\n');
            }
        }
        Frame::Binary(bytes) => {
            out.push_str("event: binary\ndata: ");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
            out.push('\n');
        }
    }
    out.push('\n');
}

/// The top-level `seq` of a JSON object frame, if it has a numeric one.
fn seq_of(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: Option<u64>,
    }
    if !text.starts_with('{') || !text.contains("\"seq\"") {
        return None;
    }
    serde_json::from_str::<Seq>(text).ok()?.seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: Frame) -> String {
        let mut out = String::new();
        encode(&frame, &mut out);
        out
    }

    #[test]
    fn a_frame_with_a_seq_carries_it_as_the_event_id() {
        let text = r#"{"type":"event","seq":42,"payload":{"seq":"x"}}"#;
        assert_eq!(
            encoded(Frame::Text(text.into())),
            format!("id: 42\ndata: {text}\n\n")
        );
        let welcome = r#"{"type":"welcome"}"#;
        assert_eq!(
            encoded(Frame::Text(welcome.into())),
            format!("data: {welcome}\n\n")
        );
        // Not a number, or not at the top level: no id.
        let odd = r#"{"type":"x","seq":"7"}"#;
        assert!(!encoded(Frame::Text(odd.into())).contains("id:"));
        let nested = r#"{"type":"x","payload":{"seq":7}}"#;
        assert!(!encoded(Frame::Text(nested.into())).contains("id:"));
    }

    #[test]
    fn line_breaks_cannot_end_an_event_early() {
        let out = encoded(Frame::Text("one\ntwo\r\n\nthree".into()));
        assert_eq!(out, "data: one\ndata: two\ndata: \ndata: three\n\n");
        assert_eq!(
            out.matches("\n\n").count(),
            1,
            "one event, ended once: {out}"
        );
    }

    #[tokio::test]
    async fn a_write_waits_while_the_unread_bytes_fill_the_budget() {
        use futures_util::StreamExt;
        let (sender, body) = sse_stream(10);
        let mut body = Box::pin(body);
        sender
            .send(Bytes::from_static(b"123456"))
            .await
            .ok()
            .unwrap();
        // 6 + 6 > 10: the second write waits for the first to be taken.
        let second = sender.send(Bytes::from_static(b"abcdef"));
        tokio::pin!(second);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut second).await;
        assert!(waited.is_err(), "the second write went past the budget");
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"123456");
        second.await.ok().unwrap();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"abcdef");
        // Larger than the whole budget: it waits for an empty queue, not forever.
        sender.send(Bytes::from(vec![b'x'; 64])).await.ok().unwrap();
        assert_eq!(body.next().await.unwrap().unwrap().len(), 64);
        // The body gone (the client went): writes fail.
        drop(body);
        assert!(sender.send(Bytes::from_static(b"z")).await.is_err());
    }

    #[test]
    fn binary_frames_are_base64() {
        assert_eq!(
            encoded(Frame::Binary(vec![0, 255, 1])),
            "event: binary\ndata: AP8B\n\n"
        );
    }
}
