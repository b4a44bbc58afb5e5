"""results.json + REPORT.md + PNG plots from one benchmark run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr_edge.labels import CLASS_NAMES

# Published anchors, with their protocols (typed from the papers, not measured here).
LITERATURE = [
    {"source": "Student report (DenseNet201, SGD 1e-3)", "task": "3-class", "accuracy": 0.8370,
     "protocol": "random 64/16/20 split over images: patients leak between train and test"},
    {"source": "Student report (2-conv CNN)", "task": "3-class", "accuracy": 0.6518,
     "protocol": "same leaky split"},
    {"source": "Kermany et al. 2018, Cell", "task": "normal vs pneumonia", "accuracy": 0.928,
     "protocol": "official test set (624 images)"},
    {"source": "Kermany et al. 2018, Cell", "task": "bacterial vs viral", "accuracy": 0.907,
     "protocol": "official test set, pneumonia cases only"},
    {"source": "Ayan et al. 2021, Arab J Sci Eng (doi:10.1007/s13369-021-06127-z)", "task": "3-class",
     "accuracy": 0.9071, "protocol": "official test set (624 images); an ensemble of three ImageNet CNNs"},
    {"source": "Rahman et al. 2020 (DenseNet201)", "task": "3-class", "accuracy": 0.933,
     "protocol": "5-fold cross-validation over images: not comparable"},
]


def _pct(x, ci=None):
    if x is None:
        return "n/a"
    s = f"{100 * x:.1f}"
    return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def label(row: dict) -> str:
    """A row's artifact name; a row copied from an earlier run of the benchmark says so."""
    return row["artifact"] + (f" [carried from {row['carried_from']}]" if row.get("carried_from") else "")


def accuracy_table(rows: list[dict]) -> str:
    out = ["| artifact | 3-class acc % [95% CI] | macro-F1 % [CI] | recall N / B / V % | AUC (OvR) N / B / V "
           "| normal-vs-pneumonia acc % | sens % | spec % | AUC | size |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, ci = r["metrics"], r["ci95"]
        rec = " / ".join(f"{100 * m['recall'][c]:.1f}" for c in CLASS_NAMES)
        auc = " / ".join(f"{m['auc_ovr'].get(c, float('nan')):.3f}" for c in CLASS_NAMES)
        b = m["binary"]
        size = f"{r['file_bytes'] / 2**20:.2f} MiB" if r.get("file_bytes") else "n/a"
        out.append(f"| {label(r)} | {_pct(m['accuracy'], ci['accuracy'])} | "
                   f"{_pct(m['macro_f1'], ci['macro_f1'])} | {rec} | {auc} | "
                   f"{_pct(b['accuracy'], ci.get('binary_accuracy'))} | {_pct(b['sensitivity'])} | "
                   f"{_pct(b['specificity'])} | {b['auc']:.3f} | {size} |")
    return "\n".join(out)


def timing_table(timings: dict) -> str:
    out = ["| what | median ms | p95 ms | n |", "|---|---|---|---|"]
    for k, v in timings.items():
        out.append(f"| {k} | {v['median_ms']:.2f} | {v['p95_ms']:.2f} | {v['n']} |")
    return "\n".join(out)


def plots(rows: list[dict], y: np.ndarray, out: Path, latency: dict | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    n = len(rows)
    if n:
        cols = min(3, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.6 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, r in zip(axes.flat, rows):
            cm = np.array(r["metrics"]["confusion"])
            ax.imshow(cm, cmap="Blues")
            for i in range(3):
                for j in range(3):
                    ax.text(j, i, cm[i, j], ha="center", va="center",
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
            ax.set_xticks(range(3), CLASS_NAMES)
            ax.set_yticks(range(3), CLASS_NAMES)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(label(r), fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=90)
        plt.close(fig)
        files.append("confusion.png")

        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        for r in (r for r in rows if "probs" in r):  # rows carried from an earlier run have no probabilities
            p = np.array(r["probs"])
            for k, ax in enumerate(axes[:3]):
                fpr, tpr, _ = roc_curve(y == k, p[:, k])
                ax.plot(fpr, tpr, label=r["artifact"], lw=1)
                ax.set_title(f"{CLASS_NAMES[k]} vs rest")
            fpr, tpr, _ = roc_curve(y != 0, p[:, 1:].sum(1))
            axes[3].plot(fpr, tpr, lw=1)
            axes[3].set_title("pneumonia vs normal")
        for ax in axes:
            ax.plot([0, 1], [0, 1], "k:", lw=0.5)
            ax.set_xlabel("false positive rate")
        axes[0].set_ylabel("true positive rate")
        axes[0].legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=90)
        plt.close(fig)
        files.append("roc.png")
    if latency and latency.get("inference"):
        t = latency["inference"]["batch1"]
        names = list(t)
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1))
        ax.barh(range(len(names)), [t[k]["median_ms"] for k in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("median latency, ms (log scale)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=90)
        plt.close(fig)
        files.append("latency.png")
    return files


def reliability_plot(cal: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for key, style in (("raw", "o-"), ("calibrated", "s--")):
        b = cal[key]["bins"]
        ax.plot([r["confidence"] for r in b], [r["accuracy"] for r in b], style,
                label=f"{key} (ECE {cal[key]['ece']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.6)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, T = {cal['temperature']:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=90)
    plt.close(fig)
    return "reliability.png"


def scrub(text: str) -> str:
    """No machine paths in committed reports: the folder that holds this checkout and ``shared/`` becomes
    ``..``, the home folder ``~``."""
    here = Path(__file__).resolve().parent.parent
    for folder, short in ((here, "."), (here.parent, ".."), (Path.home(), "~")):
        text = text.replace(str(folder) + "/", short + "/")
    return text


def write(results: dict, y: np.ndarray, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = results.get("accuracy", [])
    results["plots"] = plots(rows, y, out, results.get("latency"))
    if results.get("calibration"):
        results["plots"].append(reliability_plot(results["calibration"], out))
    slim = json.loads(scrub(json.dumps(results, default=str)))
    for r in slim.get("accuracy", []):
        r.pop("probs", None)
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(slim))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# cxr-edge benchmark report",
        "",
        f"Generated by `{r['command']}` on {r['date']}.",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        "Data: Kermany et al. 2018 (Cell 172:1122; CC BY 4.0), official test split "
        f"({r.get('test_images', '?')} images), never used to choose a model, epoch or threshold.",
        "",
    ]
    if r.get("targets"):
        lines += ["## Headline targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in r["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if r.get("accuracy"):
        lines += ["## Accuracy on the official test set", "",
                  f"95% intervals: percentile bootstrap over images ({r.get('bootstrap_resamples', '?')} "
                  "resamples). N / B / V = normal / "
                  "bacterial / viral.", "", accuracy_table(r["accuracy"]), "",
                  "![confusion matrices](confusion.png)", "", "![ROC curves](roc.png)", ""]
    if r.get("calibration"):
        c = r["calibration"]
        lines += ["## Calibration", "",
                  f"{c['artifact']} on the official test set: expected calibration error (10 bins, top-class "
                  f"confidence) {c['raw']['ece']:.3f} raw, {c['calibrated']['ece']:.3f} with the card's "
                  f"temperature T = {c['temperature']:.2f} (fitted on the validation split at export; the "
                  "runtime applies it).", "", "![reliability diagram](reliability.png)", ""]
    if r.get("ood"):
        from benchmarks import ood as ood_bench

        lines += ["## Input gate (shipped in the bundle)", "", *ood_bench.markdown(r["ood"]), "",
                  "The gate's settings were chosen on gate_dev cross-validation and on generated non-radiographs, "
                  "so its rates there are optimistic; the official test row is the one set it never saw.", ""]
    if r.get("orientation"):
        from benchmarks import orientation

        lines += ["### Turned and inverted chest films (`benchmarks.orientation`)", "",
                  *orientation.markdown(r["orientation"]), ""]
    fast = (r.get("latency") or {}).get("fast_path") or {}
    if fast:
        lines += ["## Fast path (issue 10)", "", "```json", json.dumps(fast, indent=1)[:6000], "```", ""]
    if r.get("serve"):
        lines += ["## Web service under load", "", "```json", json.dumps(r["serve"], indent=1)[:3000], "```", ""]
    if r.get("batch") and not r["batch"].get("skipped"):
        lines += ["## Archive-scale batch", "", "See [batch.md](batch.md).", ""]
    lines += ["## Published numbers, with their protocols", "",
              "| source | task | accuracy % | protocol |", "|---|---|---|---|"]
    lines += [f"| {x['source']} | {x['task']} | {100 * x['accuracy']:.1f} | {x['protocol']} |" for x in LITERATURE]
    lines.append("")
    if r.get("report_table"):
        lines += ["## The report's experiment table, re-run", "",
                  "| row | model | protocol | val acc % | test acc % [95% CI] | epochs | machine | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["report_table"]:
            lines.append(f"| {row['name']} | {row['model']} | {row['protocol']} | {_pct(row.get('val_accuracy'))} | "
                         f"{_pct(row.get('test_accuracy'), row.get('test_ci95'))} | {row.get('epochs', '')} | "
                         f"{row.get('machine', '')} | "
                         + "; ".join(filter(None, [row.get("note"), row.get("carried_from") and (
                             f"carried from the benchmark run of {row['carried_from']}: its run folder is not in "
                             "this checkout")])) + " |")
        lines.append("")
    lat = r.get("latency") or {}
    if lat.get("end_to_end"):
        e = lat["end_to_end"]
        lines += ["## Latency on this CPU", "",
                  f"End to end through `Classifier.classify` on `{e['scan']}` ({e['scan_pixels'][0]}x"
                  f"{e['scan_pixels'][1]} px, {e['scan_bytes'] / 1024:.0f} KiB), alternating with the bare "
                  "decode of the same file:", "", timing_table(e["timings"]), ""]
    if lat.get("inference"):
        lines += ["Inference alone (preprocessed input), alternating, after warm-up:", "",
                  timing_table(lat["inference"]["batch1"]), "", "Batched throughput (2 threads):", "",
                  "| artifact | batch | median ms | images/s |", "|---|---|---|---|"]
        for k, v in lat["inference"]["batched"].items():
            lines.append(f"| {k} | {v['batch']} | {v['median_ms']:.1f} | {v['images_per_s']:.1f} |")
        lines += ["", "![latency](latency.png)", ""]
    if lat.get("cli"):
        c = lat["cli"]
        lines += [f"CLI cold start (`{c['command']}`, process start to first result): median "
                  f"{c['median_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms; peak RSS {c['peak_rss_mib']:.0f} MiB.", ""]
    if lat.get("installed"):
        lines += ["Installed size (site-packages of a fresh venv):", "", "| venv | MiB |", "|---|---|"]
        lines += [f"| {k} | {v['site_packages_mib']:.0f} |" for k, v in lat["installed"].items()]
        lines.append("")
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# ---- the README results block: generated from results.json, never typed ------------------------------

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def _shipped(r: dict) -> list[dict]:
    return [a for a in r.get("accuracy", []) if "(shipped)" in a["artifact"]]


def _readme_table(r: dict) -> list[str]:
    rows = _shipped(r) + [a for a in r.get("accuracy", []) if a["format"] == "keras"]
    if not rows:
        return []
    out = ["| model | 3-class acc % [95% CI] | macro-F1 % | viral recall % | normal vs pneumonia acc % | file |",
           "|---|---|---|---|---|---|"]
    for a in rows:
        m, ci = a["metrics"], a["ci95"]
        size = f"{a['file_bytes'] / 2**20:.2f} MiB" if a.get("file_bytes") else "n/a"
        out.append(f"| {label(a)} | {_pct(m['accuracy'], ci['accuracy'])} | {_pct(m['macro_f1'])} | "
                   f"{_pct(m['recall']['viral'])} | {_pct(m['binary']['accuracy'])} | {size} |")
    return out + [""]


def _readme_targets(r: dict) -> list[str]:
    """One row per target: what it asks, what was measured, met or not."""
    if not r.get("targets"):
        return []
    out = ["| target | measured | |", "|---|---|---|"]
    for t in r["targets"]:
        cells = [str(t["target"]), str(t["measured"]), "met" if t["met"] else "**not met**"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def readme_block(r: dict) -> str:
    """The README's results block (without the markers), every number taken from ``r`` (results.json):
    one header line, the accuracy table of the shipped models, one table of targets."""
    m = r["machine"]
    met = sum(bool(t["met"]) for t in r.get("targets", []))
    lines = [f"`{r['command']}` on {m['cpu']} ({m['usable_cores']} cores), {r['date']}: official test set, "
             f"{r.get('test_images', '?')} images, 95% bootstrap intervals ({r.get('bootstrap_resamples', '?')} "
             f"resamples); {met} of {len(r.get('targets', []))} targets met. Full report: "
             "[`benchmarks/results/REPORT.md`](benchmarks/results/REPORT.md).", ""]
    lines += _readme_table(r)
    lines += _readme_targets(r)
    return "\n".join(lines).rstrip("\n")


def write_readme(r: dict, readme: Path) -> bool:
    """Replace the text between the README's results markers with ``readme_block(r)``; False (file
    untouched) when the markers are missing."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[:start + len(README_START)] + "\n" + readme_block(r) + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report --readme [README.md] [--results results.json]``: rewrite the README's
    results block from an existing results.json, measuring nothing."""
    import argparse
    import sys

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("--readme", nargs="?", const=str(here.parent / "README.md"), required=True,
                    help="README whose results block is rewritten (default: the project's)")
    ap.add_argument("--results", default=str(here / "results" / "results.json"), help="results.json to read")
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    if not write_readme(json.loads(Path(args.results).read_text()), readme):
        print(f"{readme}: no {README_START} ... {README_END} markers; not written", file=sys.stderr)
        return 1
    print(f"wrote the results block of {readme} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
