"""axguard: the confidence check of a deployed PyTorch image classifier.

Importing this package is cheap; the engine modules (torch, Captum) load on first use:
`axguard.engine`, `axguard.model`, `axguard.scoring`, `axguard.attribution`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
