//! Bounds how many shards commit at the same time.
//!
//! Every redb commit costs a fixed amount of CPU whatever it carries: about seven 4 KiB pages in
//! different places of the file, written back and synced (`fdatasync`), plus the writer's wake-up.
//! With 16 shards and a few dozen concurrent writers spread over many streams, each shard sees
//! only a few operations per transaction, and on a machine with few cores those fixed costs,
//! paid 16 times over, crowd out the work that produces the operations (HTTP). A shard that finds
//! the gate full waits; the operations that reach it meanwhile join its transaction, so the same
//! operations need fewer commits. Shards are let in first come, first served.
//!
//! The limit is twice the CPUs (two commits per core: one syncing while the other writes its
//! pages); with at least as many permits as shards the gate is not used at all, so machines with
//! many cores and parallel disks keep one commit in flight per shard.
//!
//! Waiting only pays when more operations are on their way to the waiting shard. The gate counts
//! the operations submitted and not yet committed, and lets every shard straight through while
//! they average fewer than two per shard: with few concurrent writers a wait would only delay a
//! commit of one operation while the disk could sync several shards side by side.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;

use parking_lot::Mutex;

/// Commits in flight allowed per CPU.
const COMMITS_PER_CPU: usize = 2;
/// The gate holds shards back only while at least this many operations per shard are
/// submitted and not yet committed.
const CROWD_PER_SHARD: usize = 2;

/// The permits, shared by the writers of one store.
#[derive(Debug)]
pub(super) struct CommitGate {
    state: Mutex<State>,
    /// Operations submitted to any shard and not yet committed.
    pending: AtomicUsize,
    /// `pending` at which shards start to wait for permits.
    crowd: usize,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// Writers waiting for a permit, oldest first.
    waiting: VecDeque<Arc<Waiter>>,
}

/// One writer thread's place in the queue, reused for every wait.
#[derive(Debug)]
pub(super) struct Waiter {
    thread: Thread,
    /// Set by the writer that hands its permit over.
    granted: AtomicBool,
}

impl Waiter {
    /// The calling thread's waiter.
    pub(super) fn current() -> Arc<Waiter> {
        Arc::new(Waiter {
            thread: std::thread::current(),
            granted: AtomicBool::new(false),
        })
    }
}

/// A permit to commit; handed to the next waiting writer when dropped. `None` when the gate
/// let the writer through without one.
pub(super) struct Permit<'g> {
    gate: Option<&'g CommitGate>,
}

impl CommitGate {
    /// The gate for `shards` shards on this machine, or `None` when it would never make a shard
    /// wait.
    pub(super) fn for_machine(shards: usize) -> Option<Arc<CommitGate>> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let permits = cpus * COMMITS_PER_CPU;
        (permits < shards).then(|| Arc::new(CommitGate::new(permits, shards * CROWD_PER_SHARD)))
    }

    /// A gate of `permits` permits that shards wait for once `crowd` operations are pending.
    pub(super) fn new(permits: usize, crowd: usize) -> CommitGate {
        CommitGate {
            state: Mutex::new(State {
                free: permits.max(1),
                waiting: VecDeque::new(),
            }),
            pending: AtomicUsize::new(0),
            crowd,
        }
    }

    /// Counts `n` operations submitted to a shard.
    pub(super) fn submitted(&self, n: usize) {
        self.pending.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` operations committed (or failed, or dropped with the queue).
    pub(super) fn finished(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Waits for a permit when enough operations are pending for waiting to grow the batch;
    /// `me` must belong to the calling thread.
    pub(super) fn enter<'g>(&'g self, me: &Arc<Waiter>) -> Permit<'g> {
        if self.pending.load(Ordering::Relaxed) < self.crowd {
            return Permit { gate: None };
        }
        {
            let mut state = self.state.lock();
            if state.free > 0 {
                state.free -= 1;
                return Permit { gate: Some(self) };
            }
            me.granted.store(false, Ordering::Relaxed);
            state.waiting.push_back(me.clone());
        }
        // `park` may return spuriously; the flag says when the permit is ours.
        while !me.granted.load(Ordering::Acquire) {
            std::thread::park();
        }
        Permit { gate: Some(self) }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let Some(gate) = self.gate else {
            return;
        };
        let next = {
            let mut state = gate.state.lock();
            let next = state.waiting.pop_front();
            if next.is_none() {
                state.free += 1;
            }
            next
        };
        // The permit passes straight to the oldest waiter: no other writer can take it between.
        if let Some(next) = next {
            next.granted.store(true, Ordering::Release);
            next.thread.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn never_more_than_the_limit_inside_and_everyone_gets_in() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 200;
        let gate = CommitGate::new(3, 0);
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let entered = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    let me = Waiter::current();
                    for _ in 0..ROUNDS {
                        let _permit = gate.enter(&me);
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        entered.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(entered.load(Ordering::SeqCst), THREADS * ROUNDS);
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?}");
        assert_eq!(gate.state.lock().free, 3);
    }

    #[test]
    fn waiters_are_let_in_oldest_first() {
        let gate = CommitGate::new(1, 0);
        let order = Mutex::new(Vec::new());
        let first = gate.enter(&Waiter::current());
        std::thread::scope(|scope| {
            for i in 0..3 {
                let queued = || gate.state.lock().waiting.len();
                let (gate, order) = (&gate, &order);
                scope.spawn(move || {
                    let _permit = gate.enter(&Waiter::current());
                    order.lock().push(i);
                });
                // Wait until thread `i` is queued before starting the next one.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while queued() < i + 1 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "thread {i} never queued"
                    );
                    std::thread::yield_now();
                }
            }
            drop(first);
        });
        assert_eq!(*order.lock(), vec![0, 1, 2]);
    }

    #[test]
    fn few_pending_operations_pass_without_a_permit() {
        let gate = CommitGate::new(1, 4);
        let me = Waiter::current();
        let held = gate.enter(&me);
        // Nothing pending: a second writer is not made to wait for the one permit.
        let free_pass = gate.enter(&me);
        assert!(free_pass.gate.is_none());
        drop(free_pass);
        gate.submitted(4);
        drop(held);
        let permit = gate.enter(&me);
        assert!(permit.gate.is_some());
        assert_eq!(gate.state.lock().free, 0);
        drop(permit);
        gate.finished(4);
        assert_eq!(gate.state.lock().free, 1);
    }
}
