"""Hot swap of the calibration: a new file renamed into place under load is served within
the poll with no failed request, from the serving process and its engine process alike; a
broken file or another model's calibration is refused and the old one keeps serving;
SIGHUP reads the file at once; health stays SERVING."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from axguard.config import load_settings
from axguard.demo.bundle import ASSETS
from axguard.flag.artifact import load_artifact, save_artifact
from axguard.transport.server import build_server, start_serving, watch_calibration
from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

DIGIT = EXAMPLES / "digit_3.png"


def rename_into_place(artifact, target):
    """Write the artifact beside `target` and rename it over it (one atomic step)."""
    staged = target.with_name(f".{target.name}.new")
    save_artifact(artifact, staged)
    os.replace(staged, target)


def another(artifact, threshold: float):
    """The artifact with another threshold and the id that content has."""
    changed = artifact.with_threshold(threshold)
    return changed.model_copy(update={"calibration_id": changed.content_id()})


def wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def swapping(tmp_path):
    """A real server (one engine process beside it) serving a calibration file it polls
    every 0.2 s, and the file."""
    from axguard.builder import build_engine

    path = tmp_path / "calibration.json"
    shutil.copy(ASSETS / "calibration.json", path)
    settings = load_settings(server={"host": "127.0.0.1", "port": 0, "engine_processes": 1},
                             model={"source": "demo"}, calibration=str(path),
                             calibration_poll_seconds=0.2)
    parts = build_server(settings, build_engine(settings))
    start_serving(parts, settings)
    watcher = watch_calibration(parts, settings)
    try:
        yield parts, path
    finally:
        watcher.close()
        parts.server.stop(None)
        parts.plane.close()
        parts.engines.close()


def test_a_renamed_in_calibration_is_served_under_load_and_a_broken_one_refused(swapping):
    parts, path = swapping
    old = load_artifact(path)
    new = another(old, 0.5)
    assert new.calibration_id != old.calibration_id
    seen: list[str] = []
    failures: list[BaseException] = []
    health: list[int] = []
    stop = threading.Event()
    target = f"127.0.0.1:{parts.port}"

    def load() -> None:
        with AxguardClient(target, timeout=30) as client:
            while not stop.is_set():
                try:
                    seen.append(client.check(DIGIT).verdict.calibration_id)
                except Exception as err:  # noqa: BLE001  (every failure is a test failure)
                    failures.append(err)

    def watch_health() -> None:
        import grpc

        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                health.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
                time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(8)]
    threads.append(threading.Thread(target=watch_health))
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(seen) > 40)
        rename_into_place(new, path)
        assert wait_for(lambda: seen[-8:] == [new.calibration_id] * 8), seen[-20:]
        # A broken file and another model's calibration: refused, the new one serves on.
        path.write_text("{ not json")
        other = new.model_copy(update={"model": new.model.model_copy(
            update={"fingerprint": "0" * 64})})
        registry = parts.metrics.registry
        refused = {"model": "digits-cnn", "outcome": "refused"}
        assert wait_for(lambda: registry.get_sample_value(
            "axguard_calibration_reloads_total", refused) == 1)
        rename_into_place(other, path)
        assert wait_for(lambda: registry.get_sample_value(
            "axguard_calibration_reloads_total", refused) == 2)
        count = len(seen)
        assert wait_for(lambda: len(seen) > count + 40)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:3]
    # Every answer carries one of the two ids, the old ones first; none after the swap is old.
    switch = seen.index(new.calibration_id)
    assert set(seen[:switch]) == {old.calibration_id}
    assert set(seen[switch:]) == {new.calibration_id}
    assert set(health) == {health_pb2.HealthCheckResponse.SERVING}
    registry = parts.metrics.registry
    assert registry.get_sample_value("axguard_calibration_reloads_total",
                                     {"model": "digits-cnn", "outcome": "swapped"}) == 1
    # Metrics and drift follow the new calibration.
    assert registry.get_sample_value("axguard_model_info", {
        "model": "digits-cnn", "version": "1", "fingerprint": old.model.fingerprint,
        "calibration_id": new.calibration_id}) == 1
    assert registry.get_sample_value("axguard_model_info", {
        "model": "digits-cnn", "version": "1", "fingerprint": old.model.fingerprint,
        "calibration_id": old.calibration_id}) is None
    assert parts.plane.live.drift.reference.calibration_id == new.calibration_id
    assert parts.plane.engine.calibration.calibration_id == new.calibration_id


def test_sighup_reads_the_calibration_at_once(tmp_path):
    path = tmp_path / "calibration.json"
    shutil.copy(ASSETS / "calibration.json", path)
    new = another(load_artifact(path), 0.6)
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "axguard.cli", "serve", "--port", "0", "--metrics-port",
             "0", "--calibration", str(path), "--set", "calibration_poll_seconds=0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            assert wait_for(lambda: '"serving"' in log.read_text(), 120), log.read_text()
            address = next(json.loads(line)["address"] for line in log.read_text().splitlines()
                           if line.startswith("{") and '"serving"' in line)
            with AxguardClient(address, timeout=30) as client:
                before = client.check(DIGIT).verdict.calibration_id
                rename_into_place(new, path)
                time.sleep(0.5)  # no polling: still the old one
                assert client.check(DIGIT).verdict.calibration_id == before
                proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: '"calibration_swapped"' in log.read_text(), 30)
                assert client.check(DIGIT).verdict.calibration_id == new.calibration_id
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
