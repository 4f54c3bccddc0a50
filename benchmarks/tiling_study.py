#!/usr/bin/env python
"""Tiled against resized inspection, on real images: the shared classes at native size, and
high-resolution frames built as mosaics of real images.

    python benchmarks/tiling_study.py --data ROOT --out DIR [--classes a,b] [--grid 2] [--epochs N]
        [--tiled-epochs N] [--parts native,mosaic] [--tile 256]

* native: one model resized whole (today's default) and one tiled at native resolution (`--tile`),
  per class and mean image / pixel AUROC and AUPRO, on the tuning half and the report half of the
  test images (hgad_edge.training.evaluate.tuning_half) and on the full sets.
* mosaic: each frame is a grid x grid mosaic of real images of one class at their native size
  (training frames of training images, test frames of test images: a defective frame holds one
  defective image among normal ones, its mask mosaicked the same way; cells of unequal size are
  padded by repeating their border pixels, which the normal frames have too). Both models train on
  the mosaic training frames and are scored on whole mosaic frames: the high-resolution camera case.

An epoch of a tiled model is tiles-per-image times as many optimizer steps as the resized model's:
`--tiled-epochs` gives the tiled model its own epoch count (e.g. the resized default's step budget),
and every row reports its epochs.

Writes DIR/tiling_study.json and DIR/tiling_study.md; the mosaic data under DIR/mosaic_data (MVTec
layout, so `hgad-edge train/eval --data DIR/mosaic_data` reproduces each row by hand).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, also when loaded by path
from _bootstrap import bootstrap_package  # noqa: E402

bootstrap_package()

from hgad_edge.core.files import atomic_write_json, atomic_write_text  # noqa: E402
from hgad_edge.core.imaging import load_image, load_mask  # noqa: E402

PARTS = ("native", "mosaic")


# ---- mosaics ----------------------------------------------------------------------------------------
def mosaic(images: list[np.ndarray], grid: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """grid x grid images (HxWx3 or HxW) at native size on one canvas, row by row; each cell as large
    as the largest image of its row / column, an image in the cell's top-left corner, the rest of the
    cell its border pixels repeated. Returns the canvas and each image's (y, x) origin."""
    import cv2

    rows = [images[r * grid : (r + 1) * grid] for r in range(grid)]
    heights = [max(im.shape[0] for im in row) for row in rows]
    widths = [max(rows[r][c].shape[1] for r in range(grid)) for c in range(grid)]
    canvas_rows, origins, y = [], [], 0
    for r, row in enumerate(rows):
        cells, x = [], 0
        for c, im in enumerate(row):
            pad_h, pad_w = heights[r] - im.shape[0], widths[c] - im.shape[1]
            cells.append(cv2.copyMakeBorder(im, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE))
            origins.append((y, x))
            x += widths[c]
        canvas_rows.append(np.concatenate(cells, axis=1))
        y += heights[r]
    return np.concatenate(canvas_rows, axis=0), origins


def mosaic_mask(masks: list[np.ndarray | None], shapes: list[tuple[int, int]], grid: int) -> np.ndarray:
    """The masks (None: a normal image) laid out exactly like `mosaic` lays out the images; padding is
    never defect."""
    blanks = [m.astype(np.uint8) * 255 if m is not None else np.zeros(s, np.uint8) for m, s in zip(masks, shapes)]
    canvas, origins = mosaic(blanks, grid)
    out = np.zeros(canvas.shape[:2], np.uint8)
    for (y, x), m in zip(origins, blanks):
        out[y : y + m.shape[0], x : x + m.shape[1]] = m
    return out


def build_mosaic_class(src: Path, dst: Path, grid: int, seed: int) -> dict[str, int]:
    """One class of MVTec layout at `src` -> mosaic frames at `dst` (same layout); returns counts."""
    import cv2

    rng = np.random.default_rng(seed)
    k = grid * grid

    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def write(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)
        if not ok:
            raise OSError(f"could not write {path}")

    counts = {}
    train = files(src / "train" / "good")
    for i in range(max(len(train) // k, 1) * 2):  # each training image in ~2 frames
        picks = [train[j] for j in rng.choice(len(train), k, replace=False)]
        write(dst / "train" / "good" / f"{i:04d}.png", mosaic([load_image(p) for p in picks], grid)[0])
    counts["train"] = max(len(train) // k, 1) * 2
    normals = files(src / "test" / "good")
    for i in range(len(normals)):  # as many normal test frames as normal test images
        picks = [normals[j] for j in rng.choice(len(normals), k, replace=False)]
        write(dst / "test" / "good" / f"{i:04d}.png", mosaic([load_image(p) for p in picks], grid)[0])
    counts["test_good"] = len(normals)
    for kind in sorted(p.name for p in (src / "test").iterdir() if p.is_dir() and p.name != "good"):
        for i, bad in enumerate(files(src / "test" / kind)):
            others = [normals[j] for j in rng.choice(len(normals), k - 1, replace=False)]
            slot = int(rng.integers(k))
            paths = others[:slot] + [bad] + others[slot:]
            images = [load_image(p) for p in paths]
            frame, _ = mosaic(images, grid)
            write(dst / "test" / kind / f"{i:04d}.png", frame)
            mask_path = src / "ground_truth" / kind / f"{bad.stem}_mask.png"
            if mask_path.exists():
                masks = [None] * k
                masks[slot] = load_mask(mask_path, images[slot].shape[:2])
                full = mosaic_mask(masks, [im.shape[:2] for im in images], grid)
                write(dst / "ground_truth" / kind / f"{i:04d}_mask.png", full)
            counts[f"test_{kind}"] = counts.get(f"test_{kind}", 0) + 1
    return counts


# ---- the study --------------------------------------------------------------------------------------
def train_and_eval(roots: list[Path], classes: list[str] | None, out: Path, tile: int, epochs: int | None) -> dict:
    """One model (tile 0: resized whole) trained and evaluated; finished runs are reused."""
    from hgad_edge.training.checkpoint import load_run
    from hgad_edge.training.config import load_config
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.evaluate import evaluate
    from hgad_edge.training.train import train

    metrics_file = out / "eval" / "metrics.json"
    if metrics_file.exists():
        from hgad_edge.training.checkpoint import load_run_config

        return json.loads(metrics_file.read_text()) | {"epochs": load_run_config(out).train.epochs}
    overrides = {"tiling": {"tile": tile}} | ({"train": {"epochs": epochs}} if epochs else {})
    cfg = load_config(None, overrides)
    dataset = open_roots(roots, classes=classes)
    t0 = time.time()
    if not (out / "meta.json").exists():
        train(cfg, dataset, out)
    train_s = time.time() - t0
    scorer, cfg, _ = load_run(out)
    t1 = time.time()
    metrics = evaluate(scorer, dataset, out / "eval")
    metrics["train_seconds"], metrics["eval_seconds"] = train_s, time.time() - t1
    metrics["epochs"] = cfg.train.epochs
    atomic_write_json(metrics_file, metrics)
    return metrics


def halves(roots: list[Path], classes: list[str] | None, out: Path) -> dict:
    """The run's metrics on the tuning half and the report half of each class's test images
    (hgad_edge.training.evaluate.tuning_half): what tiling is chosen on, and what it is reported on;
    cached in out/eval/halves.json."""
    from hgad_edge.training.checkpoint import load_run
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.evaluate import class_metrics, mean_metrics, predict_class, subset, tuning_half

    cached = out / "eval" / "halves.json"
    if cached.exists():
        return json.loads(cached.read_text())
    scorer, _, _ = load_run(out)
    dataset = open_roots(roots, classes=classes)
    names, test = scorer.model.class_names, dataset.samples("test")
    result: dict = {"tuning": {"classes": {}}, "report": {"classes": {}}}
    for name in dataset.classes:
        samples = [s for s in test if s.class_name == name]
        class_id = names.index(name)
        pred = predict_class(scorer, samples, class_id, dataset.has_masks(name))
        tune = tuning_half(samples)
        for half, keep in (("tuning", tune), ("report", ~tune)):
            result[half]["classes"][name] = class_metrics(subset(pred, keep), class_id)
    for half in result.values():
        half["mean"] = mean_metrics(half["classes"])
    atomic_write_json(cached, result)
    return result


def table(rows: dict[str, dict]) -> str:
    classes = sorted({c for m in rows.values() for c in m.get("classes", {})})
    head = "| model | " + " | ".join(classes) + " | mean | epochs | train s |\n"
    head += "|---|" + "---|" * (len(classes) + 3) + "\n"

    def cell(m: dict) -> str:
        img, pix, pro = (m.get(k) for k in ("image_auroc", "pixel_auroc", "aupro"))
        parts = [f"{100 * img:.1f}" if img is not None else "-"]
        if pix is not None:
            parts.append(f"{100 * pix:.1f}")
        if pro is not None:
            parts.append(f"{100 * pro:.1f}")
        return " / ".join(parts)

    lines = []
    for name, m in rows.items():
        per = [cell(m.get("classes", {}).get(c, {})) for c in classes]
        mean, seconds = cell(m.get("mean", {})), m.get("train_seconds", 0)
        epochs = m.get("epochs", "-")
        lines.append(f"| {name} | " + " | ".join(per) + f" | {mean} | {epochs} | {seconds:.0f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, action="append")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", help="comma-separated subset (default: every class found)")
    ap.add_argument("--grid", type=int, default=2, help="mosaic frames of grid x grid images")
    ap.add_argument("--tile", type=int, default=256, help="tile side in source pixels for the tiled model")
    ap.add_argument("--epochs", type=int, help="override train.epochs for every model of the study")
    ap.add_argument("--tiled-epochs", type=int, help="train.epochs of the tiled models (default: --epochs)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if args.grid < 1:
        ap.error("--grid must be >= 1")
    classes = [c for c in args.classes.split(",") if c] if args.classes else None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.epochs is not None and args.epochs < 1 or args.tiled_epochs is not None and args.tiled_epochs < 1:
        ap.error("--epochs and --tiled-epochs must be >= 1")
    tiled_epochs = args.tiled_epochs or args.epochs
    variants = [
        ("resized whole (tiling off)", "resize", 0, args.epochs),
        (f"tiled, {args.tile} px", "tiled", args.tile, tiled_epochs),
    ]
    command = "python benchmarks/tiling_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict = {"command": command}
    md = [
        "# Tiled against resized inspection\n",
        f"`{command}`\n",
        "Cells: image AUROC / pixel AUROC / AUPRO (x100). Pixel metrics of a tiled model are on its stitched map "
        "at native resolution; of a resized model on its map at the input size against masks resized to it.\n",
    ]
    if "native" in parts:
        rows = {
            name: train_and_eval(args.data, classes, args.out / f"native_{key}", tile, epochs)
            for name, key, tile, epochs in variants
        }
        report["native"] = rows
        md += ["## The classes at their native size\n", "Full test sets:\n", table(rows)]
        split = {name: halves(args.data, classes, args.out / f"native_{key}") for name, key, _, _ in variants}
        report["native_halves"] = split
        for half, words in (("tuning", "the tuning half (what the choice is made on)"), ("report", "the report half")):
            part = {
                name: split[name][half]
                | {"epochs": rows[name].get("epochs"), "train_seconds": rows[name].get("train_seconds", 0)}
                for name in rows
            }
            md += [f"On {words} of each class's test images:\n", table(part)]
    if "mosaic" in parts:
        from hgad_edge.training.data import open_roots

        data = args.out / "mosaic_data"
        if not (data / ".complete").exists():
            counts = {}
            for name in classes or open_roots(args.data).classes:
                src = next(root / name for root in args.data if (root / name).is_dir())
                counts[name] = build_mosaic_class(src, data / name, args.grid, args.seed)
            atomic_write_json(data / ".complete", counts)
        mosaic_classes = sorted(json.loads((data / ".complete").read_text()))
        rows = {
            name: train_and_eval([data], mosaic_classes, args.out / f"mosaic_{key}", tile, epochs)
            for name, key, tile, epochs in variants
        }
        report["mosaic"] = rows
        md += [f"## High-resolution frames: {args.grid}x{args.grid} mosaics of real images\n", table(rows)]
    atomic_write_json(args.out / "tiling_study.json", report)
    atomic_write_text(args.out / "tiling_study.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
