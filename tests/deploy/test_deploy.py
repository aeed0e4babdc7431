"""The container and the deployment files, checked with the real tools offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gen_prometheusrule  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
PROM = ROOT / "deploy" / "prometheus"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    assert path, f"{name} is not installed: `make test` installs it"
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.system
def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    # One stage, torch's layer before any source is copied: a source change reuses it.
    assert text.count("FROM ") == 1 and "gcc" not in text and "build-essential" not in text
    assert text.index("torch==2.14.1 torchvision==0.29.1") < text.index("COPY service")
    assert "download.pytorch.org/whl/cpu" in text
    assert "USER 10001" in text and "EXPOSE 50051 9090" in text
    assert "HEALTHCHECK" in text and '"axguard", "health"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("target", ["base", "overlays/custom-model"])
@pytest.mark.system
def test_kustomize_output_validates_against_kubernetes_schemas(target, tmp_path):
    built = run(tool("kubectl"), "kustomize", str(K8S / target))
    assert built.returncode == 0, built.stderr
    out = tmp_path / "all.yaml"
    out.write_text(built.stdout)
    result = run(tool("kubernetes-validate"), "--strict", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(built.stdout)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor", "PrometheusRule"} <= kinds


@pytest.mark.system
def test_base_has_a_headless_service_for_client_side_balancing():
    built = run(tool("kubectl"), "kustomize", str(K8S / "base"))
    assert built.returncode == 0, built.stderr
    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all(built.stdout)
                if d["kind"] == "Service"}
    cluster, headless = services["axguard"], services["axguard-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert cluster["spec"].get("clusterIP") != "None"
    # The same pods and the same gRPC port, so either name reaches every replica.
    assert headless["spec"]["selector"] == cluster["spec"]["selector"]
    grpc_port = next(p for p in cluster["spec"]["ports"] if p["name"] == "grpc")
    assert [p for p in headless["spec"]["ports"] if p["name"] == "grpc"] == [grpc_port]
    (deployment,) = [d for d in yaml.safe_load_all(built.stdout) if d["kind"] == "Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()


@pytest.mark.system
def test_every_manifest_file_validates():
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
             and "patch" not in p.name and p.name != "axguard.yaml"]
    result = run(tool("kubernetes-validate"), "--strict", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


# KServe's ComponentExtensionSpec: the predictor's fields that are not a PodSpec's.
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                           "containerConcurrency", "timeout", "canaryTrafficPercent",
                           "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy", "autoScaling"}


@pytest.mark.system
def test_kserve_inferenceservice_is_a_custom_grpc_predictor_with_a_valid_pod(tmp_path):
    # No KServe schema ships offline: the predictor minus KServe's own fields is a PodSpec,
    # validated strictly against Kubernetes' schema (unknown fields fail).
    isvc = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1",
                                                  "InferenceService")
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "axguard-predictor"},
           "spec": pod_spec}
    out = tmp_path / "pod.yaml"
    out.write_text(yaml.safe_dump(pod))
    result = run(tool("kubernetes-validate"), "--strict", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (container,) = predictor["containers"]
    from axguard.config import Settings

    port = Settings().server.port
    assert container["ports"] == [{"name": "h2c", "containerPort": port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] >= predictor["minReplicas"]
    base = deployment()["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == base["resources"]
    assert container["securityContext"] == base["securityContext"]


def deployment(target: str = "base") -> dict:
    built = run(tool("kubectl"), "kustomize", str(K8S / target)).stdout
    return next(d for d in yaml.safe_load_all(built)
                if d["kind"] == "Deployment" and d["metadata"]["name"] == "axguard")


def test_probes_security_and_drain_fit_together():
    spec = deployment()["spec"]["template"]["spec"]
    container = spec["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = float(env["AXGUARD_SERVER__GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The memory limit covers the request budget plus the server's own resident memory
    # (bench/results/memory.md: about 1.1 GiB with the CUDA torch build, less on CPU wheels).
    limit_mib = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
    budget_mib = int(env["AXGUARD_SERVER__MEMORY_BUDGET_MIB"])
    assert limit_mib >= budget_mib + 768


@pytest.mark.system
def test_network_policy_allows_grpc_and_metrics_only_and_no_egress():
    out = run(tool("kubectl"), "kustomize", str(K8S / "base"))
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    ports = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert ports == ["grpc", "metrics"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"


def test_overlay_turns_on_tls_and_tokens_and_probes_through_tls():
    spec = deployment("overlays/custom-model")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AXGUARD_SERVER__TLS__CERT_FILE"] == "/tls/tls.crt"
    assert env["AXGUARD_SERVER__AUTH__TOKEN_FILE"] == "/auth/tokens"
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"tls": "axguard-tls", "auth": "axguard-tokens",
                       "receipt-keys": "axguard-receipt-keys"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert "grpc" not in container[probe]  # kubelet's gRPC probe speaks plaintext only
        assert command[:2] == ["axguard", "health"] and "--tls-ca" in command
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]


def test_overlay_gives_every_replica_the_same_receipt_keys():
    spec = deployment("overlays/custom-model")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AXGUARD_FEEDBACK__KEY_FILE"] == "/receipts/keys"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/receipts"]["readOnly"]
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/receipts"]["name"])
    assert volume["secret"]["items"] == [{"key": "keys", "path": "keys"}]


def test_overlay_counts_labels_once_in_a_redis_the_servers_may_reach():
    built = [d for d in yaml.safe_load_all(
        run(tool("kubectl"), "kustomize", str(K8S / "overlays/custom-model")).stdout) if d]
    container = deployment("overlays/custom-model")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    store = env["AXGUARD_FEEDBACK__STORE"]
    service = next(d for d in built if d["kind"] == "Service"
                   and d["metadata"]["name"] == "axguard-redis")
    assert store == f"redis://axguard-redis:{service['spec']['ports'][0]['port']}/0"
    redis = next(d for d in built if d["kind"] == "Deployment"
                 and d["metadata"]["name"] == "axguard-redis")
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/component"] == "feedback-store"  # not a server
    policy = next(d for d in built if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "axguard")["spec"]
    to_store = [rule for rule in policy["egress"] if rule.get("to")]
    assert to_store == [{"to": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/component": "feedback-store"}}}],
        "ports": [{"port": 6379, "protocol": "TCP"}]}]


def test_overlay_mounts_model_config_and_calibration():
    spec = deployment("overlays/custom-model")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/models", "/config", "/calibration", "/tmp"} <= mounts
    config = (K8S / "overlays/custom-model/axguard.yaml").read_text()
    from axguard.config import Settings

    Settings.model_validate(yaml.safe_load(config))  # the example config is valid


@pytest.mark.system
def test_prometheus_rules_pass_promtool_and_their_unit_tests():
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", "axguard-rules.yaml", cwd=PROM)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", "axguard-rules.test.yaml", cwd=PROM)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_prometheusrule_manifest_is_the_tested_rules_file():
    assert (K8S / "base/prometheusrule.yaml").read_text() == gen_prometheusrule.render()


def test_grafana_dashboard_queries_exported_metrics():
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/axguard-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for needed in ("axguard_flagged_total", "axguard_risk_score_bucket",
                   "axguard_check_duration_seconds_bucket", "axguard_checks_total",
                   "axguard:live_false_alarm_rate_lower95:1d", "axguard_calibration_promise",
                   "axguard:live_error_recall:1d", "axguard_feedback_refused_total",
                   "axguard_drift_psi", "axguard_drift_flagged_share"):
        assert any(needed in e for e in exprs), needed


@pytest.mark.system
def test_the_recalibration_job_uses_the_served_model_and_replaces_the_mounted_configmap():
    docs = [d for d in yaml.safe_load_all((K8S / "jobs/recalibrate.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    calibrate, compare = job["initContainers"]
    served = yaml.safe_load((K8S / "overlays/custom-model/axguard.yaml").read_text())

    def options(command: list[str]) -> dict:
        out, key = {}, None
        for word in command[2:]:
            if word.startswith("--"):
                key = word[2:]
                out[key] = []
            else:
                out[key].append(word)
        return out

    for container in (calibrate, compare):
        got = options(container["command"])
        model = served["model"]
        assert got["model"] == [model["source"]] and got["weights"] == [model["weights"]]
        assert got["classes"] == [model["classes"]] and got["name"] == [model["name"]]
        assert [int(v) for v in got["input-size"]] == model["input_size"]
        assert [float(v) for v in got["mean"]] == model["mean"]
        assert [float(v) for v in got["std"]] == model["std"]
        assert got["model-version"] == [model["version"]]
    assert options(calibrate["command"])["out"] == ["/work/calibration.json"]
    cmp = options(compare["command"])
    assert cmp["calibration"] == ["/work/calibration.json"]
    # --compare reads the calibration in service, where the pods mount it.
    pod = deployment("overlays/custom-model")["spec"]["template"]["spec"]
    mounted = next(v for v in pod["volumes"] if v["name"] == "calibration")["configMap"]["name"]
    assert cmp["compare"] == ["/calibration/calibration.json"]
    assert served["calibration"] == "/calibration/calibration.json"
    assert f"configmap {mounted} " in job["containers"][0]["command"][-1]
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [mounted], "verbs": ["get", "patch", "update"]}]
