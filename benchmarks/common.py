"""What the benchmark commands share: the results folder (``benchmarks/results``), their ``--out`` option and
writing a result as ``NAME.json`` and ``NAME.md`` (the Markdown printed too). The machine a result was measured
on: ``benchmarks.machine.describe``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_out(ap: argparse.ArgumentParser, default: Path = RESULTS) -> None:
    """The ``--out DIR`` option: where ``write_results`` puts the files (default ``benchmarks/results``)."""
    ap.add_argument("--out", type=Path, default=default)


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    """``out/NAME.json`` (``result``, indented) and ``out/NAME.md`` (``markdown``, also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
