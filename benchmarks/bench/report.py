"""report.md from the JSON-shaped report (so a stored report.json can be rendered again)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hgad_edge.bench.official import PAPER_TAB5
from hgad_edge.core.files import atomic_write_text


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_f(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines + [""]


def _complexity_md(c: dict, title: str) -> list[str]:
    lines = [f"**{title}** — input {c['input_size'][0]}x{c['input_size'][1]}, batch {c['batch']}", ""]
    rows = [
        (x["name"], x["flops"] / 1e9, x["gmacs"], x["params"] / 1e6, x["learnable_params"] / 1e6)
        for x in c["components"]
    ]
    rows.append(
        (
            "**sum of components**",
            c["sum_components_flops"] / 1e9,
            c["sum_components_flops"] / 2e9,
            c["params"] / 1e6,
            c["learnable_params"] / 1e6,
        )
    )
    rows.append(("**one whole forward**", c["total_flops"] / 1e9, c["total_gmacs"], None, None))
    return lines + _table(["component", "GFLOPs", "GMACs", "params (M)", "learnable (M)"], rows)


def _latency_rows(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            blank = (None,) * 6
            out.append(
                (
                    r["backend"],
                    r["precision"],
                    r["batch"],
                    r.get("device", ""),
                    *blank,
                    f"{r['status']}: {r.get('reason', '')}",
                )
            )
            continue
        e, m = r["e2e"], r["model"]
        note = f"{r['iters']} iters" + (" (budget)" if r.get("truncated") else "")
        timing = (e["p50_ms"], e["p90_ms"], e["p99_ms"], e["images_per_s"], m["p50_ms"], m["images_per_s"])
        out.append((r["backend"], r["precision"], r["batch"], r["device"], *timing, note))
    return out


def write_markdown(report: dict, path: Path) -> None:
    m, s, run = report["machine"], report["settings"], report["run"]
    lines = [
        f"# hgad-edge benchmark: {m['name']}",
        "",
        f"Run `{run['path']}` ({run['backbone']}, input {run['input_size']}, "
        f"{run['levels']} levels, {run['coupling_blocks']} couplings, {len(run['classes'])} classes), "
        f"{report['created']}.",
        "",
    ]
    if report.get("busy_warning"):
        lines += [f"> **Warning:** {report['busy_warning']}.", ""]
    lines += ["## Machine", ""]
    board = f" on {m['board']}" if m.get("board") else ""
    lines += [
        f"- CPU: {m['cpu_model']}{board}, {m['cores']} usable cores ({m['physical_cores']} physical); "
        f"GPU: {m['gpu'] or 'none'}",
        f"- host {m['hostname']}, {m['platform']}, Python {m['python']}; "
        f"1/5/15-min load before {report['load_average']['before']}, "
        f"after {report['load_average']['after']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- threads: torch {s['threads']['torch']}; "
        f"ONNX Runtime intra-op: runtime Detector {s['threads']['onnxruntime_detector_intra_op']} "
        f"(ORT default: {s['threads']['onnxruntime_default_means']}), "
        f"op profile session {s['threads']['onnxruntime_profile_intra_op']}; "
        f"TF32 {'on' if s['tf32'] else 'off'}",
        f"- timing: {s['warmup']} warm-up + {s['iters']} timed calls per case; end to end = host resize of a "
        f"{s['camera_frame_hw'][1]}x{s['camera_frame_hw'][0]} RGB frame + inference + outputs on the host; "
        "model only = the inference call",
        "",
    ]
    lines += _targets_md(report) + _complexity_section(report) + _latency_section(report)
    lines += _int8_section(report) + _official_section(report) + _accuracy_section(report)
    lines += _breakdown_section(report)
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {x['what']}: {x['reason']}" for x in report["skipped"]] + [""]
    lines += ["## Stages", ""] + _table(
        ["stage", "status", "seconds"], [(x["name"], x["status"], x["seconds"]) for x in report["stages"]]
    )
    for err in report["errors"]:
        lines += [f"### Error in {err['stage']}", "", "```", err["traceback"].rstrip(), "```", ""]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _targets_md(report: dict) -> list[str]:
    rows = [
        (t["target"], t["value"], t["threshold"], f"**{t['status']}**", t["reason"] or t["detail"])
        for t in report["targets"]
    ]
    return ["## Targets", ""] + _table(["target", "measured", "needed", "verdict", "note"], rows)


def _complexity_section(report: dict) -> list[str]:
    cx = report["complexity"]
    lines = [
        "## FLOPs and parameters",
        "",
        "Counted by `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add of convolutions and matrix "
        "products; elementwise ops are not counted). GMACs = GFLOPs / 2, the unit most papers call 'FLOPs'. "
        "Learnable = flows + heads (the backbone is frozen); FrEIA's fixed permutation matrices are parameters "
        "without gradients, so they count in the total only.",
        "",
    ]
    if cx.get("ours"):
        lines += _complexity_md(cx["ours"], "This run")
    official = report.get("official") or {}
    titles = {
        "paper_config": (
            f"{official.get('label', 'official configuration')} at its real input "
            f"({_config_text(official.get('config'))}; random weights)"
        ),
        "paper_config_tab5_input": "official HGAD configuration at 256x256 (the input of the paper's Tab. 5)",
    }
    for key, title in titles.items():
        if cx.get(key):
            lines += _complexity_md(cx[key], title[0].upper() + title[1:])
    t5 = PAPER_TAB5
    lines += [
        f"Paper Tab. 5 (HGAD, at 256x256): {t5['gflops']} GFLOPs, {t5['learnable_params_m']}M learnable parameters, "
        f"{t5['fps']} fps. "
        "Our counts of the official configuration above are at its real input unless labelled 256x256; "
        "the paper does not "
        "say whether its 'FLOPs' are multiply-adds.",
        "",
    ]
    return lines


def _config_text(config: dict | None) -> str:
    if not config:
        return "?"
    bb, flow = config.get("backbone", {}), config.get("flow", {})
    return (
        f"{bb.get('name', 'tf_efficientnet_lite0')} stages {bb.get('stages', '?')}, "
        f"pyramid {bb.get('pyramid', [1.0])}, "
        f"{flow.get('coupling_blocks', 8)} couplings"
    )


LATENCY_HEADERS = (
    "backend", "precision", "batch", "device", "e2e p50 ms", "e2e p90 ms", "e2e p99 ms", "e2e img/s",
    "model p50 ms", "model img/s", "note",
)  # the columns of _latency_rows, for this run's table and the official configuration's


def _latency_section(report: dict) -> list[str]:
    return (
        ["## Latency and throughput", ""]
        + _table(LATENCY_HEADERS, _latency_rows(report["latency"]))
        + ["![throughput](throughput.png)", ""]
    )


def _official_section(report: dict) -> list[str]:
    off = report.get("official")
    lines = ["## Official configuration, same machine, same run", ""]
    if not off:
        return lines + ["Not measured (see Skipped).", ""]
    lines += [
        f"{off['label']}: PyTorch eager FP32, batch 1, RANDOM weights (timing only; its scores mean nothing), "
        f"input {off['config']['input_size']}.",
        "",
    ]
    lines += _table(LATENCY_HEADERS, _latency_rows([off["latency"]]))
    if report["ratios"]:
        lines += ["Speed-ups (images/s ratios, measured side by side):", ""]
        rows = [
            (r["what"], r["timing"], r["ours_images_per_s"], r["official_images_per_s"], r["ratio"])
            for r in report["ratios"]
        ]
        lines += _table(["ratio", "timing", "ours img/s", "official img/s", "x"], rows)
    return lines


def _accuracy_section(report: dict) -> list[str]:
    acc = report.get("accuracy")
    lines = ["## Accuracy and drift", ""]
    if not acc:
        return lines + ["No data root given (--data): accuracy not measured.", ""]
    lines += [
        f"Data: {', '.join(acc['data_roots'])}; at most {acc['max_images'] or 'all'} test images per class, "
        "class id given (not auto).",
        "",
    ]
    cases = sorted({k for per in acc["classes"].values() for k in per})
    rows = []
    for name, per in acc["classes"].items():
        ref = per.get("torch fp32", {})
        for case in cases:
            r = per.get(case, {})
            drift = [_drift(r.get(k), ref.get(k)) for k in ("image_auroc", "pixel_auroc")]
            rows.append((name, case, r.get("n"), r.get("image_auroc"), r.get("pixel_auroc"), *drift, r.get("finite")))
    headers = ["class", "backend precision", "images", "image AUROC", "pixel AUROC"]
    lines += _table([*headers, "image drift (x100)", "pixel drift (x100)", "finite"], rows)
    lines += ["Drift: AUROC minus PyTorch FP32's on the same images, in AUROC points (x100).", ""]
    lines += ["Largest drift against PyTorch FP32 (same images, same class ids):", ""]
    lines += _table(
        ["backend", "precision", "images", "max |score diff|", "max |map diff|", "non-finite images"],
        [
            (
                d["backend"],
                d["precision"],
                d["n_images"],
                d["max_abs_score_diff"],
                d["max_abs_map_diff"],
                d["nonfinite"],
            )
            for d in acc["drift"]
        ],
    )
    return lines


def _drift(value: float | None, reference: float | None) -> str:
    return "" if value is None or reference is None else f"{100 * (value - reference):+.2f}"


def _int8_section(report: dict) -> list[str]:
    ratio = report.get("int8_speedup")
    if not ratio:
        return []
    lines = ["## INT8 against FP32, interleaved", ""]
    lines += [
        f"{ratio['backend']} {ratio['precision']} and {ratio['reference']} at batch {ratio['batch']}, end to end, "
        f"their calls alternating ({ratio['pairs']} pairs, medians): {ratio['reference_ms_p50']:.1f} ms -> "
        f"{ratio['ms_p50']:.1f} ms, **{ratio['speedup']:.2f}x** ({ratio['description']}).",
        "",
    ]
    return lines


def _breakdown_section(report: dict) -> list[str]:
    bd = report.get("breakdown") or {}
    lines = ["## Where the time goes", ""]
    comp = bd.get("torch_components")
    if comp:
        lines += [
            f"PyTorch eager FP32 on {comp['device']}, batch 1, p50 per component (sum {comp['sum_p50_ms']:.3g} ms):",
            "",
        ]
        lines += _table(
            ["component", "p50 ms", "share"], [(c["name"], c["p50_ms"], _pct(c["share"])) for c in comp["components"]]
        )
    prof = bd.get("ort_profile")
    if prof:
        lines += [
            f"ONNX Runtime profile of {prof['model']} (CPU, batch 1, {prof['intra_op_threads']} intra-op threads, "
            f"{prof['runs']} runs, "
            f"{prof['kernel_ms_per_run']:.3g} ms kernel time per run), top op types:",
            "",
        ]
        lines += _table(
            ["op type", "ms per run", "share", "nodes"],
            [(o["op_type"], o["ms_per_run"], _pct(o["share"]), o["nodes"]) for o in prof["top_ops"]],
        )
    return lines + (["![breakdown](breakdown.png)", ""] if comp or prof else ["Not measured (see Skipped).", ""])
