//! The host side of one instance: the world's two imports (`ack-context`, `emit`) and the
//! limiter on its memory, tables and instance counts.

use std::sync::Arc;

use wasmtime::component::Linker;
use wasmtime::{ResourceLimiter, StoreContextMut, UpdateDeadline};

use super::bindings::gateway::handler::connection::Host;
use super::clock::CallClock;
use super::engine::ticks;
use super::{Fault, Frame, InstanceLimits, WORLD_0_1_IMPORT};
use crate::metrics::Metrics;

/// The host side of one instance: what `emit` and `ack-context` act on.
pub struct HostState {
    pub(super) connection_id: String,
    pub(super) user_id: String,
    pub(super) acked: bool,
    /// Frames emitted during the current call, sent once the call returns.
    pub(super) outbox: Vec<Frame>,
    /// Bytes in `outbox`: a call may emit at most `outbound_queue_bytes`, checked before a
    /// frame is kept, so no call buffers more than a connection may have queued.
    pub(super) outbox_bytes: usize,
    /// Set when a host function refuses the guest; the call then traps and this says why.
    pub(super) violation: Option<Fault>,
    /// Set when the guest asked for memory past its cap, to tell a memory fault from a trap.
    pub(super) memory_exceeded: bool,
    /// The largest memory the guest asked for past its cap (for the trial instantiation's
    /// advice on which limit to raise).
    pub(super) memory_wanted: usize,
    /// Set when a call ran out of CPU time (or wall time).
    pub(super) cpu_exceeded: bool,
    /// The event being handled, during `on-event`: a frame too large for the client made
    /// from it is the publisher's doing, not the guest's (see `emit`).
    pub(super) event_seq: Option<u64>,
    pub(super) clock: CallClock,
    pub(super) limits: InstanceLimits,
    pub(super) metrics: Arc<Metrics>,
    /// This guest version's live instances.
    pub(super) version_instances: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for HostState {
    fn drop(&mut self) {
        // The store owns this state, so this runs exactly when the instance's memory is freed.
        self.metrics.instances_live.dec();
        self.version_instances.dec();
    }
}

impl HostState {
    /// Forgets what the previous call left: the outcome of a call is its own.
    pub(super) fn start_call(&mut self) {
        self.clock = CallClock::start();
        // A memory request refused (and survived) earlier must not name a later fault.
        self.memory_exceeded = false;
        self.cpu_exceeded = false;
        self.violation = None;
        self.outbox_bytes = 0;
    }

    /// Runs when the epoch deadline passes during a call: the deadline is only a wake-up.
    /// The call goes on while it has used less CPU than its budget and less wall time than
    /// its bound.
    pub(super) fn check_deadline(&mut self) -> wasmtime::Result<UpdateDeadline> {
        let (cpu, wall) = self.clock.used();
        if cpu >= self.limits.cpu || wall >= self.limits.wall {
            self.cpu_exceeded = true;
            return Ok(UpdateDeadline::Interrupt);
        }
        let left = (self.limits.cpu - cpu).min(self.limits.wall - wall);
        Ok(UpdateDeadline::Continue(ticks(left)))
    }
}

impl Host for HostState {
    fn ack_context(&mut self, connection_id: String, user_id: String) -> wasmtime::Result<()> {
        if connection_id != self.connection_id || user_id != self.user_id {
            self.violation = Some(Fault::AckMismatch);
            wasmtime::bail!("ack-context named another connection or user");
        }
        self.acked = true;
        Ok(())
    }

    fn emit(&mut self, frame: Frame) -> wasmtime::Result<()> {
        if !self.acked {
            self.violation = Some(Fault::Unacknowledged);
            wasmtime::bail!("emit before ack-context");
        }
        if self.outbox.len() >= self.limits.emits_per_call {
            self.violation = Some(Fault::EmitBudget);
            wasmtime::bail!("more than {} emits in one call", self.limits.emits_per_call);
        }
        let len = match &frame {
            Frame::Text(text) => text.len(),
            Frame::Binary(bytes) => bytes.len(),
        };
        if len > self.limits.emit_bytes
            && let Some(seq) = self.event_seq
        {
            // An event's frame can outgrow the client limit through what the publisher put
            // in it (the API's size check is an estimate): the client gets a marker naming
            // the event instead, and the guest keeps its connection.
            self.metrics.event_frames_too_large.inc();
            let marker = format!(
                r#"{{"type":"gateway.event_too_large","seq":{seq},"bytes":{len},"limit":{}}}"#,
                self.limits.emit_bytes
            );
            self.outbox_bytes += marker.len();
            self.outbox.push(Frame::Text(marker));
            return Ok(());
        }
        if len > self.limits.emit_bytes {
            self.violation = Some(Fault::EmitTooLarge);
            wasmtime::bail!(
                "emitted frame of {len} bytes, limit {}",
                self.limits.emit_bytes
            );
        }
        if self.outbox_bytes + len > self.limits.emit_bytes_per_call {
            self.violation = Some(Fault::EmitBudget);
            wasmtime::bail!(
                "more than {} bytes emitted in one call",
                self.limits.emit_bytes_per_call
            );
        }
        self.outbox_bytes += len;
        self.outbox.push(frame);
        Ok(())
    }
}

/// The 0.1.0 world's import: the same two functions under the interface's old name, so that
/// guests built against it keep loading.
pub(super) fn add_0_1_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut connection = linker.instance(WORLD_0_1_IMPORT)?;
    connection.func_wrap(
        "ack-context",
        |mut cx: StoreContextMut<'_, HostState>, (connection_id, user_id): (String, String)| {
            cx.data_mut().ack_context(connection_id, user_id)
        },
    )?;
    connection.func_wrap(
        "emit",
        |mut cx: StoreContextMut<'_, HostState>, (frame,): (Frame,)| cx.data_mut().emit(frame),
    )?;
    Ok(())
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_bytes {
            self.memory_exceeded = true;
            self.memory_wanted = self.memory_wanted.max(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.limits.table_elements)
    }

    // A wit-bindgen component holds 3 core instances, 2 tables and 1 memory; other
    // toolchains need more (componentize-py: 38 core instances), so the counts are limits
    // an operator can raise, not the defaults of 10,000.
    fn instances(&self) -> usize {
        self.limits.instances
    }
    fn tables(&self) -> usize {
        self.limits.tables
    }
    fn memories(&self) -> usize {
        self.limits.memories
    }
}
