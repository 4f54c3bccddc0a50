#!/usr/bin/env python
"""GPU check for a lent machine: the benchmark with the defaults a short GPU session wants.

    python benchmarks/gpu_check.py RUN [--bundle DIR] [--data ROOT --classes NAME] [--out DIR]

It is `hgad-edge bench` (same options, see --help) with these defaults, each overridable:
every engine the benchmark knows (hgad_edge.bench.ENGINES: torch eager, torch replaying a CUDA
graph, and every runtime backend, e.g. TensorRT built for this GPU), FP32 and mixed FP16, a 270 s
budget (stages past it are reported as skipped), at most 200 test images per class for accuracy
and the FP16-vs-FP32 drift. A failing stage is written into the report and the rest goes on.
Then TensorRT-RTX (hgad_edge.bench.rtx_latency): its fp16 engine is built for this GPU and timed
when TensorRT-RTX supports the GPU's compute capability, else it says why; written to
OUT/<machine>/rtx.md beside report.md (give --bundle, or the report's own bundle is used).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package as _bootstrap_package  # noqa: E402


def _bench_script():
    """benchmarks/bench.py, by path: `import bench` finds the benchmarks/bench/ package first."""
    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).resolve().with_name("bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_verb = _bench_script().run_verb


def gpu_defaults() -> list[str]:
    _bootstrap_package()
    from hgad_edge.bench.choices import BACKENDS

    return ["--backends", ",".join(BACKENDS), "--precisions", "fp32,fp16", "--budget-s", "270", "--max-images", "200"]


def rtx_stage(args: list[str]) -> None:
    """TensorRT-RTX engine latency beside the bench rows (a failure is written, never raised)."""
    from hgad_edge.bench.machine import machine_info
    from hgad_edge.bench.rtx_latency import time_rtx_engine
    from hgad_edge.core.files import atomic_write_text

    folder = Path(_option(args, "--out", "benchmarks/results")) / machine_info()["name"]
    bundle = Path(_option(args, "--bundle", str(folder / "bundle")))
    try:
        rtx = time_rtx_engine(bundle)
        lines = [f"- {rtx.note}"] + [f"- {r.precision} batch {r.batch}: {r.batch / r.seconds:.1f} img/s "
                                     f"({1e3 * r.seconds:.2f} ms per batch, {r.iters} iters)" for r in rtx.rows]
    except Exception as err:  # noqa: BLE001 - a lent GPU's session must still leave a report
        lines = [f"- TensorRT-RTX stage failed: {type(err).__name__}: {err}"]
    text = "# TensorRT-RTX on this GPU\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(folder / "rtx.md", text)
    print(text)


def _option(args: list[str], name: str, default: str) -> str:
    """The last value given for `--name VALUE` / `--name=VALUE` (the user's wins over the defaults)."""
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def main(argv: list[str] | None = None) -> int:
    """The defaults come first: the same option given later (the user's) wins."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args:
        return run_verb(args, "benchmarks/gpu_check.py")
    code = run_verb([*gpu_defaults(), *args], "benchmarks/gpu_check.py")
    if code == 0:  # a refused command line (exit 2) writes nothing, RTX stage included
        rtx_stage(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
