"""The benchmark suite runs end to end in its quick mode, so that it cannot rot; the README's results
block is written from results.json by the benchmark, never by hand, and never by a quick run."""
import json
from pathlib import Path

from benchmarks.__main__ import main
from benchmarks.report import README_END, README_START, readme_block, write_readme

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_quick_benchmark_writes_json_markdown_and_plots(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    scan = MINI / "test" / "NORMAL" / "NORMAL2-IM-0219-0001.jpeg"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nhand-typed 99.9%\n{README_END}\n\ntail\n")
    before = readme.read_text()
    assert main(["--quick", "--bundle", str(tiny_bundle), "--data", str(MINI), "--out", str(out),
                 "--scan", str(scan), "--readme", str(readme)]) == 0
    assert readme.read_text() == before  # --quick never writes the README
    results = json.loads((out / "results.json").read_text())
    assert results["bootstrap_resamples"] == 100  # quick: the count said in the report is the one used
    assert "(100 resamples)" in (out / "REPORT.md").read_text()
    assert main(["--readme-from", str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# x\n\n{README_START}\n") and text.endswith(f"\n{README_END}\n\ntail\n")
    assert text[text.index(README_START) + len(README_START):text.index(README_END)].strip() == \
        readme_block(results)
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


def _results(acc_tflite: float) -> dict:
    def row(name, fmt, acc, size):
        m = {"accuracy": acc, "macro_f1": 0.5, "recall": {"normal": 0.25, "bacterial": 0.5, "viral": 0.75},
             "binary": {"accuracy": 0.875, "sensitivity": 0.9, "specificity": 0.8}}
        return {"artifact": name, "format": fmt, "metrics": m, "ci95": {"accuracy": [acc - 0.01, acc + 0.02]},
                "file_bytes": size}
    return {"command": "python -m benchmarks", "date": "2030-01-02 03:04", "test_images": 624,
            "bootstrap_resamples": 1000, "machine": {"cpu": "Test CPU", "usable_cores": 2},
            "accuracy": [row("m / TFLite int8 (shipped)", "tflite", acc_tflite, 3 * 2**20),
                         row("m / TFLite float32", "tflite", 0.5, 2**20),
                         row("m / Keras float32 (r)", "keras", 0.8125, None)],
            "targets": [{"target": "shipped int8 model, 3-class accuracy on the official test >= 0.91",
                         "measured": f"{acc_tflite:.4f}", "met": acc_tflite >= 0.91}],
            "calibration": {"temperature": 1.25, "raw": {"ece": 0.0771}, "calibrated": {"ece": 0.0502}}}


def test_readme_block_comes_from_the_results(tmp_path):
    """The block is one header line, the accuracy table of the shipped and float models and one table of
    targets (target | measured | met or not), every number from results.json."""
    r = _results(0.8093)
    r["targets"].append({"target": "web service p95 <= 60 ms", "measured": "p50 48 ms | p95 52 ms", "met": True})
    block = readme_block(r)
    lines = block.splitlines()
    assert lines[0].startswith("`python -m benchmarks` on Test CPU (2 cores), 2030-01-02 03:04")
    assert "624 images" in lines[0] and "1000 resamples" in lines[0] and "1 of 2 targets met" in lines[0]
    assert "(benchmarks/results/REPORT.md)" in lines[0]
    assert "| m / TFLite int8 (shipped) | 80.9 [79.9, 82.9] | 50.0 | 75.0 | 87.5 | 3.00 MiB |" in lines
    assert "| m / Keras float32 (r) | 81.2 [80.2, 83.2] | 50.0 | 75.0 | 87.5 | n/a |" in lines
    assert "TFLite float32" not in block
    assert "| target | measured | |" in lines
    assert "| shipped int8 model, 3-class accuracy on the official test >= 0.91 | 0.8093 | **not met** |" in lines
    assert "| web service p95 <= 60 ms | p50 48 ms \\| p95 52 ms | met |" in lines  # a '|' cannot split a cell
    assert all(len(line) < 400 for line in lines)  # tables, no paragraph
    assert "| shipped int8 model, 3-class accuracy on the official test >= 0.91 | 0.9200 | met |" in \
        readme_block(_results(0.9200)).splitlines()

    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{README_START}\nold\n{README_END}\nfoot\n")
    assert write_readme(r, readme)
    assert readme.read_text() == f"head\n{README_START}\n{block}\n{README_END}\nfoot\n"
    assert write_readme(r, readme) and readme.read_text().count(README_START) == 1
    readme.write_text("no markers\n")
    assert not write_readme(r, readme) and readme.read_text() == "no markers\n"


def test_readme_block_is_rewritten_from_results_json_without_measuring(tmp_path):
    """python -m benchmarks.report --readme renders the block from an existing results.json (the
    same renderer python -m benchmarks uses); a README without markers is left alone, exit status 1."""
    from benchmarks.report import main as report_main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results(0.9200)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{README_START}\nhand-typed 99.9%\n{README_END}\ntail\n")
    assert report_main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == f"# x\n{README_START}\n{readme_block(_results(0.9200))}\n{README_END}\ntail\n"
    assert main(["--readme-from", str(results), "--readme", str(readme)]) == 0  # python -m benchmarks: same text
    assert readme.read_text() == f"# x\n{README_START}\n{readme_block(_results(0.9200))}\n{README_END}\ntail\n"
    readme.write_text("no markers\n")
    assert report_main(["--readme", str(readme), "--results", str(results)]) == 1
    assert readme.read_text() == "no markers\n"


def test_the_project_readme_block_is_the_one_results_json_renders():
    """README.md's block is what benchmarks/results/results.json renders: nobody typed it."""
    project = Path(__file__).resolve().parents[1]
    text = (project / "README.md").read_text()
    block = text[text.index(README_START) + len(README_START):text.index(README_END)].strip()
    assert block == readme_block(json.loads((project / "benchmarks" / "results" / "results.json").read_text()))


def test_rows_whose_runs_are_absent_are_carried_with_their_date_not_dropped(tmp_path):
    """Run folders stay out of git (most came from GPU leases): a fresh checkout re-running the benchmark keeps
    the experiment table's measured rows from the previous results.json, each saying which run measured it;
    a row never measured stays 'no finished run', and a carried row keeps its first date through later carries."""
    import benchmarks.__main__ as bm
    from benchmarks.report import accuracy_table, label

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"defaults": {"model": "baseline"}, "rows": [{"name": "zz-measured"},
                                                                          {"name": "zz-never"}]}))
    measured = {"name": "zz-measured", "model": "baseline", "protocol": "grouped", "val_accuracy": 0.8,
                "test_accuracy": 0.7, "test_ci95": [0.65, 0.75], "epochs": 3, "machine": "gpu, 9 s"}
    prev = {"date": "2026-01-02 03:04", "report_table": [measured]}
    rows = bm._report_table(plan, None, 10, prev)
    assert rows[0]["val_accuracy"] == 0.8 and rows[0]["carried_from"] == "2026-01-02 03:04"
    assert "carried_from" not in rows[1] and rows[1]["note"].startswith("no finished run")
    again = bm._report_table(plan, None, 10, {"date": "2026-02-02 00:00", "report_table": rows})
    assert again[0]["carried_from"] == "2026-01-02 03:04"
    acc_row = {"artifact": "m / Keras float32", "metrics": {"accuracy": 0.8, "macro_f1": 0.8,
               "recall": {"normal": 1, "bacterial": 1, "viral": 1}, "auc_ovr": {}, "binary": {
                   "accuracy": 1, "sensitivity": 1, "specificity": 1, "auc": 1}}, "ci95": {"accuracy": [0.7, 0.9],
                                                                                           "macro_f1": [0.7, 0.9]}}
    carried = bm._carried(acc_row, prev)
    assert label(carried) == "m / Keras float32 [carried from 2026-01-02 03:04]"
    assert "[carried from 2026-01-02 03:04]" in accuracy_table([carried]) and label(acc_row) == acc_row["artifact"]


def test_resolution_probe_exports_each_size_and_times_the_runtime_steps(tmp_path):
    """python -m benchmarks.resolution on a small model: one int8 model file per input size, each really
    taking that size, and per size the runtime's preprocessing and one model pass timed against the bare
    decode of the same files."""
    from benchmarks import resolution
    from cxr_edge.engines import open_engine

    data = Path(__file__).parent / "data" / "chest_xray"
    r = resolution.run([32, 48], n_files=2, repeats=1, model_name="baseline", data=data, weights=None,
                       work=tmp_path / "work")
    assert [row["size"] for row in r["sizes"]] == [32, 48] and r["files"] == 2
    for row in r["sizes"]:
        assert open_engine(tmp_path / "work" / str(row["size"]) / "model.tflite").input_shape == (
            row["size"], row["size"], 1)
        assert row["load_gray"]["n"] == row["model"]["n"] == 2
        assert row["ratio_lower_bound"] == row["load_plus_model_median_ms"] / r["bare_decode"]["median_ms"]
        assert row["load_plus_model_median_ms"] > row["model"]["min_ms"]
    assert r["any_size_within_target"] == any(row["ratio_lower_bound"] <= 3 for row in r["sizes"])
    md = resolution.markdown({"command": "x", "date": "d", "machine": {"cpu": "c", "usable_cores": 2}, **r})
    assert "| 32 |" in md and "| 48 |" in md


def test_long_job_overhead_is_the_median_of_paired_blocks_not_the_fastest_runs():
    from benchmarks.batch import long_job_overhead

    def block(b, local, ray):
        return [{"mode": "local", "block": b, "run_s": local[0]}, {"mode": "ray", "block": b, "run_s": ray[0]},
                {"mode": "ray", "block": b, "run_s": ray[1]}, {"mode": "local", "block": b, "run_s": local[1]}]

    # one lucky local run (9 s) would make the fastest-run estimate +11%; each block says about +1%
    runs = block(0, (10, 10), (10.1, 10.1)) + block(1, (9, 11), (10.2, 10)) + block(2, (12, 12), (12, 12.4))
    got = long_job_overhead(runs)
    assert got["block_overhead_pct"] == [1.0, 1.0, 1.7]
    assert got["ray_overhead_pct"] == 1.0
    assert got["min_run_overhead_pct"] == 11.1
