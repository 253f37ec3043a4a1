//! The Wasm sandbox: one compiled guest for the process, one instance per connection.
//!
//! [`Sandbox`] owns the wasmtime `Engine`, a `Linker` that holds exactly the world's two
//! imports, and the `InstancePre` built once at start-up. [`Instance`] is one connection's
//! handler: its own `Store`, so its own linear memory, CPU deadline and limits. Dropping an
//! `Instance` drops the store and every byte the handler kept.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};

use crate::config::{Config, ReservationPolicy};
use crate::metrics::Metrics;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: trappable },
    });
}

pub use bindings::gateway::handler::connection::{CloseReason, Context, Event, Frame};
use bindings::{Handler, HandlerPre};

/// The one interface a guest may import.
pub const WORLD_IMPORT: &str = "gateway:handler/connection@0.1.0";

/// How often the epoch ticks; a guest call's CPU deadline is a whole number of ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read guest component {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid WebAssembly component: {reason:#}")]
    Compile {
        path: String,
        reason: wasmtime::Error,
    },
    #[error(
        "guest {path} imports what this gateway does not provide: {}. A handler may import only \
         `{WORLD_IMPORT}` (see wit/world.wit). Build it for wasm32-unknown-unknown (not \
         wasm32-wasip1/wasip2, whose std imports WASI) and wrap the core module with \
         `gateway guest wrap`, or wasm-tools component new without a WASI adapter.",
        imports.join(", ")
    )]
    ForeignImports { path: String, imports: Vec<String> },
    #[error("guest {path} does not match the gateway:handler world: {reason:#}")]
    World {
        path: String,
        reason: wasmtime::Error,
    },
    #[error("cannot configure the Wasm engine: {0:#}")]
    Engine(wasmtime::Error),
}

/// Why a guest lost its connection. Each maps to a close code and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The guest trapped: a panic, `unreachable`, an out-of-bounds access.
    Trap,
    /// A call ran past its CPU deadline.
    Cpu,
    /// The guest asked for more linear memory than its cap and then failed.
    Memory,
    /// More emits in one call than the per-call budget.
    EmitBudget,
    /// One emitted frame larger than the maximum frame size.
    EmitTooLarge,
    /// `emit` before `ack-context`, or `init` returned without acknowledging.
    Unacknowledged,
    /// `ack-context` named another connection or user.
    AckMismatch,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Trap => "trap",
            Fault::Cpu => "cpu",
            Fault::Memory => "memory",
            Fault::EmitBudget => "emit_budget",
            Fault::EmitTooLarge => "emit_too_large",
            Fault::Unacknowledged => "unacknowledged",
            Fault::AckMismatch => "ack_mismatch",
        }
    }

    /// Identity faults are policy violations; the rest are the guest breaking.
    pub fn is_policy(self) -> bool {
        matches!(self, Fault::Unacknowledged | Fault::AckMismatch)
    }
}

/// Per-instance limits, copied into each store.
#[derive(Debug, Clone, Copy)]
struct InstanceLimits {
    memory_bytes: usize,
    table_elements: usize,
    emits_per_call: usize,
    emit_bytes: usize,
    /// CPU time one call may use.
    cpu: Duration,
    /// Wall time one call may take, however little CPU it got.
    wall: Duration,
}

/// The compiled guest, shared by every connection.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    pre: HandlerPre<HostState>,
    limits: InstanceLimits,
    pub reservation: Reservation,
    metrics: Arc<Metrics>,
    /// Benchmark builds only: run the reference handler natively instead.
    #[cfg(feature = "native-handler")]
    native: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Sandbox {
    /// Compiles and links the guest at `path`, refusing it if it imports anything but the
    /// world, for up to `instances` instances at once (which picks the [`Reservation`]).
    /// Starts the epoch ticker that enforces CPU deadlines.
    pub fn load(
        path: &Path,
        config: &Config,
        instances: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(
            &bytes,
            &path.display().to_string(),
            config,
            Reservation::choose(config.limits.guest_memory_reservation, instances),
            metrics,
        )
    }

    pub fn from_bytes(
        bytes: &[u8],
        name: &str,
        config: &Config,
        reservation: Reservation,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LoadError> {
        let limits = &config.limits;
        let engine = Engine::new(&engine_config(config, reservation)).map_err(LoadError::Engine)?;
        let component = Component::new(&engine, bytes).map_err(|reason| LoadError::Compile {
            path: name.to_owned(),
            reason,
        })?;

        let foreign: Vec<String> = component
            .component_type()
            .imports(&engine)
            .map(|(import, _)| import.to_owned())
            .filter(|import| import != WORLD_IMPORT)
            .collect();
        if !foreign.is_empty() {
            return Err(LoadError::ForeignImports {
                path: name.to_owned(),
                imports: foreign,
            });
        }

        let mut linker = Linker::<HostState>::new(&engine);
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(|reason| {
            LoadError::World {
                path: name.to_owned(),
                reason,
            }
        })?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(HandlerPre::new)
            .map_err(|reason| LoadError::World {
                path: name.to_owned(),
                reason,
            })?;

        spawn_epoch_ticker(&engine);
        Ok(Sandbox {
            engine,
            pre,
            reservation,
            limits: InstanceLimits {
                memory_bytes: limits.guest_memory_bytes,
                table_elements: 10_000,
                emits_per_call: limits.max_emits_per_call,
                emit_bytes: limits.max_message_bytes,
                cpu: Duration::from_millis(limits.guest_call_ms.max(1)),
                wall: Duration::from_millis(limits.guest_call_wall_ms.max(limits.guest_call_ms)),
            },
            metrics,
            #[cfg(feature = "native-handler")]
            native: false,
        })
    }

    /// Benchmark builds only: every connection gets the reference handler as native code,
    /// with no sandbox, so the cost of the sandbox can be measured against it.
    #[cfg(feature = "native-handler")]
    pub fn use_native_handler_for_benchmark(&mut self) {
        self.native = true;
    }

    /// Creates this connection's own instance. Its memory is its own until it is dropped.
    pub fn instantiate(&self, ctx: &Context) -> wasmtime::Result<Instance> {
        #[cfg(feature = "native-handler")]
        if self.native {
            self.metrics.instantiations.inc();
            return Ok(Instance::Native(native::Handler::default()));
        }
        let started = std::time::Instant::now();
        let state = HostState {
            connection_id: ctx.connection_id.clone(),
            user_id: ctx.user_id.clone(),
            acked: false,
            outbox: Vec::new(),
            violation: None,
            memory_exceeded: false,
            cpu_exceeded: false,
            clock: CallClock::start(),
            limits: self.limits,
            metrics: self.metrics.clone(),
        };
        self.metrics.instances_live.inc();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|mut store| store.data_mut().check_deadline());
        store.set_epoch_deadline(ticks(self.limits.cpu));
        let handler = self.pre.instantiate(&mut store)?;
        self.metrics.instantiations.inc();
        self.metrics
            .instantiate_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(Instance::Wasm(WasmInstance {
            store,
            handler,
            faulted: None,
        }))
    }
}

/// How each instance's linear memory is laid out in the address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// 4 GiB per instance: every 32-bit address falls in the reservation or its guard, so the
    /// compiled guest needs no bounds check on its memory accesses (a guest call is about a
    /// third faster: `sandbox_calls`, README "Performance").
    Full,
    /// The memory cap (at least 16 MiB) per instance: many more instances fit in the address
    /// space, and every memory access carries an explicit bounds check.
    Compact,
}

/// Full reservations take the whole 4 GiB of 32-bit addresses plus a guard for offsets.
const FULL_RESERVATION: u64 = 4 << 30;
const GUARD: u64 = 64 << 10;

impl Reservation {
    /// `Full` when `instances` full reservations fit in three quarters of the user address
    /// space (128 TiB on x86-64 Linux: about 24,000 instances) and no address-space limit
    /// (`ulimit -v`) is set, `Compact` otherwise.
    pub fn for_instances(instances: usize) -> Self {
        let unlimited = rlimit::Resource::AS
            .get()
            .is_ok_and(|(soft, _)| soft == rlimit::INFINITY);
        let usable: u64 = if cfg!(all(target_arch = "x86_64", target_os = "linux")) && unlimited {
            (128u64 << 40) / 4 * 3
        } else {
            0 // unknown or limited address space: stay compact
        };
        if (instances as u64).saturating_mul(FULL_RESERVATION + GUARD) <= usable {
            Reservation::Full
        } else {
            Reservation::Compact
        }
    }

    /// What the operator asked for; `auto` decides by [`Reservation::for_instances`].
    pub fn choose(policy: ReservationPolicy, instances: usize) -> Self {
        match policy {
            ReservationPolicy::Auto => Self::for_instances(instances),
            ReservationPolicy::Full => Reservation::Full,
            ReservationPolicy::Compact => Reservation::Compact,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reservation::Full => "full",
            Reservation::Compact => "compact",
        }
    }
}

fn engine_config(gateway: &Config, reservation: Reservation) -> wasmtime::Config {
    let limits = &gateway.limits;
    let mut config = wasmtime::Config::new();
    if gateway.guest_perf_map {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    // Wasmtime's default (4 GiB plus a 2 GiB guard per memory) runs out of address space at
    // ~20k instances. A full reservation with a small guard still elides bounds checks; a
    // compact one lets memories grow (by copying) up to the cap enforced in `memory_growing`.
    config.memory_reservation(match reservation {
        Reservation::Full => FULL_RESERVATION,
        Reservation::Compact => limits.guest_memory_bytes.max(16 << 20) as u64,
    });
    config.memory_guard_size(GUARD);
    config.memory_reservation_for_growth(0);
    config.memory_init_cow(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(512 << 10);
    config
}

/// Ticks the engine's epoch so that a guest stuck in a loop hits its deadline. A plain OS
/// thread, not a tokio task: when guests occupy every runtime worker, this must still tick.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine); // hold no strong reference while asleep, so the engine can go
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(err) = spawned {
        tracing::error!(%err, "cannot start the epoch ticker; guest CPU deadlines will not fire");
    }
}

/// Epoch ticks covering `d` (at least one).
fn ticks(d: Duration) -> u64 {
    (d.as_micros().div_ceil(EPOCH_TICK.as_micros().max(1)) as u64).max(1)
}

/// The clock of the current guest call. Reading a thread's CPU time is a system call, too
/// dear for every call (most take microseconds), so it is read only from the first epoch
/// check on, which comes one tick after the call starts. What the call used before that
/// check is taken as its wall time, capped at two ticks: the tick itself, and the short run
/// to the guest's next epoch check. The cap matters on a busy machine, where the thread can
/// be preempted between the tick and that check; the preemption must not count.
#[derive(Clone, Copy)]
struct CallClock {
    wall: Instant,
    /// From the first check on: what the call used before it, and the thread's CPU time then.
    mark: Option<(Duration, Duration)>,
}

impl CallClock {
    fn start() -> Self {
        CallClock {
            wall: Instant::now(),
            mark: None,
        }
    }

    /// CPU time the call has used so far, and wall time.
    fn used(&mut self) -> (Duration, Duration) {
        let wall = self.wall.elapsed();
        let cpu = match self.mark {
            None => {
                let before = wall.min(2 * EPOCH_TICK);
                self.mark = Some((before, thread_cpu_time()));
                before
            }
            Some((before, cpu_at_mark)) => before + thread_cpu_time().saturating_sub(cpu_at_mark),
        };
        (cpu, wall)
    }
}

/// CPU time of the calling thread. A guest call runs synchronously on one thread, so the
/// difference across the call is what the guest used; time the thread was preempted (by
/// other guests, or by anything else on a busy machine) does not count against it.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// The host side of one instance: what `emit` and `ack-context` act on.
pub struct HostState {
    connection_id: String,
    user_id: String,
    acked: bool,
    /// Frames emitted during the current call, sent once the call returns.
    outbox: Vec<Frame>,
    /// Set when a host function refuses the guest; the call then traps and this says why.
    violation: Option<Fault>,
    /// Set when the guest asked for memory past its cap, to tell a memory fault from a trap.
    memory_exceeded: bool,
    /// Set when a call ran out of CPU time (or wall time).
    cpu_exceeded: bool,
    clock: CallClock,
    limits: InstanceLimits,
    metrics: Arc<Metrics>,
}

impl Drop for HostState {
    fn drop(&mut self) {
        // The store owns this state, so this runs exactly when the instance's memory is freed.
        self.metrics.instances_live.dec();
    }
}

impl HostState {
    /// Runs when the epoch deadline passes during a call: the deadline is only a wake-up.
    /// The call goes on while it has used less CPU than its budget and less wall time than
    /// its bound.
    fn check_deadline(&mut self) -> wasmtime::Result<UpdateDeadline> {
        let (cpu, wall) = self.clock.used();
        if cpu >= self.limits.cpu || wall >= self.limits.wall {
            self.cpu_exceeded = true;
            return Ok(UpdateDeadline::Interrupt);
        }
        let left = (self.limits.cpu - cpu).min(self.limits.wall - wall);
        Ok(UpdateDeadline::Continue(ticks(left)))
    }
}

impl bindings::gateway::handler::connection::Host for HostState {
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
        if len > self.limits.emit_bytes {
            self.violation = Some(Fault::EmitTooLarge);
            wasmtime::bail!(
                "emitted frame of {len} bytes, limit {}",
                self.limits.emit_bytes
            );
        }
        self.outbox.push(frame);
        Ok(())
    }
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

    // A wit-bindgen component holds 3 core instances, 2 tables and 1 memory; leave headroom
    // for other toolchains but nothing like the defaults (10,000).
    fn instances(&self) -> usize {
        16
    }
    fn tables(&self) -> usize {
        16
    }
    fn memories(&self) -> usize {
        4
    }
}

/// One connection's handler.
pub enum Instance {
    Wasm(WasmInstance),
    #[cfg(feature = "native-handler")]
    Native(native::Handler),
}

impl Instance {
    pub fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault> {
        match self {
            Instance::Wasm(i) => i.init(ctx),
            #[cfg(feature = "native-handler")]
            Instance::Native(h) => Ok(h.init(ctx)),
        }
    }

    pub fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault> {
        match self {
            Instance::Wasm(i) => i.on_client_message(frame),
            #[cfg(feature = "native-handler")]
            Instance::Native(h) => Ok(h.on_client_message(frame)),
        }
    }

    pub fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault> {
        match self {
            Instance::Wasm(i) => i.on_event(event),
            #[cfg(feature = "native-handler")]
            Instance::Native(h) => Ok(h.on_event(event)),
        }
    }

    pub fn on_close(&mut self, reason: CloseReason) -> Result<Vec<Frame>, Fault> {
        match self {
            Instance::Wasm(i) => i.on_close(reason),
            #[cfg(feature = "native-handler")]
            Instance::Native(_) => Ok(Vec::new()),
        }
    }

    pub fn fault(&self) -> Option<Fault> {
        match self {
            Instance::Wasm(i) => i.faulted,
            #[cfg(feature = "native-handler")]
            Instance::Native(_) => None,
        }
    }
}

/// One connection's Wasm instance: its own store, so its own memory.
pub struct WasmInstance {
    store: Store<HostState>,
    handler: Handler,
    /// Once set, the instance is never entered again: after a trap its state is undefined.
    faulted: Option<Fault>,
}

impl WasmInstance {
    fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault> {
        let frames = self.call(|h, s| h.call_init(s, ctx))?;
        if !self.store.data().acked {
            return Err(self.fail(Fault::Unacknowledged));
        }
        Ok(frames)
    }

    fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault> {
        self.call(|h, s| h.call_on_client_message(s, frame))
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault> {
        self.call(|h, s| h.call_on_event(s, event))
    }

    fn on_close(&mut self, reason: CloseReason) -> Result<Vec<Frame>, Fault> {
        self.call(|h, s| h.call_on_close(s, reason))
    }

    fn call(
        &mut self,
        f: impl FnOnce(&Handler, &mut Store<HostState>) -> wasmtime::Result<()>,
    ) -> Result<Vec<Frame>, Fault> {
        if let Some(fault) = self.faulted {
            return Err(fault);
        }
        let state = self.store.data_mut();
        state.clock = CallClock::start();
        // What a call learns about why it failed belongs to that call only: a memory
        // request refused (and survived) earlier must not name a later fault.
        state.memory_exceeded = false;
        state.cpu_exceeded = false;
        state.violation = None;
        // The first check comes after one tick; `check_deadline` sets the ones after it.
        self.store.set_epoch_deadline(1);
        let result = f(&self.handler, &mut self.store);
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

/// Benchmark builds only: the reference handler's logic linked natively, given the same
/// inputs the Wasm instance gets (owned copies, as lowering into linear memory makes).
#[cfg(feature = "native-handler")]
mod native {
    use super::{Context, Event, Frame};
    use gateway_guest::handler::{EventIn, State};

    #[derive(Default)]
    pub struct Handler(State);

    impl Handler {
        pub fn init(&mut self, ctx: &Context) -> Vec<Frame> {
            let welcome = self.0.init(
                ctx.connection_id.clone(),
                ctx.user_id.clone(),
                ctx.expires_at,
            );
            vec![Frame::Text(welcome)]
        }

        pub fn on_client_message(&mut self, frame: &Frame) -> Vec<Frame> {
            let reply = match frame {
                Frame::Text(text) => self.0.text_message(text),
                Frame::Binary(_) => self.0.binary_message(),
            };
            vec![Frame::Text(reply)]
        }

        pub fn on_event(&mut self, event: &Event) -> Vec<Frame> {
            let event = EventIn {
                seq: event.seq,
                kind: event.kind.clone(),
                payload: event.payload.clone(),
                run_id: event.run_id.clone(),
                thread_id: event.thread_id.clone(),
            };
            let mut out = String::new();
            if self.0.event(event, &mut out) {
                vec![Frame::Text(out)]
            } else {
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_full_only_while_they_fit_the_address_space() {
        if cfg!(all(target_arch = "x86_64", target_os = "linux"))
            && rlimit::Resource::AS
                .get()
                .is_ok_and(|(soft, _)| soft == rlimit::INFINITY)
        {
            assert_eq!(Reservation::for_instances(1), Reservation::Full);
            assert_eq!(Reservation::for_instances(20_000), Reservation::Full);
        }
        // 48 TiB of 4 GiB reservations is more than 3/4 of any 47-bit address space.
        assert_eq!(Reservation::for_instances(100_000), Reservation::Compact);
        // An operator's choice stands, whatever the capacity.
        assert_eq!(
            Reservation::choose(ReservationPolicy::Compact, 1),
            Reservation::Compact
        );
        assert_eq!(
            Reservation::choose(ReservationPolicy::Full, 100_000),
            Reservation::Full
        );
        assert_eq!(
            Reservation::choose(ReservationPolicy::Auto, 100_000),
            Reservation::Compact
        );
    }

    #[test]
    fn a_call_clock_counts_at_most_two_ticks_before_its_first_check() {
        let mut clock = CallClock {
            wall: Instant::now() - Duration::from_millis(50),
            mark: None,
        };
        // Preempted for 50 ms before the first check: not counted as CPU.
        let (cpu, wall) = clock.used();
        assert_eq!(cpu, 2 * EPOCH_TICK);
        assert!(wall >= Duration::from_millis(50));
        // From then on, the thread's own CPU time is added (spin until it has used 5 ms,
        // however long that takes on a busy machine).
        let start = thread_cpu_time();
        while thread_cpu_time() - start < Duration::from_millis(5) {}
        let (cpu, _) = clock.used();
        assert!(cpu >= 2 * EPOCH_TICK + Duration::from_millis(5), "{cpu:?}");
    }
}
