"""The one place that chooses between one serving process and several: `server` never
imports `workers`, and `workers` runs `server.serve` in each child."""

from __future__ import annotations

from ..config import Settings


def launch(settings: Settings) -> int:
    """Serve until SIGTERM: one process (server.serve), or `server.processes` workers on
    one port (workers.serve_processes); return the exit code."""
    if settings.server.processes > 1:
        from .workers import serve_processes

        return serve_processes(settings)
    from .server import serve

    return serve(settings)
