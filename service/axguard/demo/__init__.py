"""The bundled demo model: a small CNN on scikit-learn's handwritten digits."""
