//! The wasmtime engine: how instances' memories are reserved, and the epoch ticker that
//! wakes CPU-deadline checks.

use std::time::Duration;

use wasmtime::Engine;

use crate::config::{Config, ReservationPolicy};

/// How often the epoch ticks; a guest call's CPU deadline is a whole number of ticks.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);

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

pub(super) fn engine_config(gateway: &Config, reservation: Reservation) -> wasmtime::Config {
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
pub(super) fn spawn_epoch_ticker(engine: &Engine) {
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
pub(super) fn ticks(d: Duration) -> u64 {
    (d.as_micros().div_ceil(EPOCH_TICK.as_micros().max(1)) as u64).max(1)
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
}
