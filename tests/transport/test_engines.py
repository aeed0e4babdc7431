"""Engine processes beside the transport: the start-up rule by hand, then real engine
processes behind a real server: the same answers, every batch computed there, a killed
engine process loses no request, and `axguard serve` exits 1 when one dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from axguard.config import load_settings
from axguard.engine.core import CheckItem
from axguard.serving.batching import DynamicBatcher
from axguard.serving.metrics import EngineCollector
from axguard.serving.threads import ThreadChoice
from axguard.transport.engines import (
    GPU_CONTEXT_BYTES,
    PROCESS_FLOOR_BYTES,
    available_memory_bytes,
    engine_process_count,
    engine_threads,
    resident_bytes,
)
from axguard.transport.server import build_server, start_serving
from axguard_client import AxguardClient
from conftest import EXAMPLES, ROOT

GIB = 2**30


def measured(threads: int, batch_seconds: float, transport_seconds: float) -> ThreadChoice:
    return ThreadChoice(threads, "measured", 8, {threads: batch_seconds}, transport_seconds)


def test_the_rule_by_hand():
    # The demo on 2 cores: 1 thread, 7.5 ms per batch of 8 (0.94 ms an item), 0.64 ms of
    # transport: cores ⌊(2 − 1) / 1⌋ = 1, feed ⌈0.94 / 0.64⌉ = 2 → one engine beside.
    count, why = engine_process_count(2, measured(1, 0.0075, 0.00064), "cpu", 10**6, 20 * GIB)
    assert count == 1 and why.startswith("smallest of cores 1, feed 2, memory ")
    # ResNet-34 on 2 cores chose both threads: still one engine beside (at least 1).
    assert engine_process_count(2, measured(2, 1.9, 0.001), "cpu", 85 * 2**20, 20 * GIB)[0] == 1
    # 16 cores, a small model: the transport feeds ⌈0.94 / 0.64⌉ = 2 engines.
    assert engine_process_count(16, measured(1, 0.0075, 0.00064), "cpu", 10**6, 20 * GIB)[0] == 2
    # A GPU: cores − 1 = 15, GPU memory ⌊4 GiB / (100 MiB + 1 GiB)⌋ = 3.
    gpu = ThreadChoice(15, "device")
    count, why = engine_process_count(16, gpu, "cuda", 100 * 2**20, 64 * GIB, 4 * GIB)
    assert count == 3 and "gpu_memory 3" in why and "feed" not in why
    assert GPU_CONTEXT_BYTES == GIB
    # One core, or no memory for another process: the engine stays in the serving process.
    assert engine_process_count(1, measured(1, 0.0075, 0.00064), "cpu", 10**6, 20 * GIB) == (
        0, "one usable core")
    tight = PROCESS_FLOOR_BYTES + 10**6 - 1
    assert engine_process_count(2, measured(1, 0.0075, 0.00064), "cpu", 10**6, tight)[0] == 0
    # Each engine process needs what the serving process holds: a 2 GiB pod limit with
    # 1.1 GiB used leaves 0.9 GiB, less than the serving process's 1.1 GiB: no engine process.
    pod = engine_process_count(2, measured(1, 0.0075, 0.00064), "cpu", 10**6,
                               int(0.9 * GIB), process_bytes=int(1.1 * GIB))
    assert pod[0] == 0 and "memory 0" in pod[1]
    assert engine_process_count(2, measured(1, 0.0075, 0.00064), "cpu", 10**6, 3 * GIB,
                                process_bytes=int(1.1 * GIB))[0] == 1
    # Threads: the measured choice on a CPU, a share of the cores on a GPU.
    assert engine_threads(16, measured(2, 0.1, 0.001), "cpu", 4) == 2
    assert engine_threads(16, gpu, "cuda", 3) == 5


def test_resident_memory_is_read_from_proc(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  789012 kB\n")
    assert resident_bytes(status) == 789012 * 1024
    assert resident_bytes(tmp_path / "none") is None
    assert resident_bytes() > 100 * 2**20  # this test process, with torch loaded


def test_free_memory_is_the_cgroup_limit_less_its_usage(tmp_path):
    (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{GIB}\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert available_memory_bytes(tmp_path, meminfo) == 3 * GIB
    (tmp_path / "memory.max").write_text("max\n")  # no limit: what the node has free
    assert available_memory_bytes(tmp_path, meminfo) == 1000 * 1024
    assert available_memory_bytes(tmp_path / "none", tmp_path / "none") is None


def test_the_metrics_sum_every_engines_counters(demo_engine):
    batcher = DynamicBatcher(demo_engine)
    collector = EngineCollector(demo_engine, batcher, "digits-cnn")
    demo_engine.captum_calls["deeplift"] = demo_engine.captum_calls.get("deeplift", 0) + 2
    collector.remote = {"captum_calls": {"deeplift": 3}, "nonfinite_outputs": {"logits": 4}}
    try:
        families = {f.name: f for f in collector.collect()}
        captum = {s.labels["method"]: s.value for s in families["axguard_captum_fallback"].samples}
        assert captum["deeplift"] == demo_engine.captum_calls["deeplift"] + 3
        nonfinite = {s.labels["stage"]: s.value
                     for s in families["axguard_nonfinite_outputs"].samples}
        assert nonfinite["logits"] == demo_engine.nonfinite_outputs.get("logits", 0) + 4
    finally:
        demo_engine.captum_calls["deeplift"] -= 2
        batcher.close()


@pytest.fixture()
def beside(demo_bundle, demo_calibration):
    """A real server whose checks run in one engine process beside it."""
    from axguard.builder import build_engine

    settings = load_settings(server={"host": "127.0.0.1", "port": 0, "engine_processes": 1},
                             model={"source": "demo"})
    engine = build_engine(settings)
    parts = build_server(settings, engine)
    start_serving(parts, settings)
    try:
        yield parts
    finally:
        parts.server.stop(None)
        parts.plane.close()
        if parts.engines is not None:
            parts.engines.close()


def test_checks_run_in_the_engine_process_with_the_same_answers(beside):
    parts = beside
    assert parts.engines is not None and len(parts.engines) == 1
    assert parts.metrics.registry.get_sample_value(
        "axguard_engine_processes", {"model": "digits-cnn", "source": "configured"}) == 1
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    alone = parts.plane.engine.check([CheckItem(image) for image in images])
    # One connection, eight threads: every batch goes to the engine process's pipes.
    with AxguardClient(f"127.0.0.1:{parts.port}") as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda image: client.check(image, return_heatmaps=True),
                                [*images, *images]))
    for answer, expected in zip(answers, [*alone, *alone], strict=True):
        assert answer.prediction.class_index == expected.class_index
        assert list(answer.prediction.logits) == pytest.approx(expected.logits, rel=1e-4,
                                                               abs=1e-5)
        assert [s.score for s in answer.co_scores] == pytest.approx(
            [s.score for s in expected.scores], rel=1e-3, abs=1e-3)
        assert answer.verdict.risk == pytest.approx(expected.verdict.risk, rel=1e-4, abs=1e-6)
        assert set(answer.heatmaps) == {s.method for s in expected.scores}
    by_runner = parts.plane.batcher.stats.batches_by_runner
    assert "axguard-batcher-0" not in by_runner  # the serving process's engine ran none
    assert sum(by_runner.values()) >= 1 and parts.plane.batcher.stats.items == 32


def test_a_killed_engine_process_loses_no_request(beside):
    parts = beside
    os.kill(parts.engines.pids[0], signal.SIGKILL)
    time.sleep(0.5)
    with AxguardClient(f"127.0.0.1:{parts.port}") as client:
        answers = [client.check(EXAMPLES / "digit_3.png") for _ in range(5)]
    assert [a.prediction.class_index for a in answers] == [3] * 5
    stats = parts.plane.batcher.stats
    assert stats.lost_runners == 2  # both pipes of the engine; then the own engine serves
    assert stats.failed_batches == 0
    assert not parts.engines.alive()


def test_the_server_exits_1_when_an_engine_process_dies(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "axguard.cli", "serve", "--port", "0",
                                 "--metrics-port", "0", "--engine-processes", "1"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and '"serving"' not in log.read_text():
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            events = [json.loads(line) for line in log.read_text().splitlines()
                      if line.startswith("{")]
            (chosen,) = [e for e in events if e["event"] == "engine_processes"]
            assert chosen["processes"] == 1 and chosen["source"] == "configured"
            children = [pid for pid in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert children, "no engine process"
            for pid in children:
                os.kill(int(pid), signal.SIGKILL)
            assert proc.wait(timeout=60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
    assert '"engine_process_died"' in log.read_text()


def test_the_wire_keeps_every_option_and_every_answer(demo_engine):
    from axguard.engine.core import CheckResult, StageTiming
    from axguard.errors import NonFiniteOutput
    from axguard.transport import engines

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    asked = [demo_engine.resolve(CheckItem(images[0], label=4, return_heatmaps=True)),
             demo_engine.resolve(CheckItem(images[1], prediction_only=True)),
             demo_engine.resolve(CheckItem(images[2], pairs=[("deconvolution", "product")]))]
    received, calibration = engines._batch_from_wire(engines._items_to_wire(asked))
    assert calibration is None
    assert engines._batch_from_wire(engines._items_to_wire(asked, "{}"))[1] == "{}"
    for a, b in zip(asked, received, strict=True):
        assert type(b) is type(a)
        assert torch.equal(a.image, b.image)
        assert (a.methods, a.ax_processes, a.label, a.return_heatmaps, a.prediction_only,
                a.verdict_only, a.pairs) == (b.methods, b.ax_processes, b.label,
                                             b.return_heatmaps, b.prediction_only,
                                             b.verdict_only, b.pairs)
    results = [*demo_engine.check(received),
               CheckResult.failed(NonFiniteOutput("heatmap"), StageTiming(1.0, 2.0, 3.0))]
    back = [engines._result_from_wire(engines._result_to_wire(r)) for r in results]
    for a, b in zip(results, back, strict=True):
        assert (a.class_index, a.class_name, a.probability, a.logits, a.probabilities,
                a.scores, a.verdict, a.timing) == (b.class_index, b.class_name,
                                                   b.probability, b.logits, b.probabilities,
                                                   b.scores, b.verdict, b.timing)
        assert a.heatmaps.keys() == b.heatmaps.keys()
        assert all(torch.equal(a.heatmaps[k], b.heatmaps[k]) for k in a.heatmaps)
    assert back[0].scores[0].labelled_score is not None and back[0].heatmaps
    assert isinstance(back[-1].error, NonFiniteOutput) and back[-1].error.stage == "heatmap"
