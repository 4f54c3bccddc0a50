"""Tiled training and evaluation (config `tiling`, hgad_edge.core.tiling) on tiny generated data: the
`--tile` option, a cache of tiles, thresholds on frame scores, native-resolution maps and pixel
metrics, run calibration on frames; and the untiled path unchanged. The tests on the tiled run are
`slow`: one `hgad-edge train --tile auto` (about half a minute on 2 cores) serves them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.core.imaging import load_image, resize_image
from hgad_edge.core.metrics import image_and_pixel_metrics
from hgad_edge.core.thresholds import choose_threshold
from hgad_edge.core.tiling import Tiling, cut_tiles, plan_tiles
from hgad_edge.training import train as train_module
from hgad_edge.training.batching import iter_tile_batches
from hgad_edge.training.checkpoint import load_run, load_run_config
from hgad_edge.training.config import HGADConfig, load_config, save_config
from hgad_edge.training.data import open_roots
from hgad_edge.training.evaluate import evaluate, predict_class, predict_frames, ragged_pixel_metrics
from hgad_edge.training.scoring import frame_scores
from hgad_edge.training.train import Trainer, TrainingError, resolve_tiling, split_calibration
from tests.helpers import TINY_CONFIG, make_tiny_dataset

FRAME = 128  # training frames twice the tiny model input (64): `--tile auto` tiles them at 64 px
TILED_CONFIG = {
    **TINY_CONFIG,
    "train": {**TINY_CONFIG["train"], "epochs": 2},
    "tiling": {"overlap": 0.0},  # 2 x 2 tiles of a 128 px frame: a fast test
}


def _cropped(path: Path, rows: int, cols: int, keep: np.ndarray | None) -> None:
    """Cut `rows` / `cols` pixels off the bottom / right of an image, never into the defect `keep`."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    height, width = image.shape[:2]
    if keep is not None:
        ys, xs = np.nonzero(keep)
        rows, cols = min(rows, height - 1 - ys.max()), min(cols, width - 1 - xs.max())
    cv2.imwrite(str(path), image[: height - rows, : width - cols])


def make_ragged_dataset(root: Path) -> Path:
    """The tiny two-class dataset at 128 px, its test images (and masks) cropped to assorted sizes."""
    make_tiny_dataset(root, n_train=16, size=FRAME)
    for i, path in enumerate(sorted(root.glob("*/test/*/*.png"))):
        mask = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        keep = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0 if mask.is_file() else None
        rows, cols = 20 * (i % 3), 12 * ((i + 1) % 4)
        for file in (path, mask) if keep is not None else (path,):
            _cropped(file, rows, cols, keep)
    return root


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> SimpleNamespace:
    """`hgad-edge train --tile auto` on the ragged data: its output, run folder and Trainer."""
    base = tmp_path_factory.mktemp("tiled")
    data = make_ragged_dataset(base / "data")
    cfg_path, run = base / "tiled.yaml", base / "run"
    save_config(HGADConfig.from_dict(TILED_CONFIG), cfg_path)
    trainers = []
    real_run = Trainer.run

    def spy(self):
        trainers.append(self)
        return real_run(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "run", spy)
        args = ["train", "--data", str(data), "--out", str(run), "--config", str(cfg_path), "--tile", "auto"]
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return SimpleNamespace(data=data, run=run, output=res.output, trainer=trainers[0])


def test_config_round_trip_with_tiling(tmp_path):
    cfg = HGADConfig.from_dict({"tiling": {"tile": 320, "overlap": 0.25, "blend": "max"}})
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.tiling == cfg.tiling and back.tiling.setting() == Tiling(320, 0.25, "max")
    assert HGADConfig().tiling.setting() is None  # default: off, frames resized whole
    assert HGADConfig.from_dict({"tiling": {"tile": 0}}).to_dict() == HGADConfig().to_dict()


def test_runs_from_before_tiling_load_untiled(tiny_run, tmp_path):
    import yaml

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    data = yaml.safe_load((old / "config.yaml").read_text())
    del data["tiling"]
    (old / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(old).tiling.setting() is None


def test_tile_option_auto_chooses_from_the_images(tiny_data, tmp_path):
    small = open_roots([tiny_data]).samples("train")  # 64 px frames, the model input itself
    cfg = HGADConfig.from_dict(TINY_CONFIG)
    assert resolve_tiling(cfg, small, "auto") == "tiling: off (frames near the input size are resized whole)"
    assert cfg.tiling.tile == 0
    large = open_roots([make_tiny_dataset(tmp_path / "large", n_train=4, n_good=1, n_bad=1, size=FRAME)])
    cfg = HGADConfig.from_dict(TILED_CONFIG)
    line = resolve_tiling(cfg, large.samples("train"), "auto")
    assert line == "tiling: 64 px tiles, overlap 0, ~4 tiles per training image" and cfg.tiling.tile == 64
    assert resolve_tiling(cfg, large.samples("train"), 0).startswith("tiling: off") and cfg.tiling.tile == 0
    res = CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--tile", "big"])
    assert res.exit_code == 2 and "auto" in res.output


def test_cache_over_budget_is_refused_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "CACHE_BUDGET_BYTES", 1000)
    monkeypatch.setattr(train_module, "extract_features", lambda *a, **k: pytest.fail("extracted"))
    cfg = HGADConfig.from_dict({**TINY_CONFIG, "tiling": {"tile": 32, "overlap": 0.0}})
    with pytest.raises(TrainingError, match=r"feature cache: 168 tiles of 42 training images.*tiling\.tile"):
        train_module.train(cfg, open_roots([tiny_data]), tmp_path / "run", log=pytest.fail)
    assert not (tmp_path / "run").exists()


def test_tile_batches_keep_each_tile_with_its_frame():
    """Frames of assorted sizes in batches of 3 tiles: every tile once, in frame order, as cut_tiles
    cuts it, with its frame's index and grid, a frame's tiles going on into the next batch."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (h, w, 3), np.uint8) for h, w in ((100, 70), (40, 40), (130, 200))]
    tiling = Tiling(48, overlap=0.25)
    batches = list(iter_tile_batches(frames, (32, 32), 3, tiling))
    grids = [plan_tiles(f.shape[:2], tiling) for f in frames]
    want = np.concatenate([cut_tiles(f, g, (32, 32)) for f, g in zip(frames, grids)])
    assert [len(b.tiles) for b in batches[:-1]] == [3] * (len(batches) - 1) and 0 < len(batches[-1].tiles) <= 3
    np.testing.assert_array_equal(torch.cat([b.tiles for b in batches]).numpy(), want)
    ids = np.concatenate([b.frame_ids for b in batches])
    assert ids.tolist() == [i for i, g in enumerate(grids) for _ in range(g.count)]
    assert all(b.grids == {f: grids[f] for f in set(b.frame_ids.tolist())} for b in batches)
    assert frame_scores(np.arange(len(ids), dtype=np.float32), [b.frame_ids for b in batches]).tolist() == [
        float(np.flatnonzero(ids == f).max()) for f in range(3)
    ]
    whole = list(iter_tile_batches(frames[:2], (32, 32), 3))  # untiled: one resized frame each
    assert len(whole) == 1 and whole[0].frame_ids.tolist() == [0, 1] and whole[0].grids == {0: None, 1: None}


def test_ragged_pixel_metrics_equal_a_stack():
    """Equal sizes: what image_and_pixel_metrics gives for the stack. Ragged: images of one width stacked
    in pairs (regions away from the seam) are the same pixels and regions as the ragged list."""
    rng = np.random.default_rng(0)
    heights = [30, 50, 50, 30, 45, 35]
    maps = [rng.normal(size=(h, 40)).astype(np.float32) for h in heights]
    masks = [np.zeros((h, 40), bool) for h in heights]
    for i, (m, a) in enumerate(zip(masks, maps)):
        if i % 3:
            y, x = 5 + i, 3 + 4 * i
            m[y : y + 8 + i, x : x + 6] = True
            m[y + 12 + i :, 30:33] = i == 4  # a second region (to the bottom edge) in one image
            a[m] += 1.0 + 0.2 * i
    pairs = [(0, 1), (2, 3), (4, 5)]
    stacked_masks = np.stack([np.concatenate([masks[i], masks[j]]) for i, j in pairs])
    stacked_maps = np.stack([np.concatenate([maps[i], maps[j]]) for i, j in pairs])
    want = image_and_pixel_metrics(np.array([0, 1, 1]), np.zeros(3), stacked_masks, stacked_maps)
    got = ragged_pixel_metrics(masks, maps)
    assert got["pixel_auroc"] == want["pixel_auroc"] and got["aupro"] == pytest.approx(want["aupro"], abs=1e-12)
    same = ragged_pixel_metrics(list(stacked_masks), list(stacked_maps))
    assert same["aupro"] == pytest.approx(want["aupro"], abs=1e-12)


@pytest.mark.slow  # trains the tiled run (module fixture)
def test_tiled_train_prints_the_choice_and_records_it(tiled):
    assert "tiling: 64 px tiles, overlap 0, ~4 tiles per training image" in tiled.output
    assert "feature cache: 104 tiles of 26 training images, per image 4 tiles x" in tiled.output
    saved = load_config(tiled.run / "config.yaml").tiling
    assert (saved.tile, saved.overlap, saved.blend) == (64, 0.0, "mean")


@pytest.mark.slow  # trains the tiled run (module fixture)
def test_tiled_cache_holds_every_tile_with_its_image_class(tiled):
    cfg = tiled.trainer.cfg
    fit, _ = split_calibration(tiled.trainer.dataset.samples("train"), cfg.train)
    counts = [plan_tiles(load_image(s.path).shape[:2], cfg.tiling.setting()).count for s in fit]
    cache = tiled.trainer.cache
    assert cache.labels.shape[0] == sum(counts) == 104 and all(f.shape[0] == sum(counts) for f in cache.levels)
    assert cache.frames.tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    assert cache.labels.tolist() == [fit[i].class_id for i in cache.frames.tolist()]
    meta = json.loads((tiled.run / "meta.json").read_text())
    assert meta["n_train_tiles"] == {"dots": 52, "stripes": 52}


@pytest.mark.slow  # trains the tiled run (module fixture)
def test_thresholds_are_fitted_on_frame_scores(tiled):
    """Recomputed independently: each held-out frame's tiles cut by hand, scored by the graph's forward,
    the frame's score their max; the saved threshold is the policy's on those frame scores."""
    scorer, cfg, meta = load_run(tiled.run)
    _, calib = split_calibration(open_roots([tiled.data]).samples("train"), cfg.train)
    calibration = meta["calibration"]
    policy, param = calibration["threshold_policy"]
    for y, name in enumerate(scorer.model.class_names):
        frames = [load_image(s.path) for s in calib if s.class_id == y]
        expected = []
        for frame in frames:
            grid = plan_tiles(frame.shape[:2], cfg.tiling.setting())
            tiles = torch.from_numpy(cut_tiles(frame, grid, cfg.input_size))
            with torch.no_grad():
                tile_scores = scorer(tiles, torch.full((len(tiles),), y))[1].numpy()
            assert len(tile_scores) == 4
            expected.append(float(tile_scores.max()))
        recorded = calibration["held_out_scores"][name]
        assert len(recorded) == len(frames) == 3  # one score a frame, not a tile
        np.testing.assert_allclose(recorded, expected, rtol=1e-5)
        assert float(scorer.threshold[y]) == np.float32(choose_threshold(policy, param, recorded).threshold)
        assert float(scorer.threshold[y]) == pytest.approx(choose_threshold(policy, param, expected).threshold, 1e-5)


@pytest.mark.slow  # trains the tiled run (module fixture)
def test_tiled_eval_is_at_native_resolution_and_finds_the_defects(tiled, tmp_path):
    scorer, cfg, _ = load_run(tiled.run)
    dataset = open_roots([tiled.data])
    result = evaluate(scorer, dataset, tmp_path / "eval", pictures=True)
    assert result["map_resolution"] == "native"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["map_resolution"] == "native"
    assert "native resolution" in (tmp_path / "eval" / "metrics.md").read_text()
    assert (tmp_path / "eval" / "pictures" / "dots_overlays.png").is_file()
    for name, m in result["classes"].items():
        assert m["level"] == "pixel" and m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9, (name, m)
        assert m["aupro"] >= 0.8, (name, m)
    samples = [s for s in dataset.samples("test") if s.class_name == "stripes"]
    y = scorer.model.class_names.index("stripes")
    pred = predict_class(scorer, samples, y, True)
    native = [load_image(s.path).shape[:2] for s in samples]
    assert len(set(native)) > 1 and isinstance(pred.maps, list)  # assorted sizes: one map each, not a stack
    assert [m.shape for m in pred.maps] == native == [m.shape for m in pred.masks]
    maps, scores, classes = predict_frames(scorer, cfg, [load_image(s.path) for s in samples], y)
    np.testing.assert_array_equal(scores, pred.scores)
    assert all(np.array_equal(a, b) for a, b in zip(maps, pred.maps)) and (classes == y).all()
    _, _, auto = predict_frames(scorer, cfg, [load_image(s.path) for s in samples[:4]], -1)
    assert (auto == y).all()  # each tile picks its class, the frame takes the majority
    odd_maps, odd_scores, _ = predict_frames(scorer, cfg, samples, y, batch_size=3)  # frames split over batches
    np.testing.assert_allclose(odd_scores, scores, rtol=1e-5)
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(odd_maps, maps))


@pytest.mark.slow  # trains the tiled run (module fixture)
def test_calibrating_a_tiled_run_scores_frames(tiled, tmp_path):
    from hgad_edge.threshold_calibration import calibrate_target

    normal = tiled.data / "dots" / "train" / "good"
    frames = [load_image(p) for p in sorted(normal.glob("*.png"))]
    for refit in (False, True):
        run = Path(shutil.copytree(tiled.run, tmp_path / f"run_{refit}"))
        result = calibrate_target(run, normal, "max", class_name="dots", refit_statistics=refit)
        scorer, cfg, _ = load_run(run)
        held_out = frames[1::2] if refit else frames  # a refit fits the statistics on the other half
        _, scores, _ = predict_frames(scorer, cfg, held_out, scorer.model.class_names.index("dots"))
        assert result.threshold == pytest.approx(float(scores.max()), rel=1e-6)


@pytest.mark.slow
def test_untiled_results_are_unchanged(tiny_run, tiny_data, tmp_path):
    """Untiled, predict_frames is the scorer's forward on whole resized frames, bit for bit; and a run
    with tiling.tile 0 written out is the default run, weights, calibration and metrics."""
    from hgad_edge.training.batching import load_batch

    scorer, cfg, _ = load_run(tiny_run)
    samples = open_roots([tiny_data]).samples("test")[:5]
    maps, scores, classes = predict_frames(scorer, cfg, samples, 1)
    with torch.no_grad():
        amap, score, cls = scorer(load_batch(samples, cfg.input_size), torch.ones(5, dtype=torch.long))
    assert torch.equal(torch.from_numpy(np.stack(maps)), amap) and torch.equal(torch.from_numpy(scores), score)
    assert [m.shape for m in maps] == [tuple(cfg.input_size)] * 5 and (classes == cls.numpy()).all()
    frame = load_image(samples[0].path)
    assert np.array_equal(resize_image(frame, cfg.input_size), load_batch(samples[:1], cfg.input_size)[0].numpy())

    one_epoch = {**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "epochs": 1}}
    results = {}
    for label, extra in (("default", {}), ("off", {"tiling": {"tile": 0}})):
        run = tmp_path / label
        train_module.train(HGADConfig.from_dict({**one_epoch, **extra}), open_roots([tiny_data]), run)
        s, _, meta = load_run(run)
        results[label] = (
            (run / "model.safetensors").read_bytes(),
            meta["calibration"],
            evaluate(s, open_roots([tiny_data]), run / "eval"),
        )
    assert results["default"] == results["off"]
    assert results["off"][2]["map_resolution"] == "input 64x64"


@pytest.mark.slow  # trains the tiled run (module fixture), exports it and starts a Triton server
def test_the_runtime_stitches_what_pytorch_stitches(tiled, tmp_path):
    """The exported tiled run through the torch-free runtime (ONNX Runtime, and a real Triton server)
    gives PyTorch's stitched maps, frame scores and classes on the same frames (predict_frames)."""
    from hgad_edge.export.onnx_export import export_bundle
    from hgad_edge.runtime import Detector

    bundle = tmp_path / "bundle"
    export_bundle(tiled.run, bundle, ("fp32",), simplify=False)
    scorer, cfg, _ = load_run(tiled.run)
    frames = [load_image(p) for p in sorted(tiled.data.glob("*/test/*/*.png"))[:5]]  # assorted native sizes
    sizes = {f.shape[:2] for f in frames}
    assert len(sizes) > 1 and any(h > FRAME // 2 or w > FRAME // 2 for h, w in sizes)

    def compare(detector: Detector) -> None:
        for frame, class_id in zip(frames, (0, 1, -1, 0, -1)):
            maps, scores, classes = predict_frames(scorer, cfg, [frame], class_id)
            got = detector.infer(frame, "auto" if class_id < 0 else class_id)
            assert got.anomaly_map.shape == (1, *frame.shape[:2]) == (1, *maps[0].shape)
            np.testing.assert_allclose(got.anomaly_map[0], maps[0], atol=2e-3, rtol=1e-4)
            np.testing.assert_allclose(got.score, scores, atol=2e-3, rtol=1e-4)
            np.testing.assert_array_equal(got.class_pred, classes)

    with Detector(bundle, backend="onnxruntime", max_batch=3) as local:  # 4 tiles a frame: two calls
        compare(local)
    pytest.importorskip("pytriton.triton", reason="pip install '.[serve]'")
    from hgad_edge.runtime.triton.server import ServeProcess

    server = ServeProcess(bundle, tmp_path / "serve", max_batch=4)
    try:
        server.start()
        with Detector(server.url, backend="triton") as remote:
            compare(remote)
    finally:
        server.stop()
