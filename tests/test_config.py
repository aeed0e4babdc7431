"""Settings precedence: defaults < YAML < AXGUARD_* environment < CLI flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from axguard.cli import main as cli_main  # noqa: F401  (the CLI imports cleanly)
from axguard.config import load_settings


def test_defaults():
    settings = load_settings()
    assert settings.model.source == "demo"
    assert settings.server.port == 50051
    assert settings.attribution.default_methods == ["saliency", "deconvolution"]


def test_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  port: 6000\n  max_workers: 3\nmodel:\n  version: yaml\n")
    assert load_settings(config).server.port == 6000
    monkeypatch.setenv("AXGUARD_SERVER__PORT", "7000")
    monkeypatch.setenv("AXGUARD_MODEL__NAME", "env-name")
    settings = load_settings(config, server={"host": "0.0.0.0"})
    assert settings.server.port == 7000  # env beats YAML
    assert settings.server.max_workers == 3  # YAML kept where env is silent
    assert settings.server.host == "0.0.0.0"
    assert (settings.model.name, settings.model.version) == ("env-name", "yaml")
    assert load_settings(config, server={"port": 8000}).server.port == 8000  # CLI beats env


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(config)
    with pytest.raises(ValidationError):
        load_settings(attribution={"default_methods": ["occlusion"]})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")
