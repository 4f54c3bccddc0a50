#!/usr/bin/env python
"""GPU check for a lent machine: the benchmark with the defaults a short GPU session wants.

    python benchmarks/gpu_check.py RUN [--bundle DIR] [--data ROOT --classes NAME] [--out DIR]

It is `hgad-edge bench` (same options, see --help) with these defaults, each overridable:
every engine the benchmark knows (hgad_edge.bench.ENGINES: torch eager, torch replaying a CUDA
graph, and every runtime backend, e.g. TensorRT built for this GPU), FP32 and mixed FP16, a 270 s
budget (stages past it are reported as skipped), at most 200 test images per class for accuracy
and the FP16-vs-FP32 drift. A failing stage is written into the report and the rest goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402
from bench import run_verb  # noqa: E402


def gpu_defaults() -> list[str]:
    _bootstrap_package()
    from hgad_edge.bench import BACKENDS

    return ["--backends", ",".join(BACKENDS), "--precisions", "fp32,fp16", "--budget-s", "270", "--max-images", "200"]


def main(argv: list[str] | None = None) -> int:
    """The defaults come first: the same option given later (the user's) wins."""
    args = sys.argv[1:] if argv is None else list(argv)
    return run_verb(args if "--help" in args else [*gpu_defaults(), *args], "benchmarks/gpu_check.py")


if __name__ == "__main__":
    sys.exit(main())
