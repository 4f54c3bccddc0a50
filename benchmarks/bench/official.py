"""The official HGAD configuration (random weights), timed and counted beside the run."""

from __future__ import annotations

import time
from typing import Any

from hgad_edge.bench.context import Setup
from hgad_edge.bench.engines import TorchEngine
from hgad_edge.bench.flops import count_complexity
from hgad_edge.bench.latency import time_engine
from hgad_edge.bench.log import Budget
from hgad_edge.bench.rows import LatencyRow, OfficialResult

# The official HGAD pipeline: one stride-16 stage of EfficientNet-B6 on a 1024/512/256 image
# pyramid, no local aggregation, 12 couplings per level; 15 classes as on MVTec AD.
PAPER_CONFIG: dict[str, Any] = {
    "input_size": [1024, 1024],
    "backbone": {"name": "tf_efficientnet_b6", "stages": [3], "pool": 1, "pyramid": [1.0, 0.5, 0.25]},
    "flow": {"coupling_blocks": 12},
}
PAPER_CLASSES = 15
PAPER_TAB5 = {"gflops": 32.8, "learnable_params_m": 30.8, "input_size": [256, 256], "fps": 24.3}
OFFICIAL_MAX_ITERS = 5  # the official configuration is timed on a few images at batch 1 only
OFFICIAL_BUDGET_S = 240.0


def build_scorer(config: dict, num_classes: int = PAPER_CLASSES):
    """An uncalibrated scorer with RANDOM weights for `config` (counting and timing only)."""
    from hgad_edge.training.config import HGADConfig
    from hgad_edge.training.model import HGADModel
    from hgad_edge.training.scoring import AnomalyScorer

    cfg = HGADConfig.from_dict(config)
    model = HGADModel(cfg, [f"class{i}" for i in range(num_classes)], load_backbone_weights=False)
    return AnomalyScorer(model, cfg.score).eval(), cfg


def bench_official(setup: Setup, config: dict, label: str, budget: Budget) -> OfficialResult:
    """Complexity and batch-1 eager FP32 speed of the official configuration (random weights)."""
    t0 = time.perf_counter()
    scorer, cfg = build_scorer(config)
    build_s = time.perf_counter() - t0
    complexity = count_complexity(scorer)
    engine = TorchEngine(scorer.to(setup.device), setup.device)
    allowance = Budget(min(OFFICIAL_BUDGET_S, budget.left()))
    timed = time_engine(engine, 1, 1, min(setup.iters, OFFICIAL_MAX_ITERS), allowance, "official eager fp32 b1")
    row = LatencyRow("official torch eager", "fp32", 1, "ok", device=setup.device, **timed)
    return OfficialResult(label, config, build_s, row, complexity)


def paper_config_at(size: int) -> dict:
    return {**PAPER_CONFIG, "input_size": [size, size]}
