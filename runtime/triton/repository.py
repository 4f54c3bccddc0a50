"""Triton Inference Server model repository from a bundle (`hgad-edge triton-repo`, `export --triton`).

    repo/hgad_onnx_fp32/config.pbtxt + 1/model.onnx     platform onnxruntime_onnx
    repo/hgad_onnx_fp16/...                             the mixed graph (FP16 body, FP32 head)
    repo/hgad_trt_fp16/config.pbtxt + 1/<engine>.engine platform tensorrt_plan, one plan per GPU
                                                        compute capability (cc_model_filenames)

NVIDIA's Triton container (`tritonserver --model-repository repo/`) runs these with its onnxruntime
and tensorrt backends. Tensor names, types and dims are read from the bundle's ONNX files, never
assumed. With batching on, the batch axis is implicit: a graph tensor of shape (B,) is declared
`dims: [1]` with `reshape: { shape: [] }` (Triton's rule for batch-only tensors). The bundle
metadata rides in `parameters` (runtime/triton/client.py reads it), so a client checks
classes, input size and versions before it sends a frame, and knows a tiled bundle's `tiling`: it
cuts frames into tiles and sends them as the batch (a TensorRT model's max batch is its engine's
profile: `hgad-edge build --frame` sizes it to the tiles of a frame). Each model folder is replaced in one
rename; other models in the repository are left alone. Torch-free (onnxruntime reads the graphs).
`config_text` also writes the config of `hgad-edge serve`'s own model (platform "python": Triton's
Python backend running the runtime, server.py).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgad_edge.core.bundle import Bundle, load_bundle
from hgad_edge.core.files import atomic_dir
from hgad_edge.runtime.triton.client import model_parameters

__all__ = [
    "INSTANCE_KINDS",
    "RepositoryError",
    "RepositoryModel",
    "Signature",
    "TritonTensor",
    "config_text",
    "read_signature",
    "write_repository",
]

log = logging.getLogger("hgad_edge.export")

MODEL_PREFIX = "hgad"  # runtime/triton/client.py MODEL_CANDIDATES lists the names built from it
MAX_BATCH = 16  # ONNX graphs have a free batch axis; this caps what the dynamic batcher forms
QUEUE_DELAY_US = 2000  # how long a request may wait for others to fill a batch (2 ms << one frame)
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
PYTHON_BACKEND = "python"  # config_text's platform for Triton's Python backend (hgad-edge serve)
_ONNX_TYPES = {
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bool)": "TYPE_BOOL",
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class RepositoryError(RuntimeError):
    """The repository cannot be written as asked; the message names the fix."""


@dataclass(frozen=True)
class TritonTensor:
    """One model input/output as Triton declares it (batch axis excluded)."""

    name: str
    data_type: str  # TYPE_UINT8, TYPE_FP32, ...
    shape: tuple[int, ...]  # per-sample shape in the graph; () for a (B,) tensor

    @property
    def dims(self) -> tuple[int, ...]:
        return self.shape or (1,)

    @property
    def reshaped(self) -> bool:
        return not self.shape


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in (*self.inputs, *self.outputs)}


@dataclass
class RepositoryModel:
    """One model written into the repository."""

    name: str
    platform: str
    precision: str
    path: Path
    max_batch: int
    notes: list[str] = field(default_factory=list)


def _tensor(node: Any, path: Path) -> TritonTensor:
    data_type = _ONNX_TYPES.get(node.type)
    dims = list(node.shape)
    if data_type is None:
        raise RepositoryError(
            f"{path}: tensor {node.name!r} has type {node.type}, which this writer does not map; re-export the bundle"
        )
    if not dims or isinstance(dims[0], int):
        raise RepositoryError(
            f"{path}: tensor {node.name!r} has no dynamic batch axis (shape {dims}); "
            "re-export the bundle with `hgad-edge export`"
        )
    rest = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise RepositoryError(
            f"{path}: tensor {node.name!r} has dynamic dims besides the batch ({dims}); re-export the bundle"
        )
    return TritonTensor(node.name, data_type, tuple(rest))


def read_signature(onnx_path: Path | str) -> Signature:
    """Inputs and outputs of an ONNX graph in Triton terms (names, types, dims), read with onnxruntime."""
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise RepositoryError(f"{path} is missing from the bundle; copy the whole bundle folder again or re-export it")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the signature is needed
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return Signature(
        tuple(_tensor(n, path) for n in session.get_inputs()), tuple(_tensor(n, path) for n in session.get_outputs())
    )


# ---- config.pbtxt (protobuf text format of Triton's ModelConfig) ----------------------------------
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _list(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _tensor_block(tensor: TritonTensor, reshape: bool = True) -> str:
    lines = [
        f"    name: {_quote(tensor.name)}",
        f"    data_type: {tensor.data_type}",
        f"    dims: {_list(tensor.dims)}",
    ]
    if tensor.reshaped and reshape:
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _warmup_block(signature: Signature, batch: int) -> str:
    """Random images and class id 0 (a random int64 class id would index out of range)."""
    inputs = []
    for tensor in signature.inputs:
        data = (
            "random_data: true" if tensor.data_type in ("TYPE_UINT8", "TYPE_FP32", "TYPE_FP16") else "zero_data: true"
        )
        inputs.append(
            f"    inputs {{\n      key: {_quote(tensor.name)}\n      value: {{ data_type: {tensor.data_type} "
            f"dims: {_list(tensor.dims)} {data} }}\n    }}"
        )
    return f'  {{\n    name: "batch_{batch}"\n    batch_size: {batch}\n' + "\n".join(inputs) + "\n  }"


def config_text(
    name: str,
    platform: str,
    signature: Signature,
    max_batch: int,
    preferred: Sequence[int],
    queue_delay_us: int,
    instances: int,
    kind: str,
    parameters: dict[str, str],
    cc_model_filenames: dict[str, str] | None = None,
) -> str:
    """A complete config.pbtxt; tests parse it with Triton's own ModelConfig schema.

    platform "python" is Triton's Python backend (`hgad-edge serve`): `backend: "python"`, and (B,)
    tensors keep dims [1] (the model reshapes its own rows)."""
    python = platform == PYTHON_BACKEND
    parts = [
        f"name: {_quote(name)}",
        f"backend: {_quote(platform)}" if python else f"platform: {_quote(platform)}",
        f"max_batch_size: {int(max_batch)}",
        "input [\n" + ",\n".join(_tensor_block(t, not python) for t in signature.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, not python) for t in signature.outputs) + "\n]",
        f"dynamic_batching {{\n  preferred_batch_size: {_list(preferred)}\n"
        f"  max_queue_delay_microseconds: {int(queue_delay_us)}\n}}",
        f"instance_group [\n  {{\n    count: {int(instances)}\n    kind: {INSTANCE_KINDS[kind]}\n  }}\n]",
        "model_warmup [\n" + ",\n".join(_warmup_block(signature, b) for b in sorted({1, int(max_batch)})) + "\n]",
    ]
    for cc, filename in sorted((cc_model_filenames or {}).items()):
        parts.append(f"cc_model_filenames {{\n  key: {_quote(cc)}\n  value: {_quote(filename)}\n}}")
    for key, value in sorted(parameters.items()):
        parts.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(parts) + "\n"


# ---- the repository ------------------------------------------------------------------------------
def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in str(version).split("."))


def _engine_groups(bundle: Bundle) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{precision: {compute capability: engine file}} of the TensorRT engines (TensorRT-RTX ones are noted and
    skipped); of two engines for one GPU the newer TensorRT wins."""
    groups: dict[str, dict[str, str]] = {}
    notes = []
    engines = bundle.metadata.get("engines") or {}
    for name in sorted(engines, key=lambda n: _version_key(engines[n].get("trt_version", "0"))):
        entry = engines[name]
        if entry.get("target", "tensorrt") != "tensorrt":
            notes.append(
                f"engine {name} is a {entry['target']} engine: Triton's tensorrt_plan backend runs TensorRT engines "
                "only; skipped (the ONNX models serve the bundle, or `hgad-edge serve` runs it)"
            )
            continue
        if not bundle.engine_path(name).is_file():
            notes.append(f"engine {name} is listed in the metadata but missing from {bundle.engines_dir()}; skipped")
            continue
        cc_files = groups.setdefault(entry["precision"], {})
        cc = str(entry["compute_capability"])
        if cc in cc_files:
            notes.append(f"{cc_files[cc]} replaced by {name} (newer TensorRT) for compute capability {cc}")
        cc_files[cc] = name
    return groups, notes


def _check_options(repo: Path, prefix: str, max_batch: int, queue_delay_us: int, instances: int, kind: str) -> None:
    if not _NAME.fullmatch(prefix):
        raise RepositoryError(f"model name prefix {prefix!r} may hold only letters, digits, '_', '.', '-'")
    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise RepositoryError(
            f"need max_batch >= 1, instances >= 1, queue_delay_us >= 0 (got {max_batch}, {instances}, {queue_delay_us})"
        )
    if kind not in INSTANCE_KINDS:
        raise RepositoryError(f"instance kind must be one of {sorted(INSTANCE_KINDS)}, got {kind!r}")
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"{repo} exists and is not a folder; pick a folder for the model repository")


def _write_model(repo: Path, name: str, config: str, files: dict[str, Path]) -> Path:
    """Model folder <repo>/<name> with config.pbtxt and 1/<files>, swapped in atomically."""
    with atomic_dir(repo / name) as stage:
        (stage / "config.pbtxt").write_text(config, encoding="utf-8")
        (stage / "1").mkdir()
        for target, source in files.items():
            shutil.copyfile(source, stage / "1" / target)
    return repo / name


def write_repository(
    bundle_path: Path | str,
    repo: Path | str,
    *,
    prefix: str = MODEL_PREFIX,
    max_batch: int = MAX_BATCH,
    queue_delay_us: int = QUEUE_DELAY_US,
    instances: int = 1,
    kind: str = "gpu",
) -> list[RepositoryModel]:
    """Write one Triton model per ONNX graph and per engine precision of the bundle (module doc)."""
    repo = Path(repo)
    _check_options(repo, prefix, max_batch, queue_delay_us, instances, kind)
    bundle = load_bundle(bundle_path)
    written = []
    signatures = {precision: read_signature(bundle.model_path(precision)) for precision in bundle.models}
    for precision, signature in signatures.items():
        name = f"{prefix}_onnx_{precision}"
        params = model_parameters(bundle.metadata, precision, signature.shapes)
        config = config_text(
            name, "onnxruntime_onnx", signature, max_batch, (max_batch,), queue_delay_us, instances, kind, params
        )
        path = _write_model(repo, name, config, {"model.onnx": bundle.model_path(precision)})
        written.append(RepositoryModel(name, "onnxruntime_onnx", precision, path, max_batch))
    groups, notes = _engine_groups(bundle)
    engines = bundle.metadata.get("engines") or {}
    for precision, cc_files in sorted(groups.items()):
        entries = [engines[f] for f in cc_files.values()]
        source = entries[0].get("model", "fp16" if precision == "fp16" else "fp32")
        signature = signatures.get(source) or next(iter(signatures.values()))  # same tensors in every graph
        profile_max = min(int(e["batch"][-1]) for e in entries)
        preferred = sorted({min(int(e["batch"][1]) for e in entries), profile_max})
        name = f"{prefix}_trt_{precision}"
        params = model_parameters(bundle.metadata, precision, signature.shapes)
        params["hgad_edge.trt_versions"] = json.dumps(
            {cc: engines[f]["trt_version"] for cc, f in sorted(cc_files.items())}
        )
        config = config_text(
            name, "tensorrt_plan", signature, profile_max, preferred, queue_delay_us, instances, "gpu", params, cc_files
        )
        path = _write_model(repo, name, config, {f: bundle.engine_path(f) for f in cc_files.values()})
        model = RepositoryModel(name, "tensorrt_plan", precision, path, profile_max, list(notes))
        if kind != "gpu":
            model.notes.append("TensorRT plans run only on GPU instances: its instance_group is KIND_GPU")
        written.append(model)
        notes = []
    for note in notes:
        log.warning(note)
    return written
