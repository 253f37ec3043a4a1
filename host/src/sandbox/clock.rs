//! The clock of a guest call: the thread's CPU time, read only once a call is long enough
//! to matter.

use std::time::{Duration, Instant};

use super::engine::EPOCH_TICK;

/// The clock of the current guest call. Reading a thread's CPU time is a system call, too
/// dear for every call (most take microseconds), so it is read only from the first epoch
/// check on, which comes one tick after the call starts. What the call used before that
/// check is taken as its wall time, capped at two ticks: the tick itself, and the short run
/// to the guest's next epoch check. The cap matters on a busy machine, where the thread can
/// be preempted between the tick and that check; the preemption must not count.
#[derive(Clone, Copy)]
pub(super) struct CallClock {
    wall: Instant,
    /// From the first check on: what the call used before it, and the thread's CPU time then.
    mark: Option<(Duration, Duration)>,
}

impl CallClock {
    pub(super) fn start() -> Self {
        CallClock {
            wall: Instant::now(),
            mark: None,
        }
    }

    /// CPU time the call has used so far, and wall time.
    pub(super) fn used(&mut self) -> (Duration, Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
