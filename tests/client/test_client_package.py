"""The client as its own distribution: installed alone in a fresh virtual environment, it
has no torch, stays small, and talks to a real server with the library and the CLI."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, RunningServer

# A fresh virtual environment, pip-installed.
pytestmark = pytest.mark.system

SIZE_LIMIT_MB = 150


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(ROOT / "clients" / "python")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return env


def site_packages_mb(env: Path) -> float:
    (site,) = env.glob("lib/python*/site-packages")
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 1e6


def test_the_client_installs_alone_without_torch_and_small(client_venv):
    python = client_venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", (
        "import importlib.util, axguard_client\n"
        "from axguard_client.v1 import confidence_pb2\n"
        "print(importlib.util.find_spec('torch') is None, "
        "importlib.util.find_spec('axguard') is None)")],
        capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True", "True"]  # neither torch nor the server
    assert site_packages_mb(client_venv) < SIZE_LIMIT_MB


def test_library_and_cli_of_the_lone_client_call_a_real_server(client_venv, demo_engine):
    server = RunningServer(demo_engine)
    try:
        python = client_venv / "bin" / "python"
        # A file, a numpy array, a PIL image, and the asyncio client, without torch.
        code = ("import asyncio, sys\n"
                "import numpy as np\n"
                "from PIL import Image\n"
                "from axguard_client import AsyncAxguardClient, AxguardClient\n"
                "image = Image.open(sys.argv[2])\n"
                "with AxguardClient(sys.argv[1], timeout=30) as c:\n"
                "    r = c.check(sys.argv[2])\n"
                "    print(r.prediction.class_name, r.verdict.calibrated)\n"
                "    print(c.check(np.asarray(image)).prediction.class_name)\n"
                "    print(c.check(image).prediction.class_name)\n"
                "async def main():\n"
                "    async with AsyncAxguardClient(sys.argv[1], timeout=30) as c:\n"
                "        print((await c.check(sys.argv[2])).prediction.class_name)\n"
                "asyncio.run(main())\n"
                "print('torch' in sys.modules)\n")
        out = subprocess.run([str(python), "-c", code, server.target,
                              str(EXAMPLES / "digit_6.png")], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["6", "True", "6", "6", "6", "False"]
        cli = subprocess.run([str(client_venv / "bin" / "axguard"), "check",
                              str(EXAMPLES / "digit_8.png"), "--target", server.target],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "predicted '8'" in cli.stdout and "verdict:" in cli.stdout
    finally:
        server.stop()


def test_the_server_package_uses_the_client_stubs():
    from axguard_client.v1 import confidence_pb2
    from axguard_client.v1 import confidence_pb2 as client_pb2

    assert confidence_pb2 is client_pb2
    assert sys.modules["axguard_client.v1.confidence_pb2"] is confidence_pb2
