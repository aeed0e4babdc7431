"""The data plane on its own, with no gRPC at all: checks through the batcher with metrics and
receipts, label feedback counted once, a diagnosis stream, and draining. Run in a child
interpreter that asserts grpc, protobuf and the client were never imported (this test
process has them loaded through conftest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent('''
    import sys
    import tempfile
    from pathlib import Path

    import torch
    from prometheus_client import CollectorRegistry

    from axguard.config import load_settings
    from axguard.dataplane import DataPlane, DiagnoseAsk
    from axguard.demo.bundle import ASSETS, load_demo_bundle
    from axguard.demo.data import load_split
    from axguard.engine import CheckItem, Engine
    from axguard.errors import NotReady
    from axguard.calibration.artifact import load_artifact
    from axguard.metrics import Metrics

    bundle = load_demo_bundle()
    engine = Engine(bundle, calibration=load_artifact(ASSETS / "calibration.json"))
    engine.warm_up()
    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text("k1 " + "cd" * 32 + "\\n")
    settings = load_settings(feedback={"key_file": keys})
    registry = CollectorRegistry()
    metrics = Metrics(registry, model=bundle.name, class_names=bundle.class_names)
    plane = DataPlane(engine, settings, metrics)
    plane.ensure_ready()

    x, y = load_split("test").tensors(bundle.spec)
    items = [plane.resolve(CheckItem(img)) for img in x[:6]]
    with plane.arriving(len(items)) as arrival:
        results, receipts = plane.check(items, [f"r{i}" for i in range(6)], timeout=60,
                                        arrival=arrival, started=0.0)
    assert [r.class_index for r in results] == [int(v) for v in y[:6]], "predictions"
    assert all(r.verdict.calibrated for r in results) and all(receipts)
    counted = sum(registry.get_sample_value("axguard_checks_total", {
        "model": bundle.name, "predicted_class": name}) or 0 for name in bundle.class_names)
    assert counted == 6, counted

    first = plane.feedback([(receipts[0], int(y[0]))], "f1")
    again = plane.feedback([(receipts[0], int(y[0]))], "f2")
    assert first[0].counted and not again[0].counted and again[0].duplicate

    with plane.diagnosis():
        events = list(plane.diagnose(x[0], DiagnoseAsk(max_steps=3), "d1",
                                     should_stop=lambda: False, cancelled=lambda: False))
    assert events[-1].kind == "result" and events[0].kind == "progress"

    plane.draining = True
    try:
        plane.ensure_ready()
        raise AssertionError("a draining plane accepted a request")
    except NotReady as err:
        assert "shutting down" in str(err)
    plane.close()
    loaded = [m for m in ("grpc", "google.protobuf", "axguard_client") if m in sys.modules]
    assert not loaded, loaded
    print("ok")
''')


def test_the_data_plane_serves_checks_feedback_and_diagnoses_without_grpc():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
