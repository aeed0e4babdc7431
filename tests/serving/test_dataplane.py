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
    from axguard.demo.bundle import ASSETS, load_demo_bundle
    from axguard.demo.data import load_split
    from axguard.engine import CheckItem, Engine
    from axguard.errors import InputTooLarge, InvalidInput, NotFound, NotReady, field_within
    from axguard.flag import load_artifact
    from axguard.serving import DataPlane, DiagnoseAsk, Metrics

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
    answers = plane.check_request(6, lambda i: CheckItem(x[i]), [f"r{i}" for i in range(6)],
                                  timeout=60)
    results = [a.result for a in answers.items]
    receipts = [a.receipt for a in answers.items]
    assert [a.request_id for a in answers.items] == [f"r{i}" for i in range(6)]
    assert [r.class_index for r in results] == [int(v) for v in y[:6]], "predictions"
    assert 0 <= answers.decode_ms <= answers.total_ms
    assert all(r.verdict.calibrated for r in results) and all(receipts)
    counted = sum(registry.get_sample_value("axguard_checks_total", {
        "model": bundle.name, "predicted_class": name}) or 0 for name in bundle.class_names)
    assert counted == 6, counted

    first = plane.feedback([(receipts[0], int(y[0]))], "f1")
    again = plane.feedback([(receipts[0], int(y[0]))], "f2")
    assert first[0].counted and not again[0].counted and again[0].duplicate

    # One bad item of a separately answered request fails alone, named by the caller's
    # field names; without `separate` it fails the request.
    def decode(i):
        return CheckItem(x[i] if i != 1 else torch.full_like(x[i], float("nan")))

    def names(i, field):
        return field_within(f"requests[{i}]", field)

    mixed = plane.check_request(3, decode, ["a", "b", "c"], timeout=60, field_names=names,
                                separate=True)
    assert mixed.items[0].result is not None and mixed.items[2].result is not None
    assert mixed.items[1].error.field == "requests[1].image", mixed.items[1].error.field
    assert not mixed.items[1].receipt
    try:
        plane.check_request(3, decode, ["a", "b", "c"], timeout=60, field_names=names)
        raise AssertionError("a bad item did not fail the whole request")
    except InvalidInput as err:
        assert err.field == "requests[1].image", err.field
    for count, error in ((0, InvalidInput), (settings.server.max_batch_items + 1,
                                             InputTooLarge)):
        try:
            plane.check_request(count, decode, ["x"] * count, timeout=60)
            raise AssertionError(f"{count} items were accepted")
        except error as err:
            assert err.field == "requests", err.field

    described = plane.describe(bundle.name)
    assert described.ready and described.calibration is not None
    assert described.default_pairs == tuple((m, "sum") for m in engine.default_methods)
    try:
        plane.describe("another-model")
        raise AssertionError("another model's name was accepted")
    except NotFound as err:
        assert err.field == "name"

    events = list(plane.diagnose_request(lambda: (x[0], DiagnoseAsk(max_steps=3)), "d1",
                                         should_stop=lambda: False, cancelled=lambda: False))
    assert events[-1].kind == "result" and events[0].kind == "progress"
    assert torch.equal(events[-1].image, x[0])

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
