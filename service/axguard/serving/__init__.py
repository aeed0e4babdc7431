"""Serving without a transport: the data plane (readiness, draining, one request path through
the dynamic batcher, receipts, feedback, diagnosis pacing), Prometheus metrics, the live
quality book and the thread rule. No gRPC: a transport converts and calls DataPlane."""

from .batching import DynamicBatcher
from .dataplane import DataPlane, DiagnoseAsk, DiagnoseEvent
from .diagnoser import Diagnoser
from .feedback import FeedbackBook
from .metrics import Metrics
from .quality import LiveQuality

__all__ = ["DataPlane", "DiagnoseAsk", "DiagnoseEvent", "Diagnoser", "DynamicBatcher",
           "FeedbackBook", "LiveQuality", "Metrics"]
