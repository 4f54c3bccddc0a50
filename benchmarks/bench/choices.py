"""The engines `hgad-edge bench` times: the choices of its --backends and --precisions, and the keys of
hgad_edge.bench.engines.ENGINES (which imports them from here).

Light on purpose: the package's __init__ loads its stages lazily, so `hgad-edge --help` and
`hgad-edge bench --help` import this module and the runtime's backend registry, never torch or a stage.
"""

from __future__ import annotations

from hgad_edge.runtime.backends import LOCAL_BACKENDS, REGISTRY

# in-process PyTorch: eager, and replaying a CUDA graph -> the precisions they run
TORCH_ENGINES: dict[str, tuple[str, ...]] = {"torch": ("fp32", "fp16"), "torch-cudagraph": ("fp32", "fp16")}
# every local runtime backend, through the torch-free Detector; a remote one (triton) scores on a server,
# not on the bench's bundle: benchmarks/serve_bench.py measures it
RUNTIME_ENGINES: tuple[str, ...] = LOCAL_BACKENDS[1:]
_PRECISIONS_OF = {**TORCH_ENGINES, **{name: REGISTRY[name].precisions for name in RUNTIME_ENGINES}}
BACKENDS: tuple[str, ...] = tuple(_PRECISIONS_OF)
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for precisions in _PRECISIONS_OF.values() for p in precisions))
DEFAULT_BACKENDS = ("torch", "onnxruntime", "tensorrt")
