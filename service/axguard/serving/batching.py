"""Dynamic batching: concurrent checks are grouped into one engine batch (no gRPC here).

Like Triton's dynamic batcher: a worker thread takes the first waiting item, then waits up
to `max_delay` seconds for more, up to `max_batch_size`, and runs them as one engine batch.
It stops waiting early when no request is on its way: callers announce a request with
`arriving()` before they decode it, and while none is being decoded and the queue is empty,
waiting could only add latency (8 clients in a closed loop otherwise lose `max_delay` on
every batch). The queue is bounded: when it is full, `submit` raises Busy at once.

Several runners can take batches from the one queue (`add_runner`): each is a thread with
its own way to run a batch, e.g. an engine in another process (transport/engines.py). A
batch goes to whichever runner is free, so the load reaches every engine however few
client connections bring it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..engine.core import CheckItem, CheckResult, Engine
from ..errors import Busy, DeadlineExceeded

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 365 * 24 * 3600.0
# Bounds of the retry delay a full queue suggests (Busy.retry_after), in seconds.
MIN_RETRY_AFTER, MAX_RETRY_AFTER = 0.05, 5.0
"""Deadlines further away than this count as none (waiting on a far-future deadline
overflows the platform's time_t: some clients, Triton's among them, send one)."""


@dataclass
class _Job:
    item: CheckItem
    future: Future
    enqueued: float
    running: bool = False
    """Its future is marked running (a batch took it; a lost runner's batch is retaken)."""


class RunnerLost(Exception):
    """Raised by a runner that can run no more batches (its engine process ended): its
    batch goes back to the queue for the other runners, and its thread stops."""


class Arrival:
    """Items announced to the batcher as on their way; `done` (idempotent) when queued."""

    def __init__(self, batcher: DynamicBatcher, count: int) -> None:
        self._batcher = batcher
        self._count = count

    def done(self) -> None:
        """The items are queued (or will never be)."""
        if self._count:
            count, self._count = self._count, 0
            self._batcher._arrived(count)


@dataclass
class BatchStats:
    """Counters of the batcher (read by tests and metrics)."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    rejected: int = 0
    failed_batches: int = 0
    lost_runners: int = 0
    """Runners that stopped (an engine process ended); their batches were queued again."""
    batches_by_runner: dict[str, int] = field(default_factory=dict)
    """Batches each runner thread ran, by thread name (axguard-batcher-N)."""
    seconds_per_item: float = 0.0
    """Moving average of engine seconds per item (what a full queue will take to clear)."""


Runner = Callable[[list[CheckItem]], list[CheckResult]]
"""Runs one batch of resolved items: Engine.check, or a call into an engine process."""


class DynamicBatcher:
    """Groups submitted items into engine batches; `submit` returns a Future of CheckResult.

    Items must already be validated with `engine.resolve`, so one bad item cannot fail a
    batch. The result's `queue_ms` field tells how long the item waited.
    """

    def __init__(self, engine: Engine, *, max_batch_size: int = 32, max_delay: float = 0.002,
                 max_queue: int = 1024) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = BatchStats()
        self.in_flight = 0
        """Items taken from the queue whose batch is running (all runners)."""
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._retired: set[str] = set()
        self._started = 0
        self.add_runner(engine.check)

    @property
    def runners(self) -> int:
        """Threads taking batches from the queue (one per engine)."""
        return len(self._threads)

    def retire_first_runner(self) -> None:
        """Stop the first runner (the serving process's own engine) once it takes its next
        batch, which goes back to the queue: with engines in other processes, this one's
        Python no longer competes with the transport for the GIL. It comes back if every
        other runner is lost."""
        self._retired.add(self._threads[0].name)

    def add_runner(self, run: Runner) -> None:
        """Start one more thread that takes batches from the queue and runs them with
        `run` (same results, in order, as Engine.check)."""
        self._started += 1
        thread = threading.Thread(target=self._run, args=(run,), daemon=True,
                                  name=f"axguard-batcher-{self._started - 1}")
        self._threads.append(thread)
        thread.start()

    @property
    def depth(self) -> int:
        """Items waiting in the queue."""
        return self._queue.qsize()

    @contextmanager
    def arriving(self, count: int = 1) -> Iterator[Arrival]:
        """Announce `count` items being decoded until `check` submits them (pass it the
        Arrival) or the block ends (a refused request)."""
        with self._arriving_lock:
            self._arriving += count
        arrival = Arrival(self, count)
        try:
            yield arrival
        finally:
            arrival.done()

    def _arrived(self, count: int) -> None:
        with self._arriving_lock:
            self._arriving -= count

    def submit(self, item: CheckItem) -> Future:
        """Queue one validated item; raise Busy when the queue is full."""
        future: Future = Future()
        try:
            self._queue.put_nowait(_Job(item, future, time.perf_counter()))
        except queue.Full:
            self.stats.rejected += 1
            clear = self._queue.maxsize * self.stats.seconds_per_item
            raise Busy(f"the check queue is full ({self._queue.maxsize} waiting); retry later",
                       field="queue", retry_after=min(max(clear, MIN_RETRY_AFTER),
                                                      MAX_RETRY_AFTER)) from None
        return future

    def check(self, items: list[CheckItem], timeout: float | None = None,
              arrival: Arrival | None = None) -> list[CheckResult]:
        """Submit items and wait for all their results, in order. `arrival` (from
        `arriving`) is marked done once every item is queued."""
        futures: list[Future] = []
        try:
            for item in items:
                futures.append(self.submit(item))
        except Busy:
            for f in futures:
                f.cancel()  # the call fails as a whole: its queued items are not computed
            raise
        finally:
            if arrival is not None:
                arrival.done()
        if timeout is not None and timeout > MAX_WAIT_SECONDS:
            timeout = None  # "no deadline" as some clients send it: a far-future one
        end = None if timeout is None else time.perf_counter() + timeout
        try:
            return [f.result(timeout=None if end is None else max(end - time.perf_counter(), 0))
                    for f in futures]
        except TimeoutError:
            for f in futures:
                f.cancel()  # still queued: it will be skipped, not computed
            raise DeadlineExceeded("the deadline passed while the check waited or ran",
                                   field="deadline") from None

    def close(self) -> None:
        """Stop the runners after the items already queued."""
        self._queue.put(None)  # each runner passes it on to the next, then stops
        for thread in self._threads:
            thread.join(timeout=30)

    def _drop_this_runner(self) -> None:
        """Forget the calling runner thread (it is about to end); under _stats_lock."""
        self._threads = [t for t in self._threads if t is not threading.current_thread()]

    def _run(self, run: Runner) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.put(None)  # for the other runners
                return
            if threading.current_thread().name in self._retired:
                self._queue.put(first)  # taken by another runner
                with self._stats_lock:
                    self._drop_this_runner()
                return
            jobs = [first]
            deadline = time.perf_counter() + self.max_delay
            while len(jobs) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if self._arriving == 0 and self._queue.empty():
                    break  # nothing on its way: waiting would only add latency
                try:
                    job = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 \
                        else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
            if not self._execute(jobs, run):
                return

    def _execute(self, jobs: list[_Job], run: Runner) -> bool:
        """Run one batch; False when the runner was lost (the batch is queued again)."""
        live = [j for j in jobs if j.running or j.future.set_running_or_notify_cancel()]
        if not live:
            return True
        for job in live:
            job.running = True
        started = time.perf_counter()
        with self._stats_lock:
            self.in_flight += len(live)
        try:
            results = run([j.item for j in live])
        except RunnerLost as err:
            log.error("batch_runner_lost", extra={"size": len(live), "reason": str(err)})
            with self._stats_lock:
                self.in_flight -= len(live)
                self.stats.lost_runners += 1
                self._drop_this_runner()
                if not [t for t in self._threads if t.name not in self._retired]:
                    log.error("batch_runners_all_lost", extra={"fallback": "engine"})
                    self.add_runner(self.engine.check)  # the serving process's own engine
            for job in live:
                try:
                    self._queue.put_nowait(job)  # another runner takes it: nothing is lost
                except queue.Full:
                    job.future.set_exception(err)
            return False
        except BaseException as err:  # noqa: BLE001  (handed to every waiting caller)
            with self._stats_lock:
                self.in_flight -= len(live)
                self.stats.failed_batches += 1
            log.error("batch_failed", exc_info=err, extra={"size": len(live)})
            for job in live:
                job.future.set_exception(err)
            return True
        # Seconds per item of the whole engine pool: one runner's batch time ÷ runners.
        per_item = (time.perf_counter() - started) / len(live) / len(self._threads)
        with self._stats_lock:
            self.in_flight -= len(live)
            stats = self.stats
            stats.batches += 1
            name = threading.current_thread().name
            stats.batches_by_runner[name] = stats.batches_by_runner.get(name, 0) + 1
            stats.items += len(live)
            stats.largest_batch = max(stats.largest_batch, len(live))
            previous = stats.seconds_per_item
            stats.seconds_per_item = per_item if previous == 0 else 0.8 * previous + 0.2 * per_item
        for job, result in zip(live, results, strict=True):
            result.timing.queue_ms = (started - job.enqueued) * 1e3
            job.future.set_result(result)
        return True
