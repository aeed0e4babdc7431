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
from fuzzing import FUZZ_KEY_ID, FUZZ_SECRET, hostile_cases, nonfinite_model_cases, run_cases

from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

REQUESTS = int(os.environ.get("AXGUARD_FUZZ_REQUESTS", "3000"))
REPORT = os.environ.get("AXGUARD_FUZZ_REPORT")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def start_server(folder: Path, *args: str, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, str, Path]:
    """Start `axguard serve` in its own process on a free port; wait until it answers a
    Check; return (process, target, its log file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "server.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port),
             "--metrics-port", "0", "--log-level", "WARNING", *args], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})})
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
    return proc, target, log


def stop_server(proc: subprocess.Popen, log: Path) -> None:
    proc.terminate()
    proc.wait(30)
    # Nothing the fuzz sent is the server's bug: no unexpected error was logged.
    assert '"rpc_failed"' not in log.read_text()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    keys = folder / "receipt-keys"
    keys.write_text(f"{FUZZ_KEY_ID} {FUZZ_SECRET}\n")
    proc, target, log = start_server(folder, "--feedback-key-file", str(keys))
    yield proc, target
    stop_server(proc, log)


@pytest.fixture(scope="module")
def nonfinite_server(tmp_path_factory):
    """A user's model whose outputs are NaN or Inf for marked images (nonfinite_model.py)."""
    import torch
    from nonfinite_model import MEAN, STD, demo_weights

    from axguard.demo.bundle import ASSETS

    folder = tmp_path_factory.mktemp("fuzz-nonfinite")
    torch.save(demo_weights(), folder / "weights.pt")
    config = folder / "axguard.yaml"
    config.write_text(
        "model:\n  source: nonfinite_model:build\n"
        f"  weights: {folder / 'weights.pt'}\n  classes: {ASSETS / 'classes.txt'}\n"
        f"  input_size: [32, 32]\n  mean: [{MEAN}, {MEAN}, {MEAN}]\n"
        f"  std: [{STD}, {STD}, {STD}]\n  name: nonfinite\n"
        "calibration: none\n")
    tests = str(ROOT / "tests")
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    proc, target, log = start_server(folder, "--config", str(config),
                                     env={"PYTHONPATH": path})
    yield proc, target
    stop_server(proc, log)


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
    assert len(kinds) == 20  # every kind of case was sent
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


def test_a_model_that_returns_nan_or_inf_never_answers_ok_with_them(nonfinite_server):
    """Valid requests to a user's model that is not finite on some inputs: those items get
    INVALID_ARGUMENT (alone in a batch), every OK answer holds only finite numbers, and the
    server keeps serving (make fuzz: AXGUARD_FUZZ_REQUESTS // 5 of them)."""
    proc, target = nonfinite_server
    count = max(REQUESTS // 5, 100)
    cases = list(nonfinite_model_cases(seed=0, count=count))
    with grpc.insecure_channel(target) as channel:
        report = run_cases(channel, cases)
    assert proc.poll() is None, "the server died"
    assert report.violations == [], report.violations[:20]
    codes = {code for _, code in report.codes}
    assert {"OK", "INVALID_ARGUMENT"} <= codes, report.codes
    assert len({kind for kind, _ in report.codes}) == 5
    with AxguardClient(target, timeout=30) as client:
        assert client.check(EXAMPLES / "digit_3.png").prediction.class_name == "3"
    if REPORT:
        path = Path(REPORT).with_name("fuzz_nonfinite.json")
        path.write_text(json.dumps({
            "requests": report.sent, "violations": len(report.violations),
            "codes": {f"{k} {c}": n for (k, c), n in sorted(report.codes.items())}},
            indent=1) + "\n")
