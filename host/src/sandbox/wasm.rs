//! One connection's Wasm instance: its own `Store`, so its own linear memory, deadline and
//! limits. Dropping it drops every byte the guest kept.

use wasmtime::Store;

use super::bindings::Handler as World;
use super::bindings_0_1::Handler as World0_1;
use super::host::HostState;
use super::{CloseReason, Context, Event, Fault, Frame, Handler};

/// The instance's exports, by the world the guest was built against.
pub enum Exports {
    Current(World),
    /// 0.1.0: the same calls, without `save` and `restore`.
    V0_1(World0_1),
}

pub struct WasmHandler {
    pub(super) store: Store<HostState>,
    pub(super) exports: Exports,
    /// Once set, the instance is never entered again: after a trap its state is undefined.
    pub(super) faulted: Option<Fault>,
}

/// Calls the export `$f` of either world with the same arguments.
macro_rules! either {
    ($exports:expr, $store:expr, $f:ident($($arg:expr),*)) => {
        match $exports {
            Exports::Current(w) => w.$f($store, $($arg),*),
            Exports::V0_1(w) => w.$f($store, $($arg),*),
        }
    };
}

impl Handler for WasmHandler {
    fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault> {
        let frames = self.call(|w, s| either!(w, s, call_init(ctx)))?;
        if !self.store.data().acked {
            return Err(self.fail(Fault::Unacknowledged));
        }
        Ok(frames)
    }

    fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault> {
        self.call(|w, s| either!(w, s, call_on_client_message(frame)))
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault> {
        self.store.data_mut().event_seq = Some(event.seq);
        let result = self.call(|w, s| either!(w, s, call_on_event(event)));
        self.store.data_mut().event_seq = None;
        result
    }

    fn on_close(&mut self, reason: CloseReason) -> Result<Vec<Frame>, Fault> {
        self.call(|w, s| either!(w, s, call_on_close(reason)))
    }

    fn fault(&self) -> Option<Fault> {
        self.faulted
    }

    fn hibernates(&self) -> bool {
        matches!(self.exports, Exports::Current(_)) && self.faulted.is_none()
    }

    fn save(&mut self) -> Result<Option<Vec<u8>>, Fault> {
        let mut saved = None;
        let frames = self.call(|w, s| match w {
            Exports::Current(w) => {
                saved = w.call_save(s)?;
                Ok(())
            }
            Exports::V0_1(_) => Ok(()),
        })?;
        // Frames emitted while saving would reach the client out of any order it expects;
        // the world says `save` does not emit, so they are dropped (and logged).
        if !frames.is_empty() {
            tracing::debug!(frames = frames.len(), "frames emitted by save dropped");
        }
        Ok(saved)
    }
}

impl WasmHandler {
    /// `restore` on a fresh instance, in place of `init`: the guest must acknowledge its
    /// context again.
    pub(super) fn restore(&mut self, ctx: &Context, state: &[u8]) -> Result<(), Fault> {
        let mut refused = None;
        self.call(|w, s| match w {
            Exports::Current(w) => {
                refused = w.call_restore(s, ctx, state)?.err();
                Ok(())
            }
            Exports::V0_1(_) => {
                refused = Some("a 0.1.0 guest cannot restore".to_owned());
                Ok(())
            }
        })?;
        if let Some(reason) = refused {
            tracing::warn!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                reason = %reason.chars().take(256).collect::<String>(),
                "guest refused to restore its saved state: connection closed"
            );
            return Err(self.fail(Fault::Restore));
        }
        if !self.store.data().acked {
            return Err(self.fail(Fault::Unacknowledged));
        }
        Ok(())
    }

    fn call(
        &mut self,
        f: impl FnOnce(&Exports, &mut Store<HostState>) -> wasmtime::Result<()>,
    ) -> Result<Vec<Frame>, Fault> {
        if let Some(fault) = self.faulted {
            return Err(fault);
        }
        self.store.data_mut().start_call();
        // The first check comes after one tick; `check_deadline` sets the ones after it.
        self.store.set_epoch_deadline(1);
        let result = f(&self.exports, &mut self.store);
        let state = self.store.data_mut();
        let frames = std::mem::take(&mut state.outbox);
        match result {
            Ok(()) => Ok(frames),
            Err(err) => {
                let fault = if let Some(v) = state.violation {
                    v
                } else if state.memory_exceeded {
                    Fault::Memory
                } else if err.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    Fault::Cpu
                } else {
                    Fault::Trap
                };
                tracing::debug!(fault = fault.as_str(), error = %format!("{err:#}"), "guest fault");
                Err(self.fail(fault))
            }
        }
    }

    fn fail(&mut self, fault: Fault) -> Fault {
        self.faulted = Some(fault);
        fault
    }
}
