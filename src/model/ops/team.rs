//! A team of spinning threads for the decode kernels' parallel loops.
//!
//! A decode step runs a few hundred parallel loops of tens of microseconds each. rayon parks
//! an idle worker within microseconds, and waking it (a futex, an inter-processor interrupt on
//! a VM) takes about as long as the loop itself, so the second core mostly sat idle. The team's
//! helpers instead spin for [`SPIN`] after their last loop before they park, the way ggml's
//! threadpool polls. Which thread runs a task never changes what the task computes.
//!
//! One loop runs on the team at a time; a loop started while it is busy (another thread, or a
//! task that itself loops) runs on rayon instead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins for the next loop before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// How long a helper spins before it starts yielding its core between checks.
const YIELD_AFTER: Duration = Duration::from_micros(200);

struct Team {
    helpers: usize,
    /// Held by the thread whose loop the team runs.
    busy: Mutex<()>,
    /// Bumped to publish a loop; helpers wait for it to change.
    epoch: AtomicUsize,
    /// The published loop's epoch while helpers may join it, 0 once closed.
    open: AtomicUsize,
    /// The loop: the address of a `&(dyn Fn(usize) + Sync)` on the caller's stack, and its size.
    job: AtomicUsize,
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Helpers inside the open loop; the caller returns only once none is.
    inside: AtomicUsize,
    panicked: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: rayon::current_num_threads().saturating_sub(1),
            busy: Mutex::new(()),
            epoch: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            job: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        }));
        for i in 0..team.helpers {
            let spawned = std::thread::Builder::new().name(format!("kdllm-team-{i}")).spawn(move || team.help());
            if spawned.is_err() {
                // Without its helpers the team's loops run on the calling thread alone.
                break;
            }
        }
        team
    })
}

impl Team {
    fn help(&self) {
        let mut seen = 0;
        loop {
            let epoch = self.wait_past(seen);
            seen = epoch;
            self.inside.fetch_add(1, SeqCst);
            if self.open.load(SeqCst) == epoch {
                // SAFETY: the loop is open and we are counted inside it, so the caller is still
                // waiting in `run` and the closure it published is alive.
                let job = unsafe { *(self.job.load(SeqCst) as *const Job) };
                self.work(job);
            }
            self.inside.fetch_sub(1, SeqCst);
        }
    }

    /// Spins until the epoch moves past `seen`, parking after [`SPIN`]; the new epoch.
    fn wait_past(&self, seen: usize) -> usize {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.epoch.load(SeqCst);
            if epoch != seen {
                return epoch;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                continue;
            }
            let waited = start.elapsed();
            if waited > SPIN {
                let mut sleepers = self.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while self.epoch.load(SeqCst) == seen {
                    sleepers = self.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
                return self.epoch.load(SeqCst);
            }
            // Past a short pure spin, give the core to any other runnable thread (candle's or
            // rayon's workers between the team's loops) while still answering within microseconds.
            if waited > YIELD_AFTER {
                std::thread::yield_now();
            }
        }
    }

    /// Claims and runs tasks of the published loop until none is left.
    fn work(&self, job: Job) {
        let n = self.tasks.load(SeqCst);
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= n {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| job(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// Runs `f(i)` for every `i` in `0..n`, on this thread and the team's helpers, in no fixed
/// order; returns when all have run.
pub fn run(n: usize, f: impl Fn(usize) + Sync) {
    let team = team();
    if team.helpers == 0 || n <= 1 {
        return (0..n).for_each(f);
    }
    let Ok(guard) = team.busy.try_lock() else { return (0..n).into_par_iter().for_each(&f) };
    let job: Job = &f;
    team.job.store(&job as *const Job as usize, SeqCst);
    team.tasks.store(n, SeqCst);
    team.next.store(0, SeqCst);
    team.done.store(0, SeqCst);
    let epoch = team.epoch.load(SeqCst).wrapping_add(1).max(1);
    team.open.store(epoch, SeqCst);
    team.epoch.store(epoch, SeqCst);
    if *team.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
        team.wake.notify_all();
    }
    team.work(job);
    while team.done.load(SeqCst) < n {
        std::hint::spin_loop();
    }
    team.open.store(0, SeqCst);
    while team.inside.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    drop(guard);
    if team.panicked.swap(false, SeqCst) {
        panic!("a task of a decode kernel panicked");
    }
}

/// Calls `f(i, chunk)` for each `size`-long chunk of `out` (the last may be shorter), on the
/// team.
pub fn for_each_chunk(out: &mut [f32], size: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let (len, base) = (out.len(), out.as_mut_ptr() as usize);
    run(len.div_ceil(size), |i| {
        let start = i * size;
        // SAFETY: chunk i is out[start..start + size] clipped to out, disjoint from every other
        // task's; `out` stays borrowed until `run` returns.
        let chunk = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(start), size.min(len - start)) };
        f(i, chunk)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many times each of `n` tasks ran, over `loops` loops, started from `threads` threads
    /// at once (all but one of them find the team busy and take rayon).
    fn counts(n: usize, loops: usize, threads: usize) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..loops {
                        run(n, |i| {
                            hits[i].fetch_add(1, SeqCst);
                        });
                    }
                });
            }
        });
        hits.iter().map(|h| h.load(SeqCst)).collect()
    }

    #[test]
    fn every_task_runs_once_per_loop_whoever_starts_it() {
        for (n, loops, threads) in [(0, 3, 1), (1, 3, 1), (7, 500, 1), (64, 200, 3)] {
            assert_eq!(counts(n, loops, threads), vec![loops * threads; n], "{n} tasks, {threads} threads");
        }
    }

    #[test]
    fn a_loop_inside_a_task_and_chunks_cover_their_output() {
        let mut out = vec![0f32; 1000];
        for_each_chunk(&mut out, 64, |i, chunk| {
            // A nested loop finds the team busy and runs on rayon.
            let inner = AtomicUsize::new(0);
            run(3, |_| {
                inner.fetch_add(1, SeqCst);
            });
            chunk.iter_mut().for_each(|v| *v = (i * 100 + inner.load(SeqCst)) as f32);
        });
        let want: Vec<f32> = (0..1000).map(|j| ((j / 64) * 100 + 3) as f32).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_still_runs() {
        let r = catch_unwind(|| run(50, |i| assert!(i != 17, "task 17")));
        assert!(r.is_err(), "the panic of a task was lost");
        assert_eq!(counts(50, 10, 1), vec![10; 50]);
    }
}
