"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/axguard-rules.yaml."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def render() -> str:
    """Return the PrometheusRule manifest wrapping the plain rules file."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/axguard-rules.yaml").read_text())
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "axguard"}, "spec": rules}
    return ("# Generated from deploy/prometheus/axguard-rules.yaml by "
            "scripts/gen_prometheusrule.py;\n# a test fails when they differ.\n"
            + yaml.safe_dump(doc, sort_keys=False, width=100))


if __name__ == "__main__":
    (ROOT / "deploy/k8s/base/prometheusrule.yaml").write_text(render())
