"""The runtime's options in one frozen dataclass: what `create`, `Detector`, `create_runner`, `hgad-edge run`
and `hgad-edge serve` (its runtime part) share.

`RuntimeOptions` checks its values when it is built, with the messages (and `Status.INVALID_ARGUMENT`)
the C-style API returns for them; what needs the bundle (threshold class names and values, a precision
the bundle lacks, an engine that fits) is checked when the bundle is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hgad_edge.core.errors import InvalidArgumentError
from hgad_edge.runtime.backends import BACKENDS, PRECISIONS

__all__ = ["RuntimeOptions"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How a bundle (or a server URL) is run.

    backend: "auto", a name of hgad_edge.runtime.backends.REGISTRY; device: CUDA device index;
    precision: "auto" or one a backend runs; max_batch: largest batch one call takes (buffers are
    planned for it); allow_engine_host_code: load version-compatible TensorRT engines, which run host
    code embedded in the engine file (only engines you built or trust); thresholds: {class name: score
    threshold} used instead of the bundle's for those classes (kept as a copy of the dict given).
    """

    backend: str = "auto"
    device: int = 0
    precision: str = "auto"
    max_batch: int = 8
    allow_engine_host_code: bool = False
    thresholds: dict[str, float] | None = None

    def __post_init__(self) -> None:
        for name, low in (("device", 0), ("max_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, allowed in (("backend", BACKENDS), ("precision", PRECISIONS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise InvalidArgumentError(f"{name} must be one of {list(allowed)}, got {value!r}")
        object.__setattr__(self, "allow_engine_host_code", bool(self.allow_engine_host_code))
        if self.thresholds is not None:
            if not isinstance(self.thresholds, dict):
                kind = type(self.thresholds).__name__
                raise InvalidArgumentError(f"thresholds must be a dict {{class name: threshold}}, got {kind}")
            object.__setattr__(self, "thresholds", dict(self.thresholds))
