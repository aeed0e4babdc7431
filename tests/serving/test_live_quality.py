"""Receipts, Feedback and drift through real servers, real gRPC calls and a real Prometheus."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from prometheus_run import running_prometheus

from axguard.cli import main
from axguard.demo.data import load_split
from axguard.serving.feedback import Receipt, sign_receipt
from axguard_client import AxguardClient, FailedPrecondition, InvalidArgument, ResourceExhausted
from conftest import EXAMPLES, ROOT, RunningServer, png_bytes

SECRET = "live-quality-test-secret-" + "x" * 16


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "receipt-keys"
    path.write_text(f"k1 {SECRET}\n")
    return path


@pytest.fixture(scope="module")
def replicas(demo_engine, key_file) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two replicas of the demo model sharing one receipt key file."""
    settings = {"feedback": {"key_file": key_file, "max_items": 500},
                "drift": {"window": 100, "min_items": 20}}
    a, b = RunningServer(demo_engine, settings), RunningServer(demo_engine, settings)
    yield a, b
    a.stop()
    b.stop()


def _registry(server: RunningServer):
    return server.metrics.registry


def _feedback_count(server: RunningServer, calibration_id: str, outcome: str,
                    flagged: str) -> float:
    return _registry(server).get_sample_value(
        "axguard_feedback_total", {"model": "digits-cnn", "calibration_id": calibration_id,
                                   "outcome": outcome, "flagged": flagged}) or 0.0


def test_every_answer_carries_a_receipt_another_replica_counts(replicas, hardest_wrong_digit):
    a, b = replicas
    image, label = hardest_wrong_digit
    with AxguardClient(a.target) as ca, AxguardClient(b.target) as cb:
        single = ca.check(EXAMPLES / "digit_3.png", request_id="one")
        batch = ca.check_batch([EXAMPLES / "digit_5.png", png_bytes(image), b"not an image"])
        assert single.receipt.startswith("axr1.k1.")
        assert batch[0].receipt and batch[1].receipt and not batch[2].receipt  # failed item
        assert len({single.receipt, batch[0].receipt, batch[1].receipt}) == 3
        assert batch[1].verdict.likely_wrong
        cid = single.verdict.calibration_id
        before = {(o, f): _feedback_count(b, cid, o, f)
                  for o in ("correct", "wrong") for f in ("true", "false")}
        response = cb.feedback([(single.receipt, 3), (batch[0].receipt, 5),
                                (batch[1].receipt, label)])
        assert (response.counted, response.duplicates, response.errors) == (3, 0, 0)
        results = response.results
        assert results[0].request_id == "one" and results[0].prediction_correct
        assert not results[2].prediction_correct and results[2].flagged
        assert _feedback_count(b, cid, "correct", "false") == before["correct", "false"] + 2
        assert _feedback_count(b, cid, "wrong", "true") == before["wrong", "true"] + 1
        # The same receipt again on the same replica: counted once.
        again = cb.feedback([(single.receipt, 3)])
        assert (again.counted, again.duplicates) == (0, 1) and again.results[0].duplicate
        assert _feedback_count(b, cid, "correct", "false") == before["correct", "false"] + 2


def test_a_prediction_only_receipt_counts_accuracy_without_a_flag(replicas):
    a, _ = replicas
    with AxguardClient(a.target) as client:
        response = client.check(EXAMPLES / "digit_7.png", prediction_only=True)
        before = _feedback_count(a, "none", "correct", "none")
        counted = client.feedback([(response.receipt, 7)])
    assert counted.counted == 1 and not counted.results[0].flagged
    assert _feedback_count(a, "none", "correct", "none") == before + 1


def test_each_bad_item_gets_its_own_error_naming_the_field(replicas, demo_bundle, key_file):
    a, _ = replicas
    now_ms = int(time.time() * 1e3)
    fingerprint = demo_bundle.fingerprint[:16]
    expired = sign_receipt(Receipt("old", fingerprint, "", 1, None, None,
                                   now_ms - 8 * 86400 * 1000), "k1", SECRET.encode())
    foreign = sign_receipt(Receipt("x", "0" * 16, "", 1, None, None, now_ms), "k1",
                           SECRET.encode())
    unknown_key = sign_receipt(Receipt("x", fingerprint, "", 1, None, None, now_ms), "k2",
                               SECRET.encode())
    refused = _registry(a).get_sample_value("axguard_feedback_refused_total",
                                            {"model": "digits-cnn", "reason": "expired"}) or 0
    with AxguardClient(a.target) as client:
        good = client.check(EXAMPLES / "digit_1.png").receipt
        response = client.feedback([(good + "x", 1), (good, 10), (expired, 1), (foreign, 1),
                                    (unknown_key, 1), ("", 1), (good, 1)])
        errors = [(r.error.code, r.error.message) for r in response.results]
        assert (response.counted, response.errors) == (1, 6)
        invalid, failed = grpc.StatusCode.INVALID_ARGUMENT.value[0], \
            grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert errors[0][0] == invalid and errors[0][1].startswith("items[0].receipt: ")
        assert errors[1][0] == invalid and errors[1][1].startswith("items[1].label: 10 is out")
        assert errors[2][0] == failed and "items[2].receipt: was issued" in errors[2][1]
        assert errors[3][0] == failed and "belongs to model 0000" in errors[3][1]
        assert errors[4][0] == failed and "key id 'k2'" in errors[4][1]
        assert errors[5][0] == invalid and errors[5][1].startswith("items[5].receipt: is empty")
        assert response.results[6].counted
        assert _registry(a).get_sample_value("axguard_feedback_refused_total", {
            "model": "digits-cnn", "reason": "expired"}) == refused + 1
        with pytest.raises(InvalidArgument, match="items: is empty"):
            client.feedback([])
        with pytest.raises(ResourceExhausted, match="feedback.max_items"):
            client.feedback([(good, 1)] * 501)
        info = client.model_info().feedback
        assert info.enabled and info.signing_key_id == "k1" and info.max_items == 500
        assert client.health() == "SERVING"


def test_without_a_key_receipts_are_empty_and_feedback_says_it_is_off(client):
    response = client.check(EXAMPLES / "digit_2.png")
    assert response.receipt == ""
    with pytest.raises(FailedPrecondition, match="feedback.key_file"):
        client.feedback([("axr1.k1.e30.AAAA", 2)])
    assert not client.model_info().feedback.enabled


def test_drift_gauges_and_the_calibration_promise_are_exported(replicas, demo_calibration):
    a, _ = replicas
    split = load_split("test")
    with AxguardClient(a.target) as client:
        client.check_batch([png_bytes(img) for img in split.images[:40]])
    registry = _registry(a)
    cid = demo_calibration.calibration_id
    labels = {"model": "digits-cnn", "calibration_id": cid}
    assert registry.get_sample_value("axguard_drift_window_items", labels) >= 20
    for score in ("risk", "msp", "predicted_class"):
        value = registry.get_sample_value("axguard_drift_psi", {**labels, "score": score})
        assert value is not None and 0 <= value < 5
    assert registry.get_sample_value("axguard_calibration_promise",
                                     {**labels, "mode": "false_alarm"}) == 0.05
    assert registry.get_sample_value("axguard_calibration_flagged_share", labels) == \
        pytest.approx(demo_calibration.threshold.flagged_share)
    assert registry.get_sample_value("axguard_feedback_filter_entries",
                                     {"model": "digits-cnn"}) >= 0


def test_the_feedback_command_reads_a_csv_and_names_refused_lines(replicas, tmp_path, capsys):
    a, _ = replicas
    with AxguardClient(a.target) as client:
        receipts = [client.check(EXAMPLES / f"digit_{d}.png").receipt for d in (4, 6)]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(f"receipt,label\n{receipts[0]},4\n{receipts[1]},99\nnonsense,1\n")
    code = main(["feedback", str(csv_file), "--target", a.target, "--batch", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "3 rows: 1 counted, 0 already counted, 2 refused" in out
    assert f"{csv_file}:3: label: 99 is out of range" in err
    assert f"{csv_file}:4: receipt: is not an axguard receipt" in err
    csv_file.write_text(f"{receipts[0]},4\n")
    assert main(["feedback", str(csv_file), "--target", a.target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates"] == 1
    csv_file.write_text("a,b,c\n")
    assert main(["feedback", str(csv_file), "--target", a.target]) == 2


@pytest.mark.system
def test_prometheus_sums_feedback_of_two_replicas_into_the_live_flag_quality(
        demo_engine, key_file, demo_calibration, tmp_path):
    """Checks answered by one replica, labels sent to the other, both scraped by a real
    Prometheus with the shipped rules: the recording rules see every label once.

    Fresh replicas, so every feedback series starts at 0 in Prometheus; then increase()
    stretches all series of one replica by the same factor and the rates are exact."""
    from prometheus_client import start_http_server

    settings = {"feedback": {"key_file": key_file}}
    a, b = RunningServer(demo_engine, settings), RunningServer(demo_engine, settings)
    https = [start_http_server(0, "127.0.0.1", registry=_registry(s))[0] for s in (a, b)]
    cid = demo_calibration.calibration_id
    try:
        with running_prometheus([h.server_port for h in https], tmp_path) as prometheus:
            _labels_to_the_other_replica(a, b, cid, prometheus.query)
    finally:
        for http in https:
            http.shutdown()
            http.server_close()
        a.stop()
        b.stop()


def _labels_to_the_other_replica(a: RunningServer, b: RunningServer, cid: str,
                                 query) -> None:  # noqa: ANN001
    """Checks on `a`, their labels to `b`; Prometheus's sums and rates equal the counts."""
    deadline = time.time() + 90
    while time.time() < deadline and len(query("up == 1")) < 2:
        time.sleep(0.5)
    time.sleep(2)  # a scrape with every counter at its starting value, 0
    split = load_split("test")
    with AxguardClient(a.target) as ca, AxguardClient(b.target) as cb:
        images = [png_bytes(img) for img in split.images]
        responses = ca.check_batch(images[:180]) + ca.check_batch(images[180:])
        labels = [int(y) for y in split.labels]
        sent = cb.feedback([(r.receipt, y) for r, y in zip(responses, labels, strict=True)])
    assert sent.counted == len(labels)
    want = {("correct", "true"): 0, ("correct", "false"): 0,
            ("wrong", "true"): 0, ("wrong", "false"): 0}
    for r, y in zip(responses, labels, strict=True):
        outcome = "correct" if r.prediction.class_index == y else "wrong"
        want[outcome, str(r.verdict.likely_wrong).lower()] += 1
    assert want["wrong", "true"] > 0 and want["correct", "true"] > 0
    totals, rates = {}, {}
    while time.time() < deadline:
        totals = {(r["metric"]["outcome"], r["metric"]["flagged"]): float(r["value"][1])
                  for r in query(f'sum by (outcome, flagged) (axguard_feedback_total'
                                 f'{{calibration_id="{cid}"}})')}
        rates = {name: query(f'axguard:{name}:1d{{calibration_id="{cid}"}}')
                 for name in ("live_false_alarm_rate", "live_error_recall",
                              "live_precision", "live_false_alarm_rate_lower95")}
        if totals == want and all(rates.values()):
            time.sleep(2)  # let the rules evaluate on the final scrape
            rates = {name: query(f'axguard:{name}:1d{{calibration_id="{cid}"}}')
                     for name in rates}
            break
        time.sleep(1)
    assert totals == want
    got = {name: float(r[0]["value"][1]) for name, r in rates.items()}
    correct = want["correct", "true"] + want["correct", "false"]
    wrong = want["wrong", "true"] + want["wrong", "false"]
    flagged = want["correct", "true"] + want["wrong", "true"]
    assert got["live_false_alarm_rate"] == pytest.approx(want["correct", "true"] / correct)
    assert got["live_error_recall"] == pytest.approx(want["wrong", "true"] / wrong)
    assert got["live_precision"] == pytest.approx(want["wrong", "true"] / flagged)
    assert got["live_false_alarm_rate_lower95"] < got["live_false_alarm_rate"]
    # The promise holds on these 360 held-out digits: its alert expression is false.
    promise = next(r for g in _rules()["groups"] for r in g["rules"]
                   if r.get("alert") == "AxguardFlagPromiseBroken")
    assert query(promise["expr"]) == []


def _rules() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "deploy" / "prometheus" / "axguard-rules.yaml").read_text())
