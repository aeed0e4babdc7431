"""The shared duplicate filter on a real Redis (Debian's redis-server on loopback): a label
sent to replica 1, then to replica 2, then to replica 1 after a restart counts once; with
the store down Feedback answers UNAVAILABLE, nothing is counted, and the metric says so."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_run import free_port

from axguard.config import load_settings
from axguard_client import AxguardClient
from axguard_client.errors import Unavailable
from conftest import EXAMPLES, RunningServer

pytestmark = pytest.mark.system
SECRET = "s" * 44


@pytest.fixture()
def redis_url(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed: `make test` installs it (Debian package)"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.terminate()
    proc.wait(timeout=10)


def counted(server: RunningServer) -> float:
    registry = server.metrics.registry
    return sum(registry.get_sample_value("axguard_feedback_total", {
        "model": "digits-cnn", "calibration_id": cid, "outcome": o, "flagged": f}) or 0.0
        for cid in (server.engine.calibration.calibration_id, "none")
        for o in ("correct", "wrong") for f in ("true", "false", "none"))


def test_a_label_counts_once_across_replicas_and_restarts(demo_engine, tmp_path, redis_url):
    url, _ = redis_url
    keys = tmp_path / "keys"
    keys.write_text(f"k1 {SECRET}\n")
    settings = {"feedback": {"key_file": keys, "store": url}}
    assert load_settings(**settings).feedback.store == url
    one, two = RunningServer(demo_engine, settings), RunningServer(demo_engine, settings)
    try:
        with AxguardClient(one.target) as c1, AxguardClient(two.target) as c2:
            receipt = c1.check(EXAMPLES / "digit_3.png").receipt
            first = c1.feedback([(receipt, 3)])
            assert (first.counted, first.duplicates) == (1, 0)
            second = c2.feedback([(receipt, 3)])
            assert (second.counted, second.duplicates) == (0, 1)
        one.stop()
        one = RunningServer(demo_engine, settings)  # a restart: a new process's memory
        with AxguardClient(one.target) as c1:
            third = c1.feedback([(receipt, 3)])
            assert (third.counted, third.duplicates) == (0, 1)
        assert counted(one) == 0 and counted(two) == 0  # the restarted one and replica 2
    finally:
        one.stop()
        two.stop()


def test_with_the_store_down_feedback_is_unavailable_and_nothing_counts(demo_engine, tmp_path,
                                                                        redis_url):
    url, proc = redis_url
    keys = tmp_path / "keys"
    keys.write_text(f"k1 {SECRET}\n")
    server = RunningServer(demo_engine, {"feedback": {"key_file": keys, "store": url}})
    try:
        with AxguardClient(server.target, retry=None) as client:
            receipt = client.check(EXAMPLES / "digit_5.png").receipt
            proc.terminate()
            proc.wait(timeout=10)
            with pytest.raises(Unavailable, match="feedback.store"):
                client.feedback([(receipt, 5)])
            assert client.check(EXAMPLES / "digit_5.png").prediction.class_index == 5
        registry = server.metrics.registry
        assert registry.get_sample_value("axguard_feedback_store_errors_total",
                                         {"model": "digits-cnn"}) == 1
        assert counted(server) == 0
    finally:
        server.stop()
