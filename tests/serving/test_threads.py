"""The torch thread policy: the pure rule against hand computations, and the server's
warm-up measurement through GetModelInfo and /metrics."""

from __future__ import annotations

import pytest

from axguard.config import load_settings
from axguard.serving.threads import candidate_threads, choose_threads, cycle_seconds
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


@pytest.mark.parametrize("configured", [None, 2])
def test_the_server_reports_the_threads_it_chose_and_why(demo_engine, configured):
    server, port = _serve(demo_engine, torch_threads=configured)
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
            source = "measured"
        assert registry.get_sample_value("axguard_torch_threads", {
            "model": "digits-cnn", "source": source}) == info.torch_threads
    finally:
        server.server.stop(None)
        server.plane.close()


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
