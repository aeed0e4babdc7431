"""Live flag quality: receipts on answers, labels counted from Feedback, and the drift
window, wired to the metrics. Transport-neutral: the servicer converts messages only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config import Settings
from ..engine.core import CheckResult
from ..engine.model import ModelBundle
from ..errors import (
    AxguardError,
    FailedPrecondition,
    InputTooLarge,
    InvalidInput,
    StoreUnavailable,
)
from ..flag.drift import DriftReference, DriftWindow
from ..flag.verdict import neg_log_one_minus_msp
from .feedback import FeedbackBook, LabelOutOfRange, ReceiptError, ReceiptKeys
from .metrics import Metrics

log = logging.getLogger(__name__)

FEEDBACK_OFF = ("feedback is off: this server has no receipt key; set feedback.key_file "
                "(AXGUARD_FEEDBACK__KEY_FILE) to the same key file on every replica")


@dataclass(frozen=True)
class LabelOutcome:
    """What happened to one LabelFeedback: counted, duplicate, or refused (`error`)."""

    counted: bool = False
    duplicate: bool = False
    request_id: str = ""
    prediction_correct: bool = False
    flagged: bool = False
    error: AxguardError | None = None
    """Why the item was refused; its field is `items[i].receipt` or `items[i].label`."""
    reason: str = ""
    """The refusal's metric label (feedback.ReceiptError.reason)."""


INVALID_REASONS = frozenset({"malformed", "bad_signature", "label_out_of_range"})
"""Refusals that are the client's input; the others (unknown key, expired, another model,
beyond the duplicate filter's horizon) cannot be counted by this server: a precondition."""


def refusal(err: ReceiptError, index: int) -> AxguardError:
    """The engine error for a refused item, naming its field in the request."""
    field = f"items[{index}].{'label' if isinstance(err, LabelOutOfRange) else 'receipt'}"
    kind = InvalidInput if err.reason in INVALID_REASONS else FailedPrecondition
    return kind(err.message, field=field)


class LiveQuality:
    """Receipts, feedback counting and drift for one served model and calibration."""

    def __init__(self, settings: Settings, bundle: ModelBundle, calibration, metrics: Metrics
                 ) -> None:  # noqa: ANN001  (CalibrationArtifact | None)
        self.metrics = metrics
        fb = settings.feedback
        self.max_items = fb.max_items
        self.max_age_seconds = fb.max_age.total_seconds()
        self.book: FeedbackBook | None = None
        if fb.key_file is not None:
            self.book = FeedbackBook(
                ReceiptKeys(fb.key_file), fingerprint=bundle.fingerprint,
                num_classes=len(bundle.class_names), max_age_seconds=self.max_age_seconds,
                max_clock_skew_seconds=fb.max_clock_skew.total_seconds(),
                duplicate_capacity=fb.duplicate_filter_size, store=fb.store)
            metrics.child(metrics.feedback_store_errors, metrics.model)  # from 0
            log.info("feedback_on", extra={"signing_key_id": self.book.keys.signing_key_id,
                                           "store": getattr(self.book.duplicates, "url",
                                                            "memory"),
                                           "max_age_seconds": self.max_age_seconds})
        else:
            log.info("feedback_off", extra={"reason": "no feedback.key_file"})
        self._drift_settings = settings.drift
        self.drift: DriftWindow | None = None
        if calibration is not None:
            self.use_calibration(calibration)

    def use_calibration(self, calibration) -> None:  # noqa: ANN001  (CalibrationArtifact)
        """Publish a (new) calibration's promise and restart the drift window against its
        reference: verdicts of the old calibration no longer count."""
        drift = self._drift_settings
        if drift.enabled:
            self.drift = DriftWindow(DriftReference.from_artifact(calibration), drift.window,
                                     drift.min_items)
        self.metrics.set_calibration(calibration)

    @property
    def enabled(self) -> bool:
        """True when receipts are signed and Feedback counts."""
        return self.book is not None

    def observe(self, results: list[CheckResult], request_ids: list[str]) -> list[str]:
        """Feed answered checks to the drift window; return their receipts ("" when off)."""
        if self.drift is not None:
            judged = [r for r in results if r.verdict.calibrated]
            if judged:
                nlm = neg_log_one_minus_msp(np.asarray([r.logits for r in judged],
                                                       dtype=np.float64))
                for r, value in zip(judged, nlm, strict=True):
                    self.drift.add(r.verdict.risk, float(value), r.class_index,
                                   r.verdict.likely_wrong)
        if self.book is None:
            return [""] * len(results)
        receipts = self.book.issue_many([
            (request_id, r.verdict.calibration_id if r.verdict.calibrated else "",
             r.class_index, r.verdict.risk if r.verdict.calibrated else None,
             r.verdict.likely_wrong if r.verdict.calibrated else None)
            for r, request_id in zip(results, request_ids, strict=True)])
        self.metrics.child(self.metrics.receipts_issued, self.metrics.model).inc(len(receipts))
        return receipts

    def count_labels(self, items: list[tuple[str, int]]) -> list[LabelOutcome]:
        """Verify and count (receipt, label) pairs; one outcome per pair, in order."""
        if self.book is None:
            raise FailedPrecondition(FEEDBACK_OFF, field="feedback")
        if not items:
            raise InvalidInput("is empty: send at least one LabelFeedback", field="items")
        if len(items) > self.max_items:
            raise InputTooLarge(f"has {len(items)} items, limit {self.max_items} "
                                "(feedback.max_items)", field="items")
        m = self.metrics
        outcomes = []
        for index, (receipt_text, label) in enumerate(items):
            try:
                counted = self.book.count(receipt_text, label)
            except StoreUnavailable:
                # Items before this one are counted and recorded in the store; a retry of
                # the request finds them there (duplicates): none counts twice, none is lost.
                m.child(m.feedback_store_errors, m.model).inc()
                raise
            except ReceiptError as err:
                m.feedback_refused.labels(m.model, err.reason).inc()
                outcomes.append(LabelOutcome(error=refusal(err, index), reason=err.reason))
                continue
            r = counted.receipt
            flagged = bool(r.flagged)
            if counted.duplicate:
                m.feedback_duplicates.labels(m.model).inc()
            else:
                m.feedback.labels(
                    m.model, r.calibration_id or "none",
                    "correct" if counted.correct else "wrong",
                    "none" if r.flagged is None else str(flagged).lower()).inc()
            outcomes.append(LabelOutcome(counted=not counted.duplicate,
                                         duplicate=counted.duplicate, request_id=r.request_id,
                                         prediction_correct=counted.correct, flagged=flagged))
        return outcomes
