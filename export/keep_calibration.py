"""`hgad-edge export NEWRUN --out B --keep-calibration OLD_BUNDLE`: carry the on-site calibrations of the
classes a class change did not touch from the bundle of the parent model into the new bundle.

`hgad-edge calibrate` records its thresholds in metadata.json (`calibration`: the latest record with
the earlier ones as a flat `history`, each naming its class and the thresholds and scales it replaced,
hgad_edge.threshold_calibration). After `train --from PARENT`, a class whose scoring constants the change
kept (the run's last lineage entry says "kept") scores as it did under the parent, so its calibrated
threshold still holds; a class added, retrained or refitted scores differently, so its calibrations are
dropped and it gets the new model's threshold. The kept records are re-indexed to the new class list;
each one's `previous` values of a changed class become the new model's, so `calibrate --undo` steps
back through the kept calibrations to the new model's exported thresholds and never to a threshold of
another model.

Refused (KeepCalibrationError, before any export work) where it cannot apply: OLD_BUNDLE exported from
neither the new run's parent nor the run itself, no calibration record in it, another input size or
tiling, or no record of a kept class. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hgad_edge.core.bundle_schema import BundleMetadata

_HISTORY_KEYS = ("history", "history_dropped")


class KeepCalibrationError(ValueError):
    """--keep-calibration cannot apply; the message says why and what to do instead."""


def kept_classes(old: BundleMetadata, run_meta: dict[str, Any], run_sha256: str, where: Path) -> list[str]:
    """The classes whose calibrations carry over: those the run's last change kept when `old` was exported
    from its parent, every class when `old` was exported from this very model."""
    old_sha = old.extra.get("checkpoint_sha256")
    lineage = run_meta.get("lineage") or []
    if old_sha == run_sha256:
        return list(run_meta["classes"])
    if not lineage or lineage[-1].get("parent_sha256") != old_sha:
        parent = lineage[-1]["parent_sha256"][:12] if lineage else None
        whose = f"its parent's ({parent})" if parent else "a parent's (the run was trained from scratch)"
        msg = (
            f"--keep-calibration {where}: that bundle was exported from model {str(old_sha)[:12]}, which is neither "
            f"this run's ({run_sha256[:12]}) nor {whose}: its calibrations belong to another model; "
            "export without --keep-calibration and calibrate again"
        )
        raise KeepCalibrationError(msg)
    status = lineage[-1].get("thresholds") or {}
    return [c for c in run_meta["classes"] if status.get(c) == "kept"]


def carry_calibration(
    old: BundleMetadata,
    classes: Sequence[str],
    thresholds: Sequence[float],
    scales: Sequence[float],
    kept: Sequence[str],
    where: Path,
) -> tuple[list[float], list[float], dict[str, Any]]:
    """The new bundle's (thresholds, scales, calibration record): the old bundle's values for the kept
    classes, the new model's (`thresholds`, `scales`, in `classes` order) for the others, and the old
    records of kept classes re-indexed (see the module docstring). KeepCalibrationError where none apply."""
    if old.calibration is None:
        msg = (
            f"--keep-calibration {where}: that bundle holds no calibration record (its thresholds are the exported "
            "ones), so there is nothing to keep; export without --keep-calibration"
        )
        raise KeepCalibrationError(msg)
    record = old.calibration
    entries = record.get("history") if isinstance(record.get("history"), list) else []
    entries = [*entries, {k: v for k, v in record.items() if k not in _HISTORY_KEYS}]
    mine = [e for e in entries if isinstance(e, dict) and e.get("class") in kept]
    if not mine:
        calibrated = sorted({str(e.get("class")) for e in entries if isinstance(e, dict)})
        msg = (
            f"--keep-calibration {where}: its calibrations are of {', '.join(calibrated)}, none of them a class this "
            f"change kept ({', '.join(kept) or 'none'}), so there is nothing to keep; export without --keep-calibration"
        )
        raise KeepCalibrationError(msg)
    old_index = {c: i for i, c in enumerate(old.classes)}

    def remap(old_values: Sequence[float], new_values: Sequence[float]) -> list[float]:
        if not isinstance(old_values, (list, tuple)) or len(old_values) != len(old.classes):
            raise KeepCalibrationError(
                f"--keep-calibration {where}: a calibration record there is damaged ({old_values!r})"
            )
        return [float(old_values[old_index[c]]) if c in kept else float(v) for c, v in zip(classes, new_values)]

    rows = []
    for e in mine:
        previous = e.get("previous") or {}
        rows.append(
            {
                **e,
                "previous": {
                    "thresholds": remap(previous.get("thresholds", old.thresholds), thresholds),
                    "scales": remap(previous.get("scales", old.scales), scales),
                },
            }
        )
    dropped = len(entries) - len(mine)
    top = {
        **rows[-1],
        "kept_from": {
            "bundle": str(Path(where).resolve()),
            "checkpoint_sha256": old.extra.get("checkpoint_sha256"),
            "classes": sorted({e["class"] for e in mine}),
            "records_dropped": dropped,
        },
        "history_dropped": int(record.get("history_dropped", 0)),
        "history": rows[:-1],
    }
    return remap(old.thresholds, thresholds), remap(old.scales, scales), top


def check_same_frames(old: BundleMetadata, input_size: Sequence[int], tiling: Any, where: Path) -> None:
    """A threshold holds only for scores of the same frames: same input size and tiling."""
    if tuple(old.input_size) != tuple(input_size) or old.tiling != tiling:
        msg = (
            f"--keep-calibration {where}: that bundle scores frames at {list(old.input_size)} (tiling {old.tiling}), "
            f"this run at {list(input_size)} (tiling {tiling}): its thresholds do not apply; calibrate again"
        )
        raise KeepCalibrationError(msg)
