"""The kNN reference (hgad_edge/training/knn.py): exact nearest distances, one unified bank, real detection."""

from __future__ import annotations

import torch

from hgad_edge.training.knn import fit_bank, knn_maps, nearest_distance
from tests.helpers import TINY_CONFIG


def test_nearest_distance_is_exact_in_any_chunking():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 7, generator=gen), torch.randn(301, 7, generator=gen)
    expected = torch.cdist(queries.double(), bank.double()).amin(1).float()
    for chunk in (1, 64, 4096):
        torch.testing.assert_close(nearest_distance(queries, bank, chunk), expected, rtol=1e-4, atol=1e-4)
    # a query that is a bank row is at distance 0
    assert nearest_distance(bank[:3], bank).abs().max() < 1e-3


def test_bank_holds_per_class_samples_of_every_class_and_maps_have_input_size():
    levels = [torch.randn(6, 4, 8, 8), torch.randn(6, 3, 4, 4)]  # two levels of different resolution
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    bank = fit_bank(levels, labels, per_class=100)
    assert bank.vectors.shape == (200, 7)  # 100 of each class, levels fused to 4 + 3 channels
    amap, score = knn_maps(bank, [lv[:2] for lv in levels], (32, 32))
    assert amap.shape == (2, 32, 32) and torch.equal(score, amap.flatten(1).amax(1))


def test_knn_ablation_row_finds_the_tiny_defects(tiny_data, tmp_path):
    from hgad_edge.training.config import HGADConfig
    from hgad_edge.training.data import open_roots
    from hgad_edge.training.knn import evaluate_knn

    result = evaluate_knn(HGADConfig.from_dict(TINY_CONFIG), open_roots([tiny_data]), per_class=2000)
    assert set(result["classes"]) == {"stripes", "dots"}
    assert result["mean"]["image_auroc"] > 0.9 and result["mean"]["pixel_auroc"] > 0.9
    assert result["bank_mb"] > 0 and result["score_ms_per_image"] > 0
