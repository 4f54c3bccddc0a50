#!/usr/bin/env python
"""Benchmark report of a trained run on this machine: `hgad-edge bench` from a plain checkout.

    python benchmarks/bench.py RUN [--data ROOT] [--backends torch,onnxruntime,tensorrt] \
        [--precisions fp32,fp16,int8] [--batch 1,8] [--out benchmarks/results]   (all options: --help)

Writes <out>/<machine>/report.md, report.json, throughput.png, breakdown.png (and bundle/ unless
--bundle names one). Run it on an otherwise idle machine: the report warns when it was not.
The options are the CLI verb's own (hgad_edge/cli/tools.py `bench`); the work is hgad_edge.bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402


def run_verb(argv: list[str], prog_name: str) -> int:
    """`hgad-edge bench ARGV`; returns its exit code (click errors print without a traceback)."""
    _bootstrap_package()
    from hgad_edge.cli.tools import bench

    try:
        bench.main(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb(sys.argv[1:] if argv is None else list(argv), "benchmarks/bench.py")


if __name__ == "__main__":
    sys.exit(main())
