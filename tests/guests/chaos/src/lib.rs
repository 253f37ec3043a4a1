//! A guest that misbehaves on request, so tests can inject faults into some connections
//! while others carry traffic.
//!
//! At `init` the token's `sid` claim picks an identity fault: `no-ack`, `ack-other-user`,
//! `ack-other-connection`, `emit-before-ack`, or none. Afterwards a client text frame picks
//! a runtime fault: `trap`, `loop`, `grow`, `flood`, `big`; or `try-grow` (asks for more
//! memory than any cap, survives the refusal and says so), `emit-bytes` (60 frames of 60 KiB
//! in one call), `slow-events` (every later event burns ~20 million loop turns of CPU);
//! anything else is echoed back.
//! Events are forwarded as `{"type":"event","seq":N,"kind":K,"count":C}`, where `count` (events
//! seen by this handler) survives hibernation. Hibernation faults, picked by a client frame:
//! `save-trap`, `save-none` (declines), `save-big` (64 KiB of state), `restore-refuse`,
//! `restore-no-ack`. `expiry` answers `{"type":"expiry","expires_at":T}`, the token expiry of
//! the context this instance was given (by `init`, or by `restore` after hibernation).

// The generated export glue takes one argument per flattened record field.
#![allow(clippy::too_many_arguments)]

use std::cell::Cell;

wit_bindgen::generate!({ path: "../../../wit", world: "handler" });

use gateway::handler::connection::{ack_context, emit};

thread_local! {
    static EVENTS: Cell<u64> = const { Cell::new(0) };
    static SLOW: Cell<bool> = const { Cell::new(false) };
    /// The hibernation fault asked for, if any (saved with the state).
    static SAVE_MODE: Cell<u8> = const { Cell::new(0) };
    /// `expires-at` of the context this instance was given.
    static EXPIRES_AT: Cell<u64> = const { Cell::new(0) };
}

const SAVE_TRAP: u8 = 1;
const SAVE_NONE: u8 = 2;
const SAVE_BIG: u8 = 3;
const RESTORE_REFUSE: u8 = 4;
const RESTORE_NO_ACK: u8 = 5;

struct Chaos;

impl Guest for Chaos {
    fn init(ctx: Context) {
        EXPIRES_AT.set(ctx.expires_at);
        match ctx.session_id.as_deref() {
            Some("no-ack") => {}
            Some("ack-other-user") => ack_context(&ctx.connection_id, "mallory"),
            Some("ack-other-connection") => ack_context("another-connection", &ctx.user_id),
            Some("emit-before-ack") => {
                emit(&Frame::Text("early".into()));
                ack_context(&ctx.connection_id, &ctx.user_id);
            }
            _ => ack_context(&ctx.connection_id, &ctx.user_id),
        }
        emit(&Frame::Text(r#"{"type":"welcome"}"#.into()));
    }

    fn on_client_message(frame: Frame) {
        let Frame::Text(text) = frame else { return };
        match text.as_str() {
            "trap" => panic!("asked to trap"),
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(vec![1u8; 256 << 10]));
                }
            }
            "flood" => {
                for _ in 0..100_000 {
                    emit(&Frame::Text("flood".into()));
                }
            }
            "big" => emit(&Frame::Text("x".repeat(1 << 20))),
            "emit-bytes" => {
                for _ in 0..60 {
                    emit(&Frame::Text("x".repeat(60 << 10)));
                }
            }
            "slow-events" => {
                SLOW.set(true);
                emit(&Frame::Text(r#"{"type":"slow"}"#.into()));
            }
            "try-grow" => {
                // 60,000 pages (3.7 GiB): past any cap, refused without a trap.
                let refused = grow_memory(60_000);
                emit(&Frame::Text(format!(
                    r#"{{"type":"grow","refused":{refused}}}"#
                )));
            }
            "save-trap" => SAVE_MODE.set(SAVE_TRAP),
            "save-none" => SAVE_MODE.set(SAVE_NONE),
            "save-big" => SAVE_MODE.set(SAVE_BIG),
            "restore-refuse" => SAVE_MODE.set(RESTORE_REFUSE),
            "restore-no-ack" => SAVE_MODE.set(RESTORE_NO_ACK),
            "expiry" => emit(&Frame::Text(format!(
                r#"{{"type":"expiry","expires_at":{}}}"#,
                EXPIRES_AT.get()
            ))),
            _ => emit(&Frame::Text(text)),
        }
    }

    fn on_event(event: Event) {
        if SLOW.get() {
            let mut n = 0u64;
            for _ in 0..20_000_000 {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        let n = EVENTS.get() + 1;
        EVENTS.set(n);
        emit(&Frame::Text(format!(
            r#"{{"type":"event","seq":{},"kind":"{}","count":{n}}}"#,
            event.seq, event.kind
        )));
    }

    fn on_close(_reason: CloseReason) {}

    fn save() -> Option<Vec<u8>> {
        let mode = SAVE_MODE.get();
        match mode {
            SAVE_TRAP => panic!("asked to trap in save"),
            SAVE_NONE => return None,
            _ => {}
        }
        let mut state = vec![mode, u8::from(SLOW.get())];
        state.extend_from_slice(&EVENTS.get().to_le_bytes());
        if mode == SAVE_BIG {
            state.resize(64 << 10, 0);
        }
        Some(state)
    }

    fn restore(ctx: Context, state: Vec<u8>) -> Result<(), String> {
        let Some((&[mode, slow], events)) = state.split_first_chunk::<2>() else {
            return Err("saved state too short".into());
        };
        if mode != RESTORE_NO_ACK {
            ack_context(&ctx.connection_id, &ctx.user_id);
        }
        if mode == RESTORE_REFUSE {
            return Err("asked to refuse".into());
        }
        EXPIRES_AT.set(ctx.expires_at);
        let events = events.get(..8).ok_or("saved state too short")?;
        EVENTS.set(u64::from_le_bytes(events.try_into().unwrap()));
        SLOW.set(slow == 1);
        SAVE_MODE.set(mode);
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
fn grow_memory(pages: usize) -> bool {
    core::arch::wasm32::memory_grow(0, pages) == usize::MAX
}

#[cfg(not(target_arch = "wasm32"))]
fn grow_memory(_pages: usize) -> bool {
    true
}

export!(Chaos);
