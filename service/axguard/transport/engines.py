"""Engine processes beside the transport: `server.engine_processes` (default: chosen at
start-up by `engine_process_count`; 0 keeps the engine in the serving process).

The serving process keeps the gRPC transport, the data plane and an engine of its own (to
validate requests, describe the model and run GAX diagnoses). Each engine process loads the
same model and calibration, lays its weights out and sets its threads as the serving
process chose them, warms up, and then runs the batches that batcher threads hand it: every
engine takes batches from the one queue (serving/batching.py), so the load reaches every
engine however few client connections bring it. A batch travels over a pipe as a pickle of
one image array and plain tuples (the items, validated by the serving process), and its
results and counter changes come back the same way; each engine has PIPES_PER_ENGINE pipes,
so that the next batch waits in one while it computes another.

An engine process that ends loses nothing: its batch goes back to the queue for the others
(the serving process's own engine takes over when none is left), and the server then drains
and exits 1 so that its supervisor (Kubernetes) restarts the pod.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from ..config import Settings, plain_settings
from ..engine.core import (
    CheckItem,
    CheckResult,
    Engine,
    MethodScore,
    ResolvedItem,
    StageTiming,
    Verdict,
)
from ..errors import AxguardError, ConfigError, NonFiniteOutput
from ..flag.artifact import CalibrationArtifact
from ..serving.batching import RunnerLost
from ..serving.threads import ThreadChoice

log = logging.getLogger("axguard.server")

READY_TIMEOUT_SECONDS = 900.0
"""An engine process loads its model and warms up within this (ResNets take a minute)."""
MAX_AUTO_PROCESSES = 8
PROCESS_FLOOR_BYTES = 512 * 2**20
"""The least memory counted for one engine process: a torch process holds about this much
before it loads a model (torch 2.14's CUDA build: 510 MiB resident after `import torch`)."""
GPU_CONTEXT_BYTES = 1024 * 2**20
"""GPU memory of one more engine process beyond its weights: its CUDA context and a batch's
activations (an estimate: no GPU was lent to measure it)."""
COUNTERS = ("zero_heatmaps", "captum_calls", "nonfinite_outputs")
"""The engine's own counters (dicts by method or stage) that /metrics reads."""


@dataclasses.dataclass(frozen=True)
class ProcessChoice:
    """How many engine processes, and why (logged, and the count in
    axguard_engine_processes)."""

    processes: int
    """Engine processes beside the serving process (0: the engine runs in it)."""
    source: str
    """"configured" (server.engine_processes) or "measured" (the start-up rule)."""
    reason: str = ""

    def describe(self) -> str:
        """One line for the log."""
        return f"{self.processes} ({self.source}{': ' + self.reason if self.reason else ''})"


def model_bytes(engine: Engine) -> int:
    """Bytes of the served network's parameters and buffers."""
    network = engine.bundle.network
    return sum(t.numel() * t.element_size()
               for t in (*network.parameters(), *network.buffers()))


def _kib_field(path: Path, key: str) -> int | None:
    """Bytes of a "KEY:  N kB" line of a /proc file (meminfo, status), or None."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def available_memory_bytes(cgroup: Path = Path("/sys/fs/cgroup"),
                           meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory this process may still use: the cgroup's limit less its usage (a Kubernetes
    memory limit), else MemAvailable; None when neither can be read."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            return max(0, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return _kib_field(meminfo, "MemAvailable")


def resident_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's resident memory (VmRSS), or None when it cannot be read."""
    return _kib_field(status, "VmRSS")


def engine_process_count(cores: int, choice: ThreadChoice, device: str, weights_bytes: int,
                         free_bytes: int | None, gpu_free_bytes: int | None = None,
                         process_bytes: int | None = None) -> tuple[int, str]:
    """The rule for `server.engine_processes` unset: (engine processes beside the serving
    process, why); 0 keeps the engine in the serving process.

    Beside it, an engine's Python no longer competes with the transport for one GIL (on
    this machine the transport of a demo Check costs 0.8 ms of CPU alone and about 2 ms
    beside an engine). The count is the smallest of:
    - cores: the serving process keeps one core; a CPU engine takes the chosen torch
      threads t: ⌊(cores − 1) / t⌋, at least 1; a GPU engine about one core: cores − 1;
    - feed: the transport costs τ seconds per request (the measured loopback round trip),
      an engine s seconds per item (the measured batch), so the one transport keeps at
      most ⌈s / τ⌉ engines busy;
    - memory: each engine process needs as much of the free memory (less the server's
      request memory budget, server.memory_budget_mib) as the serving process
      holds after its warm-up (`process_bytes`, its VmRSS: the same libraries and model;
      at least PROCESS_FLOOR_BYTES plus the weights), and on a GPU the weights plus
      GPU_CONTEXT_BYTES of its memory;
    - MAX_AUTO_PROCESSES.
    With one usable core, or no memory for one more process, it is 0.
    """
    if cores < 2:
        return 0, "one usable core"
    bounds: dict[str, int] = {}
    if device == "cpu":
        bounds["cores"] = max(1, (cores - 1) // max(1, choice.threads))
    else:
        bounds["cores"] = cores - 1
    if choice.batch_seconds and choice.transport_seconds_per_item > 0:
        per_item = choice.batch_seconds[choice.threads] / max(1, choice.batch)
        bounds["feed"] = max(1, math.ceil(per_item / choice.transport_seconds_per_item))
    if free_bytes is not None:
        need = max(process_bytes or 0, PROCESS_FLOOR_BYTES + weights_bytes)
        bounds["memory"] = free_bytes // need
    if gpu_free_bytes is not None:
        bounds["gpu_memory"] = gpu_free_bytes // (weights_bytes + GPU_CONTEXT_BYTES)
    bounds["most"] = MAX_AUTO_PROCESSES
    count = max(0, min(bounds.values()))
    return count, "smallest of " + ", ".join(f"{name} {value}" for name, value in bounds.items())


def engine_threads(cores: int, choice: ThreadChoice, device: str, count: int) -> int:
    """Torch threads of each engine process: the serving process's measured choice on a
    CPU; on a GPU an equal share of the cores the transport leaves."""
    if device == "cpu":
        return choice.threads
    return max(1, (cores - 1) // max(1, count))


# -- the wire: a batch and its results as plain tuples, lists and one image array --------

def _items_to_wire(items: list[CheckItem], calibration: str | None = None) -> bytes:
    """A batch for an engine process; `calibration` (an artifact's JSON) when it must
    judge this batch and every later one with a new calibration."""
    images = torch.stack([item.image for item in items]).cpu().numpy()
    options = [(tuple(i.methods), tuple(i.ax_processes), i.label, i.return_heatmaps,
                i.prediction_only, i.verdict_only, tuple(i.pairs)) for i in items]
    return pickle.dumps((images, options, calibration), protocol=pickle.HIGHEST_PROTOCOL)


def _batch_from_wire(data: bytes) -> tuple[list[CheckItem], str | None]:
    """The items of a batch (validated by the serving process) and the calibration JSON
    it carries, if any."""
    images, options, calibration = pickle.loads(data)
    pixels = torch.from_numpy(images)
    items: list[CheckItem] = [
        ResolvedItem(pixels[k], methods, processes, label, heatmaps, prediction_only,
                     verdict_only, pairs, image_checked=True)
        for k, (methods, processes, label, heatmaps, prediction_only, verdict_only, pairs)
        in enumerate(options)]
    return items, calibration


def _result_to_wire(r: CheckResult) -> tuple:
    v, t = r.verdict, r.timing
    return (r.class_index, r.class_name, r.probability, r.logits, r.probabilities,
            [(s.method, s.ax_process, s.score, s.labelled_score, s.zero_heatmap)
             for s in r.scores],
            {name: h.numpy() for name, h in r.heatmaps.items()},
            (v.calibrated, v.likely_wrong, v.risk, v.threshold, v.calibration_id, v.features),
            (t.forward_ms, t.attribution_ms, t.ax_ms, t.queue_ms, t.batch_size),
            r.error.stage if r.error is not None else None)


def _result_from_wire(wire: tuple) -> CheckResult:
    (index, name, probability, logits, probabilities, scores, heatmaps, verdict, timing,
     error) = wire
    return CheckResult(index, name, probability, logits, probabilities,
                       [MethodScore(*s) for s in scores],
                       {n: torch.from_numpy(h) for n, h in heatmaps.items()},
                       Verdict(*verdict), StageTiming(*timing),
                       NonFiniteOutput(error) if error is not None else None)


def _counters(engine: Engine) -> dict[str, dict[str, int]]:
    return {name: dict(getattr(engine, name)) for name in COUNTERS}


PIPES_PER_ENGINE = 2
"""Batches on their way to one engine process: while it computes one, the next is already in
its other pipe (one pipe would leave it idle while results travel back)."""


def _engine_main(settings: Settings, threads: int, memory_format: str,
                 pipes: list[Connection]) -> None:
    """An engine process: build the engine as the serving process did, then run the
    batches of whichever pipe has one, until every pipe is closed."""
    from ..builder import build_engine
    from ..engine.model import set_memory_format
    from ..logs import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the serving process drains first
    configure_logging(settings.log_level, settings.log_json)
    torch.set_num_threads(threads)
    try:
        engine = build_engine(settings)
        if engine.bundle.memory_format != memory_format:
            set_memory_format(engine.bundle, memory_format)
        engine.warm_up()
    except AxguardError as err:
        pipes[0].send(("failed", err.message))
        return
    except Exception as err:  # noqa: BLE001  (reported to the serving process)
        pipes[0].send(("failed", f"{type(err).__name__}: {err}"))
        raise
    pipes[0].send(("ready", os.getpid()))
    open_pipes = list(pipes)
    while open_pipes:
        for conn in multiprocessing.connection.wait(open_pipes):
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                open_pipes.remove(conn)
                continue
            conn.send_bytes(_run_batch(engine, data))


def _run_batch(engine: Engine, data: bytes) -> bytes:
    """One batch in an engine process: the reply with its results and counter changes."""
    before = _counters(engine)
    try:
        items, calibration = _batch_from_wire(data)
        if calibration is not None:  # validated by the serving process; checked again
            engine.use_calibration(CalibrationArtifact.model_validate_json(calibration))
        results = engine.check(items)
        after = _counters(engine)
        delta = {name: {k: v - before[name].get(k, 0) for k, v in after[name].items()
                        if v != before[name].get(k, 0)} for name in COUNTERS}
        reply = ("ok", [_result_to_wire(r) for r in results], delta)
    except Exception as err:  # noqa: BLE001  (the batch fails in the serving process)
        log.exception("engine_process_batch_failed")
        reply = ("error", f"{type(err).__name__}: {err}")
    return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)


class EngineProcessDied(RunnerLost):
    """An engine process ended: its batch goes to the other engines (batching.RunnerLost)."""


class EngineProcesses:
    """Engine processes beside the serving process, and the batcher's runners for them
    (PIPES_PER_ENGINE each)."""

    def __init__(self, settings: Settings, count: int, threads: int, memory_format: str
                 ) -> None:
        context = multiprocessing.get_context("spawn")
        settings = plain_settings(settings)
        self._workers: list[tuple[multiprocessing.process.BaseProcess, list[Connection]]] = []
        self.counters: dict[str, dict[str, int]] = {name: {} for name in COUNTERS}
        """Counters of every engine process, summed (the serving engine keeps its own)."""
        self._lock = threading.Lock()
        self._calibration: tuple[int, str] = (0, "")
        """(version, artifact JSON) of the calibration every later batch must use."""
        self._sent: dict[int, int] = {}
        """The calibration version sent down each pipe (by id): every pipe carries a new
        one once, so no later batch of either pipe is judged with the old."""
        for index in range(count):
            pairs = [context.Pipe(duplex=True) for _ in range(PIPES_PER_ENGINE)]
            process = context.Process(target=_engine_main, name=f"axguard-engine-{index + 1}",
                                      args=(settings, threads, memory_format,
                                            [theirs for _, theirs in pairs]), daemon=True)
            process.start()
            for _, theirs in pairs:
                theirs.close()
            self._workers.append((process, [ours for ours, _ in pairs]))
        for index, (process, pipes) in enumerate(self._workers):
            message = ("failed", "no answer")
            try:
                if pipes[0].poll(READY_TIMEOUT_SECONDS):
                    message = pipes[0].recv()
            except EOFError:
                process.join(5)
                message = ("failed", f"exited with {process.exitcode}")
            if message[0] != "ready":
                self.close()
                raise ConfigError(f"engine process {index + 1} did not start: {message[1]}",
                                  field="server.engine_processes")
        self.pids = [process.pid for process, _ in self._workers]

    def __len__(self) -> int:
        return len(self._workers)

    def runners(self) -> list[Callable[[list[CheckItem]], list[CheckResult]]]:
        """The batcher's runners: one per pipe of every engine process."""
        return [self._runner(index, pipe) for index, (_, pipes) in enumerate(self._workers)
                for pipe in pipes]

    def _runner(self, index: int, conn: Connection
                ) -> Callable[[list[CheckItem]], list[CheckResult]]:
        process = self._workers[index][0]

        def run(items: list[CheckItem]) -> list[CheckResult]:
            with self._lock:
                version, text = self._calibration
                new = text if self._sent.get(id(conn), 0) != version else None
                self._sent[id(conn)] = version
            try:
                conn.send_bytes(_items_to_wire(items, new))
                reply = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError) as err:
                process.join(1)
                raise EngineProcessDied(f"engine process {index + 1} (pid {process.pid}) "
                                        f"ended: exit code {process.exitcode}") from err
            if reply[0] != "ok":
                raise RuntimeError(f"engine process {index + 1}: {reply[1]}")
            _, results, delta = reply
            if any(delta.values()):
                with self._lock:
                    for name, values in delta.items():
                        totals = self.counters[name]
                        for key, value in values.items():
                            totals[key] = totals.get(key, 0) + value
            return [_result_from_wire(r) for r in results]

        return run

    def use_calibration(self, calibration: CalibrationArtifact) -> None:
        """Send `calibration` with the next batch to each engine process: batches already
        in a pipe finish with the old one, every later one uses it."""
        with self._lock:
            self._calibration = (self._calibration[0] + 1, calibration.model_dump_json())

    def alive(self) -> bool:
        """True while every engine process runs."""
        return all(process.is_alive() for process, _ in self._workers)

    def close(self) -> None:
        """End every engine process (closing its pipes ends it; then SIGTERM, SIGKILL)."""
        for _, pipes in self._workers:
            for conn in pipes:
                conn.close()
        for process, _ in self._workers:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
