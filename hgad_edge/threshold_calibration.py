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
the expected FPR / recall and the previous thresholds, so `--undo` restores them; earlier records
are kept as a flat list of at most HISTORY_LIMIT (older versions nested each record in the next; such
bundles are read and written back flat). Bad input fails before anything is written.

One calibration (or undo) of a target runs at a time: `calibration_lock` (fcntl.flock on a lock
file in the folder) is held from the first read to the write, a second run waits or is refused,
and creating the lock file refuses a read-only target before any image is scored. Images are decoded
one at a time as they are scored (`ImageFiles`), never all held at full resolution.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
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
from hgad_edge.core.files import atomic_dir, atomic_write_json, remove_orphans, sha256_file
from hgad_edge.core.imaging import IMAGE_EXTENSIONS, DataError, image_size, load_image
from hgad_edge.core.thresholds import POLICIES, PolicyError, choose_threshold, score_scale

RUN_RECORD_KEY = "threshold_calibration"  # meta.json key of a run folder's calibration record
STATISTICS_BACKUP = "statistics_before_refit.safetensors"  # scorer statistics kept for --undo of a refit
SCORE_BATCH = 8  # images per PyTorch batch (run folders)


class CalibrationError(ValueError):
    """Calibration cannot start or cannot be undone; the message names the fix. Nothing was written."""


# ---- images ------------------------------------------------------------------------------------
HEADER_BYTES = 1 << 20  # read to find an image's size without decoding it (the whole file if not enough)


class ImageFiles(Sequence[np.ndarray]):
    """Image files decoded one at a time, as they are read, and dropped after scoring: six 49 MP
    images never sit in memory together. A slice is another lazy sequence. A file that cannot be
    decoded (truncated, unreadable) or is not `size` is a CalibrationError naming it."""

    def __init__(self, paths: Sequence[Path], what: str, size: tuple[int, int] | None = None) -> None:
        self.paths, self.what, self.size = list(paths), what, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.what, self.size)
        path = self.paths[index]
        try:
            image = load_image(path)
        except DataError as err:
            raise CalibrationError(f"{self.what} images: {err}") from err
        if self.size is not None and image.shape[:2] != self.size:
            raise CalibrationError(_mixed_sizes_message(self.size, [(path, image.shape[:2])]))
        return image


@dataclass
class ImageSet:
    folder: Path
    paths: list[Path]
    sizes: list[tuple[int, int] | None]  # (H, W) of each file from its header (None: not an image load_image decodes)
    what: str = "normal"

    @property
    def images(self) -> ImageFiles:
        """HxWx3 uint8 RGB (grey and RGBA converted as in training), decoded as they are read."""
        return ImageFiles(self.paths, self.what, _common_size(self))

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


def _header_size(path: Path, what: str) -> tuple[int, int] | None:
    """(H, W) from the file's header, without decoding (TIFF may keep it at the end: then the whole file)."""
    try:
        with open(path, "rb") as fh:
            size = image_size(fh.read(HEADER_BYTES))
            if size is None and fh.read(1):
                fh.seek(0)
                size = image_size(fh.read())
    except OSError as err:
        raise CalibrationError(
            f"cannot read {what} image {path}: {err.strerror or err}; check its permissions"
        ) from err
    return size


def load_image_set(folder: Path | str, what: str) -> ImageSet:
    """The folder's images with their sizes read from the headers; the pixels are decoded only when
    scored (`ImageSet.images`), one at a time."""
    paths = image_paths(folder, what)
    return ImageSet(Path(folder), paths, [_header_size(p, what) for p in paths], what)


def _common_size(*sets: ImageSet) -> tuple[int, int] | None:
    """The size most of the images have (None when no header gives one)."""
    counts: dict[tuple[int, int], int] = {}
    for s in sets:
        for size in s.sizes:
            if size is not None:
                counts[size] = counts.get(size, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _mixed_sizes_message(common: tuple[int, int], odd_sizes: list[tuple[Path, tuple[int, int]]]) -> str:
    odd = [f"{p.name} ({k[1]}x{k[0]})" for p, k in odd_sizes]
    return (
        f"calibration images differ in size: most are {common[1]}x{common[0]}, but {', '.join(odd[:5])}"
        f"{' ...' if len(odd) > 5 else ''}; use images from the deployed camera setup only (crop/resize them "
        "to one size, or calibrate each setup separately)"
    )


def check_same_size(*sets: ImageSet) -> None:
    """All calibration images must come from one camera setup: one size. Mixed sizes are refused
    (the model would see them stretched differently), from the headers, before anything is decoded;
    grey, RGBA and 16-bit images are converted."""
    common = _common_size(*sets)
    odd = [(p, k) for s in sets for p, k in zip(s.paths, s.sizes) if k is not None and k != common]
    if odd:
        raise CalibrationError(_mixed_sizes_message(common, odd))


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
        """One image at a time: images[i] is decoded for its call and freed before the next is decoded."""
        out = np.empty(len(images), np.float64)
        for i in range(len(images)):
            out[i] = float(self.detector.infer(images[i], class_id).score[0])
        return out

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
    try:
        atomic_write_json(folder / METADATA_FILE, data)
    except OSError as err:
        reason = err.strerror or err
        msg = f"cannot write {folder / METADATA_FILE}: {reason}; nothing was changed (is the bundle writable?)"
        raise CalibrationError(msg) from err


# ---- one calibration at a time ------------------------------------------------------------------
LOCK_FILE = ".calibrate.lock"  # in the bundle or run folder, flock'ed while a calibration or an undo runs


@contextlib.contextmanager
def calibration_lock(folder: Path, wait: bool = True, announce: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `folder`'s calibration lock (fcntl.flock on LOCK_FILE inside it) from before its first
    read to after its write, so two calibrations (or undos) of one bundle never lose one another's
    thresholds or history. Another holder: wait (saying who it is), or with wait=False a
    CalibrationError. Creating the lock file is also the write test: a read-only target is refused
    here, before any image is scored. Once held, what killed writers left beside the files a
    calibration writes is removed. The kernel drops the lock of a killed holder; the file goes on release."""
    path = folder / LOCK_FILE
    fd = _acquire(path, wait, announce)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
        written = METADATA_FILE if is_bundle(folder) else None  # a run folder is staged and swapped whole
        removed = remove_orphans(folder / written if written else folder)
        if removed and announce is not None:
            announce(f"removed {len(removed)} temporary file(s) an interrupted write left: {removed[0].name} ...")
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)


def _acquire(path: Path, wait: bool, announce: Callable[[str], None] | None) -> int:
    folder, announced = path.parent, False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                msg = (
                    f"{folder} is read-only ({err.strerror}): calibrate rewrites its "
                    f"{METADATA_FILE if is_bundle(folder) else 'files'}; make it writable (or copy it somewhere "
                    "writable) and run again; no image was scored"
                )
            else:
                msg = f"cannot create the lock file {path}: {err.strerror or err}; no image was scored"
            raise CalibrationError(msg) from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process"
                if not wait:
                    msg = (
                        f"another calibration of {folder} is running ({holder}); try again once it has finished "
                        "(without --no-wait, hgad-edge calibrate waits for it)"
                    )
                    raise CalibrationError(msg) from None
                if announce is not None and not announced:
                    announce(f"waiting for another calibration of {folder} to finish ({holder}) ...")
                announced = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file as it let go: lock the one that is there now


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---- the calibration record and its history ----------------------------------------------------
HISTORY_LIMIT = 10  # earlier calibrations a record keeps for --undo; beyond it the oldest go (counted)
_HISTORY_KEYS = ("history_dropped", "history")


def _entry(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _HISTORY_KEYS}


def _history(record: dict[str, Any] | None) -> tuple[list[dict[str, Any]], int]:
    """Every calibration up to `record` (itself last), oldest first, as flat entries, and how many older
    ones were dropped. Records of older versions nest each previous record in the next
    (previous.calibration, near 500 levels deep a RecursionError): they are unrolled here in a loop,
    whatever the depth, and written back flat by the next calibration or undo."""
    if record is None:
        return [], 0
    if isinstance(record.get("history"), list):
        return [*record["history"], _entry(record)], int(record.get("history_dropped", 0))
    chain, current = [], record
    while isinstance(current, dict):
        previous, entry = current.get("previous"), _entry(current)
        if isinstance(previous, dict):
            entry["previous"] = {k: v for k, v in previous.items() if k != "calibration"}
        chain.append(entry)
        current = previous.get("calibration") if isinstance(previous, dict) else None
    return chain[::-1], 0


def _chained(fields: dict[str, Any], thresholds, scales, current: dict[str, Any] | None) -> dict[str, Any]:
    """A new record: `fields`, the thresholds and scales it replaces, and the earlier records as a flat
    list of at most HISTORY_LIMIT (not one nested in the next: a file that grows without bound)."""
    history, dropped = _history(current)
    extra = len(history) - HISTORY_LIMIT
    if extra > 0:
        history, dropped = history[extra:], dropped + extra
    previous = {"thresholds": list(thresholds), "scales": list(scales)}
    return {**fields, "previous": previous, "history_dropped": dropped, "history": history}


def _undone(record: dict[str, Any], where: Path) -> tuple[list[float], list[float], dict[str, Any] | None]:
    """What --undo of `record` restores: the thresholds and scales it replaced and the record before it
    (None: the exported or trained thresholds), byte for byte as it was unless history was dropped since."""
    previous = record.get("previous")
    if not isinstance(previous, dict) or not all(k in previous for k in ("thresholds", "scales")):
        raise CalibrationError(
            f"the calibration record in {where} keeps no previous thresholds, so it cannot be "
            "undone; calibrate again with the policy you want"
        )
    history, dropped = _history(record)
    earlier = history[:-1]
    if not earlier and dropped:
        raise CalibrationError(
            f"the calibrations before this one in {where} were dropped from its history (it keeps "
            f"{HISTORY_LIMIT} for --undo), so this one cannot be undone; calibrate again with the policy you want"
        )
    restored = {**earlier[-1], "history_dropped": dropped, "history": earlier[:-1]} if earlier else None
    return list(previous["thresholds"]), list(previous["scales"]), restored


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
    wait: bool = True,
    announce: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Score `normal` (and `defects`) images one at a time, choose the class's threshold with `policy`,
    write it. Folders, image sizes, policy and target kind are checked before the lock (wait=False:
    refused if another calibration holds it; `announce` gets the waiting line); nothing is written
    before every image was scored and the threshold chosen."""
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
    with calibration_lock(target, wait, announce):
        scorer = BundleScorer(target, backend, precision) if kind == "bundle" else RunScorer(target)
        try:
            return _calibrate(
                target, kind, scorer, normal_set, defect_set, policy, param, class_name, refit_statistics, date
            )
        finally:
            scorer.close()


def _calibrate(target, kind, scorer, normal_set, defect_set, policy, param, class_name, refit_statistics, date):
    """calibrate_target once the lock is held and the scorer loaded."""
    y = _class_index(scorer.classes, class_name)
    name = scorer.classes[y]
    if kind == "run":  # the run's thresholds, read before a refit changes them
        current = (scorer.meta, scorer.scorer.threshold.tolist(), scorer.scorer.scale.tolist())
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
    _check_not_degenerate(policy, param, normal_scores, choice, name)
    scale = score_scale(normal_scores)
    if kind == "bundle":  # read just before the write: a `build` meanwhile keeps its engine entry
        meta = read_bundle_metadata(target)
        current = (meta, list(meta.thresholds), list(meta.scales))
    meta, thresholds, scales = current
    fields = {
        "policy": policy,
        "params": {} if param is None else {policy: param},
        "class": name,
        "method": choice.method,
        "scored_with": scorer.description,
        "images": normal_set.record(),
        "defect_images": defect_set.record() if defect_set else None,
        "refit_statistics": refit_statistics,
        "date": date or _now(),
        "expected": {"fpr": choice.expected_fpr, "recall": choice.expected_recall},
    }
    previous_record = meta.calibration if kind == "bundle" else meta.get(RUN_RECORD_KEY)
    record = _chained(fields, thresholds, scales, previous_record)
    old_threshold = float(thresholds[y])
    thresholds[y], scales[y] = choice.threshold, scale
    if kind == "bundle":
        write_bundle_metadata(target, meta.with_calibration(thresholds, scales, record))
    else:
        backup = previous_state if refit_statistics else None
        _write_run(target, scorer, thresholds, scales, {**meta, RUN_RECORD_KEY: record}, backup)
    return CalibrationResult(target, kind, name, old_threshold, choice.threshold, record)


def _check_not_degenerate(policy: str, param: float | None, scores: np.ndarray, choice, name: str) -> None:
    """A quantile that lands on tied scores fails far more normal images than 1 - Q (FAIL is score >=
    threshold): refuse it, saying why. Without ties the empirical quantile fails at most 1 - Q + 1/n."""
    if policy != "quantile" or choice.expected_fpr is None:
        return
    if choice.expected_fpr <= 1.0 - param + 1.0 / scores.size + 1e-12:
        return
    tied = int(np.count_nonzero(scores == choice.threshold))
    raise CalibrationError(
        f"--quantile {param} is degenerate here: {tied} of the {scores.size} normal scores of class {name} are tied "
        f"at {choice.threshold:.6g}, so it would fail {choice.expected_fpr:.0%} of the normal images, not about "
        f"{1.0 - param:.0%}; the images are likely duplicates (or the model scores them alike): calibrate with "
        "varied normal images of the line, or use --max (just above the highest score)"
    )


def _check_counts(policy, param, n_normal, defect_set, name, detail) -> None:
    """Fail before refitting (which is slow) if the policy cannot use that many images."""
    need = POLICIES[policy].min_normal(param)
    if n_normal < need:
        raise PolicyError(
            f"policy {policy} needs at least {need} normal images for class {name}{detail}, "
            f"got {n_normal}: add normal images"
        )
    if defect_set is not None and len(defect_set.paths) < POLICIES[policy].min_defects(param):
        raise PolicyError(
            f"policy {policy} needs at least {POLICIES[policy].min_defects(param)} defect images, "
            f"got {len(defect_set.paths)}"
        )


def set_threshold(
    target: Path | str, class_name: str, threshold: float, how: str = "set by hand", date: str | None = None
) -> CalibrationResult:
    """Write one class's threshold chosen by a person (the live page's slider, `hgad-edge run --web`) into a
    bundle, recorded like a calibration (policy "manual", no images) so that `undo_target` restores it;
    the scale stays. Atomic through `write_bundle_metadata`, like every calibration."""
    target = Path(target)
    if target_kind(target) != "bundle":
        raise CalibrationError(f"{target} is a run folder: set a threshold by hand on its exported bundle")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise CalibrationError(f"a threshold must be a finite number, got {threshold!r}")
    with calibration_lock(target, wait=False):  # never waits behind a calibrate that is scoring
        meta = read_bundle_metadata(target)
        y = _class_index(meta.classes, class_name)
        thresholds, scales = list(meta.thresholds), list(meta.scales)
        fields = {
            "policy": "manual",
            "params": {},
            "class": meta.classes[y],
            "method": how,
            "scored_with": None,
            "images": None,
            "defect_images": None,
            "refit_statistics": False,
            "date": date or _now(),
            "expected": {"fpr": None, "recall": None},
        }
        record = _chained(fields, thresholds, scales, meta.calibration)
        old_threshold, thresholds[y] = float(thresholds[y]), float(threshold)
        write_bundle_metadata(target, meta.with_calibration(thresholds, scales, record))
    return CalibrationResult(target, "bundle", meta.classes[y], old_threshold, float(threshold), record)


def undo_target(target: Path | str, wait: bool = True, announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Restore the thresholds (and, after a refit, the statistics) from before the last calibration,
    under the calibration lock (see `calibration_lock`); returns the record undone."""
    target = Path(target)
    kind = target_kind(target)
    with calibration_lock(target, wait, announce):
        if kind == "bundle":
            meta = read_bundle_metadata(target)
            record = meta.calibration
            if not record:
                raise CalibrationError(f"{target} has no calibration to undo: its thresholds are the exported ones")
            thresholds, scales, restored = _undone(record, target / METADATA_FILE)
            write_bundle_metadata(target, meta.with_calibration(thresholds, scales, restored))
            return record
        scorer = RunScorer(target)
        record = scorer.meta.get(RUN_RECORD_KEY)
        if not record:
            raise CalibrationError(f"{target} has no calibration to undo: its thresholds are the trained ones")
        thresholds, scales, restored = _undone(record, target / "meta.json")
        meta = {k: v for k, v in scorer.meta.items() if k != RUN_RECORD_KEY}
        if restored:
            meta[RUN_RECORD_KEY] = restored
        refit = bool(record.get("refit_statistics"))
        if refit:
            _load_statistics(scorer.scorer, target / STATISTICS_BACKUP)
        _write_run(target, scorer, thresholds, scales, meta, None, drop_backup=refit)
        return record


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
