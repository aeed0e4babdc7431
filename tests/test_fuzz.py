"""Hostile requests against a real server process: documented codes only, never INTERNAL or
UNKNOWN, still serving afterwards, bounded memory. `make test` sends a fast subset;
`make fuzz` the whole run (AXGUARD_FUZZ_REQUESTS, default 10,000 there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from fuzzing import FUZZ_KEY_ID, FUZZ_SECRET, hostile_cases, run_cases

from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

REQUESTS = int(os.environ.get("AXGUARD_FUZZ_REQUESTS", "3000"))
REPORT = os.environ.get("AXGUARD_FUZZ_REPORT")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("fuzz")
    log = folder / "server.log"
    keys = folder / "receipt-keys"
    keys.write_text(f"{FUZZ_KEY_ID} {FUZZ_SECRET}\n")
    stderr = open(log, "w")  # noqa: SIM115  (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port), "--metrics-port",
         "0", "--log-level", "WARNING", "--feedback-key-file", str(keys)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=stderr)
    target = f"127.0.0.1:{port}"
    with AxguardClient(target, timeout=5) as client:
        deadline = time.time() + 120
        while True:
            try:
                client.health()
                client.check(EXAMPLES / "digit_0.png")
                break
            except Exception:  # noqa: BLE001  (still starting)
                assert proc.poll() is None, log.read_text()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.3)
    yield proc, target
    proc.terminate()
    proc.wait(30)
    stderr.close()
    # Nothing the fuzz sent is the server's bug: no unexpected error was logged.
    assert '"rpc_failed"' not in log.read_text()


def test_hostile_requests_get_documented_codes_and_the_server_keeps_serving(server_process):
    proc, target = server_process
    cases = list(hostile_cases(seed=0, count=REQUESTS))
    baseline = rss_mib(proc.pid)
    started = time.time()
    with grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        report = run_cases(channel, cases)
    seconds = time.time() - started
    after = rss_mib(proc.pid)
    assert proc.poll() is None, "the server died"
    assert report.violations == [], report.violations[:20]
    assert report.sent == REQUESTS and sum(report.codes.values()) == REQUESTS
    kinds = {kind for kind, _ in report.codes}
    assert len(kinds) == 19  # every kind of case was sent
    infer_codes = {code for kind, code in report.codes if kind == "model_infer"}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= infer_codes, infer_codes
    with AxguardClient(target, timeout=30) as client:
        for digit in ("3", "7"):
            response = client.check(EXAMPLES / f"digit_{digit}.png")
            assert response.prediction.class_name == digit
    assert after - baseline < 300, f"RSS grew from {baseline:.0f} to {after:.0f} MiB"
    if REPORT:
        summary = {"requests": report.sent, "seconds": round(seconds, 1), "threads": 8,
                   "rss_mib_before": round(baseline), "rss_mib_after": round(after),
                   "codes": {f"{k} {c}": n for (k, c), n in sorted(report.codes.items())},
                   "violations": len(report.violations)}
        Path(REPORT).write_text(json.dumps(summary, indent=1) + "\n")
