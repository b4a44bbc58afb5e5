"""``python -m benchmarks``: every model and format on this machine in one run, written to
``benchmarks/results/`` (results.json, REPORT.md, PNG plots).

What it measures (full run):
- the embedded default bundle (the shipped int8 model) and every bundle exported from the same run
  (``runs/<run>/bundles/*``), plus that run's Keras float model, on the official test set;
- each row of the report's experiment table (``train/plans/report_table.json``) that has a run here;
- latency: end to end vs bare decode, inference alone (1/2 threads, batch 1 and 32), Keras float predict
  of the shipped network and of DenseNet201 (architecture only: no trained DenseNet201 exists here),
  CLI cold start and peak RSS, installed sizes;
- the official test under acquisition shifts (``benchmarks.robustness``: ``robustness.json``/``.md``);
- the input gate (``benchmarks.ood``), and turned and inverted chest films (``benchmarks.orientation``).

``--quick`` (used by the tests) takes a few test images and few repeats and skips the Keras references and
the installed sizes.

A full run also rewrites the README's results block (between ``<!-- results:start -->`` and
``<!-- results:end -->``) from results.json (``benchmarks.report.readme_block``); ``--quick`` never touches
the README unless ``--write-readme`` asks. ``--readme-from results.json`` only regenerates that block, as
``python -m benchmarks.report --readme`` does: one header line, the accuracy table and one table of targets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks import accuracy as acc  # noqa: E402
from benchmarks import latency as lat  # noqa: E402
from benchmarks import machine, report  # noqa: E402
from cxr_edge.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from export.convert import size_check  # noqa: E402
from train import data as data_mod  # noqa: E402
from train.fit import RUNS_DIR  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
# The report's own model, int8, committed because it cannot be re-trained without a GPU (train/lease.sh)
DENSENET_BUNDLE = PROJECT / "benchmarks" / "models" / "densenet201-int8"


def _carried(row: dict, prev: dict) -> dict:
    """``row`` of an earlier ``results.json`` (``prev``) kept because what measured it is not in this checkout;
    ``carried_from`` names the run that measured it (kept through later carries)."""
    return {**row, "carried_from": row.get("carried_from") or prev.get("date")}


def _report_table(plan: Path, test: acc.TestSet, bootstrap: int, prev: dict | None = None) -> list[dict]:
    """One line per row of the plan: the newest finished run of that name, or the row's skip reason. A row
    whose run folder is not here (runs stay out of git; most came from GPU leases) keeps its line from the
    previous report (``prev``), marked with the date of the benchmark run that measured it."""
    spec = json.loads(plan.read_text())
    earlier = {r["name"]: r for r in (prev or {}).get("report_table", []) if r.get("val_accuracy") is not None}
    rows = []
    for row in spec["rows"]:
        merged = {**spec.get("defaults", {}), **row}
        line = {"name": row["name"], "model": merged["model"], "protocol": merged.get("protocol", "grouped")}
        runs = sorted(d for d in RUNS_DIR.glob(f"*-{row['name']}") if (d / "metrics.json").exists())
        if merged.get("skip"):
            line["note"] = "not run: " + merged["skip"]
        elif not runs and row["name"] in earlier:
            line = _carried(earlier[row["name"]], prev)
        elif not runs:
            line["note"] = f"no finished run in {RUNS_DIR}/ (python -m train plan {plan} --only {row['name']})"
        else:
            run = runs[-1]
            metrics = json.loads((run / "metrics.json").read_text())
            line.update(val_accuracy=metrics["val"]["accuracy"], epochs=metrics["epochs_run"],
                        machine=f"{metrics['machine']['device']} ({metrics['machine']['backend']}), "
                                f"{metrics.get('train_seconds', 0):.0f} s",
                        train_seconds=metrics.get("train_seconds"), run_id=run.name)
            if line["protocol"] == "seed":  # its own random test portion; the official test leaked into training
                line["test_accuracy"] = metrics["seed_test"]["accuracy"]
                line["note"] = ("test = the report's own random 20% (leaky); the official test images were "
                                "in its training pool, so it is not scored on them")
            elif not any(run.glob("weights*.npz")):  # trained on a lease whose return budget left it out
                line["note"] = "weights not returned from the GPU lease: validation only"
            else:
                res = acc.evaluate(acc.run_artifact(run), test, bootstrap)
                line.update(test_accuracy=res["metrics"]["accuracy"], test_ci95=res["ci95"]["accuracy"])
            if metrics.get("deadline_hit"):  # the budget the run had (a GPU lease sets its own)
                budget = json.loads((run / "config.json").read_text()).get("deadline_s") or merged["deadline_s"]
                line["note"] = "; ".join(filter(None, [line.get("note"), f"stopped by its {budget:.0f} s budget"]))
        rows.append(line)
    return rows


def _calibration(row: dict, card: dict, y) -> dict:
    """Expected calibration error of the shipped model on the official test set, raw and with the
    temperature its card carries (fitted on validation at export)."""
    import numpy as np

    from train.metrics import apply_temperature, calibration_bins

    t = float(card.get("temperature") or 1.0)
    probs = np.array(row["probs"])
    return {"artifact": row["artifact"], "temperature": t, "raw": calibration_bins(y, probs),
            "calibrated": calibration_bins(y, apply_temperature(probs, t))}


def _targets(results: dict, shipped: str | None) -> list[dict]:
    out = []
    rows = {r["artifact"]: r for r in results.get("accuracy", [])}
    if shipped and shipped in rows:
        m = rows[shipped]["metrics"]
        a = m["accuracy"]
        out.append({"target": "shipped int8 model, 3-class accuracy on the official test >= 0.91",
                    "measured": f"{a:.4f} ({shipped})", "met": a >= 0.91})
        out.append({"target": "shipped int8 model, macro-F1 on the official test >= 0.90",
                    "measured": f"{m['macro_f1']:.4f}", "met": m["macro_f1"] >= 0.90})
        out.append({"target": "shipped int8 model, normal recall on the official test >= 0.85",
                    "measured": f"{m['recall']['normal']:.4f}", "met": m["recall"]["normal"] >= 0.85})
        flt = next((r for r in rows.values() if r["format"] == "keras" and r.get("run_id") == rows[shipped]["run_id"]),
                   None)
        if flt:
            gap = flt["metrics"]["accuracy"] - a
            out.append({"target": "shipped int8 within 0.5 pp of its float model on the official test",
                        "measured": f"int8 - float {-100 * gap:+.2f} pp (float {flt['metrics']['accuracy']:.4f}"
                                    + (f", carried from {flt['carried_from']}" if flt.get("carried_from") else "")
                                    + ")",
                        "met": gap <= 0.005})
    latency = results.get("latency", {})
    e2e = latency.get("end_to_end", {}).get("timings", {})
    floor = next((v for k, v in e2e.items() if k.startswith("bare")), None)
    best = min((v["median_ms"] for k, v in e2e.items() if k.startswith("end to end")), default=None)
    fast = latency.get("fast_path", {})
    if fast.get("end_to_end"):
        e = fast["end_to_end"]
        out.append({"target": "Classifier.classify <= 3x the bare JPEG decode (official test JPEGs, 1 thread, "
                              "median; the target of issue 10)", "met": e["ratio"] <= 3,
                    "measured": f"{e['ratio']:.2f}x ({e['classify']['median_ms']:.1f} ms vs "
                                f"{e['bare_decode']['median_ms']:.1f} ms, {e['files']} scans)"})
    if fast.get("folder"):
        f = fast["folder"]
        out.append({"target": "cxr-edge classify on the official test folder <= 2.5x a sequential bare decode",
                    "measured": f"{f['ratio']:.2f}x ({f['cli_wall_s']:.1f} s vs {f['bare_decode_s']:.1f} s, "
                                f"{f['files']} files, {f['images_per_s']:.0f} images/s; medians of "
                                f"{f.get('repeats', 1)} alternating runs, ratios "
                                + ", ".join(f"{r['ratio']:.2f}" for r in f.get("runs", [])) + ")",
                    "met": f["ratio"] <= 2.5})
    sizes = latency.get("bundle_size")  # export.convert.size_check: the limits the export enforces
    if sizes:
        from export.parity import MAX_BUNDLE_BYTES, MAX_MODEL_BYTES

        models = {k: v for k, v in sizes["bytes"].items() if k.endswith((".tflite", ".onnx"))}
        out.append({"target": f"every model file in the shipped bundle <= {MAX_MODEL_BYTES / 2**20:.0f} MiB, the "
                              f"bundle <= {MAX_BUNDLE_BYTES / 2**20:.0f} MiB (the limits python -m export.convert "
                              "enforces)",
                    "measured": ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in models.items())
                                + f"; bundle {sizes['total_bytes'] / 2**20:.2f} MiB = {sizes['total_bytes'] / 1e6:.2f} "
                                  f"MB ({len(sizes['bytes'])} files)",
                    "met": not sizes["problems"]})
    venv = latency.get("installed", {}).get("runtime")
    if venv and "without_venv_tooling_mb" in venv:
        out.append({"target": "runtime venv (one engine) <= 160 MB, besides the pip/setuptools every venv has",
                    "measured": f"{venv['without_venv_tooling_mb']:.0f} MB ({venv['site_packages_mib']:.0f} MiB "
                                "with pip/setuptools)", "met": venv["without_venv_tooling_mb"] <= 160})
    if fast.get("formats"):
        f = fast["formats"]
        worst = max(f["max_abs_diff"].values(), default=0.0)
        out.append({"target": f"one scan in every container: probabilities within {f['tolerance']}",
                    "measured": f"max |dp| {worst:.4f} over {f['scans']} scans x {len(f['max_abs_diff'])} "
                                "containers", "met": f["agree"]})
    if floor and best:
        ratio = best / floor["median_ms"]
        out.append({"target": "end-to-end latency <= 3x the bare JPEG decode",
                    "measured": f"{ratio:.2f}x ({best:.1f} ms vs {floor['median_ms']:.1f} ms)", "met": ratio <= 3})
    if latency.get("onnx_speed"):
        from benchmarks import onnx_speed

        out.append(onnx_speed.target(latency["onnx_speed"]))
    b1 = latency.get("inference", {}).get("batch1", {})
    dn = next((v for k, v in b1.items() if k.startswith("densenet201") and "Keras" in k), None)
    fast = min((v["median_ms"] for k, v in b1.items() if "int8" in k and "2 threads" in k
                and not k.startswith("densenet201")), default=None)
    if dn and fast:
        ratio = dn["median_ms"] / fast
        out.append({"target": ">= 20x faster than Keras float DenseNet201 (batch 1, inference)",
                    "measured": f"{ratio:.0f}x ({fast:.2f} ms vs {dn['median_ms']:.0f} ms)", "met": ratio >= 20})
    s = results.get("serve")
    if s:
        out.append({"target": f"web service: {s['requests']} requests from {s['clients']} concurrent clients all "
                              "answered correctly",
                    "measured": f"{s['correct']}/{s['requests']} correct; p50 {s['p50_ms']:.0f} ms, p95 "
                                f"{s['p95_ms']:.0f} ms, {s['requests_per_s']:.1f} requests/s",
                    "met": s["correct"] == s["requests"]})
    out.extend(results.get("batch", {}).get("targets", []))
    if results.get("robustness"):
        from benchmarks import robustness

        out.append(robustness.target_row(results["robustness"]))
    g = results.get("ood")
    if g:
        from benchmarks import ood as ood_bench  # the input gate's targets (issue 11), from its own results

        out += ood_bench.targets(g)
    if results.get("orientation"):
        from benchmarks import orientation

        out += orientation.targets(results["orientation"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PROJECT / "benchmarks" / "results"))
    ap.add_argument("--data", help="Kaggle-layout folder (default as python -m train)")
    ap.add_argument("--bundle", action="append", help="bundle folder(s) to measure (default: the embedded "
                    "default and the bundles exported from its run)")
    ap.add_argument("--scan", help="full-resolution JPEG for end-to-end latency (default: the bundled sample)")
    ap.add_argument("--quick", action="store_true", help="a few images and repeats, no Keras, no venvs")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-install-size", action="store_true")
    ap.add_argument("--readme", default=str(PROJECT / "README.md"), help="README whose results block is written")
    ap.add_argument("--write-readme", action="store_true", help="write the README block even under --quick")
    ap.add_argument("--no-readme", action="store_true", help="never write the README block")
    ap.add_argument("--readme-from", metavar="RESULTS_JSON",
                    help="only rewrite the README block from an existing results.json, measure nothing")
    args = ap.parse_args(argv)
    if args.readme_from:
        return _readme(json.loads(Path(args.readme_from).read_text()), Path(args.readme))
    quick = args.quick
    repeats = 5 if quick else args.repeats
    bootstrap = 100 if quick else 1000
    out = Path(args.out)
    root = data_mod.data_dir(args.data)
    test = acc.TestSet(root, limit=24 if quick else 0)

    bundles = [Path(b) for b in args.bundle] if args.bundle else [DEFAULT_BUNDLE]
    shipped_card = load_bundle(bundles[0]).card
    run_dir = RUNS_DIR / shipped_card.get("training_run", "-")
    if not args.bundle and run_dir.is_dir():
        bundles += sorted(p.parent for p in (run_dir / "bundles").glob("*/card.json"))
    if not args.bundle and not quick and (DENSENET_BUNDLE / "card.json").exists():
        bundles.append(DENSENET_BUNDLE)
    artifacts = [a for b in bundles for a in acc.bundle_artifacts(b, " (shipped)" if b == bundles[0] else "")]
    seen, unique = set(), []
    for a in artifacts:  # the same file exported twice (default + its source bundle) is measured once
        key = (a.fmt, load_bundle(a.path).card["files"][a.fmt]["sha256"])
        if key not in seen:
            seen.add(key)
            unique.append(a)
    artifacts = unique
    has_run = (run_dir / "metrics.json").exists() and any(run_dir.glob("weights*.npz"))
    keras_runs = [acc.run_artifact(run_dir)] if has_run and not quick else []

    t0 = time.time()
    results = {"command": "python -m benchmarks" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine.describe(), "quick": quick,
               "test_images": len(test.records), "bootstrap_resamples": bootstrap, "notes": []}
    rows = []
    for a in artifacts + keras_runs:
        print(f"accuracy: {a.name}", flush=True)
        rows.append(acc.evaluate(a, test, bootstrap))
    prev_path = out / "results.json"
    prev = json.loads(prev_path.read_text()) if not quick and prev_path.exists() else {}
    if not quick and not has_run and prev:
        # The shipped model's float versions live in its run folder, which this checkout lacks: keep their rows
        # from the previous report, marked, so that the int8-vs-float comparison is not silently lost.
        names = {r["artifact"] for r in rows}
        carried = [_carried(r, prev) for r in prev.get("accuracy", [])  # float rows only: int8 is measured here
                   if r.get("run_id") == shipped_card.get("training_run") and r["artifact"] not in names
                   and "int8" not in r["artifact"]]
        rows += carried
        if carried:
            results["notes"].append(
                "Rows marked 'carried from' were measured by the python -m benchmarks run of that date and copied "
                f"here: their models are in run folder runs/{shipped_card.get('training_run')}/, which this "
                "checkout does not have (float checkpoints stay out of git): "
                + ", ".join(r["artifact"] for r in carried) + ".")
    results["accuracy"] = rows
    if rows:
        results["calibration"] = _calibration(rows[0], shipped_card, test.y)
    if not quick:
        print("accuracy: the report's experiment table", flush=True)
        results["report_table"] = _report_table(PROJECT / "train" / "plans" / "report_table.json", test, bootstrap,
                                                prev)

    # End to end on a typical scan: the official test image of median file size (the bundled sample,
    # 1024x680, is smaller than most), unless --scan names one.
    by_size = sorted(test.records, key=lambda r: Path(r.path).stat().st_size)
    scan = Path(args.scan) if args.scan else Path(by_size[len(by_size) // 2].path)
    specs = {a.spec for a in artifacts}
    refs = {}
    if not quick:
        from train.models import build
        from train.registry import load_run

        if keras_runs:
            model, spec, _ = load_run(run_dir)
            specs.add(spec)
            refs[f"{keras_runs[0].model} / Keras float32 predict"] = (spec, lambda x, m=model: m.predict(x, verbose=0))
        dn = build("densenet201", input_size=224)
        specs.add(dn.spec)
        refs["densenet201 / Keras float32 predict (untrained weights: same cost)"] = (
            dn.spec, lambda x, m=dn.model: m.predict(x, verbose=0))
    x1 = lat.preprocessed_one(scan, specs)
    print("latency: end to end", flush=True)
    results["latency"] = {"end_to_end": lat.end_to_end(bundles[0], scan, repeats),
                          "bundle_size": size_check(bundles[0])}
    print("latency: fast path (classify vs bare decode on test JPEGs, gate cost, formats, folder)", flush=True)
    results["latency"]["fast_path"] = lat.fast_path(None if not args.bundle else bundles[0],
                                                    [Path(r.path) for r in test.records], root / "test", quick)
    print("latency: inference", flush=True)
    results["latency"]["inference"] = lat.inference(artifacts, x1, repeats, refs)
    from benchmarks import onnx_speed  # ONNX Runtime int8 vs LiteRT int8 vs ONNX float32 (issue 35)

    results["latency"]["onnx_speed"] = onnx_speed.measure(None if not args.bundle else bundles[0],
                                                          [Path(r.path) for r in test.records][:20], repeats)
    print("latency: CLI cold start", flush=True)
    results["latency"]["cli"] = lat.cli_cold_start(scan, None if not args.bundle else bundles[0],
                                                   repeats=2 if quick else 10)
    print("web service: 8 clients against cxr-edge serve on 127.0.0.1", flush=True)
    from benchmarks import serve as serve_bench

    if serve_bench.available():
        results["serve"] = serve_bench.run(quick, model=bundles[0] if args.bundle else None)
    else:
        results["notes"].append('web service not measured: pip install "cxr-edge[serve]"')
    print("batch: cxr-edge batch over the official test scans, local pool and Ray, 1 and 2 workers", flush=True)
    from benchmarks import batch as batch_bench

    results["batch"] = batch_bench.run(quick, data=root / "test", model=bundles[0] if args.bundle else None)
    if "skipped" in results["batch"]:
        results["notes"].append(results["batch"]["skipped"])
    else:
        (out / "batch.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "batch.md").write_text(report.scrub(batch_bench.markdown(results["batch"])))
    if not quick and not args.no_install_size:
        print("installed sizes (two fresh venvs)", flush=True)
        results["latency"]["installed"] = lat.installed_sizes(PROJECT)
    if not quick and "ood" in shipped_card:
        print("input gate: official test scans, gate_dev (cross-validated, refits), DICOM, non-radiographs, "
              "altered scans", flush=True)
        from benchmarks import ood

        results["ood"] = ood.measure(bundles[0], root)
        print("input gate: turned and inverted chest films (benchmarks.orientation)", flush=True)
        from benchmarks import orientation

        results["orientation"] = orientation.measure(bundles[0] if args.bundle else None, args.data)
    if not quick:
        print("robustness: the official test under acquisition shifts (benchmarks.robustness)", flush=True)
        from benchmarks import robustness

        rep = robustness.run("test", bundles[0] if args.bundle else None, data=args.data)
        robustness.write_report(rep, out)
        val_json = out / f"{robustness.report_stem('val')}.json"  # the validation split's report (--split val)
        val = [json.loads(val_json.read_text())] if val_json.exists() else []
        robustness.plot(val + [rep], out / "robustness.png")
        results["robustness"] = robustness.summary(rep)
    results["targets"] = _targets(results, artifacts[0].name if artifacts else None)
    results["seconds"] = round(time.time() - t0, 1)
    report.write(results, test.y, out)
    print(f"wrote {out}/REPORT.md, results.json and plots in {results['seconds']:.0f} s")
    if (args.write_readme or not quick) and not args.no_readme:
        return _readme(json.loads((out / "results.json").read_text()), Path(args.readme))
    return 0


def _readme(results: dict, readme: Path) -> int:
    if not report.write_readme(results, readme):
        print(f"{readme}: no {report.README_START} ... {report.README_END} markers; not written", file=sys.stderr)
        return 1
    print(f"wrote the results block of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
