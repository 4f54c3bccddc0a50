"""`hgad-edge demo`: the quick run of every step through the real command (CI smoke test, ~40 s of
CPU), and the pure pieces of its summary. The engine step runs as it would for a user: it builds
where a TensorRT flavour and the builder fit this machine and says "skipped: ..." otherwise."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hgad_edge.cli import main
from hgad_edge.demo import (
    QUICK,
    STEPS,
    StreamTally,
    format_table,
    next_commands,
    prepare_elpv,
)

pytest.importorskip("elpv_dataset")


def _record(path: str, anomalous: bool) -> dict:
    return {"source": path, "anomalous": anomalous}


def test_tally_counts_fails_against_folder_labels():
    tally = StreamTally(seconds=2.0)
    for path, fail in [
        ("c/test/good/1.png", False),
        ("c/test/good/2.png", True),
        ("c/test/defective/3.png", True),
        ("c/test/defective/4.png", True),
        ("c/test/defective/5.png", False),
    ]:
        tally.add(_record(path, fail))
    assert (tally.good, tally.false_rejects, tally.defective, tally.caught) == (2, 1, 3, 2)
    assert tally.recall == pytest.approx(2 / 3) and tally.false_reject_rate == 0.5 and tally.fps == 2.5
    assert StreamTally().recall is None and StreamTally().fps == 0.0


def test_table_and_next_commands_name_the_users_paths(tmp_path):
    rows = [
        {
            "class": "elpv_mono",
            "image_auroc": 0.856,
            "recall": 0.75,
            "caught": 3,
            "defective": 4,
            "false_reject_rate": 0.1,
            "false_rejects": 1,
            "good": 10,
            "fps": 30.04,
        }
    ]
    table = format_table(rows).splitlines()
    assert "image AUROC" in table[0] and "recall at threshold" in table[0] and "false rejects" in table[0]
    assert table[1].split() == ["elpv_mono", "85.6", "3/4", "(75.0%)", "1/10", "(10.0%)", "30.0"]
    text = next_commands(tmp_path / "d", engine_built=True)
    assert f"hgad-edge run {tmp_path / 'd' / 'bundle'} --camera 0" in text
    assert f"hgad-edge bench {tmp_path / 'd' / 'model'}" in text and "--data YOUR_ROOT --out runs/mine" in text
    assert "hgad-edge build" not in text and "hgad-edge build" in next_commands(tmp_path, engine_built=False)


def test_subsets_take_the_same_split(tmp_path):
    small = prepare_elpv(tmp_path / "small", train_per_class=3, test_per_kind=2)
    large = prepare_elpv(tmp_path / "large", train_per_class=6, test_per_kind=4)
    for sub, n in (("train/good", 3), ("test/good", 2), ("test/defective", 2)):
        names = {p.name for p in (small / "elpv_mono" / sub).iterdir()}
        assert len(names) == n and names <= {p.name for p in (large / "elpv_mono" / sub).iterdir()}
    assert (small / ".complete").is_file() and not list(tmp_path.glob(".*staging"))
    prepare_elpv(small, train_per_class=4, test_per_kind=2)  # another split rewrites the folder
    assert len(list((small / "elpv_poly" / "train" / "good").iterdir())) == 4


@pytest.mark.slow
def test_demo_quick_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    for i, step in enumerate(STEPS, 1):
        assert f"[{i}/{len(STEPS)}] {step}" in text
    assert "{" not in text  # no raw JSON on the console: it is in the files
    engine_line = next(line for line in text.splitlines() if line.startswith("[5/6] engine"))
    assert "skipped: " in engine_line or ".engine" in engine_line

    summary = json.loads((out / "summary.json").read_text())
    assert [row["class"] for row in summary["classes"]] == ["elpv_mono", "elpv_poly"]
    for row in summary["classes"]:
        records = [json.loads(line) for line in (out / "run" / f"{row['class']}.jsonl").read_text().splitlines()]
        assert len(records) == 2 * QUICK.test_per_kind == row["good"] + row["defective"]
        fails = [r for r in records if r["anomalous"]]
        assert row["caught"] + row["false_rejects"] == len(fails)
        assert row["caught"] == sum("/defective/" in r["source"] for r in fails)
        assert len(list((out / "run" / "anomalies" / row["class"]).glob("*_overlay.png"))) == len(fails)
        assert f"{row['class']}" in text and f"{row['caught']}/{row['defective']}" in text
        assert 0.0 <= row["image_auroc"] <= 1.0 and row["fps"] > 0
    assert (out / "model" / "eval" / "pictures" / "elpv_mono_overlays.png").is_file()
    assert (out / "bundle" / "model_fp32.onnx").is_file()
    assert f"hgad-edge run {out / 'bundle'} --camera 0" in text and f"hgad-edge bench {out / 'model'}" in text


def test_demo_refuses_an_out_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(target)])
    assert result.exit_code == 2 and "file" in result.output.lower()
