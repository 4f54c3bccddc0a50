"""The components of the one forward (backbone, each level's flow, the rest) and where its time goes.

Nothing here re-implements the forward: the model's own modules are instrumented (forward hooks
for time, FlopCounterMode's module hierarchy for FLOPs), so what is measured is what runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hgad_edge.bench.log import Budget
from hgad_edge.bench.rows import ComponentTime

# The rest of the forward: mixture heads, class choice, standardisation, upsampling, smoothing,
# image score, calibrated normalisation (and the elementwise input cast and normalisation).
REST = "head+scoring"
_WHOLE = "(forward)"


def component_modules(scorer) -> dict[str, Any]:
    """Component name -> the module that runs it in scorer's forward (the fused flows where the
    model uses them); REST is whatever the forward does outside these."""
    model = scorer.model
    flows = model.fused_flows if model.fused_flows is not None else model.flows
    return {"backbone": model.backbone, **{f"flow {lv.name}": flows[k] for k, lv in enumerate(model.levels)}}


def component_params(scorer) -> dict[str, list]:
    """Component name (as component_modules, plus REST) -> the modules whose parameters it owns."""
    model = scorer.model
    parts: dict[str, list] = {"backbone": [model.backbone]}
    parts.update({f"flow {lv.name}": [model.flows[k]] for k, lv in enumerate(model.levels)})
    parts[REST] = [model.heads]
    return parts


@contextlib.contextmanager
def component_clock(scorer, sync: Callable[[], None] = lambda: None) -> Iterator[dict[str, list[float]]]:
    """Time every forward of `scorer` run inside the block, per component, in ms: hooks on the
    component modules and on the scorer itself (`sync` before each clock read: CUDA). The yielded
    dict is filled on exit: name -> one duration per forward; REST = the forward minus its parts."""
    spans: dict[str, list[float]] = {}
    starts: dict[str, float] = {}

    def begin(name: str):
        def hook(module, args):
            sync()
            starts[name] = time.perf_counter()

        return hook

    def end(name: str):
        def hook(module, args, output):
            sync()
            spans.setdefault(name, []).append((time.perf_counter() - starts.pop(name)) * 1e3)

        return hook

    parts = component_modules(scorer)
    handles = []
    for name, module in {**parts, _WHOLE: scorer}.items():
        handles += [module.register_forward_pre_hook(begin(name)), module.register_forward_hook(end(name))]
    times: dict[str, list[float]] = {}
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()
    whole = spans.pop(_WHOLE, [])
    times.update({name: spans.get(name, []) for name in parts})
    times[REST] = [total - sum(spans[name][i] for name in parts) for i, total in enumerate(whole)]


def component_latency(scorer, device: str, warmup: int, iters: int, budget: Budget) -> dict[str, Any]:
    """Torch eager ms per component at batch 1 (synchronised on CUDA), p50 over `iters` forwards."""
    import torch

    h, w = scorer.model.cfg.input_size
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)).to(device)
    cls = torch.full((1,), -1, dtype=torch.long, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            scorer(images, cls)
        with component_clock(scorer, sync) as times:
            for _ in tqdm(range(iters), desc="component latency", leave=False):
                scorer(images, cls)
                if budget.spent():
                    break
    p50 = {name: float(np.median(v)) for name, v in times.items() if v}
    total = sum(p50.values())
    comps = [ComponentTime(name, ms, ms / total if total else None) for name, ms in p50.items()]
    return {"device": device, "batch": 1, "backend": "torch eager fp32", "components": comps, "sum_p50_ms": total}
