"""benchmarks/ablation.py on the tiny dataset: every mode trains on shared features and is reported."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY_CONFIG, load_benchmark

pytestmark = pytest.mark.slow  # each test trains several models


def _ablation_module():
    return load_benchmark("ablation.py")


def test_ablation_runs_modes_on_shared_features(tiny_data, tmp_path, monkeypatch):
    import yaml

    from hgad_edge.training import train

    extracted = []
    real = train.extract_features
    monkeypatch.setattr(
        train,
        "extract_features",
        lambda model, samples, **kw: extracted.append(len(samples)) or real(model, samples, **kw),
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY_CONFIG))
    summary = _ablation_module().run_ablation([tiny_data], tmp_path / "abl", 2, ["full", "knn", "single"], cfg)
    assert extracted == [summary["n_fit_images"]]  # the backbone ran once: the later modes and the kNN reuse it
    on_disk = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(on_disk["results"]) == ["knn", "single", "full"] and on_disk["epochs"] == 2
    assert summary["results"]["knn"]["mean"]["image_auroc"] > 0.9  # the blobs are plain to a kNN
    assert summary["results"]["knn"]["bank_mb"] > 0
    for mode in ("single", "full"):
        evaluated = json.loads((tmp_path / "abl" / mode / "eval" / "metrics.json").read_text())
        assert summary["results"][mode]["mean"] == evaluated["mean"]  # the table reports what eval measured
        assert evaluated["mean"]["image_auroc"] > 0.5  # bright blobs on regular textures: better than chance
        assert (tmp_path / "abl" / mode / "model.safetensors").is_file()
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "single Gaussian" in table and "HGAD" in table and "kNN" in table


def test_ablation_reuses_rows_whose_training_did_not_change(tiny_data, tmp_path):
    import yaml

    module = _ablation_module()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY_CONFIG))
    module.run_ablation([tiny_data], tmp_path / "abl", 1, ["single", "mi"], cfg)
    mtimes = {m: (tmp_path / "abl" / m / "model.safetensors").stat().st_mtime_ns for m in ("single", "mi")}
    # lambda2 is not read by the single Gaussian: its row is reused; the MI row retrains
    cfg.write_text(yaml.safe_dump(TINY_CONFIG | {"head": TINY_CONFIG.get("head", {}) | {"lambda2": 3.0}}))
    summary = module.run_ablation([tiny_data], tmp_path / "abl", 1, ["single", "mi"], cfg)
    after = {m: (tmp_path / "abl" / m / "model.safetensors").stat().st_mtime_ns for m in ("single", "mi")}
    assert after["single"] == mtimes["single"] and after["mi"] != mtimes["mi"]
    assert summary["config"]["head"]["lambda2"] == 3.0


def test_ablation_recalibrates_rows_whose_score_settings_changed(tiny_data, tmp_path):
    """Score settings do not change training: the row keeps its flows, is calibrated again with the
    new settings (threshold included) and saved with them; it is not retrained."""
    import yaml
    from safetensors.torch import load_file

    from hgad_edge.training.checkpoint import load_run_config

    module = _ablation_module()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY_CONFIG))
    run = tmp_path / "abl" / "full"
    module.run_ablation([tiny_data], tmp_path / "abl", 1, ["full"], cfg)
    before, log = load_file(str(run / "model.safetensors")), (run / "train_log.jsonl").read_text()
    assert load_run_config(run).score.image_deep_weight == 3.0
    cfg.write_text(yaml.safe_dump(TINY_CONFIG | {"score": TINY_CONFIG["score"] | {"image_deep_weight": 1.0}}))
    summary = module.run_ablation([tiny_data], tmp_path / "abl", 1, ["full"], cfg)
    after = load_file(str(run / "model.safetensors"))
    assert (run / "train_log.jsonl").read_text() == log  # no epoch was trained again
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model."))
    assert not torch.equal(before["threshold"], after["threshold"])  # the image score changed, so did its threshold
    assert load_run_config(run).score.image_deep_weight == 1.0
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["results"]["full"]["mean"] == evaluated["mean"]  # evaluated again, with the new settings
