"""Calibration of the "likely wrong" flag: features, metrics, thresholds, artifact, reports.

Errors are the positives everywhere. Every score is turned into an *error score* (higher
means more likely wrong) by a fixed orientation declared with the feature, never flipped
after looking at the data.
"""
