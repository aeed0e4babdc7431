"""Label-free drift: the recent verdicts' risk, MSP and predicted classes against the
calibration's own, as population stability indices (PSI), over a fixed-size window.

The reference comes from the calibration artifact's samples (every calibration image's
final-model risk, −log(1 − MSP) and predicted class), binned at its deciles; the window is
a ring buffer of the last `window` calibrated verdicts. numpy only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

SCORES = ("risk", "msp", "predicted_class")
"""The compared distributions (the gauge's `score` label)."""
MAX_CLASS_BINS = 20
"""Models with more classes compare the 19 most predicted classes plus "the rest"."""


def psi(reference_counts: np.ndarray, window_counts: np.ndarray,
        pseudo_count: float = 0.5) -> float:
    """Population stability index Σ (w − r) · ln(w / r) of two binned distributions.

    Shares come from counts plus `pseudo_count` per bin, so an empty bin stays finite.
    """
    r = np.asarray(reference_counts, dtype=np.float64) + pseudo_count
    w = np.asarray(window_counts, dtype=np.float64) + pseudo_count
    r, w = r / r.sum(), w / w.sum()
    return float(np.sum((w - r) * np.log(w / r)))


def decile_edges(values: np.ndarray) -> np.ndarray:
    """Inner bin edges at the deciles of `values`, ties merged (fewer bins when tied)."""
    return np.unique(np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0.1, 0.9, 9)))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in the len(edges) + 1 bins the inner edges make."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def class_bins(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Map class index → bin: each class its own bin, or the MAX_CLASS_BINS − 1 classes
    predicted most often on the reference each their own and the rest one shared bin."""
    if num_classes <= MAX_CLASS_BINS:
        return np.arange(num_classes)
    counts = np.bincount(predictions, minlength=num_classes)
    top = np.argsort(-counts, kind="stable")[: MAX_CLASS_BINS - 1]
    mapping = np.full(num_classes, MAX_CLASS_BINS - 1)
    mapping[top] = np.arange(len(top))
    return mapping


@dataclass(frozen=True)
class DriftReference:
    """The calibration's distributions, binned."""

    calibration_id: str
    risk_edges: np.ndarray
    risk_counts: np.ndarray
    msp_edges: np.ndarray
    """Edges on −log(1 − MSP), which keeps confident predictions apart."""
    msp_counts: np.ndarray
    class_map: np.ndarray
    class_counts: np.ndarray
    flagged_share: float
    """Share of predictions the calibration expects flagged."""

    @classmethod
    def from_samples(cls, calibration_id: str, risk: np.ndarray, neg_log_1m_msp: np.ndarray,
                     predictions: np.ndarray, num_classes: int,
                     flagged_share: float) -> DriftReference:
        """Bin the calibration images' scores."""
        risk_edges, msp_edges = decile_edges(risk), decile_edges(neg_log_1m_msp)
        class_map = class_bins(np.asarray(predictions), num_classes)
        return cls(calibration_id, risk_edges, bin_counts(risk, risk_edges), msp_edges,
                   bin_counts(neg_log_1m_msp, msp_edges), class_map,
                   np.bincount(class_map[predictions], minlength=int(class_map.max()) + 1),
                   float(flagged_share))

    @classmethod
    def from_artifact(cls, artifact) -> DriftReference:  # noqa: ANN001  (CalibrationArtifact)
        """The reference of a calibration artifact (its samples hold every score)."""
        s = artifact.samples
        return cls.from_samples(
            artifact.calibration_id, np.asarray(s.features["risk"]),
            np.asarray(s.features["neg_log_1m_msp"]), np.asarray(s.predictions),
            len(artifact.model.class_names), artifact.threshold.flagged_share)


@dataclass(frozen=True)
class DriftState:
    """The window against the reference, at one moment."""

    items: int
    psi: dict[str, float]
    """By score name; empty while the window holds fewer than its minimum."""
    flagged_share: float


class DriftWindow:
    """The last `size` calibrated verdicts (risk, −log(1 − MSP), class, flag)."""

    def __init__(self, reference: DriftReference, size: int, min_items: int) -> None:
        self.reference = reference
        self.size = size
        self.min_items = min_items
        self._risk = np.zeros(size)
        self._msp = np.zeros(size)
        self._class = np.zeros(size, dtype=np.int64)
        self._flag = np.zeros(size, dtype=bool)
        self._next = 0
        self._items = 0
        self._lock = threading.Lock()

    def add(self, risk: float, neg_log_1m_msp: float, predicted_class: int,
            flagged: bool) -> None:
        """Record one verdict, replacing the oldest when full."""
        with self._lock:
            i = self._next
            self._risk[i], self._msp[i] = risk, neg_log_1m_msp
            self._class[i], self._flag[i] = predicted_class, flagged
            self._next = (i + 1) % self.size
            self._items = min(self._items + 1, self.size)

    def state(self) -> DriftState:
        """Return the PSIs of the window (computed now) and its flagged share."""
        with self._lock:
            n = self._items
            risk, msp = self._risk[:n].copy(), self._msp[:n].copy()
            classes, flags = self._class[:n].copy(), self._flag[:n].copy()
        share = float(flags.mean()) if n else 0.0
        if n < self.min_items:
            return DriftState(n, {}, share)
        ref = self.reference
        values = {
            "risk": psi(ref.risk_counts, bin_counts(risk, ref.risk_edges)),
            "msp": psi(ref.msp_counts, bin_counts(msp, ref.msp_edges)),
            "predicted_class": psi(ref.class_counts, np.bincount(
                ref.class_map[classes], minlength=len(ref.class_counts))),
        }
        return DriftState(n, values, share)
