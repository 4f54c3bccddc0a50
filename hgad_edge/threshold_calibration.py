"""On-site recalibration (`hgad-edge calibrate`): new PASS/FAIL thresholds from new normal images.

A bundle is scored with its own runtime backend (torch-free: the edge box has no torch) and only its
metadata.json changes: graphs and TensorRT engines stay byte-identical (thresholds live outside
them, see hgad_edge.core.thresholds), so a deployed engine keeps working without a rebuild. A run folder
is scored with PyTorch; its weights file carries the thresholds, so a later export carries them too;
there `--refit-statistics` also refits the scorer's per-position normal statistics (a lighting change).

Every write is atomic (a bundle's metadata.json is written aside and renamed; a run folder is staged
and swapped whole): a failed or killed calibration leaves the old thresholds in place. A bundle's
new metadata goes through the bundle schema (`BundleMetadata.with_calibration` / `to_json`) and is
checked against each ONNX file's copy before it is written, so calibrate never writes a bundle the
runtime would refuse. Each write records the policy, the images (count, folder, sha256), the date,
the expected FPR / recall and the previous thresholds, so `--undo` restores them. Bad input fails
before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hgad_edge.core.bundle_schema import (
    METADATA_FILE,
    BundleMetadata,
    SchemaError,
    check_onnx_copy,
    read_onnx_metadata_props,
)
from hgad_edge.core.files import atomic_dir, atomic_write_json, sha256_file
from hgad_edge.core.imaging import IMAGE_EXTENSIONS, DataError, load_image
from hgad_edge.core.thresholds import POLICIES, PolicyError, choose_threshold, score_scale

RUN_RECORD_KEY = "threshold_calibration"  # meta.json key of a run folder's calibration record
STATISTICS_BACKUP = "statistics_before_refit.safetensors"  # scorer statistics kept for --undo of a refit
SCORE_BATCH = 8  # images per PyTorch batch (run folders)


class CalibrationError(ValueError):
    """Calibration cannot start or cannot be undone; the message names the fix. Nothing was written."""


# ---- images ------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    folder: Path
    paths: list[Path]
    images: list[np.ndarray]  # HxWx3 uint8 RGB (grey and RGBA converted as in training)

    def record(self) -> dict[str, Any]:
        return {
            "count": len(self.paths),
            "folder": str(self.folder.resolve()),
            "sha256": [sha256_file(p) for p in self.paths],
        }


def image_paths(folder: Path | str, what: str) -> list[Path]:
    """Image files directly in `folder`, sorted; CalibrationError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{what} folder {folder} does not exist or is not a folder; pass a folder of images")
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith((".", "__")))
    except OSError as err:
        raise CalibrationError(
            f"cannot list {what} folder {folder}: {err.strerror or err}; check its permissions"
        ) from err
    paths = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not paths:
        sub = [p.name for p in entries if p.is_dir()]
        hint = f" (it has sub-folders {sub[:3]}: pass the one holding the images)" if sub else ""
        msg = f"{what} folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images{hint}; pass a folder of images"
        raise CalibrationError(msg)
    return paths


def load_image_set(folder: Path | str, what: str) -> ImageSet:
    """Decode every image of the folder (a truncated or unreadable one is an error naming it)."""
    paths = image_paths(folder, what)
    try:
        images = [load_image(p) for p in paths]
    except DataError as err:
        raise CalibrationError(f"{what} images: {err}") from err
    return ImageSet(Path(folder), paths, images)


def check_same_size(*sets: ImageSet) -> None:
    """All calibration images must come from one camera setup: one size. Mixed sizes are refused
    (the model would see them stretched differently); grey, RGBA and 16-bit images are converted."""
    sizes: dict[tuple[int, int], list[Path]] = {}
    for s in sets:
        for path, img in zip(s.paths, s.images):
            sizes.setdefault(img.shape[:2], []).append(path)
    if len(sizes) > 1:
        common = max(sizes, key=lambda k: len(sizes[k]))
        odd = [(f"{p.name} ({k[1]}x{k[0]})") for k, ps in sizes.items() if k != common for p in ps]
        msg = (
            f"calibration images differ in size: most are {common[1]}x{common[0]}, but {', '.join(odd[:5])}"
            f"{' ...' if len(odd) > 5 else ''}; use images from the deployed camera setup only (crop/resize them "
            "to one size, or calibrate each setup separately)"
        )
        raise CalibrationError(msg)


# ---- scoring -----------------------------------------------------------------------------------
class BundleScorer:
    """Image scores from the bundle's own runtime backend (ONNX Runtime or TensorRT)."""

    def __init__(self, folder: Path, backend: str = "auto", precision: str = "auto") -> None:
        from hgad_edge.runtime import Detector

        # untiled, batch 1: every engine's optimisation profile takes it, so "auto" scores with TensorRT where it
        # runs; tiled, a frame's tiles in as few calls as the engine takes (the runtime caps the batch to it)
        tiled = read_bundle_metadata(folder).tiling is not None
        self.detector = Detector(folder, backend=backend, precision=precision, max_batch=16 if tiled else 1)
        self.classes = self.detector.classes
        self.description = f"{self.detector.backend} ({self.detector.info['precision']})"

    def scores(self, images: Sequence[np.ndarray], class_id: int) -> np.ndarray:
        return np.array([float(self.detector.infer(image, class_id).score[0]) for image in images], np.float64)

    def close(self) -> None:
        self.detector.close()


class RunScorer:
    """Image scores from a run folder's PyTorch scorer (needs torch); a tiled run scores frames (the
    max over each frame's tiles), as evaluation and the runtime do."""

    def __init__(self, folder: Path) -> None:
        from hgad_edge.training.checkpoint import load_run

        self.scorer, self.cfg, self.meta = load_run(folder)
        self.classes = list(self.scorer.model.class_names)
        self.description = "torch (fp32)"

    def scores(self, images: Sequence[np.ndarray], class_id: int) -> np.ndarray:
        from hgad_edge.training.evaluate import predict_frames

        return predict_frames(self.scorer, self.cfg, images, class_id, SCORE_BATCH)[1].astype(np.float64)

    def refit_statistics(self, images: Sequence[np.ndarray], class_id: int) -> None:
        """Per-position means from half the images, spreads from the other half (as training does with
        its training and held-out images), so the threshold scores that half honestly. Tiled: the
        statistics pool the frames' tiles."""
        from hgad_edge.training.batching import iter_tile_batches
        from hgad_edge.training.scoring import fit_normal_statistics

        tiling = self.cfg.tiling.setting()
        batch = max(1, len(images)) if tiling is None else SCORE_BATCH  # untiled: each half one batch

        def batches(frames: Sequence[np.ndarray]):
            return iter_tile_batches(frames, self.cfg.input_size, batch, tiling)

        positions, held_out = batches(images[0::2]), batches(images[1::2])
        fit_normal_statistics(self.scorer, {class_id: held_out}, {class_id: positions}, policy=("max", None))

    def close(self) -> None:
        pass


# ---- targets -----------------------------------------------------------------------------------
def is_bundle(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file()


def is_run(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file()


def target_kind(folder: Path | str) -> str:
    folder = Path(folder)
    if is_bundle(folder):
        return "bundle"
    if is_run(folder):
        return "run"
    msg = (
        f"{folder} is neither a bundle (metadata.json, from `hgad-edge export`) nor a run folder "
        "(meta.json + model.safetensors, from `hgad-edge train`); pass one of those"
    )
    raise CalibrationError(msg)


def _class_index(classes: Sequence[str], name: str | None) -> int:
    if name is None:
        if len(classes) == 1:
            return 0
        raise CalibrationError(
            f"this model knows several classes ({', '.join(classes)}): name the one the images show with --class NAME"
        )
    if name not in classes:
        raise CalibrationError(
            f"class {name!r} is not one the model knows ({', '.join(classes)}); pass --class with one of those"
        )
    return list(classes).index(name)


# ---- the bundle's metadata (through the bundle schema) ------------------------------------------
def read_bundle_metadata(folder: Path) -> BundleMetadata:
    """The bundle's metadata, verified as the runtime loads it (schema, file names, sha256, ONNX copy)."""
    from hgad_edge.core.bundle import load_bundle

    return load_bundle(folder).schema


def write_bundle_metadata(folder: Path, meta: BundleMetadata) -> None:
    """Check `meta` against every model's ONNX copy (classes and input size always; thresholds and
    scales too when it carries no calibration record), then write metadata.json atomically."""
    try:
        for model in meta.models.values():
            check_onnx_copy(meta, read_onnx_metadata_props(folder / model.file), model.file)
        data = meta.to_json()
    except SchemaError as err:
        raise CalibrationError(f"refusing to write {folder / METADATA_FILE}: {err}; nothing was changed") from err
    atomic_write_json(folder / METADATA_FILE, data)


# ---- calibrate / undo --------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    target: Path
    kind: str
    class_name: str
    previous_threshold: float
    threshold: float
    record: dict[str, Any]


def calibrate_target(
    target: Path | str,
    normal: Path | str,
    policy: str,
    param: float | None = None,
    defects: Path | str | None = None,
    class_name: str | None = None,
    backend: str = "auto",
    precision: str = "auto",
    refit_statistics: bool = False,
    date: str | None = None,
) -> CalibrationResult:
    """Score `normal` (and `defects`) images, choose the class's threshold with `policy`, write it.
    Every check (folders, images, class, policy and image counts) runs before anything is written."""
    target = Path(target)
    kind = target_kind(target)
    if policy not in POLICIES:
        raise CalibrationError(f"unknown threshold policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if POLICIES[policy].needs_defects and defects is None:
        raise CalibrationError(f"policy {policy} needs labelled defect images: pass --defects DIR")
    if refit_statistics and kind != "run":
        raise CalibrationError(
            "--refit-statistics needs a run folder (it changes the model, so re-export afterwards); "
            "a bundle can only get new thresholds"
        )
    normal_set = load_image_set(normal, "normal")
    defect_set = load_image_set(defects, "defect") if defects is not None else None
    check_same_size(normal_set, *([defect_set] if defect_set else []))
    scorer = BundleScorer(target, backend, precision) if kind == "bundle" else RunScorer(target)
    try:
        y = _class_index(scorer.classes, class_name)
        name = scorer.classes[y]
        if kind == "run":  # the run's thresholds, read before a refit changes them
            current = (
                scorer.meta,
                scorer.scorer.threshold.tolist(),
                scorer.scorer.scale.tolist(),
                scorer.meta.get(RUN_RECORD_KEY),
            )
        normal_images = normal_set.images
        if refit_statistics:
            _check_counts(
                policy,
                param,
                len(normal_images[1::2]),
                defect_set,
                name,
                " (half of them: the other half refits the statistics)",
            )
            previous_state = _statistics(scorer.scorer)
            scorer.refit_statistics(normal_images, y)
            normal_images = normal_images[1::2]
        normal_scores = scorer.scores(normal_images, y)
        defect_scores = scorer.scores(defect_set.images, y) if defect_set else np.zeros(0)
        choice = choose_threshold(policy, param, normal_scores, defect_scores, what=f"class {name}")
        scale = score_scale(normal_scores)
        if kind == "bundle":  # read just before the write: a `build` meanwhile keeps its engine entry
            meta = read_bundle_metadata(target)
            current = (meta, list(meta.thresholds), list(meta.scales), meta.calibration)
        meta, thresholds, scales, previous = current
        record = {
            "policy": policy,
            "params": {} if param is None else {policy: param},
            "class": name,
            "method": choice.method,
            "scored_with": scorer.description,
            "images": normal_set.record(),
            "defect_images": defect_set.record() if defect_set else None,
            "refit_statistics": refit_statistics,
            "date": date or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "expected": {"fpr": choice.expected_fpr, "recall": choice.expected_recall},
            "previous": {"thresholds": list(thresholds), "scales": list(scales), "calibration": previous},
        }
        old_threshold = float(thresholds[y])
        thresholds[y], scales[y] = choice.threshold, scale
        if kind == "bundle":
            write_bundle_metadata(target, meta.with_calibration(thresholds, scales, record))
        else:
            _write_run(
                target,
                scorer,
                thresholds,
                scales,
                {**meta, RUN_RECORD_KEY: record},
                previous_state if refit_statistics else None,
            )
    finally:
        scorer.close()
    return CalibrationResult(target, kind, name, old_threshold, choice.threshold, record)


def _check_counts(policy, param, n_normal, defect_set, name, detail) -> None:
    """Fail before refitting (which is slow) if the policy cannot use that many images."""
    need = POLICIES[policy].min_normal(param)
    if n_normal < need:
        raise PolicyError(
            f"policy {policy} needs at least {need} normal images for class {name}{detail}, "
            f"got {n_normal}: add normal images"
        )
    if defect_set is not None and len(defect_set.images) < POLICIES[policy].min_defects(param):
        raise PolicyError(
            f"policy {policy} needs at least {POLICIES[policy].min_defects(param)} defect images, "
            f"got {len(defect_set.images)}"
        )


def undo_target(target: Path | str) -> dict[str, Any]:
    """Restore the thresholds (and, after a refit, the statistics) from before the last calibration."""
    target = Path(target)
    kind = target_kind(target)
    if kind == "bundle":
        meta = read_bundle_metadata(target)
        record = meta.calibration
        if not record:
            raise CalibrationError(f"{target} has no calibration to undo: its thresholds are the exported ones")
        prev = _previous(record, target / METADATA_FILE)
        write_bundle_metadata(target, meta.with_calibration(prev["thresholds"], prev["scales"], prev["calibration"]))
        return record
    scorer = RunScorer(target)
    record = scorer.meta.get(RUN_RECORD_KEY)
    if not record:
        raise CalibrationError(f"{target} has no calibration to undo: its thresholds are the trained ones")
    prev = _previous(record, target / "meta.json")
    meta = {k: v for k, v in scorer.meta.items() if k != RUN_RECORD_KEY}
    if prev["calibration"]:
        meta[RUN_RECORD_KEY] = prev["calibration"]
    if record.get("refit_statistics"):
        _load_statistics(scorer.scorer, target / STATISTICS_BACKUP)
    _write_run(
        target, scorer, prev["thresholds"], prev["scales"], meta, None, drop_backup=bool(record.get("refit_statistics"))
    )
    return record


def _previous(record: dict[str, Any], where: Path) -> dict[str, Any]:
    """The thresholds, scales and record a calibration replaced (what --undo restores)."""
    prev = record.get("previous")
    if not isinstance(prev, dict) or not all(k in prev for k in ("thresholds", "scales", "calibration")):
        raise CalibrationError(
            f"the calibration record in {where} keeps no previous thresholds, so it cannot be "
            "undone; calibrate again with the policy you want"
        )
    return prev


# ---- run folders -------------------------------------------------------------------------------
def _statistics(scorer) -> dict[str, Any]:
    """The scorer's normal statistics (per-position means, spreads), as kept before a refit."""
    kinds = ("ref_", "tau_", "spread_")
    return {k: v.detach().clone().contiguous() for k, v in scorer.state_dict().items() if k.startswith(kinds)}


def _load_statistics(scorer, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CalibrationError(
            f"{path} is missing, so the statistics from before the refit cannot be restored; "
            "retrain, or refit again with --refit-statistics"
        )
    state = load_file(str(path))
    with_rest = {**scorer.state_dict(), **state}
    scorer.load_state_dict(with_rest)


def _write_run(
    folder: Path,
    scorer: RunScorer,
    thresholds,
    scales,
    meta: dict[str, Any],
    statistics_backup: dict[str, Any] | None,
    drop_backup: bool = False,
) -> None:
    """Stage the whole run folder (other files hard-linked, not copied) and swap it in one go."""
    import torch
    from safetensors.torch import save_file

    from hgad_edge.training.checkpoint import save_run

    s = scorer.scorer
    s.threshold.copy_(torch.tensor(thresholds, dtype=s.threshold.dtype))
    s.scale.copy_(torch.tensor(scales, dtype=s.scale.dtype))
    rewritten = {"config.yaml", "model.safetensors", "meta.json"} | (
        {STATISTICS_BACKUP} if drop_backup or statistics_backup else set()
    )
    with atomic_dir(folder) as staging:
        for entry in folder.iterdir():
            if entry.name in rewritten:
                continue
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, staging / entry.name)
        extra = {k: v for k, v in meta.items() if k not in ("classes", "package_version")}
        save_run(staging, s, extra)
        if statistics_backup is not None:
            save_file(statistics_backup, str(staging / STATISTICS_BACKUP))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
