//! A connection's RPC calls (see `crate::rpc`): the bounds checked before a call leaves,
//! and the calls in flight, which end with the session.

use std::sync::Arc;

use tokio::task::{JoinError, JoinSet};

use super::rate::RateLimit;
use super::{End, Session};
use crate::rpc::{Backend, Call, Refusal, Request, Slot, error_frame, request_body};
use crate::sandbox::Frame;

/// Made on a connection's first call: connections that never call cost nothing for it.
pub(super) struct Calls {
    /// Each call's answer frame, once the backend answered or the call gave up. Dropping
    /// the set (the session ended) abandons what is still in flight.
    running: JoinSet<String>,
    rate: RateLimit,
}

impl Calls {
    /// Whether an answer may come.
    pub(super) fn waiting(calls: &Option<Box<Calls>>) -> bool {
        calls.as_ref().is_some_and(|c| !c.running.is_empty())
    }

    /// The next answer; pending while none is in flight.
    pub(super) async fn answered(calls: &mut Option<Box<Calls>>) -> Result<String, JoinError> {
        match calls.as_mut().map(|c| &mut c.running) {
            Some(running) if !running.is_empty() => match running.join_next().await {
                Some(answer) => answer,
                None => std::future::pending().await,
            },
            _ => std::future::pending().await,
        }
    }
}

impl Session {
    /// A call from the client: refused at once with the bound it broke, or sent to the
    /// backend, its answer coming back through `Calls::answered`.
    pub(super) async fn on_rpc(&mut self, request: Request, len: usize) -> Result<(), End> {
        let (id, refusal, reason) = match request {
            Request::Invalid { id, reason } => (id, Refusal::Invalid, reason.to_owned()),
            Request::Call(call) => match self.admit_call(&call, len) {
                Ok((backend, slot, running, body)) => {
                    running.spawn(backend.call(call.id, body, slot));
                    return Ok(());
                }
                Err((refusal, reason)) => (Some(call.id), refusal, reason),
            },
        };
        self.app.metrics.rpc_refused(refusal.code());
        tracing::debug!(code = refusal.code(), "rpc call refused");
        let frame = error_frame(id.as_deref(), refusal.code(), &reason);
        self.write(vec![Frame::Text(frame)]).await
    }

    /// The backend, a slot in the node's bound and where the call runs; or the bound it
    /// breaks, checked from the cheapest to the node-wide one.
    #[allow(clippy::type_complexity)]
    fn admit_call(
        &mut self,
        call: &Call,
        len: usize,
    ) -> Result<(Arc<Backend>, Slot, &mut JoinSet<String>, Vec<u8>), (Refusal, String)> {
        let config = &self.app.config.rpc;
        if len > config.max_request_bytes {
            return Err((
                Refusal::TooLarge,
                format!("a call may be at most {} bytes", config.max_request_bytes),
            ));
        }
        let Some(backend) = self.app.rpc.get().cloned() else {
            return Err((
                Refusal::Disabled,
                "this gateway has no backend for calls ([rpc] url)".to_owned(),
            ));
        };
        let calls = self.rpc.get_or_insert_with(|| {
            Box::new(Calls {
                running: JoinSet::new(),
                rate: RateLimit::new(config.calls_per_sec, config.call_burst),
            })
        });
        if calls.running.len() >= config.max_in_flight_per_connection {
            return Err((
                Refusal::TooManyCalls,
                format!(
                    "at most {} calls in flight per connection",
                    config.max_in_flight_per_connection
                ),
            ));
        }
        if !calls.rate.allow() {
            return Err((
                Refusal::RateLimited,
                format!(
                    "at most {} calls per second (burst {})",
                    config.calls_per_sec, config.call_burst
                ),
            ));
        }
        let Some(slot) = backend.slot() else {
            return Err((
                Refusal::Busy,
                "the gateway has too many calls in flight; retry shortly".to_owned(),
            ));
        };
        let body = request_body(call, &self.ctx);
        Ok((backend, slot, &mut calls.running, body))
    }

    /// The backend's answer (or the call's failure), to this connection only.
    pub(super) async fn on_rpc_answer(
        &mut self,
        answer: Result<String, JoinError>,
    ) -> Result<(), End> {
        match answer {
            Ok(frame) => {
                self.last_active = tokio::time::Instant::now();
                self.write(vec![Frame::Text(frame)]).await
            }
            // Calls do not panic; were one to, its client is not answered, and this is why.
            Err(err) => {
                tracing::error!(error = %err, "rpc call ended without an answer");
                Ok(())
            }
        }
    }
}
