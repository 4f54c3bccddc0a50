"""What the verbs share: extras checks, the user-error types, option parsers and shared options."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable

import click

TRAIN_MODULES = ("torch", "timm", "FrEIA", "yaml", "safetensors")
allow_engine_host_code_option = click.option(  # run and serve
    "--allow-engine-host-code",
    is_flag=True,
    help="Load version-compatible TensorRT engines, which run host code embedded in the engine file (only engines you "
    "trust).",
)


def require(extra: str, modules: tuple[str, ...], verb: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        msg = f"`hgad-edge {verb}` needs {', '.join(missing)}: pip install 'hgad-edge[{extra}]'"
        raise click.ClickException(msg)


def user_errors():
    """The exception types a user can cause (bad data, config, run folder), shown without a traceback."""
    from hgad_edge.training.backbone import BackboneError
    from hgad_edge.training.checkpoint import RunError
    from hgad_edge.training.config import ConfigError
    from hgad_edge.training.data import DataError
    from hgad_edge.training.train import TrainingError

    return (BackboneError, RunError, ConfigError, DataError, TrainingError)


class BadConfig(click.ClickException):
    """A config value the user must fix: exit code 2, like click's own bad-option errors."""

    exit_code = 2


class LazyChoice(click.Choice):
    """A Choice whose names `load()` gives when they are first needed (help, parsing), so that importing
    the CLI does not import the module that owns them."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())

    def to_info_dict(self) -> dict:
        return {**super().to_info_dict(), "param_type": "Choice"}  # to tools reading it, a plain Choice


def parse_classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise click.BadParameter("give class names separated by commas, e.g. --classes bottle,cable")
    return names


def parse_thresholds(items: tuple[str, ...]) -> dict[str, float] | None:
    """`--threshold NAME=VALUE` pairs -> {name: value}; the runtime checks the names against the bundle."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise click.BadParameter(
                f"{item!r}: use NAME=VALUE with a finite number, e.g. --threshold bottle=1.25", param_hint="--threshold"
            )
        out[name.strip()] = number
    return out or None
