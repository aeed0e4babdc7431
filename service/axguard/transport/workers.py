"""Several engine processes in one pod: `server.processes` > 1.

Each worker process is a whole server (its own engine, batcher, torch threads and GIL) on
the same gRPC port, which the kernel shares out by connection (SO_REUSEPORT, on by default
in grpc on Linux). Workers get disjoint shares of the usable cores (so each measures its
thread count on its own cores). The parent serves /metrics: it reads every worker's
metrics on a loopback port at scrape time and adds a `worker` label. SIGTERM goes to every
worker, which drains as a single server does, and SIGHUP too (each reads its calibration
file again); a worker that dies takes the pod down (exit
1) so that Kubernetes restarts it.

One connection always lands on one worker: a client with a single long-lived channel uses
one process. Many clients (or a client with several channels) spread out. A worker binds
the port only after its warm-up and thread measurement, so no connection reaches a worker
that cannot answer yet.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import urllib.request
from multiprocessing.connection import Connection

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from ..config import Settings, plain_settings
from ..errors import AxguardError, ConfigError

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 900.0
"""A worker loads its model and measures its threads within this (ResNets take a minute)."""


def core_shares(cores: list[int], processes: int) -> list[list[int]]:
    """Split the usable cores into `processes` disjoint, nearly equal shares (cores are
    shared round-robin when there are fewer cores than processes)."""
    if processes > len(cores):
        return [[cores[i % len(cores)]] for i in range(processes)]
    return [cores[i * len(cores) // processes:(i + 1) * len(cores) // processes]
            for i in range(processes)]


class WorkerMetrics:
    """Collects every worker's /metrics at scrape time, each sample labelled `worker`."""

    def __init__(self, ports: list[int], alive) -> None:  # noqa: ANN001  (callable)
        self.ports = ports
        self.alive = alive

    def collect(self):  # noqa: ANN201
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily("axguard_worker_up", "1 when the worker process answered the "
                               "parent's scrape.", labels=["worker"])
        for index, port in enumerate(self.ports):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode()
            except OSError:
                up.add_metric([str(index)], 0)
                continue
            up.add_metric([str(index)], 1 if self.alive(index) else 0)
            for family in text_string_to_metric_families(text):
                target = merged.setdefault(family.name, Metric(
                    family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "worker": str(index)},
                                      sample.value, sample.timestamp)
        yield up
        yield from merged.values()


def _worker(settings: Settings, index: int, cores: list[int], ready: Connection) -> None:
    """A worker process: a whole server on the shared port, reporting its metrics port."""
    from ..logs import configure_logging
    from .server import serve

    os.sched_setaffinity(0, cores)
    configure_logging(settings.log_level, settings.log_json)
    try:
        code = serve(settings, warm_first=True,
                     on_ready=lambda metrics_port: ready.send(("ready", metrics_port)))
    except AxguardError as err:
        ready.send(("failed", err.message))
        code = 2
    except Exception as err:  # noqa: BLE001  (reported to the parent, then logged)
        ready.send(("failed", f"{type(err).__name__}: {err}"))
        raise
    sys.exit(code)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def serve_processes(settings: Settings) -> int:
    """Run `server.processes` workers on one port until SIGTERM; return the exit code."""
    count = settings.server.processes
    port = settings.server.port or _free_port(settings.server.host)
    # One engine per server unless configured: the cores are already shared out.
    worker_settings = plain_settings(
        settings,
        server=settings.server.model_copy(update={
            "port": port, "processes": 1,
            "engine_processes": settings.server.engine_processes or 0}),
        metrics=settings.metrics.model_copy(update={"enabled": True, "host": "127.0.0.1",
                                                    "port": 0}))
    context = multiprocessing.get_context("spawn")
    shares = core_shares(sorted(os.sched_getaffinity(0)), count)
    workers = []
    for index, cores in enumerate(shares):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_worker, name=f"axguard-worker-{index}",
                                  args=(worker_settings, index, cores, send))
        process.start()
        send.close()  # the worker holds the only sending end: its exit reads as EOF here
        workers.append((process, receive))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def forward_hangup(*_: object) -> None:  # each worker reads its calibration again
        for process, _receive in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGHUP, forward_hangup)

    def stop_workers() -> None:
        for process, _ in workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: each drains like a single server
        for process, _ in workers:
            process.join(settings.server.grace_seconds + 30)
            if process.is_alive():
                process.kill()

    ports = []
    for index, (process, receive) in enumerate(workers):
        if not receive.poll(READY_TIMEOUT_SECONDS) or stop.is_set():
            stop_workers()
            return 1
        try:
            status, value = receive.recv()
        except EOFError:
            status, value = "failed", f"worker {index} exited with {process.exitcode}"
        if status != "ready":
            stop_workers()
            raise ConfigError(f"worker {index} did not start: {value}", field="server.processes")
        ports.append(value)
    metrics_http = None
    if settings.metrics.enabled:
        registry = CollectorRegistry()
        registry.register(WorkerMetrics(ports, lambda i: workers[i][0].is_alive()))
        metrics_http, _ = start_http_server(settings.metrics.port, settings.metrics.host,
                                            registry=registry)
    log.info("serving", extra={"address": f"{settings.server.host}:{port}",
                               "processes": count, "cores": shares})
    code = 0
    while not stop.wait(0.5):
        dead = [i for i, (process, _) in enumerate(workers) if not process.is_alive()]
        if dead:
            log.error("worker_died", extra={"workers": dead,
                                            "exit_codes": [workers[i][0].exitcode for i in dead]})
            code = 1
            break
    stop_workers()
    if metrics_http is not None:
        metrics_http.shutdown()
        metrics_http.server_close()
    if code == 0 and any(process.exitcode not in (0, -signal.SIGTERM) for process, _ in workers):
        code = 1
    log.info("stopped", extra={"exit_codes": [p.exitcode for p, _ in workers]})
    return code
