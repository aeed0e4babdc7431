"""Peak memory under the largest accepted inputs, sent concurrently: `make bench-memory`.

Starts `axguard serve` on the demo model with its defaults (memory budget 1 GiB: 384 MiB
for 8 requests of up to 16 MiB in flight, then 2 concurrent decodes, pixel limit 33.6 M),
builds the largest images the limits accept in several formats (RGBA PNG, palette PNG with
transparency, 16-bit grayscale PNG, JPEG, deflate TIFF, BMP within max_image_bytes), sends
each several times from 8 threads at once,
and records the server's resident memory (VmRSS sampled every 20 ms, and the kernel's
VmHWM peak) before, during and after. The target: peak − baseline stays under the budget.
Writes bench/results/memory.{json,md}.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from axguard.engine.preprocess import decode_plan
from axguard_client import AxguardClient

RESULTS = Path(__file__).parent / "results"
BUDGET_MIB = 1024
MAX_WORKERS = 8
MAX_IMAGE_BYTES = 16 * 2**20


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def largest_images(pixels: int) -> dict[str, bytes]:
    """The largest image of each kind that the pixel and byte limits accept."""
    side = math.isqrt(pixels)
    rng = np.random.default_rng(0)
    # Smooth content with some noise: compresses under 16 MiB at these sizes.
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    base = (np.add.outer(ramp, ramp) / 2).astype(np.uint8)
    out: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **kwargs: object) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        out[name] = buffer.getvalue()

    rgba = Image.fromarray(np.dstack([base, base[::-1], base.T, np.full_like(base, 200)]),
                           "RGBA")
    save("rgba.png", rgba, "PNG", compress_level=1)
    palette = Image.fromarray(base // 16, "L").convert("P")
    save("palette_transparent.png", palette, "PNG", transparency=0)
    save("gray16.png", Image.fromarray(base.astype(np.uint16) * 257), "PNG")
    noisy = np.clip(base.astype(int) + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8)
    save("rgb.jpg", Image.fromarray(np.dstack([noisy] * 3)), "JPEG", quality=85)
    save("rgb_deflate.tif", Image.fromarray(np.dstack([base] * 3)), "TIFF",
         compression="tiff_adobe_deflate")
    bmp_side = math.isqrt((MAX_IMAGE_BYTES - 1024) // 3)
    save("rgb.bmp", Image.fromarray(np.dstack([base[:bmp_side, :bmp_side]] * 3)), "BMP")
    return out


def main() -> int:
    decodes, pixels = decode_plan(BUDGET_MIB * 2**20, MAX_WORKERS, MAX_IMAGE_BYTES)
    images = largest_images(pixels)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AXGUARD_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port), "--metrics-port",
         "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, int]] = []
    try:
        target = f"127.0.0.1:{port}"
        with AxguardClient(target, timeout=120) as client:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    client.check(images["rgb.jpg"])
                    break
                except Exception:  # noqa: BLE001  (still starting)
                    time.sleep(0.5)
            time.sleep(1.0)
            baseline = status_kib(server.pid, "VmRSS")
            stop = threading.Event()

            def sample() -> None:
                start = time.time()
                while not stop.is_set():
                    samples.append((time.time() - start, status_kib(server.pid, "VmRSS")))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            jobs = [name for name in images for _ in range(4)]
            codes: dict[str, int] = {}

            def send(name: str) -> str:
                try:
                    response = client.check(images[name])
                    return f"OK class {response.prediction.class_index}"
                except Exception as err:  # noqa: BLE001  (recorded)
                    return type(err).__name__

            started = time.time()
            with ThreadPoolExecutor(MAX_WORKERS) as pool:
                for name, outcome in zip(jobs, pool.map(send, jobs), strict=True):
                    key = f"{name}: {outcome.split()[0]}"
                    codes[key] = codes.get(key, 0) + 1
            seconds = time.time() - started
            time.sleep(2.0)
            stop.set()
            sampler.join()
            after = status_kib(server.pid, "VmRSS")
            peak = status_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(30)
    mib = 1024
    result = {
        "command": "make bench-memory", "machine": f"{platform.machine()}, 2 cores",
        "budget_mib": BUDGET_MIB, "concurrent_decodes": decodes, "max_image_pixels": pixels,
        "inputs": {name: len(data) for name, data in images.items()},
        "requests": len(jobs), "threads": MAX_WORKERS, "seconds": round(seconds, 1),
        "outcomes": codes,
        "rss_mib": {"baseline": baseline / mib, "peak_sampled": max(r for _, r in samples) / mib,
                    "peak_vmhwm": peak / mib, "after": after / mib},
        "peak_minus_baseline_mib": (peak - baseline) / mib,
        "under_budget": (peak - baseline) / mib < BUDGET_MIB,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# Memory under the largest accepted inputs (`make bench-memory`)\n\n"
          f"budget {BUDGET_MIB} MiB → {decodes} concurrent decodes, pixel limit {pixels:,}; "
          f"{len(jobs)} requests from {MAX_WORKERS} threads in {seconds:.1f} s\n\n"
          f"| RSS (MiB) | baseline | peak (VmHWM) | peak − baseline | after |\n"
          f"|---|---|---|---|---|\n"
          f"| demo server | {baseline / mib:.0f} | {peak / mib:.0f} | "
          f"{(peak - baseline) / mib:.0f} | {after / mib:.0f} |\n\n"
          f"outcomes: {codes}\n\ninputs (bytes): {result['inputs']}\n")
    (RESULTS / "memory.md").write_text(md)
    print(md)
    return 0 if result["under_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
