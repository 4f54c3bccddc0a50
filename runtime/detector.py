"""Pythonic wrapper over the C-style API: exceptions instead of status codes, a context manager.

    with Detector("bundle/") as det:
        result = det.infer(frame_rgb)          # class "auto"
        print(result.score_normalized[0], result.anomalous[0])
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from hgad_edge.core.errors import Status, error_for
from hgad_edge.runtime import api
from hgad_edge.runtime.api import Result
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.preprocess import resolve_class_ids

__all__ = ["Detector"]


class Detector:
    """One loaded bundle on one backend. Raises `HgadRuntimeError` subclasses carrying `.status`.

    `infer` returns a Result that owns its arrays; one Detector may be shared by threads (calls
    are serialised, see `api`). `thresholds={class name: value}` overrides the bundle's
    thresholds for this detector only.
    """

    def __init__(
        self,
        bundle: Path | str,
        backend: str = "auto",
        device: int = 0,
        precision: str = "auto",
        max_batch: int = 8,
        allow_engine_host_code: bool = False,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        self._open(bundle, RuntimeOptions(backend, device, precision, max_batch, allow_engine_host_code, thresholds))

    @classmethod
    def from_options(cls, bundle: Path | str, options: RuntimeOptions) -> Detector:
        """A Detector for options built once (the CLI's `run`); the keywords of __init__ build the same."""
        detector = cls.__new__(cls)
        detector._open(bundle, options)
        return detector

    def _open(self, bundle: Path | str, options: RuntimeOptions) -> None:
        self._handle: int | None = None
        status, handle = api.create_with_options(bundle, options)
        self._raise_unless_ok(status)
        self._handle = handle
        self._release = weakref.finalize(self, api.destroy, handle)  # frees GPU memory if close() is forgotten
        _, self._info = api.info(handle)

    @property
    def info(self) -> dict[str, Any]:
        """What the detector runs, read now: thresholds follow `set_thresholds` and a server's
        recalibrated bundle; after close() the last reading."""
        if self._handle is not None:
            status, info = api.info(self._handle)
            if status == Status.OK:
                self._info = info
        return self._info

    def _raise_unless_ok(self, status: Status) -> None:
        if status != Status.OK:
            raise error_for(status, api.last_error(self._handle))

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.info["input_size"])

    @property
    def tiling(self) -> dict | None:
        """The bundle's tiling {tile, overlap, blend} (frames scored as tiles, maps at frame size), or None."""
        return self.info["tiling"]

    @property
    def lineage(self) -> list[dict]:
        """The class changes the model went through (`hgad-edge train --from`: parent model sha256, what
        changed, when), oldest first; [] for a model trained from scratch."""
        return list(self.info.get("lineage") or [])

    @property
    def backend(self) -> str:
        """The backend actually used ("tensorrt" or "onnxruntime"), useful after backend="auto"."""
        return self.info["backend"]

    @property
    def closed(self) -> bool:
        return self._handle is None

    def class_id(self, name_or_id: Any) -> int:
        """Index of a class name (or "auto" -> -1); raises InvalidArgumentError naming the choices."""
        return resolve_class_ids(name_or_id, 1, self.info["classes"])[0]

    def infer(self, frames: Any, class_id: Any = "auto") -> Result:
        """Score one HxWx3 uint8 RGB frame (any size) or a batch of them."""
        status, result = api.infer(self._handle, frames, class_id)
        self._raise_unless_ok(status)
        return result

    def set_thresholds(self, thresholds: dict[str, float] | None) -> None:
        """Decide with these {class name: threshold} overrides from the next call on (None: the bundle's
        thresholds); the bundle is not changed. `info["thresholds"]` shows them."""
        self._raise_unless_ok(api.set_thresholds(self._handle, thresholds))

    def close(self) -> None:
        """Release the backend; safe to call twice."""
        if self._handle is not None:
            self._handle = None
            status = self._release()
            if status != Status.OK:
                raise error_for(status, api.last_error())

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.info["description"]
        return f"Detector({self.info['bundle']!r}, backend={self.info['backend']!r}, {state})"
