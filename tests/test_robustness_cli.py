"""``python -m benchmarks.robustness``: one split's run writes its report and keeps the other split's panel in the
plot (the full benchmark writes the test report; a later ``--split val`` must not drop it from the figure)."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import robustness

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_a_val_run_keeps_the_test_panel(tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(robustness, "plot", lambda reports, path: plotted.append(([r["split"] for r in reports], path)))
    assert robustness.main(["--split", "test", "--data", str(MINI), "--shifts", "blur", "--workers", "1",
                            "--out", str(tmp_path)]) == 0
    test_report = json.loads((tmp_path / "robustness.json").read_text())
    assert test_report["split"] == "test" and set(test_report["results"]) == {"none", "blur"}
    test_records = robustness.split_records  # the mini set is too small for the grouped validation split
    monkeypatch.setattr(robustness, "split_records", lambda split, root, limit=0: test_records("test", root, limit))
    assert robustness.main(["--split", "val", "--data", str(MINI), "--shifts", "blur", "--workers", "1",
                            "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "robustness-val.json").read_text())["split"] == "val"
    assert [p[0] for p in plotted] == [["test"], ["val", "test"]]
    assert all(p[1] == tmp_path / "robustness.png" for p in plotted)
