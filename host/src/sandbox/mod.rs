//! The Wasm sandbox: one compiled guest for the process, one instance per connection.
//!
//! - [`Sandbox`] (here): the `Engine`, a `Linker` holding exactly the world's two imports,
//!   and the `InstancePre` built once at start-up; [`Sandbox::instantiate`] gives each
//!   connection its own [`Handler`], and [`Sandbox::trial`] proves at start-up (and in
//!   `gateway guest check`) that the guest can run under the configured limits.
//! - `engine`: memory reservations and the epoch ticker.
//! - `clock`: a guest call's CPU time.
//! - `host`: the imports (`ack-context`, `emit`) and the limiter, per instance.
//! - `wasm`: [`Handler`] for a Wasm instance: its own `Store`, so its own memory; dropping
//!   it drops every byte the handler kept.
//! - `native` (benchmark builds only): the reference handler linked natively.
//! - [`cache`]: compiled guests kept on disk (`guest_cache_dir`).
//! - [`shape`]: what a component asks of each instance (instances, memories, tables).

pub mod cache;
mod clock;
mod engine;
mod host;
#[cfg(feature = "native-handler")]
mod native;
pub mod shape;
mod wasm;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use crate::config::Config;
use crate::metrics::Metrics;
pub use engine::Reservation;
use host::HostState;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: trappable },
    });
}

/// The 0.1.0 world: the same interface under its old name, without `save` and `restore`.
/// It shares the current world's types (the component model checks records and variants by
/// shape, not by package), so a 0.1.0 guest costs no conversion.
mod bindings_0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "handler",
        with: { "gateway:handler/connection@0.1.0": super::bindings::gateway::handler::connection },
    });
}

pub use bindings::gateway::handler::connection::{CloseReason, Context, Event, Frame};
use bindings::{Handler as World, HandlerPre as WorldPre};

/// The world guests are built against.
pub const WORLD: &str = "gateway:handler@0.2.0";

/// The one interface a guest may import.
pub const WORLD_IMPORT: &str = "gateway:handler/connection@0.2.0";

/// The first world, still loaded: its guests run as before and never hibernate.
pub const WORLD_0_1: &str = "gateway:handler@0.1.0";
pub const WORLD_0_1_IMPORT: &str = "gateway:handler/connection@0.1.0";

/// A guest's exports, linked once per guest version: which world it was built against.
#[derive(Clone)]
enum Pre {
    Current(WorldPre<HostState>),
    V0_1(bindings_0_1::HandlerPre<HostState>),
}

/// One connection's handler: a Wasm instance, or (benchmark builds) the reference handler
/// linked natively. The session calls it and nothing else; a handler that faulted answers
/// every later call with its fault, never entering the guest again.
pub trait Handler: Send {
    /// Must acknowledge `ctx` (the Wasm instance checks that it called `ack-context`).
    fn init(&mut self, ctx: &Context) -> Result<Vec<Frame>, Fault>;
    fn on_client_message(&mut self, frame: &Frame) -> Result<Vec<Frame>, Fault>;
    fn on_event(&mut self, event: &Event) -> Result<Vec<Frame>, Fault>;
    fn on_close(&mut self, reason: CloseReason) -> Result<Vec<Frame>, Fault>;
    fn fault(&self) -> Option<Fault>;

    /// Whether the handler can be hibernated: saved to bytes and dropped while its
    /// connection is idle (a guest of the current world; 0.1.0 guests cannot).
    fn hibernates(&self) -> bool {
        false
    }

    /// The state to restore the handler from, or `None` when the guest declined.
    fn save(&mut self) -> Result<Option<Vec<u8>>, Fault> {
        Ok(None)
    }
}

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
         `{WORLD_IMPORT}` (see wit/world.wit), or `{WORLD_0_1_IMPORT}` if built against 0.1.0. Build it for wasm32-unknown-unknown (not \
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
    /// More emits, or more emitted bytes, in one call than the per-call budget.
    EmitBudget,
    /// One emitted frame larger than the maximum frame size.
    EmitTooLarge,
    /// `emit` before `ack-context`, or `init` returned without acknowledging.
    Unacknowledged,
    /// `ack-context` named another connection or user.
    AckMismatch,
    /// Waking a hibernated handler failed: `restore` returned an error, or a fresh instance
    /// could not be created.
    Restore,
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
            Fault::Restore => "restore",
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
    instances: usize,
    tables: usize,
    memories: usize,
    emits_per_call: usize,
    emit_bytes: usize,
    /// Bytes one call may emit in all: what one connection may have queued.
    emit_bytes_per_call: usize,
    /// CPU time one call may use.
    cpu: Duration,
    /// Wall time one call may take, however little CPU it got.
    wall: Duration,
}

/// Why an instance could not be created, with what the limiter saw.
#[derive(Debug, thiserror::Error)]
#[error("{reason:#}")]
pub struct InstantiateError {
    reason: wasmtime::Error,
    /// The linear memory the guest asked for past `guest_memory_bytes`, if it did.
    memory_wanted: Option<usize>,
}

impl InstantiateError {
    /// Which configured limit stopped the instance, and to what to raise it, when that can
    /// be told.
    pub fn advice(&self, config: &Config) -> String {
        let text = format!("{:#}", self.reason);
        let raise = |key: &str, now: usize| format!("{text}: raise limits.{key} (now {now})");
        let l = &config.limits;
        if let Some(wanted) = self.memory_wanted {
            return format!(
                "the guest needs {wanted} bytes of linear memory at start; raise \
                 limits.guest_memory_bytes (now {}) to at least {wanted}",
                l.guest_memory_bytes
            );
        }
        if text.contains("instance count too high") {
            raise("guest_max_instances", l.guest_max_instances)
        } else if text.contains("table count too high") {
            raise("guest_max_tables", l.guest_max_tables)
        } else if text.contains("memory count too high") {
            raise("guest_max_memories", l.guest_max_memories)
        } else if text.contains("table") {
            raise("guest_table_elements", l.guest_table_elements)
        } else {
            text
        }
    }
}

/// What a trial instantiation found: the guest runs under these limits, at this cost.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    /// Resident memory one live instance adds, measured over several (bytes).
    pub resident_bytes_per_instance: u64,
    /// Instantiation plus `init`, median.
    pub instantiate: Duration,
}

/// Why the trial failed: the advice names the limit to raise.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("guest {path} cannot be instantiated under the configured limits: {advice}")]
    Instantiate { path: String, advice: String },
    #[error(
        "guest {path} faulted in init during the trial instantiation ({}); every connection \
         would be closed",
        fault.as_str()
    )]
    Init { path: String, fault: Fault },
}

/// Instances the trial keeps alive at once to measure what one costs.
const TRIAL_INSTANCES: usize = 16;
/// Wall-clock bound on a trial call (see `Sandbox::trial`).
const TRIAL_WALL: Duration = Duration::from_secs(30);

/// The compiled guest, shared by every connection.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    component: Component,
    pre: Pre,
    limits: InstanceLimits,
    name: String,
    /// Which guest this is; its instances are counted under [`GuestVersion::label`].
    pub version: GuestVersion,
    /// Whether the compiled code came from `guest_cache_dir`, and how long getting it took.
    pub compiled: cache::Compiled,
    pub compile_time: Duration,
    version_instances: prometheus_client::metrics::gauge::Gauge,
    version_hibernated: prometheus_client::metrics::gauge::Gauge,
    pub reservation: Reservation,
    metrics: Arc<Metrics>,
    /// Benchmark builds only: run the reference handler natively instead.
    #[cfg(feature = "native-handler")]
    native: bool,
}

/// Compiles the component, through the compile cache when `guest_cache_dir` is set (a cache
/// that cannot be used is logged and skipped: it only saves time).
fn compile(
    engine: &Engine,
    bytes: &[u8],
    sha256: &str,
    config: &Config,
) -> wasmtime::Result<(Component, cache::Compiled, Duration)> {
    if let Some(dir) = &config.guest_cache_dir {
        match cache::CompileCache::open(dir) {
            Ok(cache) => return cache.component(engine, bytes, sha256),
            Err(err) => tracing::error!(error = %err, "compiling without the cache"),
        }
    }
    let started = Instant::now();
    let component = Component::new(engine, bytes)?;
    Ok((component, cache::Compiled::NotStored, started.elapsed()))
}

/// A guest component's identity: what an operator sees in metrics and `/v1/stats` to tell
/// which connections run which guest after a reload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuestVersion {
    /// The component file's name without its extension.
    pub name: String,
    /// SHA-256 of the component, hex.
    pub sha256: String,
    /// When it was loaded (Unix seconds).
    pub loaded_at: u64,
}

impl GuestVersion {
    fn of(path: &str, bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        let name = Path::new(path)
            .file_stem()
            .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned());
        let sha256 = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        GuestVersion {
            name,
            sha256,
            loaded_at: crate::auth::now_secs(),
        }
    }

    /// `name@` and the first 12 hex digits of the hash: short, and unique in practice.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, &self.sha256[..12])
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("guest", &self.name)
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
        let engine =
            Engine::new(&engine::engine_config(config, reservation)).map_err(LoadError::Engine)?;
        let version = GuestVersion::of(name, bytes);
        let (component, compiled, compile_time) = compile(&engine, bytes, &version.sha256, config)
            .map_err(|reason| LoadError::Compile {
                path: name.to_owned(),
                reason,
            })?;
        metrics.guest_compile(compiled.as_str());
        tracing::info!(
            guest = name,
            ms = compile_time.as_millis() as u64,
            cache = compiled.as_str(),
            "guest compiled"
        );

        let imports: Vec<String> = component
            .component_type()
            .imports(&engine)
            .map(|(import, _)| import.to_owned())
            .collect();
        let foreign: Vec<String> = imports
            .iter()
            .filter(|import| *import != WORLD_IMPORT && *import != WORLD_0_1_IMPORT)
            .cloned()
            .collect();
        if !foreign.is_empty() {
            return Err(LoadError::ForeignImports {
                path: name.to_owned(),
                imports: foreign,
            });
        }

        let world_error = |reason| LoadError::World {
            path: name.to_owned(),
            reason,
        };
        let mut linker = Linker::<HostState>::new(&engine);
        World::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(world_error)?;
        host::add_0_1_to_linker(&mut linker).map_err(world_error)?;
        let linked = linker.instantiate_pre(&component).map_err(world_error)?;
        // The import names the world: a guest built against 0.1.0 imports its interface.
        let pre = if imports.iter().any(|i| i == WORLD_0_1_IMPORT) {
            Pre::V0_1(bindings_0_1::HandlerPre::new(linked).map_err(world_error)?)
        } else {
            Pre::Current(WorldPre::new(linked).map_err(world_error)?)
        };

        engine::spawn_epoch_ticker(&engine);
        let version_instances = metrics
            .guest_instances
            .get_or_create(&vec![("guest", version.label())])
            .clone();
        let version_hibernated = metrics
            .guest_hibernated
            .get_or_create(&vec![("guest", version.label())])
            .clone();
        Ok(Sandbox {
            version,
            version_instances,
            version_hibernated,
            compiled,
            compile_time,
            engine,
            component,
            pre,
            reservation,
            name: name.to_owned(),
            limits: InstanceLimits {
                memory_bytes: limits.guest_memory_bytes,
                table_elements: limits.guest_table_elements,
                instances: limits.guest_max_instances,
                tables: limits.guest_max_tables,
                memories: limits.guest_max_memories,
                emits_per_call: limits.max_emits_per_call,
                emit_bytes: limits.max_message_bytes,
                emit_bytes_per_call: limits.outbound_queue_bytes,
                cpu: Duration::from_millis(limits.guest_call_ms.max(1)),
                wall: Duration::from_millis(limits.guest_call_wall_ms.max(limits.guest_call_ms)),
            },
            metrics,
            #[cfg(feature = "native-handler")]
            native: false,
        })
    }

    /// This guest's live instances, shared with every instance it made.
    pub fn instances_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.version_instances.clone()
    }

    /// Connections hibernated by this guest, which it will restore.
    pub fn hibernated_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.version_hibernated.clone()
    }

    /// Benchmark builds only: every connection gets the reference handler as native code,
    /// with no sandbox, so the cost of the sandbox can be measured against it.
    #[cfg(feature = "native-handler")]
    pub fn use_native_handler_for_benchmark(&mut self) {
        self.native = true;
    }

    /// The component's imports and exports, by name.
    pub fn interface(&self) -> (Vec<String>, Vec<String>) {
        let ty = self.component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        (imports, exports)
    }

    /// The world this guest was built against.
    pub fn world(&self) -> &'static str {
        match self.pre {
            Pre::Current(_) => WORLD,
            Pre::V0_1(_) => WORLD_0_1,
        }
    }

    /// Creates this connection's own handler. Its memory is its own until it is dropped.
    pub fn instantiate(&self, ctx: &Context) -> Result<Box<dyn Handler>, InstantiateError> {
        #[cfg(feature = "native-handler")]
        if self.native {
            self.metrics.instantiations.inc();
            return Ok(Box::new(native::NativeHandler::default()));
        }
        Ok(Box::new(self.instance(ctx)?))
    }

    /// A hibernated connection's handler, woken: a fresh instance given the bytes `save`
    /// returned (and no `init`). Any failure is the guest's, for this connection only.
    pub fn restore(&self, ctx: &Context, state: &[u8]) -> Result<Box<dyn Handler>, Fault> {
        let started = Instant::now();
        let mut handler = self.instance(ctx).map_err(|err| {
            tracing::warn!(error = %err, "cannot re-create a hibernated handler");
            Fault::Restore
        })?;
        handler.restore(ctx, state)?;
        self.metrics
            .wake_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(Box::new(handler))
    }

    fn instance(&self, ctx: &Context) -> Result<wasm::WasmHandler, InstantiateError> {
        let started = Instant::now();
        let state = HostState {
            connection_id: ctx.connection_id.clone(),
            user_id: ctx.user_id.clone(),
            acked: false,
            outbox: Vec::new(),
            outbox_bytes: 0,
            violation: None,
            memory_exceeded: false,
            memory_wanted: 0,
            cpu_exceeded: false,
            event_seq: None,
            clock: clock::CallClock::start(),
            limits: self.limits,
            metrics: self.metrics.clone(),
            version_instances: self.version_instances.clone(),
        };
        self.metrics.instances_live.inc();
        self.version_instances.inc();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|mut store| store.data_mut().check_deadline());
        store.set_epoch_deadline(engine::ticks(self.limits.cpu));
        let exports = match &self.pre {
            Pre::Current(pre) => pre.instantiate(&mut store).map(wasm::Exports::Current),
            Pre::V0_1(pre) => pre.instantiate(&mut store).map(wasm::Exports::V0_1),
        };
        let exports = match exports {
            Ok(exports) => exports,
            Err(reason) => {
                let wanted = store.data().memory_wanted;
                return Err(InstantiateError {
                    reason,
                    memory_wanted: (wanted > 0).then_some(wanted),
                });
            }
        };
        self.metrics.instantiations.inc();
        self.metrics
            .instantiate_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(wasm::WasmHandler {
            store,
            exports,
            faulted: None,
        })
    }

    /// Instantiates the guest a few times under the configured limits, as connections would,
    /// and calls `init`: a guest that cannot run is refused at start-up (and by `guest
    /// check`) with the limit to raise, instead of failing every connection with 503.
    /// Measures what a live instance costs in resident memory.
    pub fn trial(&self, config: &Config) -> Result<Trial, TrialError> {
        // Counted apart: the trial's instances are not connections.
        let mut sandbox = self.clone();
        sandbox.metrics = Arc::new(Metrics::new());
        // The CPU budget holds as for any call; the wall-clock bound, which protects the
        // workers of a running node, does not: at start-up the machine may be busy with
        // anything (other processes compiling guests), and a trial preempted for a second
        // says nothing about the guest.
        sandbox.limits.wall = sandbox.limits.wall.max(TRIAL_WALL);
        let resident_before = resident_bytes();
        let mut live = Vec::with_capacity(TRIAL_INSTANCES);
        let mut times = Vec::with_capacity(TRIAL_INSTANCES);
        for i in 0..TRIAL_INSTANCES {
            let ctx = Context {
                connection_id: format!("trial-{i}"),
                user_id: "trial".into(),
                tenant_id: None,
                session_id: None,
                scopes: Vec::new(),
                expires_at: 0,
            };
            let started = Instant::now();
            let mut handler = sandbox
                .instantiate(&ctx)
                .map_err(|err| TrialError::Instantiate {
                    path: self.name.clone(),
                    advice: err.advice(config),
                })?;
            handler.init(&ctx).map_err(|fault| TrialError::Init {
                path: self.name.clone(),
                fault,
            })?;
            times.push(started.elapsed());
            live.push(handler);
        }
        let resident_after = resident_bytes();
        drop(live);
        times.sort();
        Ok(Trial {
            resident_bytes_per_instance: resident_after.saturating_sub(resident_before)
                / TRIAL_INSTANCES as u64,
            instantiate: times[times.len() / 2],
        })
    }
}

/// What `gateway guest check` measures by driving one instance with synthetic events.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    /// `on-event`, median.
    pub per_event: Duration,
    /// For a guest that hibernates: bytes `save` returned after the events, and the time
    /// to wake it (a fresh instance and `restore`), which then handled one more event.
    pub hibernation: Option<(usize, Duration)>,
}

impl Sandbox {
    /// Times `on-event` over `count` synthetic agent events in one instance (for `gateway
    /// guest check`), then hibernates and wakes it once; a fault is reported as such.
    pub fn synthetic_events(&self, count: usize) -> Result<Synthetic, SyntheticFault> {
        let mut sandbox = self.clone();
        sandbox.metrics = Arc::new(Metrics::new());
        let ctx = Context {
            connection_id: "check".into(),
            user_id: "check".into(),
            tenant_id: None,
            session_id: None,
            scopes: Vec::new(),
            expires_at: 0,
        };
        let mut handler = sandbox
            .instantiate(&ctx)
            .map_err(|e| SyntheticFault(format!("instantiate: {e}")))?;
        let fault = |f: Fault| SyntheticFault(f.as_str().to_owned());
        handler.init(&ctx).map_err(fault)?;
        let event = |seq| Event {
            seq,
            kind: "tool_executing".into(),
            payload: r#"{"tool":"search","args":{"q":"weather"},"api_key":"sk-1","step":3}"#.into(),
            run_id: Some("run-1".into()),
            thread_id: Some("thread-1".into()),
        };
        let mut times = Vec::with_capacity(count);
        for seq in 1..=count as u64 {
            let event = event(seq);
            let started = Instant::now();
            handler.on_event(&event).map_err(fault)?;
            times.push(started.elapsed());
        }
        times.sort();
        let per_event = times.get(times.len() / 2).copied().unwrap_or_default();
        if !handler.hibernates() {
            return Ok(Synthetic {
                per_event,
                hibernation: None,
            });
        }
        let saved = handler
            .save()
            .map_err(|f| SyntheticFault(format!("save: {}", f.as_str())))?
            .ok_or_else(|| SyntheticFault("save declined (returned none)".into()))?;
        drop(handler);
        let started = Instant::now();
        let mut woken = sandbox
            .restore(&ctx, &saved)
            .map_err(|f| SyntheticFault(format!("restore: {}", f.as_str())))?;
        let wake = started.elapsed();
        woken.on_event(&event(count as u64 + 1)).map_err(fault)?;
        Ok(Synthetic {
            per_event,
            hibernation: Some((saved.len(), wake)),
        })
    }
}

/// The guest faulted on a synthetic event.
#[derive(Debug, thiserror::Error)]
#[error("the guest faulted on a synthetic event: {0}")]
pub struct SyntheticFault(String);

/// This process's resident memory, from `/proc/self/statm` (0 where there is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
