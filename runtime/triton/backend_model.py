"""The model `hgad-edge serve` hands to Triton's Python backend: the torch-free runtime behind model `hgad`,
with every request checked on its own before it joins a batch.

Triton runs it in the Python backend's stub process, one per model instance (`--instances`); the
repository's `model.py` only imports `BundleModel` as `TritonPythonModel`. `triton_python_backend_utils`
exists only in that process, so it is imported in `initialize`, never at import time.

initialize: what to load comes from the version folder's plan.json (`ModelPlan`, written by the serve
process; server-side only, so the bundle's path never reaches a client), what is served from the config
(the bundle metadata in `parameters`, which clients read). The bundle is loaded with every check
`load_bundle` makes (sha256 of each model file), refused when its metadata is not the one the config
announces (it changed in between: the serve process loads it again), and run by the backend and
precision the serve process chose. Triton then sends the config's warm-up requests through `execute`
and marks the model READY only when they were answered: READY means the model answers.

execute: a request is checked before batching (`check_request`): `images` uint8 (n, H, W, 3) and
`class_id` int64, n values, each a class index or -1 (auto). A request that fails the check gets its
own one-line error naming the field (INVALID_ARG) and the others run as one batch, so one bad client
cannot fail the frames of the others. A failure of the runner itself answers the requests of that
batch with one line (type and message, file paths cut out) and logs the traceback on the server
only: no traceback or path leaves the server.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.bundle import load_bundle
from hgad_edge.runtime.backends import create_runner
from hgad_edge.runtime.options import RuntimeOptions

__all__ = ["PLAN_FILE", "BundleModel", "ModelPlan", "RequestError", "check_request", "one_line"]

PLAN_FILE = "plan.json"
AUTO_CLASS = -1
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+@~-]+)+[\\/]?")  # /opt/x/y.cc, C:\x\y: what a message must not carry
_DTYPES = {"TYPE_UINT8": np.uint8, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32}
_DTYPES |= {"TYPE_FP16": np.float16, "TYPE_BOOL": np.bool_}


class RequestError(ValueError):
    """A request the model cannot take; the message is one line and starts with the field's name."""


@dataclass(frozen=True)
class ModelPlan:
    """What a model instance loads: the bundle folder and the runtime the serve process resolved for it."""

    bundle: str
    backend: str
    precision: str
    device: int
    max_batch: int
    allow_engine_host_code: bool = False

    def options(self) -> RuntimeOptions:
        return RuntimeOptions(self.backend, self.device, self.precision, self.max_batch, self.allow_engine_host_code)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> ModelPlan:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, file paths cut out: what a client may see of a server-side failure."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {_PATH.sub('<path>', first)[:300]}"


def check_request(
    images: Any, class_ids: Any, input_size: tuple[int, int], classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, H, W, 3) uint8, class ids (n,) int64) of one request, or RequestError naming the field.

    Triton checks dtypes and dims against the config already; this repeats the shape check (cheap) and
    adds what Triton cannot: class ids in range. A negative id other than -1 is refused, as the local
    API refuses it, rather than taken as "auto"."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = getattr(images, "dtype", type(images).__name__)
        raise RequestError(f"images: expected uint8 frames, got {kind}")
    want = (*input_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
        raise RequestError(f"images: expected shape (n, {want[0]}, {want[1]}, 3), got {tuple(images.shape)}")
    n = int(images.shape[0])
    if not isinstance(class_ids, np.ndarray) or class_ids.dtype != np.int64:
        kind = getattr(class_ids, "dtype", type(class_ids).__name__)
        raise RequestError(f"class_id: expected int64, got {kind}")
    ids = class_ids.reshape(-1)
    if ids.size != n:
        raise RequestError(f"class_id: expected one value per frame ({n}), got {ids.size}")
    bad = ids[(ids != AUTO_CLASS) & ((ids < 0) | (ids >= classes))]
    if bad.size:
        raise RequestError(
            f"class_id: {int(bad[0])} is out of range for this model's {classes} classes; "
            f"use 0..{classes - 1}, or -1 to let the model pick"
        )
    return images, ids


class BundleModel:
    """Triton's `TritonPythonModel` for `hgad-edge serve` (module doc)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb  # only inside Triton's Python backend stub

        self.pb = pb
        config = json.loads(args["model_config"])
        plan = ModelPlan.read(Path(args["model_repository"]) / args["model_version"] / PLAN_FILE)
        bundle = load_bundle(plan.bundle)
        from hgad_edge.runtime.triton.client import METADATA_PARAMETER  # the config key clients read

        announced = json.loads(config["parameters"][METADATA_PARAMETER]["string_value"])
        if announced != bundle.metadata:
            raise RuntimeError(
                f"{plan.bundle}/metadata.json changed while the model loaded; hgad-edge serve loads it again"
            )
        self.runner = create_runner(bundle, plan.options())
        if (self.runner.name, self.runner.precision) != (plan.backend, plan.precision):
            raise RuntimeError(
                f"the runtime chose {self.runner.name} {self.runner.precision}, "
                f"the serve process {plan.backend} {plan.precision}"
            )
        self.image_name, self.class_name = bundle.input_name, bundle.class_input_name
        self.input_size, self.classes = tuple(bundle.input_size), len(bundle.classes)
        self.outputs = [
            (t["name"], _DTYPES[t["data_type"]], tuple(int(d) for d in t["dims"])) for t in config["output"]
        ]
        pb.Logger.log_info(
            f"hgad-edge serve: {args['model_instance_name']} runs {self.runner.description} "
            f"({self.runner.precision}, max batch {self.runner.max_batch}) for {plan.bundle}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                images = self._input(request, self.image_name)
                ids = self._input(request, self.class_name)
                good.append((i, *check_request(images, ids, self.input_size, self.classes)))
            except RequestError as err:
                responses[i] = self._error(str(err), "INVALID_ARG")
        for chunk in self._chunks(good):
            try:
                answers = self._run(chunk)
            except Exception as err:  # one line to the clients, the whole story to the server log
                pb.Logger.log_error(f"hgad-edge serve: a batch failed: {traceback.format_exc()}")
                for i, *_ in chunk:
                    responses[i] = self._error(f"inference failed on the server: {one_line(err)}", "INTERNAL")
                continue
            for (i, *_), tensors in zip(chunk, answers, strict=True):
                responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.deactivate()

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"{name}: missing")
        return tensor.as_numpy()

    def _error(self, message: str, code: str) -> Any:
        error = self.pb.TritonError
        return self.pb.InferenceResponse(
            error=error(message, getattr(error, code)) if hasattr(error, code) else error(message)
        )

    def _chunks(self, good: list[tuple[int, np.ndarray, np.ndarray]]) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
        """Requests in runs of at most max_batch rows (Triton's batcher keeps within it; this is the guard)."""
        chunks: list[list[tuple[int, np.ndarray, np.ndarray]]] = []
        rows = self.runner.max_batch
        for item in good:
            n = len(item[2])
            if not chunks or rows + n > self.runner.max_batch:
                chunks.append([])
                rows = 0
            chunks[-1].append(item)
            rows += n
        return chunks

    def _run(self, chunk: list[tuple[int, np.ndarray, np.ndarray]]) -> list[list[Any]]:
        """One runner call for the requests of `chunk`; each request's rows of every output, as Triton tensors."""
        runner, n = self.runner, sum(len(ids) for _, _, ids in chunk)
        np.concatenate([images for _, images, _ in chunk], out=runner.inputs[self.image_name][:n])
        np.concatenate([ids for _, _, ids in chunk], out=runner.inputs[self.class_name][:n])
        out = runner.infer(n)
        answers, start = [], 0
        for _, _, ids in chunk:
            rows = slice(start, start + len(ids))
            answers.append(
                [
                    self.pb.Tensor(name, out[name][rows].reshape(len(ids), *dims).astype(dtype))
                    for name, dtype, dims in self.outputs
                ]
            )
            start += len(ids)
        return answers
