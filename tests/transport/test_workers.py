"""Several server processes on one port: connections spread over them, /metrics merges
them with a `worker` label, SIGTERM drains every one and the parent exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_run import free_port

from axguard.transport.workers import core_shares
from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

# Several server processes on one port.
pytestmark = pytest.mark.system


def test_cores_are_split_into_disjoint_shares():
    assert core_shares([0, 1], 2) == [[0], [1]]
    assert core_shares([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3, 4]]
    assert core_shares([0, 1], 3) == [[0], [1], [0]]  # more processes than cores: shared


def test_two_processes_share_the_port_and_the_metrics(tmp_path):
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "axguard.cli", "serve", "--processes", "2", "--port",
             str(port), "--metrics-port", str(metrics_port)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            target = f"127.0.0.1:{port}"
            deadline = time.time() + 180
            text = ""
            while time.time() < deadline and 'axguard_worker_up{worker="1"} 1.0' not in text:
                assert proc.poll() is None, log.read_text()
                try:
                    text = urllib.request.urlopen(
                        f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
                except OSError:
                    time.sleep(0.5)
            assert 'axguard_worker_up{worker="0"} 1.0' in text
            # Each client its own connection: the kernel spreads connections over workers.
            for _ in range(24):
                with AxguardClient(target, channel_options=[
                        ("grpc.use_local_subchannel_pool", 1)]) as client:
                    response = client.check(EXAMPLES / "digit_3.png")
                    assert response.prediction.class_index == 3
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=5).read().decode()
            checks = {}
            for line in text.splitlines():
                if line.startswith("axguard_checks_total{"):
                    worker = line.split('worker="')[1].split('"')[0]
                    checks[worker] = checks.get(worker, 0) + float(line.rsplit(" ", 1)[1])
            assert sum(checks.values()) == 24 and set(checks) == {"0", "1"}, checks
            assert all(v > 0 for v in checks.values()), checks
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-2000:]
    assert '"exit_codes": [0, 0]' in log.read_text()
