"""How many torch threads: measured at warm-up, not guessed. No gRPC here.

Per engine batch of b requests, torch needs c_t seconds of wall time on t threads, and the
transport (gRPC and protobuf in Python, mostly serialised by the GIL, so about one core)
needs b·τ seconds of CPU. With a core to spare (t < cores) the two overlap and a batch
cycle takes max(c_t, b·τ); with every core given to torch they compete and it takes
c_t + b·τ. The policy keeps the thread count with the shortest cycle (ties within 2% go
to fewer threads). On this 2-core machine that keeps 1 thread for the demo CNN, whose
batch barely gains from a second thread while its requests are transport-bound, and 2 for
ResNet-34, whose batch is seconds long.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TIE = 0.02
"""Cycles within 2% of the best count as equal: fewer threads win."""
MEMORY_FORMAT_GAIN = 0.05
"""channels_last is kept only when its batch is at least 5% faster than NCHW's: a
smaller gain is within the noise of a shared machine, and NCHW is what users measure."""


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the container's CFS quota allows (a Kubernetes CPU limit), or None if none.

    cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD"), else v1 `cpu.cfs_quota_us` and
    `cpu.cfs_period_us` (quota −1: none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPU cores this process may use: its cpuset, capped by the container's CPU limit
    (a pod limited to 2 CPUs on a 64-core node has 2, not 64)."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def candidate_threads(cores: int) -> list[int]:
    """Thread counts worth timing: every count up to 4, then a few spread to `cores`."""
    if cores <= 4:
        return list(range(1, cores + 1))
    return sorted({1, 2, cores // 2, cores - 1, cores})


def cycle_seconds(threads: int, batch_seconds: float, transport_seconds: float,
                  cores: int) -> float:
    """Seconds per batch cycle: overlapped when a core is left for the transport."""
    if threads < cores:
        return max(batch_seconds, transport_seconds)
    return batch_seconds + transport_seconds


def choose_threads(batch_seconds: dict[int, float], transport_seconds_per_item: float,
                   batch: int, cores: int) -> int:
    """Return the thread count with the shortest batch cycle (fewer threads on ties)."""
    transport = batch * transport_seconds_per_item
    cycles = {t: cycle_seconds(t, s, transport, cores) for t, s in batch_seconds.items()}
    best = min(cycles.values())
    return min(t for t, c in cycles.items() if c <= best * (1 + TIE))


def choose_memory_format(batch_seconds: dict[str, float]) -> str:
    """Return the layout to serve with from the measured seconds of one batch in each:
    "channels_last" when it beats "contiguous" by MEMORY_FORMAT_GAIN, else "contiguous"."""
    if batch_seconds["channels_last"] <= batch_seconds["contiguous"] * (1 - MEMORY_FORMAT_GAIN):
        return "channels_last"
    return "contiguous"


@dataclass(frozen=True)
class ThreadChoice:
    """What the policy measured and chose."""

    threads: int
    source: str
    """"configured" (model.torch_threads), "measured", or "device" (a GPU model)."""
    batch: int = 0
    batch_seconds: dict[int, float] | None = None
    transport_seconds_per_item: float = 0.0
    memory_format: str = "contiguous"
    """The network's weight layout (model.memory_format), measured or configured."""
    memory_format_seconds: dict[str, float] | None = None
    """Seconds of one batch in each layout, when measured."""

    def describe(self) -> str:
        """One line for logs and GetModelInfo."""
        layout = ""
        if self.memory_format_seconds:
            layout = "; layout {} (measured: {})".format(self.memory_format, ", ".join(
                f"{n}: {s * 1e3:.1f} ms" for n, s in sorted(self.memory_format_seconds.items())))
        elif self.memory_format != "contiguous":
            layout = f"; layout {self.memory_format}"
        if self.source != "measured" or not self.batch_seconds:
            return f"{self.threads} ({self.source}){layout}"
        timings = ", ".join(f"{t}: {s * 1e3:.1f} ms" for t, s in sorted(self.batch_seconds.items()))
        return (f"{self.threads} (measured: batch of {self.batch} at {timings}; transport "
                f"{self.transport_seconds_per_item * 1e3:.2f} ms per request){layout}")


def time_batch(run: Callable[[], object], *, budget_seconds: float = 1.0, most: int = 5
               ) -> float:
    """Median seconds of run() after one warm run: at least one timed run, more while the
    budget lasts (so a seconds-long ResNet batch is timed once, a 10 ms one five times)."""
    run()
    times: list[float] = []
    spent = 0.0
    while not times or (len(times) < most and spent < budget_seconds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def measure_threads(run_batch: Callable[[], object], candidates: list[int]) -> dict[int, float]:
    """Seconds of one batch at each candidate thread count (torch's setting is changed)."""
    timings = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        timings[threads] = time_batch(run_batch)
    return timings
