#!/usr/bin/env python
"""What tiling costs: frames/s and tiles/s of a tiled bundle on 1, 5 and 12 MP frames, end to end
through the torch-free runtime, against the model's own images/s at the same batch size.

    python benchmarks/tiling_bench.py BUNDLE [--backends onnxruntime] [--precisions fp32,fp16]
        [--megapixels 1,5,12] [--frames 3] [--max-batch 32] [--out DIR]

End to end = `Detector.infer(frame)`: cutting the tiles on the host, the runner calls, stitching the
full-resolution map and the frame score. Model only = the runner calls of those same frames (the
result's latency_ms["model"]), at the batch the tiled calls use (min(tiles per frame, max batch)).
Target: tiles/s end to end >= 0.9x the model's images/s, i.e. cutting, stitching and scoring add at
most 10 %. Host memory per frame: the peak of numpy allocations (tracemalloc) during one end-to-end
call. Writes DIR/tiling_bench.json and DIR/tiling_bench.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package  # noqa: E402

bootstrap_package()

from hgad_edge.core.files import atomic_write_json, atomic_write_text  # noqa: E402
from hgad_edge.core.tiling import Tiling, plan_tiles  # noqa: E402
from hgad_edge.runtime import Detector  # noqa: E402

# (width, height) of common camera sensors at about 1, 5 and 12 MP
FRAMES = {1: (1280, 1024), 5: (2448, 2048), 12: (4000, 3000)}
TARGET_RATIO = 0.9


def bench_one(bundle: Path, backend: str, precision: str, mp: int, frames: int, max_batch: int) -> dict:
    width, height = FRAMES[mp]
    with Detector(bundle, backend=backend, precision=precision, max_batch=max_batch) as det:
        tiling = Tiling.from_dict(det.tiling)
        if tiling is None:
            raise SystemExit(f"{bundle} is not tiled: export a run trained with --tile")
        grid = plan_tiles((height, width), tiling)
        rng = np.random.default_rng(mp)
        frame = rng.integers(0, 256, (height, width, 3), np.uint8)
        det.infer(frame, 0)  # warm-up, and buffers planned for this frame
        tracemalloc.start()
        det.infer(frame, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        start, model_ms = time.perf_counter(), 0.0
        for _ in range(frames):
            result = det.infer(frame, 0)
            model_ms += result.latency_ms["model"]
        seconds = (time.perf_counter() - start) / frames
        batch = min(grid.count, det.info["max_batch"])
    tiles_per_s = grid.count / seconds
    model_ips = grid.count * frames / (model_ms / 1e3)
    return {
        "backend": backend,
        "precision": precision,
        "megapixels": round(width * height / 1e6, 1),
        "frame": f"{width}x{height}",
        "tiles_per_frame": grid.count,
        "batch": batch,
        "frames_per_s": 1.0 / seconds,
        "tiles_per_s": tiles_per_s,
        "model_images_per_s": model_ips,
        "ratio": tiles_per_s / model_ips,
        "host_peak_mb": peak / 2**20,
        "latency_ms": {k: float(v) for k, v in result.latency_ms.items()},
    }


def markdown(rows: list[dict], command: str) -> str:
    out = [
        "# Tiled inference: frames/s and tiles/s\n",
        f"`{command}`\n",
        f"Target: tiles/s end to end >= {TARGET_RATIO}x the model's own images/s at the same batch.\n",
        "| backend | precision | frame | tiles | batch | frames/s | tiles/s | model images/s | ratio | host peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "PASS" if r["ratio"] >= TARGET_RATIO else "MISS"
        out.append(
            f"| {r['backend']} | {r['precision']} | {r['frame']} ({r['megapixels']} MP) | {r['tiles_per_frame']} "
            f"| {r['batch']} | {r['frames_per_s']:.2f} | {r['tiles_per_s']:.1f} | {r['model_images_per_s']:.1f} "
            f"| {r['ratio']:.2f} {verdict} | {r['host_peak_mb']:.0f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--backends", default="onnxruntime")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--megapixels", default="1,5,12", help=f"any of {sorted(FRAMES)}")
    ap.add_argument("--frames", type=int, default=3, help="timed frames per row (after one warm-up)")
    ap.add_argument("--max-batch", type=int, default=32, help="most tiles per runner call")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tiling_bench"))
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.megapixels.split(",") if v]
    bad = sorted(set(sizes) - set(FRAMES))
    if bad:
        ap.error(f"--megapixels: {bad} not among {sorted(FRAMES)}")
    if args.frames < 1 or args.max_batch < 1:
        ap.error("--frames and --max-batch must be >= 1")
    command = "python benchmarks/tiling_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for backend in [b for b in args.backends.split(",") if b]:
        for precision in [p for p in args.precisions.split(",") if p]:
            for mp in sizes:
                row = bench_one(args.bundle, backend, precision, mp, args.frames, args.max_batch)
                print(json.dumps(row), flush=True)
                rows.append(row)
    atomic_write_json(args.out / "tiling_bench.json", {"command": command, "rows": rows})
    text = markdown(rows, command)
    atomic_write_text(args.out / "tiling_bench.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
