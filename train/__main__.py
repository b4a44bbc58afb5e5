"""``python -m train``: fit models and list runs.

    python -m train fit --model efficientnet_lite0 --weights imagenet --optimizer adam --lr 3e-4
    python -m train plan train/plans/report_table.json [--only baseline-128]
    python -m train probe train/plans/gpu.json [--only lite0] [--steps 5]   # compile time, images/s
    python -m train list
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from train import data as data_mod
from train.fit import FitConfig, fit, load_arrays, probe
from train.registry import list_runs


def _fit_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(FitConfig):
        if f.name in ("extra", "teachers"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                           metavar="BOOL")
        elif f.name in ("weights", "deadline_s"):
            p.add_argument(flag, type=float if f.name == "deadline_s" else str, default=None)
        else:
            p.add_argument(flag, type=type(default), default=default)


def load_plan(path: str, only: list[str] | None = None) -> list[FitConfig]:
    """Rows of a plan as configs; keys that are not ``FitConfig`` fields (group, why, ...) go to
    ``extra``. Rows with ``"skip"`` (a reason) are left out."""
    spec = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(FitConfig)}
    rows = []
    for row in spec["rows"]:
        merged = {**spec.get("defaults", {}), **row}
        if merged.get("skip"):
            continue
        cfg = FitConfig(**{k: v for k, v in merged.items() if k in known})
        cfg.extra = {k: v for k, v in merged.items() if k not in known}
        if not only or {cfg.name, cfg.model, cfg.extra.get("group")} & set(only):
            rows.append(cfg)
    return rows


def run_plan(configs: list[FitConfig], root: Path) -> list[Path]:
    """Fit configs in order, decoding each (protocol, size, split) only once."""
    cache: dict[tuple, dict] = {}
    out = []
    for cfg in configs:
        key = (cfg.protocol, cfg.input_size, cfg.val_fraction, cfg.split_seed, cfg.limit)
        if key not in cache:
            cache[key] = load_arrays(cfg, root)
        out.append(fit(cfg, root, cache[key]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help=f"Kaggle-layout folder (default ${data_mod.DATA_ENV} or "
                                   "../shared/data/chest_xray)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _fit_args(sub.add_parser("fit", help="fit one configuration"))
    pl = sub.add_parser("plan", help="fit the rows of a plan JSON in order")
    pl.add_argument("plan")
    pl.add_argument("--only", nargs="*", help="row, model or group names to run")
    pl.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a field in every row (epochs=1, deadline_s=60, ...)")
    pr = sub.add_parser("probe", help="time the first step (compile) and images/s of each plan row")
    pr.add_argument("plan")
    pr.add_argument("--only", nargs="*")
    pr.add_argument("--steps", type=int, default=5)
    ls = sub.add_parser("list", help="runs and their validation metrics, best first")
    ls.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        runs = list_runs()
        if args.json:
            print(json.dumps(runs, indent=2))
        for r in runs:
            print(f"{r['run_id']:<48} {r['model']:<20} {r['protocol']:<8} "
                  f"val acc {r['val_accuracy']:.4f}  macro-F1 {r['val_macro_f1']:.4f}  "
                  f"pretrained={r['pretrained']}")
        return 0
    root = data_mod.data_dir(args.data)
    if args.cmd == "fit":
        fields = {f.name for f in dataclasses.fields(FitConfig)} - {"extra"}
        fit(FitConfig(**{k: getattr(args, k) for k in fields if k != "teachers"}), root)
        return 0
    configs = load_plan(args.plan, args.only)
    if args.cmd == "probe":
        cache: dict[tuple, dict] = {}
        for cfg in configs:
            key = (cfg.protocol, cfg.input_size, cfg.val_fraction, cfg.split_seed, cfg.limit)
            if key not in cache:
                cache[key] = load_arrays(cfg, root)
            probe(cfg, cache[key], args.steps)
        return 0
    for item in args.set:
        key, value = item.split("=", 1)
        for cfg in configs:
            old = getattr(cfg, key)
            if isinstance(old, list):
                setattr(cfg, key, [v for v in value.split(",") if v])
            elif isinstance(old, bool):
                setattr(cfg, key, value.lower() in ("1", "true", "yes"))
            else:
                setattr(cfg, key, type(old)(value) if old is not None else float(value))
    run_plan(configs, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
