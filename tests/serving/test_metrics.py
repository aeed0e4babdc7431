"""Prometheus metrics through real gRPC calls; /metrics over HTTP; graceful shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_run import running_prometheus

from axguard.serving.metrics import Metrics
from axguard_client import AxguardClient, InvalidArgument
from conftest import EXAMPLES, ROOT, RunningServer, png_bytes


@pytest.fixture()
def server(demo_engine):
    running = RunningServer(demo_engine)
    yield running
    running.stop()


def value(server, name: str, **labels: str) -> float:
    registry = server.metrics.registry
    return registry.get_sample_value(name, labels) or 0.0


def test_checks_flags_and_rpc_codes_are_counted(server, demo_engine, hardest_wrong_digit):
    with AxguardClient(server.target, timeout=60) as client:
        for _ in range(3):
            client.check(EXAMPLES / "digit_3.png")
        flagged = client.check(png_bytes(hardest_wrong_digit[0]))
        assert flagged.verdict.likely_wrong
        with pytest.raises(InvalidArgument):
            client.check(b"junk")
        client.model_info()
    model = "digits-cnn"
    assert value(server, "axguard_checks_total", model=model, predicted_class="3") == 3
    cls = flagged.prediction.class_name
    assert value(server, "axguard_flagged_total", model=model, predicted_class=cls) == 1
    assert value(server, "axguard_grpc_requests_total", grpc_method="Check",
                 grpc_code="OK") == 4
    assert value(server, "axguard_grpc_requests_total", grpc_method="Check",
                 grpc_code="INVALID_ARGUMENT") == 1
    assert value(server, "axguard_grpc_requests_total", grpc_method="GetModelInfo",
                 grpc_code="OK") == 1
    assert value(server, "axguard_co_score_count", model=model, method="saliency") == 4
    assert value(server, "axguard_risk_score_count", model=model) == 4
    assert value(server, "axguard_check_duration_seconds_count", model=model,
                 stage="total") == 4
    assert value(server, "axguard_grpc_request_duration_seconds_count",
                 grpc_method="Check") == 5
    assert value(server, "axguard_inflight_requests", model=model) == 0
    assert value(server, "axguard_batch_size_count", model=model) == 4
    assert value(server, "axguard_model_info", model=model, version="1",
                 fingerprint=demo_engine.bundle.fingerprint,
                 calibration_id=demo_engine.calibration.calibration_id) == 1
    assert value(server, "axguard_calibration_loaded", model=model) == 1
    assert value(server, "axguard_queue_depth", model=model) == 0


def test_diagnose_and_engine_counters(server):
    with AxguardClient(server.target, timeout=60) as client:
        list(client.diagnose(EXAMPLES / "digit_2.png", max_steps=5, target_co=1e9))
        client.check(EXAMPLES / "digit_2.png", methods=["deep_lift"])
    assert value(server, "axguard_diagnose_steps_count", model="digits-cnn",
                 reached_target="false") == 1
    assert value(server, "axguard_diagnose_duration_seconds_count", model="digits-cnn") == 1
    assert value(server, "axguard_grpc_requests_total", grpc_method="Diagnose",
                 grpc_code="OK") == 1
    assert value(server, "axguard_captum_fallback_total", model="digits-cnn",
                 method="deep_lift") >= 1


def test_class_labels_are_capped():
    from prometheus_client import CollectorRegistry

    from axguard.engine.core import CheckResult

    registry = CollectorRegistry()
    metrics = Metrics(registry, model="big", class_names=[str(i) for i in range(1000)],
                      max_class_labels=50)
    metrics.observe_check(CheckResult(7, "7", 0.9, [], [], []), 0.0, 0.01)
    assert registry.get_sample_value("axguard_checks_total",
                                     {"model": "big", "predicted_class": "other"}) == 1


def serve_subprocess(*extra: str) -> tuple[subprocess.Popen, dict[str, str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "axguard.cli", "serve", "--port", "0",
                             "--metrics-port", "0", "--max-workers", "16", *extra],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    addresses: dict[str, str] = {}
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] in ("metrics", "serving"):
                addresses[event["event"]] = event["address"]
            if event["event"] == "serving":
                break
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, addresses, lines


def test_metrics_endpoint_and_graceful_shutdown():
    proc, addresses, lines = serve_subprocess("--grace-seconds", "20")
    try:
        with AxguardClient(addresses["serving"], timeout=60) as client:
            client.check(EXAMPLES / "digit_5.png")
        body = urllib.request.urlopen(f"http://{addresses['metrics']}/metrics",
                                      timeout=10).read().decode()
        assert 'axguard_checks_total{model="digits-cnn",predicted_class="5"} 1.0' in body
        assert "axguard_model_info{" in body and "# TYPE axguard_risk_score histogram" in body

        # A stream of requests from several threads; SIGTERM in the middle.
        outcomes: list[str] = []
        lock = threading.Lock()
        stop_at = time.time() + 60

        def worker() -> None:
            with AxguardClient(addresses["serving"], timeout=30) as c:
                while time.time() < stop_at:
                    try:
                        c.check(EXAMPLES / "digit_7.png")
                        result = "ok"
                    except Exception as err:  # noqa: BLE001  (classified below)
                        code = getattr(err, "code", None)
                        result = code.name if isinstance(code, grpc.StatusCode) else repr(err)
                    with lock:
                        outcomes.append(result)
                    if result != "ok":
                        return

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        while len(outcomes) < 30:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert proc.wait(timeout=60) == 0
        assert set(outcomes) <= {"ok", "UNAVAILABLE"}, set(outcomes)
        assert outcomes.count("ok") >= 30
        proc.reader.join(timeout=10)  # type: ignore[attr-defined]
        events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
        assert events.index("draining") < events.index("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.system
def test_real_prometheus_scrapes_the_flag_and_the_alert_expression_sees_it(
        server, hardest_wrong_digit, tmp_path):
    """Service + a real Prometheus on loopback: flagged checks reach Prometheus's API."""
    from prometheus_client import start_http_server

    metrics_http, _ = start_http_server(0, "127.0.0.1",
                                        registry=server.metrics.registry)
    try:
        with running_prometheus([metrics_http.server_port], tmp_path) as prometheus, \
                AxguardClient(server.target, timeout=60) as client:
            deadline = time.time() + 60
            flagged_class = None
            while time.time() < deadline:
                for _ in range(5):
                    client.check(EXAMPLES / "digit_0.png")
                response = client.check(png_bytes(hardest_wrong_digit[0]))
                assert response.verdict.likely_wrong
                flagged_class = response.prediction.class_name
                flagged = prometheus.query("axguard_flagged_total")
                share = prometheus.query(
                    'sum by (model, predicted_class) (rate(axguard_flagged_total[10m])) / '
                    'sum by (model, predicted_class) (rate(axguard_checks_total[10m])) > 0.2')
                if flagged and share:
                    break
                time.sleep(1)
        assert any(r["metric"]["predicted_class"] == flagged_class and float(r["value"][1]) >= 1
                   for r in flagged), flagged
        # The AxguardFlaggedShareHigh expression (before its `for: 10m`) sees that class.
        assert [r["metric"]["predicted_class"] for r in share] == [flagged_class]
    finally:
        metrics_http.shutdown()
        metrics_http.server_close()
