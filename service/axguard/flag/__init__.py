"""The served flag: label-free features → risk → "likely wrong" (verdict), what evidence a
calibration needs (verdict.EvidencePlan), the calibration artifact's schema (artifact) and
input drift (drift). numpy and pydantic only: the offline fitting lives in calibration/."""

from .artifact import CalibrationArtifact, check_matches, load_artifact, save_artifact
from .drift import DriftReference, DriftWindow
from .verdict import EvidencePlan, Family, FlagModel, MethodPair, RiskModel, features_of

__all__ = ["CalibrationArtifact", "DriftReference", "DriftWindow", "EvidencePlan", "Family",
           "FlagModel", "MethodPair", "RiskModel", "check_matches", "features_of",
           "load_artifact", "save_artifact"]
