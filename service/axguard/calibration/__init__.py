"""Calibration of the "likely wrong" flag: features, metrics, thresholds, artifact, reports.

Errors are the positives everywhere. Every score is turned into an *error score* (higher
means more likely wrong) by a fixed orientation declared with the feature, never flipped
after looking at the data.
"""

from .calibrate import CalibrateOptions, calibrate, collect
from .datasets import LabelledImages, load_labelled_images
from .evaluate import evaluate, format_evaluation
from .report import write_report

__all__ = ["CalibrateOptions", "LabelledImages", "calibrate", "collect", "evaluate",
           "format_evaluation", "load_labelled_images", "write_report"]
