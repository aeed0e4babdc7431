"""The container image built and run for real (podman, which `make test` installs; docker
when its daemon answers).

Builds with scripts/build_image.sh (the `make image` script; this machine's local wheel
store when the torch index is out of reach), then runs it as Kubernetes would: UID 10001, a
read-only root filesystem with a tmpfs /tmp, grpc health, a Check from the repository's
client, /metrics, and exit 0 on SIGTERM within the grace period; a second run mounts a user
model as deploy/k8s/overlays/custom-model describes (config file + weights + classes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_run import free_port

from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

# The image built and run by podman (or docker).
pytestmark = pytest.mark.system

IMAGE = "localhost/axguard:test"


def engine() -> list[str]:
    """The container engine by the rule scripts/build_image.sh uses (one script for both):
    docker when its daemon answers, else podman with overlay storage. `make test` installs
    podman and its tools, so on this kind of machine these tests never skip."""
    result = subprocess.run(["bash", str(ROOT / "scripts/container_engine.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy/podman/containers.conf")}


@pytest.fixture(scope="module")
def image() -> str:
    local = Path("/opt/pypi-more/simple/torch").exists()  # this machine's wheel store
    result = subprocess.run(["bash", str(ROOT / "scripts/build_image.sh")], cwd=ROOT,
                            env={**env(), "IMAGE": IMAGE, "LOCAL_WHEELS": "1" if local else "0"},
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return IMAGE


def run_container(image: str, *extra: str) -> tuple[str, int, int]:
    grpc_port, metrics_port = free_port(), free_port()
    cmd = [*engine(), "run", "-d", "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "-e", f"AXGUARD_SERVER__PORT={grpc_port}", "-e",
           f"AXGUARD_METRICS__PORT={metrics_port}", "-e", "AXGUARD_SERVER__GRACE_SECONDS=5",
           *extra, image]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), grpc_port, metrics_port


def wait_serving(port: int, timeout: float = 180) -> float:
    started = time.time()
    with AxguardClient(f"127.0.0.1:{port}", timeout=5) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return time.time() - started
            except Exception:  # noqa: BLE001  (still starting)
                pass
            assert time.time() - started < timeout, "the container never became SERVING"
            time.sleep(0.5)


def container(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*engine(), *args], env=env(), capture_output=True, text=True,
                          timeout=120)


def test_the_image_serves_the_demo_model_as_a_restricted_user(image):
    name, port, metrics_port = run_container(image)
    try:
        cold_start = wait_serving(port)
        assert container("exec", name, "id", "-u").stdout.strip() == "10001"
        assert container("exec", name, "touch", "/opt/x").returncode != 0  # read-only root
        with AxguardClient(f"127.0.0.1:{port}", timeout=30) as client:
            response = client.check(EXAMPLES / "digit_7.png")
            assert response.prediction.class_name == "7" and response.verdict.calibrated
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert "axguard_checks_total" in text
        started = time.time()
        assert container("stop", "-t", "20", name).returncode == 0
        stopped_in = time.time() - started
        code = container("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert code == "0" and stopped_in < 20
        print(f"cold start to SERVING {cold_start:.1f} s, stop {stopped_in:.1f} s")
    finally:
        container("rm", "-f", name)


def test_the_image_serves_a_mounted_user_model(image, tmp_path):
    from axguard.demo.bundle import ASSETS

    models, config = tmp_path / "models", tmp_path / "config"
    models.mkdir()
    config.mkdir()
    shutil.copy(ASSETS / "weights.pt", models / "weights.pt")
    shutil.copy(ASSETS / "classes.txt", models / "classes.txt")
    (config / "axguard.yaml").write_text(
        "model:\n  source: axguard.demo.network:build_demo_net\n"
        "  weights: /models/weights.pt\n  classes: /models/classes.txt\n"
        "  input_size: [32, 32]\n  mean: [0.3048, 0.3048, 0.3048]\n"
        "  std: [0.323, 0.323, 0.323]\n  name: my-digits\n  version: '7'\n"
        "calibration: none\n")
    for path in (models, config):
        path.chmod(0o755)
        for f in path.iterdir():
            f.chmod(0o644)
    name, port, _ = run_container(
        image, "-v", f"{models}:/models:ro", "-v", f"{config}:/config:ro",
        "-e", "AXGUARD_CONFIG_FILE=/config/axguard.yaml")
    try:
        wait_serving(port)
        with AxguardClient(f"127.0.0.1:{port}", timeout=30) as client:
            info = client.model_info()
            assert (info.name, info.version) == ("my-digits", "7")
            assert not info.HasField("calibration")
            assert client.check(EXAMPLES / "digit_2.png").prediction.class_name == "2"
    finally:
        container("rm", "-f", name)


def test_podman_kube_play_runs_the_rendered_base(image, tmp_path):
    """The kustomize base as a Kubernetes user would apply it, played by podman: the pod
    reaches SERVING and answers a Check (kube play ignores the Service, PDB, HPA,
    ServiceMonitor, PrometheusRule and NetworkPolicy)."""
    import yaml

    if engine()[0] != "podman":
        pytest.skip("kube play is podman's; docker (its daemon answers here) has none")
    for tool in ("kubectl", "catatonit"):  # catatonit: kube play's pause image
        assert shutil.which(tool), f"{tool} is not installed: `make test` installs it"
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/k8s/base")],
                              capture_output=True, text=True, check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d["kind"] == "Deployment")
    port, metrics_port = free_port(), free_port()
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    main = spec["containers"][0]
    main["image"] = image
    main.pop("ports")  # host networking: the ports are the process's own
    main["env"] += [{"name": "AXGUARD_SERVER__PORT", "value": str(port)},
                    {"name": "AXGUARD_METRICS__PORT", "value": str(metrics_port)}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        main[probe]["grpc"]["port"] = port
    manifest = tmp_path / "axguard.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    kube = [*engine(), "kube"]
    played = subprocess.run([*kube, "play", "--network", "host", str(manifest)], env=env(),
                            capture_output=True, text=True, timeout=300)
    try:
        assert played.returncode == 0, played.stdout + played.stderr
        wait_serving(port)
        with AxguardClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.check(EXAMPLES / "digit_9.png").prediction.class_name == "9"
    finally:
        subprocess.run([*kube, "down", str(manifest)], env=env(), capture_output=True,
                       timeout=120)
