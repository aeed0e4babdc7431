"""axguard: the confidence check of a deployed PyTorch image classifier.

Importing this package is cheap; its layers load on first use: `axguard.flag` (the served
verdict), `axguard.engine` (torch, Captum), `axguard.serving` (the data plane),
`axguard.transport` (gRPC), `axguard.calibration` (offline fitting). See
docs/architecture.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
