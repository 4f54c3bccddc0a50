"""Runner contract shared by the backends (the Polygraphy loader/runner split).

A loader (a small callable) builds the framework object; a runner owns it plus every buffer.
Buffers are planned once in `activate` for `max_batch` and reused: `inputs[name]` and
`outputs[name]` are (max_batch, ...) arrays whose first `batch` rows are valid after `infer`.
Public methods do the checks; backends implement the `*_impl` methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hgad_edge.core.errors import InferenceError, InvalidArgumentError

__all__ = ["Runner", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """Per-sample shape and dtype of one model input (the batch axis is implied)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


class Runner:
    """Base runner: `activate()` once, `infer(batch)` many times, `deactivate()` once."""

    name = "base"

    def __init__(self, input_specs: list[TensorSpec], output_names: list[str], max_batch: int) -> None:
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        self.input_specs = list(input_specs)
        self.output_names = list(output_names)
        self.max_batch = int(max_batch)
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.description = self.name
        self.precision = "fp32"
        self.is_active = False

    def activate(self) -> Runner:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def infer(self, batch: int) -> dict[str, np.ndarray]:
        """Run the first `batch` rows of `inputs`; returns views of the first rows of `outputs`."""
        if not self.is_active:
            raise InferenceError(f"{self.name} runner is not active; call activate() first")
        if not 1 <= batch <= self.max_batch:
            raise InvalidArgumentError(f"batch must be in 1..{self.max_batch}, got {batch}")
        self.infer_impl(batch)
        return {name: self.outputs[name][:batch] for name in self.output_names}

    def deactivate(self) -> None:
        if self.is_active:
            self.is_active = False
            self.deactivate_impl()

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, batch: int) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError
