"""The bundled demo model: a small CNN on scikit-learn's handwritten digits."""

# Only what serving the demo needs: the data and the training (scikit-learn's digits) stay
# in demo.data and demo.train, imported where used.
from .bundle import ASSETS, demo_metadata, load_demo_bundle
from .network import build_demo_net

__all__ = ["ASSETS", "build_demo_net", "demo_metadata", "load_demo_bundle"]
