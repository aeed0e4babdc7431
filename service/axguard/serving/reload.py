"""Hot swap of the calibration: the served calibration file is watched and read again when
it changes (a file renamed or a symlink swapped into place counts: that is how a Kubernetes
ConfigMap volume updates), or at once on SIGHUP (transport/server.py). No gRPC here.

A new file is validated before anything changes: its schema (flag.artifact.load_artifact),
then the model's fingerprint and the methods its verdict needs (Engine.use_calibration).
A file that fails is refused, logged and counted, and the old calibration keeps serving; one
that passes is served from the next batch on (`apply`). Health is never touched.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import AxguardError
from ..flag.artifact import CalibrationArtifact, load_artifact
from .metrics import Metrics

log = logging.getLogger("axguard.server")


def file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is replaced or rewritten: device, inode, mtime, size of
    the file the path leads to (symlinks followed); None while it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class CalibrationWatcher:
    """Polls one calibration file every `poll_seconds` (0: only `reload` calls) and swaps
    a valid new calibration in through `apply`."""

    def __init__(self, path: Path, apply: Callable[[CalibrationArtifact], None],
                 metrics: Metrics, current_id: str, poll_seconds: float) -> None:
        self.path = Path(path)
        self.apply = apply
        self.metrics = metrics
        self.current_id = current_id
        """The calibration id being served."""
        self._stamp = file_stamp(self.path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll, args=(poll_seconds,),
                                            name="axguard-calibration-watch", daemon=True)
            self._thread.start()

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            if file_stamp(self.path) != self._stamp:
                self.reload("file_changed")

    def reload(self, reason: str) -> bool:
        """Read the file again; return True when a new calibration now serves."""
        with self._lock:
            self._stamp = file_stamp(self.path)  # a later change is seen by the next poll
            m = self.metrics
            try:
                artifact = load_artifact(self.path)
                if artifact.calibration_id == self.current_id:
                    log.info("calibration_unchanged", extra={
                        "path": str(self.path), "reason": reason,
                        "calibration_id": artifact.calibration_id})
                    return False
                self.apply(artifact)
            except AxguardError as err:
                m.child(m.calibration_reloads, m.model, "refused").inc()
                log.error("calibration_refused", extra={
                    "path": str(self.path), "reason": reason, "error": err.message,
                    "serving": self.current_id})
                return False
            m.child(m.calibration_reloads, m.model, "swapped").inc()
            log.info("calibration_swapped", extra={
                "path": str(self.path), "reason": reason, "old": self.current_id,
                "new": artifact.calibration_id})
            self.current_id = artifact.calibration_id
            return True

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
