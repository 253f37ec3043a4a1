//! One connection's Wasm instance: its own `Store`, so its own linear memory, deadline and
//! limits. Dropping it drops every byte the guest kept.

use wasmtime::Store;

use super::bindings::Handler as World;
use super::host::HostState;
use super::{CloseReason, Context, Event, Fault, Frame, Handler};

pub struct WasmHandler {
    pub(super) store: Store<HostState>,
    pub(super) world: World,
    /// Once set, the instance is never entered again: after a trap its state is undefined.
    pub(super) faulted: Option<Fault>,
}

impl Handler for WasmHandler {
    fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault> {
        let frames = self.call(|w, s| w.call_init(s, ctx))?;
        if !self.store.data().acked {
            return Err(self.fail(Fault::Unacknowledged));
        }
        Ok(frames)
    }

    fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault> {
        self.call(|w, s| w.call_on_client_message(s, frame))
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault> {
        self.store.data_mut().event_seq = Some(event.seq);
        let result = self.call(|w, s| w.call_on_event(s, event));
        self.store.data_mut().event_seq = None;
        result
    }

    fn on_close(&mut self, reason: CloseReason) -> Result<Vec<Frame>, Fault> {
        self.call(|w, s| w.call_on_close(s, reason))
    }

    fn fault(&self) -> Option<Fault> {
        self.faulted
    }
}

impl WasmHandler {
    fn call(
        &mut self,
        f: impl FnOnce(&World, &mut Store<HostState>) -> wasmtime::Result<()>,
    ) -> Result<Vec<Frame>, Fault> {
        if let Some(fault) = self.faulted {
            return Err(fault);
        }
        self.store.data_mut().start_call();
        // The first check comes after one tick; `check_deadline` sets the ones after it.
        self.store.set_epoch_deadline(1);
        let result = f(&self.world, &mut self.store);
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
