#!/usr/bin/env python
"""Benchmark report of a trained run on this machine (thin wrapper over hgad_edge.bench.run_bench).

    python benchmarks/bench.py runs/x [--data ROOT] [--backends torch,onnxruntime,tensorrt] \
        [--precisions fp32,fp16,int8] [--batch 1,8] [--out benchmarks/results]

Writes <out>/<machine>/report.md, report.json, throughput.png, breakdown.png (and bundle/ unless
--bundle names one). Run it on an otherwise idle machine: the report warns when it was not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="trained run folder (hgad-edge train --out)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="parent of the per-machine report folder")
    p.add_argument("--data", action="append", type=Path, default=[], help="dataset root for accuracy and drift (repeatable)")
    p.add_argument("--backends", type=_csv, default=["torch", "onnxruntime", "tensorrt"], help="comma-separated (default: all three)")
    p.add_argument("--precisions", type=_csv, default=["fp32", "fp16"], help="comma-separated subset of fp32,fp16,int8")
    p.add_argument("--batch", type=lambda v: [int(b) for b in _csv(v)], default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case")
    p.add_argument("--iters", type=int, default=20, help="timed calls per case")
    p.add_argument("--max-images", type=int, help="test images per class for accuracy (default: all)")
    p.add_argument("--no-official", action="store_true", help="skip the official configuration (B6 at 1024, random weights)")
    p.add_argument("--budget-s", type=float, help="wall-clock cap; stages past it are recorded as skipped")
    p.add_argument("--bundle", type=Path, help="reuse this exported bundle instead of exporting into the report folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _bootstrap_package()
    from hgad_edge.bench import run_bench

    folder = run_bench(
        args.run, args.out, data_roots=args.data, backends=args.backends, precisions=args.precisions, batches=args.batch,
        warmup=args.warmup, iters=args.iters, max_images=args.max_images, official=not args.no_official,
        budget_s=args.budget_s, bundle=args.bundle,
    )
    report = json.loads((folder / "report.json").read_text())
    for target in report["targets"]:
        print(f"{target['status']:>4}  {target['target']}")
    if report.get("busy_warning"):
        print(f"WARNING: {report['busy_warning']}")
    print(f"report: {folder / 'report.md'} ({len(report['errors'])} stage error(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
