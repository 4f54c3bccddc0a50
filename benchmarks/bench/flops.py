"""FLOPs and parameters per component, counted on fake tensors (shapes only, no arithmetic)."""

from __future__ import annotations

from collections.abc import Iterable

from hgad_edge.bench.components import REST, component_modules, component_params
from hgad_edge.bench.rows import Complexity, Component


def _params(modules: Iterable) -> tuple[int, int]:
    params = [p for m in modules for p in m.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_complexity(scorer, batch: int = 1) -> Complexity:
    """FLOPs (FlopCounterMode: 2 per multiply-add of conv/matmul; elementwise ops uncounted) and
    parameters per component at the scorer's input size, from ONE forward on fake tensors: the
    counter attributes each op to the module it ran in, REST gets what ran outside the components."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    h, w = scorer.model.cfg.input_size
    device = next(scorer.parameters()).device
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        images = torch.zeros(batch, h, w, 3, dtype=torch.uint8, device=device)
        cls = torch.full((batch,), -1, dtype=torch.long, device=device)
        with FlopCounterMode(display=False) as counter:
            scorer(images, cls)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    paths = {module: name for name, module in scorer.named_modules()}
    root = type(scorer).__name__
    total = int(counter.get_total_flops())
    flops = {
        name: int(by_module.get(f"{root}.{paths[module]}", 0)) for name, module in component_modules(scorer).items()
    }
    flops[REST] = total - sum(flops.values())
    components = []
    for name, modules in component_params(scorer).items():
        params, learnable = _params(modules)
        components.append(Component(name, flops[name], flops[name] / 2e9, params, learnable))
    params, learnable = _params([scorer])
    return Complexity(
        counter="torch.utils.flop_counter.FlopCounterMode (FakeTensorMode)",
        input_size=[int(h), int(w)],
        batch=batch,
        components=components,
        sum_components_flops=sum(c.flops for c in components),
        total_flops=total,
        total_gflops=total / 1e9,
        total_gmacs=total / 2e9,
        params=params,
        learnable_params=learnable,
    )
