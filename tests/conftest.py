"""Shared fixtures: the demo bundle, a real server on a free loopback port, a client."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from axguard.config import load_settings
from axguard.demo.bundle import ASSETS, load_demo_bundle
from axguard.engine.core import Engine
from axguard.engine.model import ModelBundle
from axguard.flag.artifact import CalibrationArtifact, load_artifact
from axguard.transport.server import build_server, start_serving
from axguard_client import AxguardClient

# Fixtures shared across test folders (the TLS certificates: tests/certificates.py).
pytest_plugins = ["certificates"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "digits"


@pytest.fixture(scope="session")
def demo_bundle() -> ModelBundle:
    return load_demo_bundle()


@pytest.fixture(scope="session")
def demo_calibration() -> CalibrationArtifact:
    """The demo model's bundled calibration, as `make serve` loads it."""
    return load_artifact(ASSETS / "calibration.json")


@pytest.fixture(scope="session")
def demo_engine(demo_bundle: ModelBundle, demo_calibration: CalibrationArtifact) -> Engine:
    engine = Engine(demo_bundle, calibration=demo_calibration)
    engine.warm_up()
    return engine


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def hardest_wrong_digit(demo_bundle: ModelBundle) -> tuple[Image.Image, int]:
    """The demo model's least confident wrong prediction on the test split: (image, label)."""
    from axguard.demo.data import load_split

    split = load_split("test")
    x, y = split.tensors(demo_bundle.spec)
    with torch.no_grad():
        probs = torch.softmax(demo_bundle.network(x), dim=1)
    wrong = (probs.argmax(dim=1) != y).nonzero().flatten()
    assert len(wrong) > 0
    hardest = int(wrong[probs[wrong].max(dim=1).values.argmin()])
    return split.images[hardest], int(y[hardest])


class RunningServer:
    """A real axguard server on 127.0.0.1 with its port and engine."""

    def __init__(self, engine: Engine, settings: dict | None = None,
                 **server_overrides: object) -> None:
        """`settings`: other sections' overrides, e.g. {"feedback": {"key_file": path}}."""
        settings = load_settings(server={"host": "127.0.0.1", "port": 0, **server_overrides},
                                 **(settings or {}))
        self.engine = engine
        self.parts = build_server(settings, engine)
        self.server, self.port, self.health = self.parts.server, self.parts.port, self.parts.health
        self.plane, self.metrics = self.parts.plane, self.parts.metrics
        start_serving(self.parts)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait()
        self.plane.close()


@pytest.fixture(scope="module")
def demo_server(demo_engine: Engine) -> Iterator[RunningServer]:
    server = RunningServer(demo_engine)
    yield server
    server.stop()


@pytest.fixture()
def client(demo_server: RunningServer) -> Iterator[AxguardClient]:
    with AxguardClient(demo_server.target, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    # Two cores here: keep torch from oversubscribing when gRPC threads run in parallel.
    torch.set_num_threads(2)


def chromium() -> str:
    """The path of Debian's chromium (`make test` installs it), for the page tests."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: `make test` installs it (Debian package chromium)"
    return path
