"""The contract: stubs reproducible by one command, buf lint clean."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gen_proto  # noqa: E402


def test_committed_stubs_equal_freshly_generated_ones(tmp_path):
    generated = gen_proto.generate(tmp_path)
    assert generated
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run make proto"


def test_buf_lint_is_clean():
    buf = shutil.which("buf")
    assert buf, "buf is not on PATH: run the tests with `make test`, which installs it"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_package_does_not_need_torch():
    code = (
        "import sys\n"
        "import axguard_client, axguard_client.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
