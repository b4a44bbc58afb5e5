"""The Markdown report of ``python -m benchmarks.batch`` (``batch.md``), from the result ``benchmarks.batch.run``
gives."""
from __future__ import annotations


def markdown(r: dict) -> str:
    if "skipped" in r:
        return f"# Batch throughput\n\n{r['skipped']}\n"
    lines = ["# Batch throughput (`cxr-edge batch`)", "",
             f"{r['images']} images from `{r['source']}`, {r['cpu_cores']} CPU cores, best of {r['repeats']} "
             "interleaved runs per configuration (median and first run listed too); "
             f"model {r['model']['name']} {r['model']['version']} ({r['model']['backend']}); "
             + (f"`ray.init` {r['ray_init_s']} s (not in the times below). " if "ray_init_s" in r else "")
             + (f"Load average (1/5/15 min) {r['load_average_before']} before, {r['load_average_after']} after: "
                "the cores are shared, so other work slows some runs." if r.get("load_average_before") else ""), "",
             "| mode | workers | run s (best) | images/s | first result s | median run s | first run s | "
             "images per worker CPU-s | other work, cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in r["best"]:
        used = "" if b["workers_used"] == b["workers"] else f" ({b['workers_used']} used: few images)"
        lines.append(f"| {b['mode']} | {b['workers']}{used} | {b['run_s']:.2f} | {b['images_per_s']:.1f} | "
                     f"{b['first_result_s']:.2f} | {b.get('median_run_s', b['run_s']):.2f} | "
                     f"{b.get('first_run_s', b['run_s']):.2f} | {b.get('images_per_worker_cpu_s', '-')} | "
                     f"{b.get('other_cores', '-')} |")
    lines.append("")
    if r["ray_overhead_pct"]:
        lines.append("Ray overhead: " + ", ".join(f"{w} worker(s) {p:+.1f}%" for w, p in r["ray_overhead_pct"].items())
                     + ". 2-vs-1 worker speedup: " + ", ".join(f"{m} {x:.2f}x" for m, x in r["speedup_2v1"].items())
                     + ". Ray's first results came " + ", ".join(
                         f"{x:.1f} s" for x in r.get("ray_later_first_result_s", {}).values())
                     + " later than the local pool's (actor start-up: a fixed cost, which a longer job spreads)"
                     + ("; each Ray actor used " + ", ".join(
                         f"{x:+.2f} CPU-s ({w} worker{'s' * (w != '1')})"
                         for w, x in r["ray_extra_worker_cpu_s"].items())
                        + " more than a local worker over the same images (a Ray worker process runs Ray's "
                        "worker loop besides the model)"
                        if r.get("ray_extra_worker_cpu_s") else "") + ".")
    if r.get("ray_floor"):
        f = r["ray_floor"]
        local2 = next((b["run_s"] for b in r["best"] if b["mode"] == "local" and b["workers"] == f["workers"]), None)
        ray_first = next((b["first_result_s"] for b in r["best"]
                          if b["mode"] == "ray" and b["workers"] == f["workers"]), None)
        lines += ["", f"Ray's own floor, with nothing of cxr-edge in it (medians of {f['repeats']} jobs): "
                  f"{f['workers']} Ray actors of one CPU each were constructed after "
                  f"{f['plain_actor_first_constructor_s']:.2f} s and answered in {f['plain_actors_s']:.2f} s"
                  + (f"; that is {100 * f['plain_actors_s'] / ray_first:.0f}% of the Ray rows' {ray_first:.2f} s to "
                     "first results" if ray_first else "")
                  + (f", and {100 * f['plain_actors_s'] / local2:.0f}% of the local pool's {local2:.2f} s run with "
                     f"{f['workers']} workers" if local2 else "")
                  + "."]
    if r.get("steady_ray_overhead_pct"):
        lines += ["", "After the first results (steady state): Ray overhead " + ", ".join(
            f"{w} worker(s) {p:+.1f}%" for w, p in r["steady_ray_overhead_pct"].items())
            + (("; 2-vs-1 worker speedup " + ", ".join(f"{m} {x:.2f}x" for m, x in r["steady_speedup_2v1"].items()))
               if r.get("steady_speedup_2v1") else "")
            + ". The start-up is fixed per job, so the overhead falls with the job's size: projected from these "
            "runs (images / steady rate + time to first results), Ray is within 15% of the local pool from "
            + ", ".join(f"{n} images ({w} worker{'s' * (w != '1')})" if n is not None else
                        f"never ({w} worker{'s' * (w != '1')})" for w, n in r.get("images_for_15pct", {}).items())
            + " per job on."]
    lj = r.get("long_job")
    if lj and "skipped" not in lj:
        lines += ["", f"Long job, measured ({lj['images']} paths: the same scans {lj['copies']} times over, "
                  f"{lj['workers']} workers, {len(lj['block_overhead_pct'])} blocks of runs in the order local, Ray, Ray, "
                  f"local): Ray overhead {lj['ray_overhead_pct']:+.1f}%, the median of the blocks' "
                  + ", ".join(f"{v:+.1f}%" for v in lj["block_overhead_pct"])
                  + f" (a block: its Ray seconds over its local seconds). Fastest runs: local pool "
                  f"{lj['local']['run_s']:.1f} s ({lj['local']['images_per_s']:.1f} images/s), Ray "
                  f"{lj['ray']['run_s']:.1f} s ({lj['ray']['images_per_s']:.1f} images/s), "
                  f"{lj['min_run_overhead_pct']:+.1f}% against each other."
                  + (f" Starting and calling {lj['workers']} empty Ray actors (above) takes {lj['ray_floor_pct']:.1f}% "
                     "of the local run by itself, before any scan is read"
                     + (f", more than the {lj['max_overhead_pct']:g}% allowance on its own"
                        if lj["ray_floor_pct"] > lj.get("max_overhead_pct", float("inf")) else "") + "."
                     if "ray_floor_pct" in lj else "")]
        if lj["local"].get("cpu_s") and lj["ray"].get("cpu_s"):
            a, b = lj["local"]["cpu_s"], lj["ray"]["cpu_s"]
            parts = {"the workers": "workers", "the driver": "driver", "everything else (Ray's daemons and "
                     "helper actors in Ray mode)": "rest"}
            lines[-1] += (" CPU-seconds of these two fastest runs, local pool vs Ray: " + "; ".join(
                f"{k} {a[v]:.1f} vs {b[v]:.1f}" for k, v in parts.items())
                + f" (total {sum(a.values()):.1f} vs {sum(b.values()):.1f} on {r['cpu_cores']} cores).")
    elif lj:
        lines += ["", f"Long job not measured: {lj['skipped']}."]
    busy = [b["other_cores"] for b in r["best"] if b.get("other_cores") is not None]
    if busy and max(busy) > 0.25:
        lines += ["", f"Other work kept {min(busy):.2f} to {max(busy):.2f} of the {r['cpu_cores']} cores busy during "
                  "these best runs (column \"other work\"): the workers had that much less than the "
                  f"{r['cpu_cores']} cores, which holds the 2-worker runs back most, so these figures understate "
                  "what the code does on dedicated cores."]
    if r.get("scaling_note"):
        lines += ["", r["scaling_note"]]
    for n in r.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"
