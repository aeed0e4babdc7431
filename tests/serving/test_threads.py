"""The torch thread policy: the pure rule against hand computations, and the server's
warm-up measurement through GetModelInfo and /metrics."""

from __future__ import annotations

import pytest
import torch

from axguard.config import load_settings
from axguard.engine.model import MEMORY_FORMATS, set_memory_format
from axguard.serving.threads import (
    candidate_threads,
    choose_memory_format,
    choose_threads,
    cycle_seconds,
)
from axguard.transport.server import build_server, start_serving
from axguard_client import AxguardClient


def test_cycle_overlaps_only_with_a_core_to_spare():
    assert cycle_seconds(1, 0.0132, 0.006, cores=2) == 0.0132  # max(13.2, 6) ms
    assert cycle_seconds(2, 0.0094, 0.006, cores=2) == pytest.approx(0.0154)  # 9.4 + 6 ms
    assert cycle_seconds(1, 0.002, 0.006, cores=2) == 0.006  # transport-bound


def test_a_small_model_keeps_a_core_for_the_transport_a_large_one_takes_both():
    # The demo CNN as measured here: batch of 8 at 1 and 2 threads, 0.75 ms per request.
    assert choose_threads({1: 0.0132, 2: 0.0094}, 0.00075, batch=8, cores=2) == 1
    # ResNet-34: 3.57 s and 2.01 s per batch of 8; the transport is negligible.
    assert choose_threads({1: 3.57, 2: 2.01}, 0.003, batch=8, cores=2) == 2


def test_ties_go_to_fewer_threads_and_candidates_cover_the_cores():
    # 4 cores, transport 8 × 0.1 ms: cycles 40, 20.2, 20.0 and 20.0 + 0.8 ms; 2 threads
    # are within 2% of the best (3 threads), so 2 win.
    assert choose_threads({1: 0.04, 2: 0.0202, 3: 0.0200, 4: 0.0200}, 0.0001, 8, 4) == 2
    assert candidate_threads(1) == [1]
    assert candidate_threads(4) == [1, 2, 3, 4]
    assert candidate_threads(16) == [1, 2, 8, 15, 16]


def _serve(engine, **model):
    settings = load_settings(server={"host": "127.0.0.1", "port": 0},
                             model={"source": "demo", **model})
    parts = build_server(settings, engine)
    start_serving(parts, settings)
    return parts, parts.port


def test_channels_last_must_win_by_five_percent():
    assert choose_memory_format({"contiguous": 0.0100, "channels_last": 0.0094}) == "channels_last"
    assert choose_memory_format({"contiguous": 0.0100, "channels_last": 0.0096}) == "contiguous"
    assert choose_memory_format({"contiguous": 0.0100, "channels_last": 0.0200}) == "contiguous"


def test_channels_last_weights_give_the_same_check(demo_bundle, demo_calibration):
    from axguard.engine.core import CheckItem, Engine

    images = torch.rand(4, *demo_bundle.spec.shape, generator=torch.Generator().manual_seed(3))
    engine = Engine(demo_bundle, calibration=demo_calibration)
    try:
        before = engine.check([CheckItem(image) for image in images])
        set_memory_format(demo_bundle, "channels_last")
        conv = next(p for p in demo_bundle.network.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert not conv.is_contiguous()
        after = engine.check([CheckItem(image) for image in images])
    finally:
        set_memory_format(demo_bundle, "contiguous")
    for a, b in zip(before, after, strict=True):
        assert a.class_index == b.class_index
        assert a.logits == pytest.approx(b.logits, rel=1e-4, abs=1e-5)
        assert [s.score for s in a.scores] == pytest.approx([s.score for s in b.scores],
                                                            rel=1e-3, abs=1e-3)
        assert a.verdict.risk == pytest.approx(b.verdict.risk, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="unknown memory format"):
        set_memory_format(demo_bundle, "nhwc")


@pytest.mark.parametrize("configured", [None, 2])
def test_the_server_reports_the_threads_it_chose_and_why(demo_engine, configured):
    layout = {"memory_format": "contiguous"} if configured else {}
    server, port = _serve(demo_engine, torch_threads=configured, **layout)
    try:
        with AxguardClient(f"127.0.0.1:{port}") as client:
            info = client.model_info()
        registry = server.metrics.registry
        if configured:
            assert info.torch_threads == 2 and info.torch_threads_choice == "2 (configured)"
            source = "configured"
        else:
            assert info.torch_threads >= 1
            assert info.torch_threads_choice.startswith(f"{info.torch_threads} (measured: ")
            assert "transport" in info.torch_threads_choice
            # The layout was timed both ways; the weights are laid out as it says.
            assert "channels_last: " in info.torch_threads_choice
            assert "contiguous: " in info.torch_threads_choice
            chosen = demo_engine.bundle.memory_format
            assert f"layout {chosen} (measured" in info.torch_threads_choice
            conv = next(p for p in demo_engine.bundle.network.parameters() if p.dim() == 4)
            assert conv.is_contiguous(memory_format=MEMORY_FORMATS[chosen])
            source = "measured"
        assert registry.get_sample_value("axguard_torch_threads", {
            "model": "digits-cnn", "source": source}) == info.torch_threads
    finally:
        server.server.stop(None)
        server.plane.close()
        set_memory_format(demo_engine.bundle, "contiguous")  # the bundle is shared by tests


def test_the_container_cpu_limit_caps_the_usable_cores(tmp_path):
    from axguard.serving.threads import cgroup_cpu_limit

    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert cgroup_cpu_limit(v1) == 1.5
    assert cgroup_cpu_limit(tmp_path / "missing") is None
