"""One client, several replicas: calls spread over every address of the target, a replica
that drains on SIGTERM costs no failed call, and the servers' maximum connection age lets a
client behind a connection-pinning proxy (a ClusterIP Service) reach a replica added later.

Three real `axguard serve` processes on loopback; which replica answered is read from each
one's own /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_run import free_port

from axguard_client import AsyncAxguardClient, AxguardClient
from conftest import EXAMPLES, ROOT

# Three `axguard serve` processes.
pytestmark = pytest.mark.system

DIGIT = (EXAMPLES / "digit_3.png").read_bytes()
# Short connection ages, so the rebalancing test sees a reconnect within seconds and every
# other test here runs through many GOAWAYs.
CONNECTION_AGE = "1"


@dataclass
class Replica:
    proc: subprocess.Popen
    address: str
    metrics_port: int
    log: Path

    def answered(self, method: str = "Check") -> float:
        """Calls of `method` this replica answered OK, from its /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "axguard_grpc_requests":
                return sum(s.value for s in family.samples if s.name.endswith("_total")
                           and s.labels == {"grpc_method": method, "grpc_code": "OK"})
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def start_replica(folder: Path, name: str, connection_age: str | None = CONNECTION_AGE
                  ) -> Replica:
    """Start `axguard serve` on free ports (`connection_age`: None keeps the default)."""
    port, metrics_port = free_port(), free_port()
    log = folder / f"{name}.log"
    age = [] if connection_age is None else [
        "--set", f"server.max_connection_age_seconds={connection_age}",
        "--set", "server.max_connection_age_grace_seconds=5"]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port),
             "--metrics-port", str(metrics_port), "--log-level", "WARNING", *age],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ))
    return Replica(proc, f"127.0.0.1:{port}", metrics_port, log)


def wait_serving(replica: Replica) -> None:
    deadline = time.time() + 180
    with AxguardClient(replica.address, timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return
            except Exception:  # noqa: BLE001  (still starting)
                pass
            assert replica.proc.poll() is None, replica.log.read_text()
            assert time.time() < deadline, f"{replica.address} did not start"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[list[Replica]]:
    folder = tmp_path_factory.mktemp("replicas")
    started = [start_replica(folder, name) for name in "abc"]
    try:
        for replica in started:
            wait_serving(replica)
        yield started
    finally:
        for replica in started:
            replica.stop()
        for replica in started:
            assert '"rpc_failed"' not in replica.log.read_text()


def all_of(replicas: list[Replica]) -> str:
    """The target a headless Service's DNS name resolves to: every replica's address."""
    return "ipv4:" + ",".join(r.address for r in replicas)


def test_one_client_spreads_its_checks_over_every_replica(replicas):
    before = [r.answered() for r in replicas]
    with AxguardClient(all_of(replicas), timeout=30) as client:
        for _ in range(300):
            client.check(DIGIT)
    shares = [(r.answered() - b) / 300 for r, b in zip(replicas, before, strict=True)]
    assert sum(shares) == pytest.approx(1.0)
    assert min(shares) >= 0.2, shares


def test_the_async_client_spreads_too(replicas):
    import asyncio

    async def run() -> None:
        async with AsyncAxguardClient(all_of(replicas), timeout=30) as client:
            for _ in range(10):
                await asyncio.gather(*(client.check(DIGIT) for _ in range(9)))

    before = [r.answered() for r in replicas]
    asyncio.run(run())
    gained = [r.answered() - b for r, b in zip(replicas, before, strict=True)]
    assert sum(gained) == 90 and min(gained) >= 18, gained


class ConnectionProxy:
    """A TCP proxy that sends each new connection to the next backend in turn, as
    kube-proxy does for a ClusterIP Service: a connection, once made, stays on its pod."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = list(backends)
        self._next = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.backends[self._next % len(self.backends)].rsplit(":", 1)
            self._next += 1
            try:
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                downstream.close()
                continue
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is read by one pump, which closes it

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def test_the_connection_age_brings_a_pinned_client_to_a_replica_added_later(replicas):
    first, added = replicas[0], replicas[1]
    proxy = ConnectionProxy([first.address])
    try:
        with AxguardClient(proxy.address, timeout=30) as client:
            client.check(DIGIT)  # connected: pinned to the first replica
            proxy.backends.append(added.address)  # the scale-up
            before = added.answered()
            failures, deadline = 0, time.time() + 30
            while added.answered() - before < 5 and time.time() < deadline:
                try:
                    client.check(DIGIT)
                except Exception:  # noqa: BLE001  (counted: there must be none)
                    failures += 1
            assert added.answered() - before >= 5, "the client never reached the new replica"
            assert failures == 0
    finally:
        proxy.close()


def test_a_replica_stopped_under_load_costs_no_failed_call(replicas):
    """Last in this module: it stops one of the three replicas."""
    stopped, staying = replicas[2], replicas[:2]
    calls, failures, stop = [0], [], threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with AxguardClient(all_of(replicas), timeout=30) as client:
            while not stop.is_set():
                try:
                    client.check(DIGIT)
                    with lock:
                        calls[0] += 1
                except Exception as err:  # noqa: BLE001  (recorded: there must be none)
                    failures.append(repr(err))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    answered_before_stop = stopped.answered()
    assert answered_before_stop > 0
    staying_before = [r.answered() for r in staying]
    code = stopped.stop()  # SIGTERM, as in a rolling update; returns once it exited
    calls_at_exit = calls[0]
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert code == 0
    assert failures == [], failures[:5]
    assert calls[0] > calls_at_exit + 20  # the load went on without it
    assert all(r.answered() > b for r, b in zip(staying, staying_before, strict=True))
