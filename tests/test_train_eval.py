"""End to end on a tiny generated dataset: train, reload, evaluate, CLI, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.training.checkpoint import RunError, load_run
from hgad_edge.training.config import HGADConfig, load_config, save_config
from hgad_edge.training.data import open_roots
from hgad_edge.training.evaluate import evaluate
from hgad_edge.training.train import TrainingError, lr_factor, split_calibration
from tests.helpers import TINY_CONFIG


@pytest.mark.slow
def test_train_then_eval_detects_visible_defects(tiny_run, tiny_data, tmp_path):
    scorer, cfg, meta = load_run(tiny_run)
    assert meta["calibrated"] and meta["classes"] == ["dots", "stripes"]
    result = evaluate(scorer, open_roots([tiny_data]), tmp_path / "eval", pictures=True)
    for name, m in result["classes"].items():
        assert m["image_auroc"] >= 0.9, (name, m)
        assert m["pixel_auroc"] >= 0.85, (name, m)
        assert m["aupro"] >= 0.8 and m["f1_max"] >= 0.9, (name, m)  # blobs found region by region
        assert m["n_test"] == 12 and m["n_anomalous"] == 6 and m["level"] == "pixel"
        # operating points at the saved threshold and what other thresholds would give
        assert m["tp"] + m["fn"] == m["n_anomalous"] and m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n_test"]
        assert m["threshold"] == pytest.approx(float(scorer.threshold[scorer.model.class_names.index(name)]))
        assert m["threshold_fpr"] == m["fp"] / (m["fp"] + m["tn"])
        assert (
            0.0 <= m["recall_at_fpr_1"] <= m["recall_at_fpr_5"] <= 1.0
            and 0.0 <= m["fpr_at_recall_90"] <= m["fpr_at_recall_95"]
        )
        assert (tmp_path / "eval" / "operating_points" / f"{name}.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result)) and on_disk["mean"]["image_auroc"] >= 0.9
    table = (tmp_path / "eval" / "metrics.md").read_text()
    quality, operating = table.split("\n\n")[:2]  # the metrics table, then the operating points
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in quality.splitlines()}
    for name, m in result["classes"].items():  # the table shows the measured numbers, in percent
        assert rows[name][3:7] == [f"{100 * m[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")]
    ops = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in operating.splitlines()}
    for name, m in result["classes"].items():
        assert ops[name][2:6] == [str(m[k]) for k in ("tp", "fp", "tn", "fn")]
    assert "recall@FPR 1%" in operating and on_disk["mean"]["tp"] >= 0
    pics = sorted(p.name for p in (tmp_path / "eval" / "pictures").iterdir())
    assert "stripes_overlays.png" in pics and "dots_loglik_hist.png" in pics and "dots_score_hist.png" in pics


def test_auto_class_and_threshold(tiny_run, tiny_data):
    scorer, cfg, _ = load_run(tiny_run)
    from hgad_edge.training.batching import load_batch

    ds = open_roots([tiny_data])
    good = [s for s in ds.samples("test") if s.label == 0]
    images = load_batch(good, cfg.input_size)
    truth = torch.tensor([s.class_id for s in good])
    with torch.no_grad():
        amap, score, cls = scorer(images, torch.full_like(truth, -1))
    norm = scorer.normalize(score, cls)
    assert (cls == truth).float().mean() == 1.0  # two very different textures
    assert amap.shape == (len(good), *cfg.input_size) and torch.isfinite(amap).all()
    assert (norm < 0.5).float().mean() >= 0.5  # most normal images pass the calibrated threshold


def test_run_reload_is_exact(tiny_run, tiny_data):
    from hgad_edge.training.batching import load_batch

    a, cfg, _ = load_run(tiny_run)
    b, _, _ = load_run(tiny_run)
    images = load_batch(open_roots([tiny_data]).samples("test")[:3], cfg.input_size)
    cls = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        for x, y in zip(a(images, cls), b(images, cls)):
            assert torch.equal(x, y)


def test_runs_from_before_pool_border_and_spreads_keep_their_scoring(tiny_run, tiny_data, tmp_path):
    """A run saved before backbone.pool_border / score.spread existed pooled over valid neighbours
    and used one spread per level: it loads as such (and the reading matters: the same weights read
    with the new defaults score differently)."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    from hgad_edge.training.batching import load_batch

    old = tmp_path / "old_run"
    shutil.copytree(tiny_run, old)
    data = yaml.safe_load((old / "config.yaml").read_text())
    del data["backbone"]["pool_border"], data["score"]["spread"], data["score"]["image_deep_weight"]
    del data["head"]["latent_components"]
    (old / "config.yaml").write_text(yaml.safe_dump(data))
    weights = {
        k: v
        for k, v in load_file(str(old / "model.safetensors")).items()
        if not k.startswith("spread_") and ".latent_" not in k
    }
    save_file(weights, str(old / "model.safetensors"))
    scorer, cfg, _ = load_run(old)
    assert cfg.backbone.pool_border == "exclude" and cfg.score.spread == "level" and cfg.score.image_deep_weight == 1.0
    assert not any(cfg.head.latent_components) and not any(h.latent_components for h in scorer.model.heads)
    assert all(torch.equal(scorer.spread("loglik", k), torch.ones_like(scorer.spread("loglik", k))) for k in range(2))
    new, _, _ = load_run(tiny_run)
    assert new.model.cfg.backbone.pool_border == "zero" and new.cfg.spread == "position"
    assert new.cfg.image_deep_weight == 3.0
    images = load_batch(open_roots([tiny_data]).samples("test")[:2], cfg.input_size)
    cls = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert not torch.allclose(scorer(images, cls)[0], new(images, cls)[0])


@pytest.mark.slow
def test_cli_train_eval_and_resume(tiny_data, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    save_config(HGADConfig.from_dict({**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "epochs": 2}}), cfg_path)
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(
        main, ["train", "--data", str(tiny_data), "--out", str(out), "--config", str(cfg_path), "--epochs", "1"]
    )
    assert res.exit_code == 0, res.output
    assert load_config(out / "config.yaml").train.epochs == 1  # the full config is saved with the model
    again = runner.invoke(main, ["train", "--data", str(tiny_data), "--out", str(out), "--config", str(cfg_path)])
    assert again.exit_code != 0 and "--resume" in again.output  # never overwrites a run
    res = runner.invoke(
        main,
        ["train", "--data", str(tiny_data), "--out", str(out), "--config", str(cfg_path), "--epochs", "2", "--resume"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "meta.json").read_text())["epochs_done"] == 2
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # epoch 1 not redone
    res = runner.invoke(main, ["eval", str(out), "--data", str(tiny_data)])
    assert res.exit_code == 0, res.output
    assert "image AUROC" in res.output and (out / "eval" / "metrics.json").is_file()


def test_cli_errors_are_clear(tiny_data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tmp_path), "--data", str(tiny_data)])
    assert res.exit_code == 1 and "not a trained run" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["train", "--data", str(tiny_data), "--classes", "nope", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "nope" in res.output
    res = runner.invoke(main, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2  # click's boundary validation


def test_calibration_split_and_schedule(tiny_data):
    cfg = HGADConfig().train
    fit, calib = split_calibration(open_roots([tiny_data]).samples("train"), cfg)
    assert not set(fit) & set(calib) and len(calib) == 2 * cfg.calib_min
    one = open_roots([tiny_data]).samples("train")[:1]
    with pytest.raises(TrainingError, match="at least 2"):
        split_calibration(one, cfg)
    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and max(values) == pytest.approx(1.0) and values[-1] < 0.05


def test_load_run_rejects_incomplete(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(RunError, match="missing"):
        load_run(broken)


def test_scores_rank_defects_above_normals(tiny_run, tiny_data):
    scorer, cfg, _ = load_run(tiny_run)
    from hgad_edge.training.evaluate import predict_class

    ds = open_roots([tiny_data])
    for cid, name in enumerate(ds.classes):
        samples = [s for s in ds.samples("test") if s.class_name == name]
        pred = predict_class(scorer, samples, cid, True)
        assert np.median(pred.scores[pred.labels == 1]) > np.median(pred.scores[pred.labels == 0])


def test_threshold_policy_needing_more_held_out_images_fails_before_training(tiny_data, tmp_path):
    from hgad_edge.training.train import train

    cfg = HGADConfig.from_dict({**TINY_CONFIG, "score": {"threshold_policy": "target-fpr", "threshold_param": 0.01}})
    with pytest.raises(TrainingError, match="needs 20 held-out normal images per class"):
        train(cfg, open_roots([tiny_data]), tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists()
