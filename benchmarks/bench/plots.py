"""throughput.png and breakdown.png from the JSON-shaped report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgad_edge.core.files import atomic_path


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    with atomic_path(path) as tmp:
        FigureCanvasAgg(fig).print_png(str(tmp))


def write_plots(report: dict, folder: Path) -> list[str]:
    """throughput.png and breakdown.png on a bare Agg canvas (no pyplot state touched)."""
    from matplotlib.figure import Figure

    written = []
    rows = [r for r in report["latency"] if r.get("status") == "ok"]
    off = (report.get("official") or {}).get("latency")
    if off:
        rows = rows + [off]
    if rows:
        fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5), tight_layout=True)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["e2e"]["images_per_s"] for r in rows], 0.4, label="end to end")
        ax.bar(x + 0.2, [r["model"]["images_per_s"] for r in rows], 0.4, label="model only")
        ax.set_xticks(x, [f"{r['backend']}\n{r['precision']} b{r['batch']}" for r in rows], fontsize=7)
        ax.set_ylabel("images / s")
        values = [r[k]["images_per_s"] for r in rows for k in ("e2e", "model") if r[k]["images_per_s"]]
        if values and max(values) / max(min(values), 1e-9) > 50:
            ax.set_yscale("log")
        ax.set_title(f"Throughput on {report['machine']['name']}")
        ax.legend()
        _save(fig, folder / "throughput.png")
        written.append("throughput.png")
    bd = report.get("breakdown") or {}
    panels = [(k, bd[k]) for k in ("torch_components", "ort_profile") if bd.get(k)]
    if panels:
        fig = Figure(figsize=(6.0 * len(panels), 4.5), tight_layout=True)
        for i, (key, data) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            if key == "torch_components":
                names, ms, title = (
                    [c["name"] for c in data["components"]],
                    [c["p50_ms"] for c in data["components"]],
                    "torch eager fp32, batch 1",
                )
            else:
                names, ms, title = (
                    [o["op_type"] for o in data["top_ops"]],
                    [o["ms_per_run"] for o in data["top_ops"]],
                    "ONNX Runtime CPU, op types",
                )
            ax.barh(np.arange(len(names)), ms)
            ax.set_yticks(np.arange(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("ms per image (p50)" if key == "torch_components" else "ms per run")
            ax.set_title(title)
        _save(fig, folder / "breakdown.png")
        written.append("breakdown.png")
    return written
