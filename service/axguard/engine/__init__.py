"""The engine: tensors in, results out. Model loading (model), preprocessing, the attribution
methods and their backward rules (attribution, activations, sharedpass), the paper's scores
(scoring), label-free evidence (evidence), GAX (gax) and the staged check (core.Engine).
It knows nothing of gRPC, of batching or of metrics."""

from .core import CheckItem, CheckResult, Engine, MethodScore, ResolvedItem, Verdict, plan_batch
from .gax import GaxOptions
from .model import InputSpec, ModelBundle, load_bundle

__all__ = ["CheckItem", "CheckResult", "Engine", "GaxOptions", "InputSpec", "MethodScore",
           "ModelBundle", "ResolvedItem", "Verdict", "load_bundle", "plan_batch"]
