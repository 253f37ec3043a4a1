//! Reference agent-events handler: one instance serves one WebSocket connection.
//!
//! Everything this handler knows about its connection lives in this instance's own linear
//! memory (`STATE` below): the identity it acknowledged, the threads the client subscribed to,
//! the lifecycle of each agent run, and counters. Nothing here can name another connection;
//! the only way out is `emit`, which reaches this connection's client.
//!
//! Client protocol (JSON text frames):
//! - `{"type":"subscribe","thread_id":"t1"}` / `{"type":"unsubscribe","thread_id":"t1"}`:
//!   with no subscription every event is forwarded, otherwise only those of subscribed threads.
//! - `{"type":"ping"}`: answered with a `pong` carrying this instance's counters and state.
//!
//! Frames sent: `welcome` on connect, `event` for each forwarded event (payload with sensitive
//! fields redacted), `message` for each op of a message (AI output streams: the gateway's
//! events of kind `gateway.message`), `subscribed`/`unsubscribed`, `pong`, and `error` for a
//! frame it cannot use.

// The generated export glue takes one argument per flattened record field.
#![allow(clippy::too_many_arguments)]

pub mod handler;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::{Cell, RefCell};

    use crate::handler::{EventIn, State};

    wit_bindgen::generate!({ path: "../wit", world: "handler" });

    use gateway::handler::connection::{ack_context, emit};

    thread_local! {
        static STATE: RefCell<State> = RefCell::new(State::default());
        static FRAME: Cell<String> = const { Cell::new(String::new()) };
    }

    struct Handler;

    impl Guest for Handler {
        fn init(ctx: Context) {
            ack_context(&ctx.connection_id, &ctx.user_id);
            let welcome =
                STATE.with_borrow_mut(|s| s.init(ctx.connection_id, ctx.user_id, ctx.expires_at));
            emit(&Frame::Text(welcome));
        }

        fn on_client_message(frame: Frame) {
            let reply = STATE.with_borrow_mut(|s| match frame {
                Frame::Text(text) => s.text_message(&text),
                Frame::Binary(_) => s.binary_message(),
            });
            emit(&Frame::Text(reply));
        }

        fn on_event(event: Event) {
            let event = EventIn {
                seq: event.seq,
                kind: event.kind,
                payload: event.payload,
                run_id: event.run_id,
                thread_id: event.thread_id,
            };
            // The frame buffer lives from event to event: no allocation per event once it
            // has grown to the usual frame size. One unusually large frame is not kept.
            let mut text = FRAME.take();
            if STATE.with_borrow_mut(|s| s.event(event, &mut text)) {
                let frame = Frame::Text(text);
                emit(&frame);
                text = match frame {
                    Frame::Text(sent) => sent,
                    Frame::Binary(_) => String::new(),
                };
            }
            if text.capacity() > 4096 {
                text = String::new();
            }
            FRAME.set(text);
        }

        fn on_close(_reason: CloseReason) {}

        fn save() -> Option<Vec<u8>> {
            Some(STATE.with_borrow(State::save))
        }

        fn restore(ctx: Context, saved: Vec<u8>) -> Result<(), String> {
            ack_context(&ctx.connection_id, &ctx.user_id);
            let state = State::restore(&ctx.connection_id, &ctx.user_id, &saved)?;
            STATE.set(state);
            Ok(())
        }
    }

    export!(Handler);
}
