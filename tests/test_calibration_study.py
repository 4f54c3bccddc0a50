"""benchmarks/calibration_study.py on the tiny dataset: both parts run and are reported atomically."""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def _study_module():
    return load_benchmark("calibration_study.py")


def test_calibration_study_on_tiny_data(tiny_run, tiny_data, tmp_path):
    summary = _study_module().run_study(tiny_run, [tiny_data], tmp_path / "study", shift_class="stripes")
    on_disk = json.loads((tmp_path / "study" / "calibration_study.json").read_text())
    assert on_disk["classes"] == summary["classes"] == ["dots", "stripes"]
    for c in on_disk["per_class"].values():
        assert c["n_held_out"] == 3 and c["n_test_normal"] == 6 and c["n_test_defect"] == 6
        assert 0.0 <= c["policies"]["max"]["fpr"] <= 1.0 and 0.0 <= c["policies"]["max"]["recall"] <= 1.0
        assert "needs at least 20 normal images" in c["policies"]["target-fpr 0.01"]["refused"]  # 3 held-out images
    shift = on_disk["lighting_shift"]
    assert shift["class"] == "stripes"
    for arm in ("no_recalibration", "thresholds_only", "refit_statistics"):
        assert set(shift[arm]) == {"max", "quantile 0.99", "target-fpr 0.01"}
    # the unshifted max threshold applied to shifted images is the no-recalibration arm
    assert (
        shift["no_recalibration"]["max"]["threshold"] == on_disk["per_class"]["stripes"]["policies"]["max"]["threshold"]
    )
    table = (tmp_path / "study" / "calibration_study.md").read_text()
    assert "Lighting shift on stripes" in table and "--refit-statistics" in table and "refused" in table
