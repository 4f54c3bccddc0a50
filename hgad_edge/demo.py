"""The embedded default job: real electroluminescence solar-cell images (elpv-dataset on PyPI,
CC BY-NC-SA 4.0), two classes (mono- and polycrystalline), laid out as MVTec AD and trained on."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import click

from .config import load_config
from .data import open_roots

# Cells with defect probability >= 2/3 are anomalous; 0 is normal; 1/3 is ambiguous and left out.
DEFECT_MIN_PROBABILITY = 2.0 / 3.0
TEST_NORMAL_PER_CLASS = 100


def prepare_elpv(root: Path, seed: int = 0) -> Path:
    """Write <root>/elpv_{mono,poly}/{train/good,test/good,test/defective} (copies, once)."""
    import elpv_dataset

    src = Path(elpv_dataset.__file__).parent / "data"
    done = root / ".complete"
    if done.exists():
        return root
    rows = []
    with open(src / "labels.csv") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], float(parts[1]), parts[2]))
    rng = random.Random(seed)
    for kind in ("mono", "poly"):
        normal = sorted(p for p, prob, t in rows if t == kind and prob == 0.0)
        defect = sorted(p for p, prob, t in rows if t == kind and prob >= DEFECT_MIN_PROBABILITY)
        rng.shuffle(normal)
        split = {
            "test/good": normal[:TEST_NORMAL_PER_CLASS],
            "train/good": normal[TEST_NORMAL_PER_CLASS:],
            "test/defective": defect,
        }
        for sub, files in split.items():
            dst = root / f"elpv_{kind}" / sub
            dst.mkdir(parents=True, exist_ok=True)
            for rel in files:
                shutil.copyfile(src / rel, dst / Path(rel).name)
    done.write_text("ok\n")
    return root


def run_demo(out: Path, epochs: int) -> dict:
    from .checkpoint import load_run
    from .evaluate import evaluate, metrics_table
    from .train import train

    data_root = prepare_elpv(out / "data")
    dataset = open_roots([data_root])
    cfg = load_config(overrides={"train": {"epochs": epochs}})
    click.echo(f"demo: training one model on {', '.join(dataset.classes)} from {data_root} ({epochs} epochs)")
    if not (out / "model" / "meta.json").exists() or not _calibrated(out / "model"):
        train(cfg, dataset, out / "model")
    scorer, _, _ = load_run(out / "model")
    result = evaluate(scorer, dataset, out / "model" / "eval", pictures=True)
    click.echo(metrics_table(result))
    click.echo(f"pictures: {out / 'model' / 'eval' / 'pictures'}")
    return result


def _calibrated(run: Path) -> bool:
    import json

    return bool(json.loads((run / "meta.json").read_text()).get("calibrated"))
