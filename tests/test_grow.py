"""Class changes on a trained run (hgad_edge.training.grow, `train --from`), the lineage in run and
bundle, and `export --keep-calibration` (export/keep_calibration.py).

The parameter surgery is checked on small hand-built models (no training): after a removal the other
classes' log-likelihood maps are bit-identical to the parent's; frozen flows train only the new rows.
The command itself runs on the session's tiny model (`slow`) with a third texture in a second root.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import TINY_CONFIG, TINY_SIZE, load_benchmark, make_tiny_dataset


# ---- builders -----------------------------------------------------------------------------------
def tiny_scorer(classes: list[str], seed: int = 0):
    """An untrained tiny scorer with every per-class tensor random (so rows are told apart)."""
    from hgad_edge.training.config import HGADConfig
    from hgad_edge.training.model import HGADModel
    from hgad_edge.training.scoring import AnomalyScorer

    torch.manual_seed(seed)
    cfg = HGADConfig.from_dict(TINY_CONFIG)
    scorer = AnomalyScorer(HGADModel(cfg, classes, load_backbone_weights=False), cfg.score)
    with torch.no_grad():
        for key, value in scorer.state_dict().items():
            if key.startswith(("ref_", "spread_", "tau_")) or key in ("threshold", "scale"):
                value.copy_(torch.rand_like(value) + 0.5)
    return scorer.eval()


def random_features(scorer, n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, lv.channels, h, w, generator=gen)
        for lv, (h, w) in zip(scorer.model.levels, scorer.model.map_shapes)
    ]


def checks_root(root: Path, n_train: int = 24, n_test: int = 6) -> Path:
    """A second data root with one more class, 'checks' (a checkerboard), MVTec layout with masks."""
    rng = np.random.default_rng(3)
    base = root / "checks"
    for sub in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (base / sub).mkdir(parents=True, exist_ok=True)

    def texture() -> np.ndarray:
        yy, xx = np.mgrid[0:TINY_SIZE, 0:TINY_SIZE]
        img = 100 + 80 * (((yy // 8) + (xx // 8)) % 2) + rng.normal(0, 6, (TINY_SIZE, TINY_SIZE))
        return np.clip(img, 0, 255).astype(np.uint8)

    for i in range(n_train):
        cv2.imwrite(str(base / "train/good" / f"{i:03d}.png"), texture())
    for i in range(n_test):
        cv2.imwrite(str(base / "test/good" / f"{i:03d}.png"), texture())
        img, mask = texture(), np.zeros((TINY_SIZE, TINY_SIZE), np.uint8)
        y, x = rng.integers(4, TINY_SIZE - 20, 2)
        img[y : y + 16, x : x + 16], mask[y : y + 16, x : x + 16] = 255, 255
        cv2.imwrite(str(base / "test/blob" / f"{i:03d}.png"), img)
        cv2.imwrite(str(base / "ground_truth/blob" / f"{i:03d}_mask.png"), mask)
    return root


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args: str):
    from hgad_edge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


# ---- what changes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "needs a change"),
        ({"add": ("c",), "remove": ("c",)}, "named twice"),
        ({"add": ("a",)}, "already in the parent"),
        ({"retrain": ("z",)}, "not in the parent"),
        ({"remove": ("z",)}, "not in the parent"),
        ({"remove": ("a", "b")}, "leaves no class"),
    ],
)
def test_bad_changes_are_refused(change, message):
    from hgad_edge.training.grow import ClassChange, GrowError

    with pytest.raises(GrowError, match=message):
        ClassChange(**change).classes_after(["a", "b"])


def test_classes_after_keep_the_parent_order_then_the_added():
    from hgad_edge.training.grow import ClassChange

    change = ClassChange(add=("z", "c"), retrain=("b",), remove=("a",))
    assert change.classes_after(["a", "b", "d"]) == ["b", "d", "z", "c"]
    assert change.fresh == ("b", "z", "c")


# ---- parameter surgery --------------------------------------------------------------------------
def test_remap_classes_takes_rows_by_source():
    from hgad_edge.training.grow import is_per_class, remap_classes

    parent = {
        "model.heads.0.main": torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
        "model.heads.0.psi": torch.tensor([0.1, 0.2, 0.3]),
        "model.flows.0.w": torch.tensor([7.0, 8.0]),
        "tau_loglik": torch.tensor([[1.0], [2.0], [3.0]]),
        "threshold": torch.tensor([10.0, 20.0, 30.0]),
        "calibrated": torch.tensor(True),
    }
    fresh = {
        "model.heads.0.main": torch.full((3, 2), -1.0),
        "model.heads.0.psi": torch.full((3,), -1.0),
        "model.flows.0.w": torch.zeros(2),
        "tau_loglik": torch.full((3, 1), -1.0),
        "threshold": torch.full((3,), -1.0),
        "calibrated": torch.tensor(False),
    }
    child = remap_classes(parent, fresh, [2, -1, 0])
    assert child["model.heads.0.main"].tolist() == [[3.0, 3.0], [-1.0, -1.0], [1.0, 1.0]]
    assert child["model.heads.0.psi"].tolist() == pytest.approx([0.3, -1.0, 0.1])
    assert child["tau_loglik"].tolist() == [[3.0], [-1.0], [1.0]]
    assert child["threshold"].tolist() == [30.0, -1.0, 10.0]
    assert child["model.flows.0.w"].tolist() == [7.0, 8.0] and bool(child["calibrated"])
    assert not is_per_class("model.flows.0.main") and not is_per_class("calibrated")
    with pytest.raises(ValueError, match="differ in their tensors"):
        remap_classes(parent, {k: v for k, v in fresh.items() if k != "threshold"}, [0, 1, 2])


def test_removing_a_class_leaves_the_others_log_likelihoods_bit_identical():
    from hgad_edge.training.grow import child_scorer

    parent = tiny_scorer(["a", "b", "c"])
    child = child_scorer(parent, ["a", "c"], fresh=[], seed=0).eval()
    feats = random_features(parent)
    with torch.no_grad():
        before, after = parent.model.terms_from_features(feats), child.model.terms_from_features(feats)
    for (ll0, _, _), (ll1, _, _) in zip(before, after):
        assert torch.equal(ll1, ll0[:, [0, 2]])
    for name in ("threshold", "scale", "tau_loglik", "ref_loglik_0", "spread_neg_entropy_1"):
        assert torch.equal(getattr(child, name), getattr(parent, name)[[0, 2]])
    assert all(torch.equal(p, q) for p, q in zip(child.model.flows.parameters(), parent.model.flows.parameters()))


def test_an_added_class_gets_fresh_rows_and_the_old_ones_stay():
    from hgad_edge.training.grow import child_scorer

    parent = tiny_scorer(["a", "b"])
    child = child_scorer(parent, ["a", "b", "c"], fresh=["c"], seed=0)
    for k, head in enumerate(child.model.heads):
        assert torch.equal(head.main[:2], parent.model.heads[k].main)
        assert torch.equal(head.deltas[:2], parent.model.heads[k].deltas)
    assert child.threshold[:2].tolist() == parent.threshold.tolist() and child.threshold[2] == 0
    feats = random_features(parent)
    with torch.no_grad():
        before, after = parent.model.terms_from_features(feats), child.model.terms_from_features(feats)
    for (ll0, _, _), (ll1, _, _) in zip(before, after):  # class-conditional: the new class changes nothing
        assert torch.equal(ll1[:, :2], ll0)


def test_frozen_flows_train_the_new_rows_only():
    from hgad_edge.training.grow import child_scorer, fresh_rows_only

    parent = tiny_scorer(["a", "b"])
    child = child_scorer(parent, ["a", "b", "c"], fresh=["c"], seed=0)
    model = child.model
    model.flows.requires_grad_(False)
    hooks = fresh_rows_only(model, [2])
    optim = torch.optim.Adam([p for p in model.heads.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    loss = sum(h.main.square().sum() + h.deltas.square().sum() + h.psi.sum() + h.psi_intra.sum() for h in model.heads)
    loss.backward()
    optim.step()
    for hook in hooks:
        hook.remove()
    for k, head in enumerate(model.heads):
        for name in ("main", "deltas", "psi", "psi_intra"):
            new, old = getattr(head, name), getattr(parent.model.heads[k], name)
            assert torch.equal(new[:2], old), name
        assert not torch.equal(head.main[2], child_scorer(parent, ["a", "b", "c"], ["c"], 0).model.heads[k].main[2])


# ---- the re-check -------------------------------------------------------------------------------
def test_score_drift_against_the_standard_error():
    from hgad_edge.training.grow import score_drift

    before = np.array([1.0, 2.0, 3.0, 4.0])  # std sqrt(1.25), n 4: standard error 0.559
    same = score_drift(before, before.copy(), ("max", None), 1.0)
    assert same["mean_shift"] == 0 and same["threshold_shift"] == 0 and not same["moved"]
    assert same["tolerance"] == pytest.approx(np.sqrt(1.25) / 2)
    assert not score_drift(before, before + 0.5, ("max", None), 1.0)["moved"]
    moved = score_drift(before, before + 0.6, ("max", None), 1.0)
    assert moved["moved"] and moved["mean_shift"] == pytest.approx(0.6)
    assert score_drift(before, np.array([1.0, 2.0, 3.0, 5.0]), ("max", None), 1.0)["moved"]  # the max moved by 1


def test_parent_splits_replay_the_scratch_split_even_without_a_removed_class(tmp_path):
    from hgad_edge.training.config import HGADConfig
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.grow import GrowError, parent_splits
    from hgad_edge.training.train import split_calibration

    data = make_tiny_dataset(tmp_path / "data", n_train=10, n_good=1, n_bad=1)
    checks_root(data, n_train=12, n_test=2)  # a third class in the same root: checks, dots, stripes
    cfg = HGADConfig.from_dict(TINY_CONFIG)
    full = open_roots([data])
    fit, calib = split_calibration(full.samples("train"), cfg.train)
    meta = {
        "n_train": {c: sum(s.class_name == c for s in fit) for c in full.classes},
        "n_calib": {c: sum(s.class_name == c for s in calib) for c in full.classes},
    }
    splits = parent_splits(full, full.classes, meta, cfg, ["dots", "stripes"])
    assert [s.path for s in splits["stripes"].held_out] == [s.path for s in calib if s.class_name == "stripes"]
    without = open_roots([data], ["dots", "stripes"])  # checks removed and gone from the data
    again = parent_splits(without, full.classes, meta, cfg, ["dots", "stripes"])
    for c in ("dots", "stripes"):
        assert [s.path for s in again[c].held_out] == [s.path for s in splits[c].held_out]
        assert not {s.path for s in again[c].held_out} & {s.path for s in again[c].fit}
    with pytest.raises(GrowError, match="not those the parent run was trained on"):
        parent_splits(full, full.classes, {**meta, "n_calib": {**meta["n_calib"], "dots": 99}}, cfg, ["dots"])


def test_replay_draws_a_bounded_stable_subset(tmp_path):
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.grow import replay_images

    data = make_tiny_dataset(tmp_path / "data", n_train=10, n_good=1, n_bad=1)
    dots = [s for s in open_roots([data]).samples("train") if s.class_name == "dots"]
    picked = replay_images(dots, 4, seed=0)
    assert len(picked) == 4 and set(picked) <= set(dots)
    assert picked == replay_images(list(reversed(dots)), 4, seed=0)
    assert len(replay_images(dots, 50, seed=0)) == 10


# ---- lineage in the bundle schema ---------------------------------------------------------------
LINEAGE = [
    {
        "parent_sha256": "a" * 64,
        "change": {"add": ["c"], "retrain": [], "remove": []},
        "date": "2026-01-02T03:04:05+00:00",
        "flows": "finetune",
        "steps": 300,
        "thresholds": {"a": "kept", "b": "refitted", "c": "added"},
    }
]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"x": 1}, "must be a list"),
        ([1], "must be an object"),
        ([{**LINEAGE[0], "parent_sha256": "abc"}], "parent_sha256"),
        ([{**LINEAGE[0], "change": {"rename": ["a"]}}], "change must name"),
        ([{**LINEAGE[0], "change": {"add": []}}], "change must name"),
        ([{**LINEAGE[0], "change": {"add": [3]}}], "list of class names"),
        ([{**LINEAGE[0], "date": None}], "date"),
    ],
)
def test_bad_lineage_is_refused(value, message):
    from hgad_edge.core.bundle_schema import SchemaError, check_lineage

    with pytest.raises(SchemaError, match=message):
        check_lineage(value)


def test_lineage_in_the_bundle_metadata_round_trips_and_older_bundles_have_none():
    from hgad_edge.core.bundle_schema import BundleMetadata, ModelFile, describe_lineage

    meta = BundleMetadata(
        ("a", "b", "c"), (64, 64), (1.0, 2.0, 3.0), (1.0, 1.0, 1.0), {"fp32": ModelFile("m.onnx", "0" * 64)}
    )
    assert "lineage" not in meta.to_json()  # from scratch: the metadata.json of before lineage
    assert BundleMetadata.from_json(meta.to_json()).lineage == ()
    grown = BundleMetadata.from_json({**meta.to_json(), "lineage": LINEAGE})
    assert grown.lineage == tuple(LINEAGE) and grown.to_json()["lineage"] == LINEAGE
    assert describe_lineage(()) == ["trained from scratch (no class changes)"]
    (line,) = describe_lineage(LINEAGE)
    assert line.startswith("1. 2026-01-02T03:04:05+00:00: add c (parent model aaaaaaaaaaaa, flows finetune, 300 steps)")
    assert line.endswith("thresholds kept: a, refitted: b")


# ---- keep-calibration (pure) --------------------------------------------------------------------
def _old_bundle(calibration):
    from hgad_edge.core.bundle_schema import BundleMetadata, ModelFile

    return BundleMetadata(
        classes=("a", "b"),
        input_size=(64, 64),
        thresholds=(1.5, 2.5),
        scales=(0.15, 0.25),
        models={"fp32": ModelFile("m.onnx", "0" * 64)},
        calibration=calibration,
        extra={"checkpoint_sha256": "a" * 64},
    )


def test_keep_calibration_carries_the_kept_classes_records():
    from hgad_edge.export.keep_calibration import carry_calibration, kept_classes

    first = {"class": "b", "policy": "max", "previous": {"thresholds": [1.0, 2.0], "scales": [0.1, 0.2]}}
    record = {
        "class": "a",
        "policy": "quantile",
        "previous": {"thresholds": [1.0, 2.5], "scales": [0.1, 0.25]},
        "history_dropped": 0,
        "history": [first],
    }
    old = _old_bundle(record)
    run_meta = {"classes": ["a", "b", "c"], "lineage": LINEAGE}
    kept = kept_classes(old, run_meta, "f" * 64, Path("old"))
    assert kept == ["a"]  # b was refitted, c added
    thresholds, scales, top = carry_calibration(
        old, ["a", "b", "c"], [1.0, 2.2, 3.3], [0.1, 0.22, 0.33], kept, Path("old")
    )
    assert thresholds == [1.5, 2.2, 3.3] and scales == [0.15, 0.22, 0.33]
    assert top["class"] == "a" and top["history"] == []  # b's record is dropped
    assert top["previous"] == {"thresholds": [1.0, 2.2, 3.3], "scales": [0.1, 0.22, 0.33]}
    assert top["kept_from"]["classes"] == ["a"] and top["kept_from"]["records_dropped"] == 1
    assert kept_classes(old, {**run_meta, "lineage": []}, "a" * 64, Path("old")) == ["a", "b", "c"]  # same model


@pytest.mark.parametrize(
    ("calibration", "run_meta", "message"),
    [
        (None, {"classes": ["a", "b", "c"], "lineage": LINEAGE}, "no calibration record"),
        (
            {"class": "b", "previous": {"thresholds": [1, 2], "scales": [1, 1]}},
            {"classes": ["a", "b", "c"], "lineage": LINEAGE},
            "nothing to keep",
        ),
        ({"class": "a"}, {"classes": ["a", "b", "c"], "lineage": []}, "neither this run's"),
        (
            {"class": "a"},
            {"classes": ["a", "b", "c"], "lineage": [{**LINEAGE[0], "parent_sha256": "b" * 64}]},
            "another model",
        ),
    ],
)
def test_keep_calibration_is_refused_where_it_cannot_apply(calibration, run_meta, message):
    from hgad_edge.export.keep_calibration import KeepCalibrationError, carry_calibration, kept_classes

    old = _old_bundle(calibration)
    with pytest.raises(KeepCalibrationError, match=message):
        kept = kept_classes(old, run_meta, "f" * 64, Path("old"))
        carry_calibration(old, run_meta["classes"], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], kept, Path("old"))


# ---- the command line ---------------------------------------------------------------------------
def fake_run(folder: Path, classes: list[str]) -> Path:
    """meta.json and config.yaml only: enough for every check made before a model is loaded."""
    from hgad_edge.training.config import HGADConfig, save_config

    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"classes": classes, "calibrated": True}))
    save_config(HGADConfig.from_dict(TINY_CONFIG), folder / "config.yaml")
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--add-class", "x"], "add --from RUN"),
        (["--from", "{run}", "--add-class", "x", "--epochs", "3"], "--epochs train from scratch"),
        (["--from", "{run}"], "needs a change"),
        (["--from", "{run}", "--add-class", "dots"], "already in the parent"),
        (["--from", "{run}", "--retrain-class", "x"], "not in the parent"),
        (["--from", "{run}", "--remove-class", "dots", "--remove-class", "stripes"], "leaves no class"),
        (["--from", "{run}", "--add-class", "nowhere"], "class nowhere is not under the data roots"),
        (["--from", "{run}", "--remove-class", "dots", "--out", "{run}"], "is the parent run"),
        (["--from", "{empty}", "--add-class", "x"], "is not a trained run"),
        (["--from", "{run}", "--remove-class", "dots", "--out", "{full}"], "is not an empty folder"),
        (["--from", "{run}", "--add-class", "x", "--flows", "melted"], "melted"),
        (["--from", "{run}", "--add-class", "x", "--config", "{bad_config}"], "only its grow section"),
    ],
)
def test_train_from_refuses_bad_input_before_any_work(tmp_path, args, message):
    data = make_tiny_dataset(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    run = fake_run(tmp_path / "run", ["dots", "stripes"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    paths = {"run": run, "empty": tmp_path / "empty", "bad_config": tmp_path / "bad.yaml", "full": tmp_path / "full"}
    args = [a.format(**paths) for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "out"]
    result = cli("train", "--data", data, *out, *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


# ---- on the tiny trained model (slow) -----------------------------------------------------------
@pytest.fixture(scope="module")
def extra_root(tmp_path_factory) -> Path:
    return checks_root(tmp_path_factory.mktemp("extra"))


GROW_CONFIG = "grow: {steps: 30, lr: 0.001}\n"


def grow_cli(tiny_run, tiny_data, extra_root, out, *change, config: Path):
    return cli(
        "train",
        "--from",
        tiny_run,
        "--data",
        tiny_data,
        "--data",
        extra_root,
        "--out",
        out,
        "--config",
        config,
        *change,
    )


def test_add_retrain_remove_on_a_trained_run(tiny_run, tiny_data, extra_root, tmp_path):
    from hgad_edge.core.files import sha256_file
    from hgad_edge.training.checkpoint import load_run

    config = tmp_path / "grow.yaml"
    config.write_text(GROW_CONFIG)
    before = folder_digest(tiny_run)
    parent, _, parent_meta = load_run(tiny_run)

    added = tmp_path / "added"
    result = grow_cli(tiny_run, tiny_data, extra_root, added, "--add-class", "checks", config=config)
    assert result.exit_code == 0, result.output
    scorer, cfg, meta = load_run(added)
    assert scorer.model.class_names == ["dots", "stripes", "checks"] and cfg.grow.steps == 30
    (entry,) = meta["lineage"]
    assert entry["parent_sha256"] == sha256_file(tiny_run / "model.safetensors")
    assert entry["change"] == {"add": ["checks"], "retrain": [], "remove": []} and entry["steps"] == 30
    assert set(entry["thresholds"]) == {"dots", "stripes", "checks"} and entry["thresholds"]["checks"] == "added"
    for c in ("dots", "stripes"):
        row = meta["grow"]["classes"][c]
        assert row["status"] in ("kept", "refitted") and row["threshold"]["old"] == pytest.approx(
            float(parent.threshold[parent.model.class_names.index(c)])
        )
    assert sorted(meta["held_out"]) == ["checks", "dots", "stripes"] and meta["n_calib"]["checks"] >= 3

    retrained = tmp_path / "retrained"
    assert grow_cli(added, tiny_data, extra_root, retrained, "--retrain-class", "dots", config=config).exit_code == 0
    removed = tmp_path / "removed"
    assert (
        grow_cli(retrained, tiny_data, extra_root, removed, "--remove-class", "stripes", config=config).exit_code == 0
    )
    r_scorer, _, r_meta = load_run(removed)
    assert r_scorer.model.class_names == ["dots", "checks"]
    assert [e["change"] for e in r_meta["lineage"]] == [
        {"add": ["checks"], "retrain": [], "remove": []},
        {"add": [], "retrain": ["dots"], "remove": []},
        {"add": [], "retrain": [], "remove": ["stripes"]},
    ]  # the chain survives
    assert r_meta["lineage"][-1]["flows"] == "unchanged" and r_meta["lineage"][-1]["steps"] == 0
    prev, _, _ = load_run(retrained)
    feats = random_features(prev)
    with torch.no_grad():
        for (ll0, _, _), (ll1, _, _) in zip(
            prev.model.terms_from_features(feats), r_scorer.model.terms_from_features(feats)
        ):
            assert torch.equal(ll1, ll0[:, [0, 2]])
    assert folder_digest(tiny_run) == before  # the parent is never changed

    result = cli("eval", removed, "--data", tiny_data, "--data", extra_root, "--classes", "dots,checks")
    assert result.exit_code == 0, result.output
    assert "lineage: 1. " in result.output and "3. " in result.output and "remove stripes" in result.output


def test_frozen_flows_keep_every_old_class_log_likelihood(tiny_run, tiny_data, extra_root, tmp_path):
    from hgad_edge.training.checkpoint import load_run

    config = tmp_path / "grow.yaml"
    config.write_text(GROW_CONFIG)
    out = tmp_path / "frozen"
    result = grow_cli(tiny_run, tiny_data, extra_root, out, "--add-class", "checks", "--flows", "frozen", config=config)
    assert result.exit_code == 0, result.output
    parent, _, _ = load_run(tiny_run)
    child, cfg, meta = load_run(out)
    assert cfg.grow.flows == "frozen" and meta["lineage"][0]["flows"] == "frozen"
    feats = random_features(parent)
    with torch.no_grad():
        for (ll0, _, _), (ll1, _, _) in zip(
            parent.model.terms_from_features(feats), child.model.terms_from_features(feats)
        ):
            assert torch.equal(ll1[:, :2], ll0)


def test_export_records_lineage_and_keeps_calibration(tiny_run, tiny_data, extra_root, tmp_path):
    from hgad_edge.export.onnx_export import ExportError, export_bundle
    from hgad_edge.runtime import Detector

    config = tmp_path / "grow.yaml"
    config.write_text(GROW_CONFIG.replace("}", ", recheck_tolerance: 1.0e+6}"))  # the old classes are kept
    child = tmp_path / "child"
    assert (
        grow_cli(
            tiny_run, tiny_data, extra_root, child, "--add-class", "checks", "--flows", "frozen", config=config
        ).exit_code
        == 0
    )
    meta = json.loads((child / "meta.json").read_text())
    old = tmp_path / "old"
    export_bundle(tiny_run, old, ("fp32",))
    with pytest.raises(ExportError, match="no calibration record"):
        export_bundle(child, tmp_path / "new", ("fp32",), keep_calibration=old)
    stripes = tiny_data / "stripes" / "test" / "good"
    assert cli("calibrate", old, "--normal", stripes, "--class", "stripes", "--quantile", "0.5").exit_code == 0
    old_thresholds = json.loads((old / "metadata.json").read_text())["thresholds"]
    assert meta["lineage"][0]["thresholds"] == {"dots": "kept", "stripes": "kept", "checks": "added"}
    new = tmp_path / "new"
    result = cli("export", child, "--out", new, "--precision", "fp32", "--keep-calibration", old)
    assert result.exit_code == 0, result.output
    assert "kept the calibrations of stripes" in result.output
    written = json.loads((new / "metadata.json").read_text())
    assert written["lineage"] == meta["lineage"]
    assert written["thresholds"][1] == old_thresholds[1] and written["calibration"]["class"] == "stripes"
    with Detector(new, backend="onnxruntime") as det:
        assert det.lineage == meta["lineage"] and det.info["thresholds"][1] == pytest.approx(old_thresholds[1])
    info = cli("info", new)
    assert info.exit_code == 0 and "add checks (parent model" in info.output
    assert cli("calibrate", new, "--undo").exit_code == 0  # back to the new model's own thresholds
    exported = json.loads((new / "metadata.json").read_text())
    assert "calibration" not in exported or exported["calibration"] is None
    with pytest.raises(ExportError, match="neither this run's"):
        export_bundle(tiny_run, tmp_path / "x", ("fp32",), keep_calibration=new)


@pytest.mark.slow  # trains four tiny models and makes three changes
def test_grow_study_on_the_tiny_data(tmp_path, tiny_data, extra_root):
    import yaml

    study = load_benchmark("grow_study.py")
    data = tmp_path / "data"
    data.mkdir()
    for root in (tiny_data, extra_root):
        for cls in root.iterdir():
            (data / cls.name).symlink_to(cls)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "grow": {"steps": 20}}))
    import sys

    argv = ["grow_study.py", "--data", str(data), "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    old, sys.argv = sys.argv, [*argv, "--config", str(config)]
    try:
        study.main()
    finally:
        sys.argv = old
    result = json.loads((tmp_path / "out" / "grow_study.json").read_text())
    assert result["class"] == "checks"  # the most training images (ties: the first name)
    steps = ["add", "retrain", "remove", "add_frozen", "retrain_frozen"]  # the default flows, then frozen too
    assert [s["name"] for s in result["steps"]] == steps
    report = (tmp_path / "out" / "grow_study.md").read_text()
    # three targets per change, and the time at the change's own speed for the two that fine-tune the flows
    assert report.count("PASS") + report.count("MISS") == 3 * 5 + 2
    assert set(result["models"]) == {"three", "four", *steps}
