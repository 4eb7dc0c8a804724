//! The operators of one batch on several threads. Operators that share state in-process (the
//! same [`Operator::thread_group`]) run in their listed order on one thread; every group
//! collects its output apart, and the outputs are merged in the order the groups are listed,
//! so what the engine emits does not depend on which thread ran what, or when. The helper
//! threads live as long as the engine: a thread started per batch would start with an empty
//! allocator heap and give its memory back at its end, and the kernel would zero it again for
//! the next.

use super::operator::{BatchMemo, Context, Operator};
use crate::results::ResultBatch;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Batches of at least this many passes run on several threads (smaller ones are not worth
/// handing to the helpers).
const MIN_PASSES: usize = 512;

/// What the operators do: one call per operator, with its context.
pub(super) type Step<'f> = &'f (dyn Fn(&mut dyn Operator, &mut Context<'_>) + Sync);

/// One step of every operator, with the watermark and the batch its context gives.
#[derive(Clone, Copy)]
pub(super) struct Phase<'f> {
    pub watermark: i64,
    pub batch: &'f BatchMemo<'f>,
    pub step: Step<'f>,
}

/// Runs groups of operators on up to `threads` threads, the slowest groups of the last run
/// first (a long group started last would leave the other threads idle).
pub(super) struct Parallel {
    threads: usize,
    /// The `threads - 1` helpers (the calling thread is the other), started on first use.
    pool: Option<rayon::ThreadPool>,
    /// Batches of at least this many passes run in parallel.
    pub min_passes: usize,
    /// Each group's running time in its last run, ns.
    cost: FxHashMap<&'static str, u64>,
}

/// One group's operators and what they emitted.
struct Group<'o> {
    name: &'static str,
    operators: Vec<&'o mut Box<dyn Operator>>,
    out: ResultBatch,
    late: Vec<(usize, &'static str)>,
    nanos: u64,
}

impl Parallel {
    pub fn new(threads: usize) -> Parallel {
        Parallel { threads: threads.max(1), pool: None, min_passes: MIN_PASSES, cost: FxHashMap::default() }
    }

    /// Whether a batch of `passes` runs on several threads.
    pub fn takes(&self, passes: usize) -> bool {
        self.threads > 1 && passes >= self.min_passes
    }

    /// What `f` appends for runs of the items, in order: `f(run, out)` appends one value per
    /// item of `run`. A large batch is cut into one run per thread.
    pub fn map_runs<T: Sync, U: Send>(&mut self, items: &[T], f: impl Fn(&[T], &mut Vec<U>) + Sync) -> Vec<U> {
        let mut out = Vec::with_capacity(items.len());
        if !self.takes(items.len()) {
            f(items, &mut out);
            return out;
        }
        let f = &f;
        let runs = items.chunks(items.len().div_ceil(self.threads));
        let parts = self.on_threads(
            runs.map(|run| {
                move || {
                    let mut part = Vec::with_capacity(run.len());
                    f(run, &mut part);
                    part
                }
            })
            .collect(),
        );
        for mut part in parts {
            out.append(&mut part);
        }
        out
    }

    /// Runs the `phases` on every operator in turn, each group with a context of its own like
    /// `ctx` (its watermark and batch the phase's): a group takes each phase right after the
    /// one before, without waiting for the other groups. Their rows and late passes then go to
    /// `ctx`'s, in the order of the groups as listed.
    pub fn run(&mut self, operators: &mut [Box<dyn Operator>], ctx: &mut Context<'_>, phases: &[Phase<'_>]) {
        let mut groups: Vec<Group<'_>> = Vec::new();
        for op in operators.iter_mut() {
            let name = op.thread_group();
            match groups.iter_mut().find(|g| g.name == name) {
                Some(group) => group.operators.push(op),
                None => groups.push(Group {
                    name,
                    operators: vec![op],
                    out: ResultBatch::default(),
                    late: Vec::new(),
                    nanos: 0,
                }),
            }
        }
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(self.cost.get(groups[*i].name).copied().unwrap_or(0)));
        let groups: Vec<Mutex<Group<'_>>> = groups.into_iter().map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        let (allowed_lateness_ms, processing_now) = (ctx.allowed_lateness_ms, ctx.processing_now);
        let work = || loop {
            let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
            let mut guard = groups[i].lock().expect("a group is run once");
            let group = &mut *guard;
            let started = Instant::now();
            for phase in phases {
                let (out, late) = (&mut group.out, &mut group.late);
                let (watermark, batch) = (phase.watermark, phase.batch);
                let mut ctx = Context { watermark, allowed_lateness_ms, processing_now, out, late, batch };
                for op in &mut group.operators {
                    (phase.step)(op.as_mut(), &mut ctx);
                }
            }
            group.nanos = started.elapsed().as_nanos() as u64;
        };
        let workers = self.threads.min(order.len());
        self.on_threads((0..workers).map(|_| &work).collect());
        for group in groups {
            let mut group = group.into_inner().expect("no group panicked");
            ctx.out.append(&mut group.out);
            ctx.late.append(&mut group.late);
            self.cost.insert(group.name, group.nanos);
        }
    }

    /// Runs `jobs`, the first on the calling thread and the others on the helpers, and returns
    /// their results in order. A job's panic is raised here once every job has ended.
    fn on_threads<R: Send>(&mut self, jobs: Vec<impl FnOnce() -> R + Send>) -> Vec<R> {
        let mut jobs = jobs.into_iter();
        let Some(own) = jobs.next() else { return Vec::new() };
        let helpers = self.threads - 1;
        let pool = self.pool.get_or_insert_with(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(helpers)
                .thread_name(|i| format!("passflow-ops-{i}"))
                .build()
                .expect("the operators' helper threads start")
        });
        let mut results: Vec<Option<R>> = std::iter::repeat_with(|| None).take(jobs.len() + 1).collect();
        let (first, rest) = results.split_first_mut().expect("one result per job");
        pool.in_place_scope(|scope| {
            for (job, slot) in jobs.zip(rest) {
                scope.spawn(move |_| *slot = Some(job()));
            }
            *first = Some(own());
        });
        results.into_iter().map(|r| r.expect("every job ran")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::operator::{StateBlob, NO_BATCH};
    use crate::ingest::DeadLetter;
    use crate::model::{Pass, RejectReason};

    /// Writes down each call it gets, as a dead letter `name:what:watermark`, and marks the
    /// first pass of a batch late.
    struct Recorder {
        name: &'static str,
        group: &'static str,
    }

    impl Recorder {
        fn note(&self, what: &str, ctx: &mut Context<'_>) {
            let id = format!("{}:{what}:{}", self.name, ctx.watermark);
            let reason = RejectReason::MalformedJson;
            ctx.out.dead_letters.push(DeadLetter { id, reason, record: String::new(), received_at: 0 });
        }
    }

    impl Operator for Recorder {
        fn name(&self) -> &'static str {
            self.name
        }
        fn state_version(&self) -> u32 {
            1
        }
        fn thread_group(&self) -> &'static str {
            self.group
        }
        fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
            self.note(&format!("batch of {}", passes.len()), ctx);
            ctx.late.push((0, self.name));
        }
        fn on_watermark(&mut self, ctx: &mut Context<'_>) {
            self.note("watermark", ctx);
        }
        fn snapshot(&self) -> anyhow::Result<StateBlob> {
            Ok(StateBlob { version: 1, bytes: Vec::new() })
        }
        fn restore(&mut self, _blob: &StateBlob) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_group_takes_the_phases_in_turn_and_the_rows_come_in_the_order_of_the_groups() {
        let recorder = |name, group| Box::new(Recorder { name, group }) as Box<dyn Operator>;
        let mut operators =
            vec![recorder("a", "one"), recorder("b", "two"), recorder("c", "one"), recorder("d", "three")];
        let memo = BatchMemo::new(&[]);
        let process: Step<'_> = &|op, ctx| op.process_batch(&[], ctx);
        let emit: Step<'_> = &|op, ctx| op.on_watermark(ctx);
        let phases = [
            Phase { watermark: 10, batch: &memo, step: process },
            Phase { watermark: 20, batch: &NO_BATCH, step: emit },
        ];
        let mut parallel = Parallel::new(3);
        // The second run starts the groups in the order of their first run's cost.
        for run in 0..2 {
            let (mut out, mut late) = (ResultBatch::default(), Vec::new());
            let mut ctx = Context {
                watermark: 0,
                allowed_lateness_ms: 0,
                processing_now: 0,
                out: &mut out,
                late: &mut late,
                batch: &NO_BATCH,
            };
            parallel.run(&mut operators, &mut ctx, &phases);
            let ids: Vec<&str> = out.dead_letters.iter().map(|d| d.id.as_str()).collect();
            assert_eq!(
                ids,
                [
                    "a:batch of 0:10",
                    "c:batch of 0:10",
                    "a:watermark:20",
                    "c:watermark:20",
                    "b:batch of 0:10",
                    "b:watermark:20",
                    "d:batch of 0:10",
                    "d:watermark:20",
                ],
                "run {run}"
            );
            assert_eq!(late, [(0, "a"), (0, "c"), (0, "b"), (0, "d")], "run {run}");
        }
    }

    #[test]
    fn a_parallel_map_of_runs_keeps_the_order_of_its_items_at_every_size() {
        let mut parallel = Parallel::new(3);
        for len in [0, 1, MIN_PASSES - 1, MIN_PASSES, MIN_PASSES + 1, 10_007] {
            let items: Vec<u64> = (0..len as u64).collect();
            let mapped = parallel.map_runs(&items, |run, out| out.extend(run.iter().map(|i| i * 7 + 1)));
            assert_eq!(mapped, items.iter().map(|i| i * 7 + 1).collect::<Vec<_>>(), "{len} items");
        }
    }
}
