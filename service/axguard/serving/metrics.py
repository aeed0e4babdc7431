"""Prometheus metrics of the service: a class that receives its CollectorRegistry.

Labels stay low-cardinality: model, method, stage, gRPC method and code, and the predicted
class name only for models with at most `max_class_labels` classes (else "other"). Never a
request id. Histograms (not summaries), so percentiles aggregate across replicas.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import OUTPUT_STAGES

# CO scores of typical CNNs lie within ±100 (demo: 10–60; the paper's ImageNet target 48).
CO_BUCKETS = (-50, -20, -10, -5, 0, 5, 10, 20, 30, 40, 50, 60, 80, 100, 150)
RISK_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
# From a 1 ms small-model check to a multi-second ResNet batch on a CPU.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000)
DIAGNOSE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STAGES = ("queue", "forward", "attribution", "ax", "total")


class Metrics:
    """Every metric axguard exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry, *, model: str, class_names: list[str],
                 max_class_labels: int = 50) -> None:
        self.registry = registry
        self.model = model
        self._class_label = (
            (lambda name: name) if len(class_names) <= max_class_labels
            else (lambda name: "other"))
        r = registry
        self.checks = Counter("axguard_checks", "Checked predictions.",
                              ["model", "predicted_class"], registry=r)
        self.flagged = Counter("axguard_flagged", "Predictions flagged as likely wrong.",
                               ["model", "predicted_class"], registry=r)
        self.co_score = Histogram("axguard_co_score", "Label-free CO scores.",
                                  ["model", "method"], buckets=CO_BUCKETS, registry=r)
        self.risk = Histogram("axguard_risk_score", "Calibrated risk of calibrated checks.",
                              ["model"], buckets=RISK_BUCKETS, registry=r)
        self.duration = Histogram("axguard_check_duration_seconds",
                                  "Seconds per check stage (batch stages per request).",
                                  ["model", "stage"], buckets=SECONDS_BUCKETS, registry=r)
        self.batch_size = Histogram("axguard_batch_size",
                                    "Engine batch size each checked image ran in.",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.diagnose_duration = Histogram("axguard_diagnose_duration_seconds",
                                           "Seconds per finished GAX diagnosis.", ["model"],
                                           buckets=DIAGNOSE_BUCKETS, registry=r)
        self.diagnose_steps = Histogram("axguard_diagnose_steps", "Steps per GAX diagnosis.",
                                        ["model", "reached_target"], buckets=STEP_BUCKETS,
                                        registry=r)
        self.inflight = Gauge("axguard_inflight_requests", "RPCs being handled.", ["model"],
                              registry=r)
        self.model_info = Gauge("axguard_model_info", "The served model (value 1).",
                                ["model", "version", "fingerprint", "calibration_id"],
                                registry=r)
        self.calibrated = Gauge("axguard_calibration_loaded",
                                "1 when a calibration is loaded, else 0.", ["model"],
                                registry=r)
        self.rpcs = Counter("axguard_grpc_requests", "RPCs by method and status code.",
                            ["grpc_method", "grpc_code"], registry=r)
        self.auth_refused = Counter("axguard_auth_refused",
                                    "RPCs refused for a missing or invalid bearer token.",
                                    ["grpc_method"], registry=r)
        self.feedback = Counter(
            "axguard_feedback", "Labels counted from Feedback, by the calibration that made "
            "the verdict, whether the prediction was right, and whether it was flagged "
            '("none": the check had no calibrated verdict).',
            ["model", "calibration_id", "outcome", "flagged"], registry=r)
        self.feedback_refused = Counter(
            "axguard_feedback_refused", "Feedback items refused, by reason.",
            ["model", "reason"], registry=r)
        self.feedback_duplicates = Counter(
            "axguard_feedback_duplicates", "Feedback items whose receipt was already counted.",
            ["model"], registry=r)
        self.feedback_store_errors = Counter(
            "axguard_feedback_store_errors", "Feedback requests answered UNAVAILABLE because "
            "the shared duplicate filter (feedback.store) could not be reached.", ["model"],
            registry=r)
        self.receipts_issued = Counter("axguard_receipts_issued", "Receipts signed.",
                                       ["model"], registry=r)
        self.calibration_promise = Gauge(
            "axguard_calibration_promise", "The loaded calibration's promised rate: the most "
            "false-alarm rate (mode false_alarm) or the least error recall (error_recall).",
            ["model", "calibration_id", "mode"], registry=r)
        self.calibration_error_recall = Gauge(
            "axguard_calibration_error_recall",
            "Error recall the loaded calibration measured.", ["model", "calibration_id"],
            registry=r)
        self.calibration_false_alarm_rate = Gauge(
            "axguard_calibration_false_alarm_rate",
            "False-alarm rate the loaded calibration measured.", ["model", "calibration_id"],
            registry=r)
        self.calibration_flagged_share = Gauge(
            "axguard_calibration_flagged_share",
            "Share of predictions the loaded calibration expects flagged.",
            ["model", "calibration_id"], registry=r)
        self.torch_threads = Gauge(
            "axguard_torch_threads", "torch intra-op threads, and how they were chosen "
            '("measured" at warm-up, "configured", "device" for GPU models).',
            ["model", "source"], registry=r)
        self.engine_processes = Gauge(
            "axguard_engine_processes", "Engine processes beside the serving process, taking "
            "its batches (0: the engine runs in it), and how the count was chosen "
            '("measured" by the start-up rule, "configured").', ["model", "source"],
            registry=r)
        self.calibration_reloads = Counter(
            "axguard_calibration_reloads", "Calibration files read after start-up (the file "
            'changed, or SIGHUP), by outcome: "swapped" (served from the next batch on), '
            '"refused" (invalid, or not for this model: the old one keeps serving).',
            ["model", "outcome"], registry=r)
        for outcome in ("swapped", "refused"):
            self.calibration_reloads.labels(model, outcome)
        self.rpc_duration = Histogram("axguard_grpc_request_duration_seconds",
                                      "Seconds per RPC.", ["grpc_method"],
                                      buckets=SECONDS_BUCKETS, registry=r)

        self._children: dict[tuple, object] = {}
        """Label children looked up once: `labels()` validates and locks on every call."""
        self.inflight_now = self.inflight.labels(model)
        self._stage = {stage: self.duration.labels(model, stage) for stage in STAGES}
        self._batch_size = self.batch_size.labels(model)
        self._risk = self.risk.labels(model)
        self._model_info_labels: tuple[str, str, str, str] | None = None
        """The labels of the model_info series now published (set_model)."""

    def child(self, metric, *labels: str):  # noqa: ANN001, ANN201  (a prometheus metric)
        """Return metric.labels(*labels), looked up once per label set."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_model(self, version: str, fingerprint: str, calibration_id: str) -> None:
        """Publish the model info and whether a calibration is loaded (a new calibration
        replaces the old info series)."""
        if self._model_info_labels is not None:
            self.model_info.remove(*self._model_info_labels)
        self._model_info_labels = (self.model, version, fingerprint, calibration_id)
        self.model_info.labels(*self._model_info_labels).set(1)
        self.calibrated.labels(self.model).set(1 if calibration_id else 0)

    def set_calibration(self, artifact) -> None:  # noqa: ANN001  (CalibrationArtifact)
        """Publish the loaded calibration's promise and measured rates, and create its
        feedback series at 0 (so rate() sees the first label)."""
        cid, t = artifact.calibration_id, artifact.threshold
        self.calibration_promise.labels(self.model, cid, t.mode).set(t.target)
        self.calibration_error_recall.labels(self.model, cid).set(t.achieved_error_recall)
        self.calibration_false_alarm_rate.labels(self.model, cid).set(
            t.achieved_false_alarm_rate)
        self.calibration_flagged_share.labels(self.model, cid).set(t.flagged_share)
        for outcome in ("correct", "wrong"):
            for flagged in ("true", "false"):
                self.feedback.labels(self.model, cid, outcome, flagged)

    def observe_check(self, result, queue_ms: float, total_s: float) -> None:  # noqa: ANN001
        """Record one answered check (an engine CheckResult)."""
        cls = self._class_label(result.class_name)
        model = self.model
        self.child(self.checks, model, cls).inc()
        for score in result.scores:
            if score.ax_process == "sum":
                self.child(self.co_score, model, score.method).observe(score.score)
        if result.verdict.calibrated:
            self._risk.observe(result.verdict.risk)
            if result.verdict.likely_wrong:
                self.child(self.flagged, model, cls).inc()
        t, stage = result.timing, self._stage
        stage["queue"].observe(queue_ms / 1e3)
        stage["forward"].observe(t.forward_ms / 1e3)
        stage["attribution"].observe(t.attribution_ms / 1e3)
        stage["ax"].observe(t.ax_ms / 1e3)
        stage["total"].observe(total_s)
        self._batch_size.observe(t.batch_size)


class EngineCollector:
    """Reads the engine's and batcher's own counters at scrape time (no double bookkeeping)."""

    def __init__(self, engine, batcher, model: str) -> None:  # noqa: ANN001
        self.engine = engine
        self.batcher = batcher
        self.model = model
        self.remote: dict[str, dict[str, int]] = {}
        """The summed counters of the extra engine processes (transport/engines.py)."""

    def _counts(self, name: str) -> dict[str, int]:
        """One engine counter (a dict by method or stage), every engine process summed."""
        total = dict(getattr(self.engine, name))
        for key, value in dict(self.remote.get(name, {})).items():
            total[key] = total.get(key, 0) + value
        return total

    def collect(self):  # noqa: ANN201
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        zero = CounterMetricFamily("axguard_zero_heatmaps", "All-zero heatmaps (scored 0).",
                                   labels=["model", "method"])
        for method, value in sorted(self._counts("zero_heatmaps").items()):
            zero.add_metric([self.model, method], value)
        captum = CounterMetricFamily("axguard_captum_fallback", "Heatmaps computed by Captum "
                                     "instead of the shared pass.", labels=["model", "method"])
        for method, value in sorted(self._counts("captum_calls").items()):
            captum.add_metric([self.model, method], value)
        depth = GaugeMetricFamily("axguard_queue_depth", "Images waiting for the batcher.",
                                  labels=["model"])
        depth.add_metric([self.model], self.batcher.depth)
        rejected = CounterMetricFamily("axguard_queue_rejected",
                                       "Checks refused because the queue was full.",
                                       labels=["model"])
        rejected.add_metric([self.model], self.batcher.stats.rejected)
        nonfinite = CounterMetricFamily(
            "axguard_nonfinite_outputs", "Checks failed because the model's output for the "
            "input was not finite, by the first stage where it was not.",
            labels=["model", "stage"])
        nonfinite_counts = self._counts("nonfinite_outputs")
        for stage in OUTPUT_STAGES:  # every series from 0, so rate() sees the first one
            nonfinite.add_metric([self.model, stage], nonfinite_counts.get(stage, 0))
        yield from (zero, captum, depth, rejected, nonfinite)


class LiveQualityCollector:
    """Reads the drift window and the duplicate filter at scrape time."""

    def __init__(self, live, model: str) -> None:  # noqa: ANN001  (live.LiveQuality)
        self.live = live
        self.model = model

    def collect(self):  # noqa: ANN201
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        drift = self.live.drift
        if drift is not None:
            state = drift.state()
            cid = drift.reference.calibration_id
            items = GaugeMetricFamily("axguard_drift_window_items",
                                      "Calibrated verdicts in the drift window.",
                                      labels=["model", "calibration_id"])
            items.add_metric([self.model, cid], state.items)
            share = GaugeMetricFamily("axguard_drift_flagged_share",
                                      "Share of the drift window's verdicts flagged.",
                                      labels=["model", "calibration_id"])
            share.add_metric([self.model, cid], state.flagged_share)
            psi = GaugeMetricFamily(
                "axguard_drift_psi", "Population stability index of the drift window against "
                "the calibration data, by score (absent until the window holds drift.min_items).",
                labels=["model", "calibration_id", "score"])
            for score, value in sorted(state.psi.items()):
                psi.add_metric([self.model, cid, score], value)
            yield from (items, share, psi)
        book = self.live.book
        if book is not None and hasattr(book.duplicates, "forgotten_early"):  # in memory
            size = GaugeMetricFamily("axguard_feedback_filter_entries",
                                     "Receipts the duplicate filter remembers.",
                                     labels=["model"])
            size.add_metric([self.model], len(book.duplicates))
            early = CounterMetricFamily(
                "axguard_feedback_filter_forgotten_early",
                "Receipts the full duplicate filter forgot before they expired.",
                labels=["model"])
            early.add_metric([self.model], book.duplicates.forgotten_early)
            yield from (size, early)
