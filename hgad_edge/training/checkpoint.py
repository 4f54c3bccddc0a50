"""A run folder: what a trained model is on disk, and the one way to load it.

runs/x/
  config.yaml          full HGADConfig the model was built and trained with
  meta.json            classes, calibration constants, training summary, package version; a run made by
                       `train --from PARENT` (training/grow.py) also its `lineage` (one entry per class
                       change, oldest first: parent model sha256, what changed, when; the parent's own
                       entries before it, so the chain survives) and its held-out image names
  model.safetensors    every tensor of the fused scorer (backbone included: self-contained)
  train_state.pt       optimizer/scheduler/epoch for --resume (plain tensors, weights_only load)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hgad_edge import __version__
from hgad_edge.core.files import atomic_write_json
from hgad_edge.training.config import ConfigError, HGADConfig, load_config, save_config

CONFIG_FILE, META_FILE, WEIGHTS_FILE, STATE_FILE = "config.yaml", "meta.json", "model.safetensors", "train_state.pt"


_RESTORE = "restore it from a copy or train it again"


class RunError(FileNotFoundError):
    """A run folder is missing or incomplete; the message says what is missing and how to fix it."""


def save_run(run_dir: Path, scorer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(scorer.model.cfg, run_dir / CONFIG_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}
    tmp = run_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(run_dir / WEIGHTS_FILE)  # never leave a half-written model behind
    meta = {**meta, "classes": scorer.model.class_names, "package_version": __version__}
    atomic_write_json(run_dir / META_FILE, meta)


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise RunError(
            f"{run_dir} is not a trained run ({META_FILE} missing): run `hgad-edge train --out {run_dir}` first"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"cannot read {path} ({err}): the run is damaged; {_RESTORE}") from err
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise RunError(f"{path} has no list of class names: the run is damaged; {_RESTORE}")
    return meta


def load_run(run_dir: Path | str):
    """-> (AnomalyScorer in eval mode, config, meta). Weights load through safetensors (no pickle)."""
    from safetensors.torch import load_file

    from hgad_edge.training.model import HGADModel
    from hgad_edge.training.scoring import AnomalyScorer

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir / name} is missing: the run is incomplete; train it again or --resume")
    cfg = load_run_config(run_dir)
    model = HGADModel(cfg, meta["classes"], load_backbone_weights=False)
    scorer = AnomalyScorer(model, cfg.score)
    try:
        weights = load_file(str(run_dir / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        msg = f"cannot read {run_dir / WEIGHTS_FILE} ({err}): the run is damaged; train it again or --resume"
        raise RunError(msg) from err
    missing, unexpected = scorer.load_state_dict(weights, strict=False)
    # runs saved before per-position spreads existed: their spreads stay ones (one per level)
    missing = [k for k in missing if not k.startswith("spread_")]
    if missing or unexpected:
        raise RunError(
            f"{run_dir / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if not bool(scorer.calibrated):
        raise RunError(f"{run_dir} was never calibrated (training stopped early): finish it with --resume")
    return scorer.eval(), cfg, meta


def load_run_config(run_dir: Path | str) -> HGADConfig:
    """The run's config.yaml as the run was trained (keys added since read as they were then); a
    damaged file is a RunError naming it, not a YAML traceback."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
        # Runs saved before these keys existed: pooling averaged the valid neighbours only, one
        # spread per level standardised the maps, the image score read the whole map, and the
        # trained centres scored every level (no latent mixture).
        if isinstance(data, dict):
            for section, key, old in (
                ("backbone", "pool_border", "exclude"),
                ("score", "spread", "level"),
                ("score", "image_deep_weight", 1.0),
                ("head", "latent_components", [0]),
            ):
                if isinstance(data.get(section), dict):
                    data[section].setdefault(key, old)
        return load_config(overrides=data)
    except (ConfigError, yaml.YAMLError, TypeError, ValueError, AttributeError, OSError) as err:
        raise RunError(f"{path} is not a valid config ({err}): the run is damaged; {_RESTORE}") from err


def save_train_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)


def load_train_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
