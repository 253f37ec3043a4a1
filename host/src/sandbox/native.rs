//! Benchmark builds only (feature `native-handler`): the reference handler's logic linked
//! natively, given the same inputs the Wasm instance gets (owned copies, as lowering into
//! linear memory makes), so that the cost of the sandbox can be measured against it.

use gateway_guest::handler::{EventIn, State};

use super::{CloseReason, Context, Event, Fault, Frame, Handler};

#[derive(Default)]
pub struct NativeHandler(State);

impl Handler for NativeHandler {
    fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault> {
        let welcome = self.0.init(
            ctx.connection_id.clone(),
            ctx.user_id.clone(),
            ctx.expires_at,
        );
        Ok(vec![Frame::Text(welcome)])
    }

    fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault> {
        let reply = match frame {
            Frame::Text(text) => self.0.text_message(text),
            Frame::Binary(_) => self.0.binary_message(),
        };
        Ok(vec![Frame::Text(reply)])
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault> {
        let event = EventIn {
            seq: event.seq,
            kind: event.kind.clone(),
            payload: event.payload.clone(),
            run_id: event.run_id.clone(),
            thread_id: event.thread_id.clone(),
        };
        let mut out = String::new();
        Ok(if self.0.event(event, &mut out) {
            vec![Frame::Text(out)]
        } else {
            Vec::new()
        })
    }

    fn on_close(&mut self, _reason: CloseReason) -> Result<Vec<Frame>, Fault> {
        Ok(Vec::new())
    }

    fn fault(&self) -> Option<Fault> {
        None
    }
}
