//! A guest that echoes every client message back unchanged: text as text, binary as binary.
//! It sends nothing else (no welcome frame), ignores events and keeps no state, so a
//! WebSocket conformance client (the Autobahn fuzzing cases, `tests/autobahn/`) sees exactly
//! the behaviour of an echo server. It is built against the first world (`wit/0.1.0`), so
//! it is also the test of guests of that world: they load, run, and never hibernate.

// The generated export glue takes one argument per flattened record field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ path: "../../../wit/0.1.0", world: "handler" });

use gateway::handler::connection::{ack_context, emit};

struct Echo;

impl Guest for Echo {
    fn init(ctx: Context) {
        ack_context(&ctx.connection_id, &ctx.user_id);
    }

    fn on_client_message(frame: Frame) {
        emit(&frame);
    }

    fn on_event(_event: Event) {}

    fn on_close(_reason: CloseReason) {}
}

export!(Echo);
