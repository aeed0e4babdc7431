"""A real Prometheus (Debian's package) on a loopback port for tests and benchmarks:
scrapes the given targets every second and evaluates the shipped rules every second."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "axguard-rules.yaml"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A running Prometheus; `query` evaluates PromQL now."""

    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr`; [] while Prometheus is not answering yet."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        except OSError:
            return []
        return body["data"]["result"] if body["status"] == "success" else []


@contextmanager
def running_prometheus(metrics_ports: list[int], folder: Path) -> Iterator[Prometheus]:
    """Run Prometheus scraping 127.0.0.1:<port> for each of `metrics_ports`, with the rules
    of deploy/prometheus, its config and data under `folder`."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make test` (make system-deps) installs it"
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in metrics_ports)
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: axguard\n    static_configs:\n"
        f"      - targets: [{targets}]\n")
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={config}",
                                f"--storage.tsdb.path={folder / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Prometheus(port)
    finally:
        process.terminate()
        process.wait(timeout=30)
