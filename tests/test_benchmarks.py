"""The benchmark suite runs end to end in its quick mode, so that it cannot rot."""
import json
from pathlib import Path

from benchmarks.__main__ import main

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_quick_benchmark_writes_json_markdown_and_plots(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    scan = MINI / "test" / "NORMAL" / "NORMAL2-IM-0219-0001.jpeg"
    assert main(["--quick", "--bundle", str(tiny_bundle), "--data", str(MINI), "--out", str(out),
                 "--scan", str(scan)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_images"] == 3 and results["machine"]["logical_cores"] >= 1
    formats = {r["format"] for r in results["accuracy"]}
    assert formats == {"tflite", "onnx"}
    for r in results["accuracy"]:
        m = r["metrics"]
        assert m["n"] == 3 and sum(map(sum, m["confusion"])) == 3
        assert 0 <= r["ci95"]["accuracy"][0] <= m["accuracy"] <= r["ci95"]["accuracy"][1] <= 1
    e2e = results["latency"]["end_to_end"]["timings"]
    assert any(k.startswith("bare") for k in e2e) and any(k.startswith("end to end") for k in e2e)
    assert all(v["median_ms"] > 0 for v in e2e.values())
    assert results["latency"]["cli"]["peak_rss_mib"] > 10
    assert any(t["target"].startswith("end-to-end") for t in results["targets"])
    report = (out / "REPORT.md").read_text()
    assert "Accuracy on the official test set" in report and "bare JPEG decode" in report
    for png in results["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
