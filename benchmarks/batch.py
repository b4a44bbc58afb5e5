"""Batch throughput: ``cxr-edge batch`` (cxr_edge/batch.py) over the official test scans with 1 and 2 workers,
local process pool and Ray (a local instance started once here), end to end into a Parquet dataset.

    python -m benchmarks.batch [--quick] [--data DIR] [--out DIR]   # writes DIR/batch.json and DIR/batch.md

``run(quick)`` is what ``python -m benchmarks`` calls (quick: 48 images, local pool only). Per run: ``run_s``
is the job from the start of the worker pool to the last shard committed (worker start-up and model loading
included; listing the inputs and ``ray.init`` are not, the latter is reported apart as ``ray_init_s``: on a
cluster Ray is already running); ``images_per_s = images / run_s``; ``first_result_s``: when the first
results came back; ``images_per_worker_cpu_s`` (local pool): images per CPU-second of its worker processes,
a per-core figure that other work on the machine does not change. Ray overhead = ``run_s(ray) /
run_s(local) - 1`` at the same worker count. Each configuration runs ``repeats`` times
(interleaved) and the fastest run counts, because the two cores here are shared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
MILLION = 1_000_000


def default_data() -> Path:
    root = os.environ.get("CXR_EDGE_DATA")
    return (Path(root) if root else PROJECT.parent / "shared" / "data" / "chest_xray") / "test"


def _ray_available() -> bool:
    from cxr_edge.batch import have_ray

    return have_ray()


def _children_cpu_s() -> float:
    try:
        import resource
    except ImportError:
        return 0.0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(quick: bool, data: Path | None = None, model=None, repeats: int | None = None) -> dict:
    try:
        from cxr_edge.batch import list_inputs, run_batch
    except ImportError as exc:
        return {"skipped": f'batch not measured: {exc} (pip install "cxr-edge[ray]")'}
    data = Path(data) if data else default_data()
    if not data.is_dir():
        return {"skipped": f"batch not measured: {data} is absent (the official test set)"}
    repeats = repeats or (1 if quick else 2)
    files = [p for p, reason in list_inputs([str(data)]) if reason is None]
    if quick:
        files = files[:48]
    tmp = Path(tempfile.mkdtemp(prefix="cxr-edge-bench-batch-"))
    listing = tmp / "inputs.txt"
    listing.write_text("\n".join(files) + "\n")
    mean_bytes = sum(os.path.getsize(f) for f in files) / max(1, len(files))
    out: dict = {"source": str(data), "images": len(files), "mean_file_kb": round(mean_bytes / 1e3, 1),
                 "cpu_cores": os.cpu_count(), "repeats": repeats,
                 "model": None, "runs": [], "notes": [],
                 "load_average_before": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    modes = [None]
    ray = None
    if quick:
        out["notes"].append("quick mode: the local pool only (the Ray path is tested in tests/test_batch.py)")
    elif _ray_available():
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        out["ray_init_s"] = round(time.perf_counter() - t, 2)
        out["ray_version"] = ray.__version__
        modes.append("local")
    else:
        out["notes"].append('Ray mode not measured: pip install "cxr-edge[ray]"')
    best: dict = {}
    try:
        for rep in range(repeats):
            for workers in (1, 2):
                for mode in modes:
                    dest = tmp / f"out-{rep}-{workers}-{mode}"
                    print(f"batch: {len(files)} images, {workers} worker(s), {'Ray' if mode else 'local pool'}",
                          flush=True)
                    cpu0 = _children_cpu_s()
                    s = run_batch([str(listing)], dest, ray=mode, workers=workers, model=model, progress=False,
                                  log=lambda m: None)
                    cpu = _children_cpu_s() - cpu0  # the local pool's worker processes, reaped at its end
                    shutil.rmtree(dest, ignore_errors=True)
                    out["model"] = s["model"]
                    row = {"mode": "ray" if mode else "local", "workers": workers, "workers_used": s["workers"],
                           "run_s": s["run_s"],
                           "images_per_s": s["images_per_s"], "first_result_s": s["first_result_s"],
                           "steady_images_per_s": s["steady_images_per_s"], "status": s["status"]}
                    if mode is None and cpu > 0:
                        row["worker_cpu_s"] = round(cpu, 2)
                        row["images_per_worker_cpu_s"] = round(len(files) / cpu, 1)
                    out["runs"].append(row)
                    key = (row["mode"], workers)
                    if key not in best or row["run_s"] < best[key]["run_s"]:
                        best[key] = row
    finally:
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_average_after"] = [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    out["best"] = [best[k] for k in sorted(best)]
    out.update(_derived(best, mean_bytes))
    if quick:  # too few images for the targets and the scaling note to mean anything
        out["targets"] = []
        out.pop("scaling_note", None)
    return out


def _derived(best: dict, mean_bytes: float) -> dict:
    d: dict = {"ray_overhead_pct": {}, "speedup_2v1": {}, "targets": []}
    for w in (1, 2):
        if ("ray", w) in best and ("local", w) in best:
            ratio = best[("ray", w)]["run_s"] / best[("local", w)]["run_s"]
            d["ray_overhead_pct"][str(w)] = round(100 * (ratio - 1), 1)
            d.setdefault("ray_later_first_result_s", {})[str(w)] = round(
                best[("ray", w)]["first_result_s"] - best[("local", w)]["first_result_s"], 2)
    for mode in ("local", "ray"):
        if (mode, 1) in best and (mode, 2) in best:
            d["speedup_2v1"][mode] = round(best[(mode, 1)]["run_s"] / best[(mode, 2)]["run_s"], 2)
    # Two figures per worker core: images per CPU-second of the local pool's workers (start-up included:
    # what a core it has to itself delivers, whatever else runs on this machine; a Ray actor runs the same
    # code), and the end-to-end wall-clock rate per worker with both cores busy, which shared cores pull down.
    ref = best.get(("ray", 2)) or best.get(("local", 2))
    cpu_rates = [b["images_per_worker_cpu_s"] for b in best.values() if b.get("images_per_worker_cpu_s")]
    if ref:
        wall = ref["images_per_s"] / 2
        per = max(cpu_rates) if cpu_rates else wall
        need = math.ceil(MILLION / 3600 / per)
        need_wall = math.ceil(MILLION / 3600 / wall)
        d["per_worker_images_s"] = round(per, 1)
        d["per_worker_images_s_wall"] = round(wall, 1)
        d["workers_for_1M_per_hour"] = need
        one = best.get(("local", 1), {})
        cores = one["images_per_s"] / one["images_per_worker_cpu_s"] if one.get("images_per_worker_cpu_s") else None
        if cores:
            d["cores_used_by_one_worker"] = round(cores, 2)
        d["scaling_note"] = (
            (f"One core classifies {per:.1f} images per CPU-second (local pool workers, start-up included). "
             if cpu_rates else "")
            + (f"A worker (one inference thread; it decodes in the same thread) kept {cores:.2f} cores busy "
               "on average when alone. " if cores else "")
            + f"With both cores of this {os.cpu_count()}-core machine busy, 2 {ref['mode']} workers gave "
            f"{wall:.1f} images/s each, wall clock, end to end (cores shared with other work). A million scans "
            f"in one hour need {MILLION / 3600:.0f} images/s: {need} cores at {per:.1f} images/s each "
            f"(about {math.ceil(need / 16)} 16-core node{'s' * (need > 16)}), or {need_wall} at the wall-clock "
            f"rate seen here, with storage delivering {MILLION / 3600 * mean_bytes / 1e6:.0f} MB/s "
            f"(these scans average {mean_bytes / 1e3:.0f} kB).")
    for w, pct in d["ray_overhead_pct"].items():
        plural = "s" * (w != "1")
        d["targets"].append({"target": f"batch: Ray overhead <= 15% against the local pool ({w} worker{plural})",
                             "measured": f"{pct:+.1f}% ({best[('ray', int(w))]['run_s']:.1f} s vs "
                                         f"{best[('local', int(w))]['run_s']:.1f} s)", "met": pct <= 15})
    for mode, x in d["speedup_2v1"].items():
        d["targets"].append({"target": f"batch: 2 workers >= 1.6x one worker ({mode})",
                             "measured": f"{x:.2f}x ({best[(mode, 1)]['images_per_s']:.1f} -> "
                                         f"{best[(mode, 2)]['images_per_s']:.1f} images/s)", "met": x >= 1.6})
    return d


def markdown(r: dict) -> str:
    if "skipped" in r:
        return f"# Batch throughput\n\n{r['skipped']}\n"
    lines = ["# Batch throughput (`cxr-edge batch`)", "",
             f"{r['images']} images from `{r['source']}`, {r['cpu_cores']} CPU cores, best of {r['repeats']}; "
             f"model {r['model']['name']} {r['model']['version']} ({r['model']['backend']}); "
             + (f"`ray.init` {r['ray_init_s']} s (not in the times below). " if "ray_init_s" in r else "")
             + (f"Load average (1/5/15 min) {r['load_average_before']} before, {r['load_average_after']} after: "
                "the cores are shared, so other work slows some runs." if r.get("load_average_before") else ""), "",
             "| mode | workers | run s | images/s | first result s | images per worker CPU-s |",
             "|---|---|---|---|---|---|"]
    for b in r["best"]:
        used = "" if b["workers_used"] == b["workers"] else f" ({b['workers_used']} used: few images)"
        lines.append(f"| {b['mode']} | {b['workers']}{used} | {b['run_s']:.2f} | {b['images_per_s']:.1f} | "
                     f"{b['first_result_s']:.2f} | {b.get('images_per_worker_cpu_s', '-')} |")
    lines.append("")
    if r["ray_overhead_pct"]:
        lines.append("Ray overhead: " + ", ".join(f"{w} worker(s) {p:+.1f}%" for w, p in r["ray_overhead_pct"].items())
                     + ". 2-vs-1 worker speedup: " + ", ".join(f"{m} {x:.2f}x" for m, x in r["speedup_2v1"].items())
                     + ". Ray's first results came " + ", ".join(
                         f"{x:.1f} s" for x in r.get("ray_later_first_result_s", {}).values())
                     + " later than the local pool's (actor start-up: a fixed cost, which a longer job spreads).")
    if r.get("scaling_note"):
        lines += ["", r["scaling_note"]]
    for n in r.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", type=Path, default=None, help="folder of scans (default: the official test set)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    t = time.strftime("%Y-%m-%d %H:%M")
    r = run(args.quick, args.data, args.model, args.repeats)
    r = {"command": "python -m benchmarks.batch " + " ".join(argv if argv is not None else sys.argv[1:]),
         "date": t, **r}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(r, indent=2) + "\n")
    (args.out / "batch.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
