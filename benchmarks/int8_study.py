"""Which parts of the graph may be INT8? Each part quantized alone, its AUROC drift and speed measured.

    python benchmarks/int8_study.py RUN --data ROOT [--data ROOT2] --out DIR [--bundle BUNDLE]
        [--calib-images 256] [--max-images N] [--iters 20] [--variants a,b]

One calibration (the run's own training images, fit split, as `hgad-edge export --int8` uses) gives
the ranges of every part; then per variant a Q/DQ copy of the FP32 graph (ONNX Runtime's asymmetric
uint8 graph, the one `model_int8.onnx` is) is scored by ONNX Runtime on every test image: image and
pixel AUROC per class against the FP32 graph's (which matches PyTorch FP32 to ~1e-5), the test FPR /
TPR at the bundle's FP32 thresholds and at thresholds refit on the held-out normals with the graph's own
scores (are per-precision thresholds needed?), and the speed at batch 1 against FP32 (model only,
the two sessions interleaved call by call in this process: a loaded machine slows both alike).

Variants: each part alone (backbone; per flow level its coupling subnets, its couplings' scale
x2 * exp(s), its soft permutations), then groups: every level's subnets, every flow part, the
policy (export/int8_quantize.py POLICY), and the policy's symmetric int8 graph for TensorRT
(`model_int8_trt.onnx`, scored here by ONNX Runtime: TensorRT's arithmetic differs in rounding only).
Each variant also gets ONNX Runtime's own profile (kernel time by part): where INT8 saves and where not.
Writes DIR/int8_study.json and DIR/int8_study.md (atomically).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import bootstrap_package  # noqa: E402

bootstrap_package()

from hgad_edge.core.bundle import load_bundle  # noqa: E402
from hgad_edge.core.files import atomic_write_json, atomic_write_text  # noqa: E402
from hgad_edge.core.metrics import auroc  # noqa: E402
from hgad_edge.core.thresholds import choose_threshold, rates  # noqa: E402
from hgad_edge.export.int8_calibration import CALIBRATION_IMAGES, calibrate_ranges, run_set  # noqa: E402
from hgad_edge.export.int8_quantize import (  # noqa: E402
    INT8_GRAPHS,
    POLICY,
    QUANTIZABLE,
    graph_parts,
    part_names,
    quantize_graph,
)

GROUPS = {"subnets": ["subnets"], "flows": ["flows"], "policy": list(POLICY)}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _predict(session, images: np.ndarray, class_id: int, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        out = session.run(["anomaly_map", "score"], {"images": chunk, "class_id": np.full(len(chunk), class_id)})
        maps.append(out[0])
        scores.append(out[1].astype(np.float64))
    return np.concatenate(maps), np.concatenate(scores)


def _test_data(run_dir: Path, roots: list[Path], classes: list[str], size, max_images: int | None) -> dict:
    """Per class: resized test images, labels, masks (or None), and the held-out normal training images."""
    from hgad_edge.bench.accuracy import cap_samples
    from hgad_edge.training.batching import load_batch
    from hgad_edge.training.checkpoint import load_run_config
    from hgad_edge.training.data import load_mask, open_roots
    from hgad_edge.training.train import split_calibration

    dataset = open_roots(roots, classes)
    _, held_out = split_calibration(dataset.samples("train"), load_run_config(run_dir).train)
    data = {}
    for name in classes:
        samples = cap_samples([s for s in dataset.samples("test") if s.class_name == name], max_images)
        masks = None
        if dataset.has_masks(name):
            masks = np.stack(
                [load_mask(s.mask_path, shape=size) if s.mask_path else np.zeros(size, bool) for s in samples]
            )
        data[name] = {
            "images": load_batch(samples, size).numpy(),
            "labels": np.array([s.label for s in samples]),
            "masks": masks,
            "held_out": load_batch([s for s in held_out if s.class_name == name], size).numpy(),
        }
    return data


def _score(session, data: dict, classes: list[str], thresholds, policy) -> dict:
    """Per class: AUROCs, FPR/TPR at the FP32 thresholds and at thresholds refit on held-out normals."""
    out = {}
    for c, name in enumerate(classes):
        d = data[name]
        maps, scores = _predict(session, d["images"], c)
        _, held = _predict(session, d["held_out"], c)
        labels = d["labels"]
        row = {"image_auroc": 100 * auroc(labels, scores), "pixel_auroc": None, "scores": scores}
        if d["masks"] is not None and d["masks"].any():
            row["pixel_auroc"] = 100 * auroc(d["masks"], maps)
        normal, defects = scores[labels == 0], scores[labels == 1]
        row["at_fp32_threshold"] = rates(normal, defects, thresholds[c])
        refit = choose_threshold(policy[0], policy[1], held).threshold
        row["at_own_threshold"] = {"threshold": float(refit), **rates(normal, defects, refit)}
        out[name] = row
    return out


def _speed(fp32, other, image: np.ndarray, iters: int) -> float:
    """FP32 ms / variant ms at batch 1, medians of interleaved calls (model only)."""
    feed = {"images": image[None], "class_id": np.array([-1])}
    for s in (fp32, other):
        for _ in range(3):
            s.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(iters):
        for k, s in enumerate((fp32, other)):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return float(np.median(times[0]) / np.median(times[1]))


def _profiles(paths: list[Path], image: np.ndarray, parts: dict[str, list[str]], runs: int) -> list[dict]:
    """ONNX Runtime's own kernel times per run of each graph, their runs alternating (a loaded machine
    slows them alike), by part (backbone, flows, the Q/DQ conversions, layout reorders, and the rest:
    head, scoring, glue) and by (part, op type): where INT8 saves time and where it cannot."""
    import json
    import re

    import onnx
    import onnxruntime as ort

    sessions, part_of = [], []
    with tempfile.TemporaryDirectory(prefix="int8-profile-") as work:
        for k, path in enumerate(paths):
            where = {n: ("backbone" if p == "backbone" else "flows") for p, names in parts.items() for n in names}
            for node in onnx.load(str(path), load_external_data=False).graph.node:
                for out in node.output:  # ORT names some rewritten nodes after an output: "<tensor>_nchwc"
                    if node.name in where:
                        where[out] = where[node.name]
            part_of.append(where)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(work) / f"profile{k}")
            sessions.append(ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"]))
        feed = {"images": image[None], "class_id": np.array([-1])}
        for _ in range(runs):
            for session in sessions:
                session.run(None, feed)
        events = [json.loads(Path(session.end_profiling()).read_text()) for session in sessions]
    special = {"QuantizeLinear": "Q/DQ", "DequantizeLinear": "Q/DQ", "ReorderOutput": "layout reorders"}
    out = []
    for where, evs in zip(part_of, events):
        by_part: dict[str, float] = {}
        by_op: dict[str, float] = {}
        for event in evs:
            name = event.get("name", "")
            if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
                continue
            node, op = name[: -len("_kernel_time")], event["args"]["op_name"]
            base = re.split(r"_token_\d+$|/", node)[0]  # fused: "<node>_token_32", "<node>/SomeFusion"
            part = where.get(node) or where.get(base) or where.get(node.removesuffix("_nchwc"))
            part = part or special.get(op, "head, scoring, glue")
            ms = event["dur"] / 1e3 / runs
            by_part[part] = by_part.get(part, 0.0) + ms
            by_op[f"{part}: {op}"] = by_op.get(f"{part}: {op}", 0.0) + ms
        top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
        out.append({"runs": runs, "ms_by_part": by_part, "ms_by_op": top, "ms_total": sum(by_part.values())})
    return out


def _variants(parts: dict[str, list[str]], wanted: list[str] | None) -> dict[str, tuple[list[str], str]]:
    """name -> (parts, graph key): every part alone, then the groups, then the policy's TensorRT graph."""
    found = {name: ([name], "int8") for name in parts}
    found.update({name: (part_names(parts, sel), "int8") for name, sel in GROUPS.items()})
    found["policy (TensorRT graph)"] = (part_names(parts, POLICY), "int8_trt")
    if wanted:
        unknown = [w for w in wanted if w not in found]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(found)}")
        found = {w: found[w] for w in wanted}
    return found


def _markdown(report: dict) -> str:
    classes = report["classes"]
    head = "| variant | parts | speed vs fp32 | " + " | ".join(f"{c} img / pix" for c in classes)
    head += " | worst drift | FPR@fp32 thr (fp32 -> int8) |\n"
    head += "|---|---|---:|" + "---:|" * len(classes) + "---:|---|\n"
    lines = []
    for name, row in report["variants"].items():
        cells = []
        for c in classes:
            r = row["classes"][c]
            pix = "n/a" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.2f} ({r['pixel_drift']:+.2f})"
            cells.append(f"{r['image_auroc']:.2f} ({r['image_drift']:+.2f}) / {pix}")
        fpr = ", ".join(
            f"{report['variants']['fp32']['classes'][c]['at_fp32_threshold']['fpr']:.3f}->"
            f"{row['classes'][c]['at_fp32_threshold']['fpr']:.3f}"
            for c in classes
        )
        speed = "1.00" if row["speed"] is None else f"{row['speed']:.2f}x"
        parts = ", ".join(row["parts"]) or "-"
        lines.append(f"| {name} | {parts} | {speed} | " + " | ".join(cells) + f" | {row['worst_drift']:.2f} | {fpr} |")
    parts = ["backbone", "flows", "Q/DQ", "layout reorders", "head, scoring, glue"]
    profile = ["| variant | " + " | ".join(parts) + " | total |", "|---|" + "---:|" * (len(parts) + 1)]
    kernels = []
    for name, row in report["variants"].items():
        if "profile" not in row:
            continue
        ref, ms = row["profile"]["fp32"], row["profile"]["int8"]
        cells = " | ".join(f"{ref['ms_by_part'].get(p, 0.0):.1f} -> {ms['ms_by_part'].get(p, 0.0):.1f}" for p in parts)
        profile.append(f"| {name} | {cells} | {ref['ms_total']:.1f} -> {ms['ms_total']:.1f} |")
        kernels.append(f"- {name}: " + ", ".join(f"{op} {v:.1f}" for op, v in list(ms["ms_by_op"].items())[:8]))
    first = next((row["profile"]["fp32"] for row in report["variants"].values() if "profile" in row), None)
    if first:
        kernels.insert(0, "- fp32: " + ", ".join(f"{op} {v:.1f}" for op, v in list(first["ms_by_op"].items())[:8]))
    facts = report["calibration"]
    tail = (
        "\n\n## Where the time goes\n\nONNX Runtime's kernel time per run (ms, batch 1, its own profiler), FP32 -> "
        "the variant, the two sessions' runs alternating; the rest of a call is the session's overhead:\n\n"
        + "\n".join(profile)
        + "\n\nLargest kernels (part: op type, ms per run):\n\n"
        + "\n".join(kernels)
        + "\n"
    )
    return (
        "# INT8 sensitivity per part\n\n"
        f"Run `{report['run']}`, bundle `{report['bundle']}`, ONNX Runtime {report['onnxruntime']}, "
        f"{report['cores']} cores, load {report['load_before']} -> {report['load_after']}. Calibration: "
        f"{facts['images']} images ({facts['source']}), {facts['method']}. AUROC x100 per class (image / pixel, "
        "drift against the FP32 graph in brackets); speed: FP32 ms / variant ms at batch 1, model only, "
        f"interleaved, {report['iters']} calls each. Command: `{report['command']}`\n\n"
        + head
        + "\n".join(lines)
        + tail
    )


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime

    from hgad_edge.bench.machine import load_average, machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, help="an export of RUN (default: export its FP32 graph into OUT)")
    parser.add_argument("--calib-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--max-images", type=int, help="test images per class (default all)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", help="comma-separated subset of the variants (default all)")
    args = parser.parse_args(argv)

    from hgad_edge.export.onnx_export import export_bundle

    bundle_dir = args.bundle or args.out / "bundle"
    if args.bundle is None and not (bundle_dir / "metadata.json").is_file():
        export_bundle(args.run, bundle_dir, precisions=("fp32",))
    bundle = load_bundle(bundle_dir)
    fp32_path = bundle.model_path("fp32")
    parts = graph_parts(onnx.load(str(fp32_path), load_external_data=False))
    variants = _variants(parts, args.variants.split(",") if args.variants else None)
    classes = list(bundle.classes)
    data = _test_data(args.run, args.data, classes, bundle.input_size, args.max_images)
    from hgad_edge.training.checkpoint import load_run_config

    policy = load_run_config(args.run).score.policy()
    calibration = run_set(args.run, args.calib_images)
    model = onnx.load(str(fp32_path), load_external_data=False)
    all_nodes = {n for names in parts.values() for n in names}
    op_types = sorted({n.op_type for n in model.graph.node if n.name in all_nodes} & set(QUANTIZABLE))
    report: dict = {
        "run": str(args.run),
        "bundle": str(bundle_dir),
        "command": "python benchmarks/int8_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "onnxruntime": onnxruntime.__version__,
        "cores": machine_info()["cores"],
        "load_before": load_average(),
        "iters": args.iters,
        "classes": classes,
        "part_nodes": {name: len(names) for name, names in parts.items()},
        "variants": {},
    }
    fp32 = _session(fp32_path)
    reference = _score(fp32, data, classes, bundle.thresholds, policy)
    probe = next(iter(data.values()))["images"][0]
    with tempfile.TemporaryDirectory(prefix="int8-study-") as work:
        ranges = Path(work) / "ranges.json"
        started = time.perf_counter()
        facts = calibrate_ranges(fp32_path, calibration, ranges, op_types, bundle.input_size, bundle.tiling)
        report["calibration"] = {**calibration.record(), **facts, "seconds": round(time.perf_counter() - started, 1)}
        runs = {"fp32": ([], None), **variants}
        for name, (chosen, key) in runs.items():
            started = time.perf_counter()
            if key is None:
                scored, speed, path = reference, None, fp32_path
            else:
                path = Path(work) / f"{len(report['variants'])}.onnx"
                nodes = [n for p in chosen for n in parts[p]]
                quantize_graph(fp32_path, ranges, path, INT8_GRAPHS[key], nodes)
                session = _session(path)
                scored = _score(session, data, classes, bundle.thresholds, policy)
                speed = _speed(fp32, session, probe, args.iters)
                del session
            row = {"parts": chosen, "graph": key, "speed": speed, "classes": {}}
            if key is not None:  # beside FP32, alternating: {"fp32": ..., "int8": ...}
                pair = _profiles([fp32_path, path], probe, parts, args.iters)
                row["profile"] = {"fp32": pair[0], "int8": pair[1]}
            drifts = []
            for c in classes:
                r, ref = scored[c], reference[c]
                shift = (r["scores"] - ref["scores"]) / bundle.scales[classes.index(c)]
                entry = {k: v for k, v in r.items() if k != "scores"}
                entry["image_drift"] = r["image_auroc"] - ref["image_auroc"]
                entry["pixel_drift"] = None if r["pixel_auroc"] is None else r["pixel_auroc"] - ref["pixel_auroc"]
                entry["score_shift_in_scales"] = {"mean": float(shift.mean()), "max_abs": float(np.abs(shift).max())}
                drifts += [abs(entry["image_drift"])] + ([abs(entry["pixel_drift"])] if r["pixel_auroc"] else [])
                row["classes"][c] = entry
            row["worst_drift"] = max(drifts)
            row["seconds"] = round(time.perf_counter() - started, 1)
            report["variants"][name] = row
            print(f"{name}: speed {speed}, worst AUROC drift {row['worst_drift']:.2f} ({row['seconds']} s)", flush=True)
    report["load_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "int8_study.json", report)
    atomic_write_text(args.out / "int8_study.md", _markdown(report))
    print(f"wrote {args.out / 'int8_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
