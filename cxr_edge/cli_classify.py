"""``cxr-edge classify`` (registered in cxr_edge/cli.py, whose docstring describes its output and exit status):
the table, JSON Lines and CSV output (CSV rows flattened by cxr_edge/rows.py) and the ``--heatmap`` overlays."""
from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Iterator

import click

from cxr_edge.cli_common import allow_adults_option, load_classifier, model_option
from cxr_edge.inputs import Missing, expand_inputs, shown
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.options import ClassifierOptions
from cxr_edge.rows import CSV_COLUMNS, csv_row

PROGRESS_MIN_FILES = 20


def _err(path: str, reason: str) -> None:
    click.echo(f"cxr-edge: error: {shown(path)}: {reason}", err=True)


def _results(clf, inputs: list) -> Iterator:
    """Results in input order; Missing entries become error results without touching the model."""
    from cxr_edge.classifier import ErrorResult

    pending: list[str] = []
    for item in inputs:
        if isinstance(item, Missing):
            yield from clf.classify_many(pending)
            pending = []
            yield ErrorResult(item.path, item.reason)
        else:
            pending.append(item)
    yield from clf.classify_many(pending)


class _Table:
    def __init__(self, width: int):
        self.width = max(4, min(width, 80))
        self.header_done = False

    def row(self, result) -> None:
        if not self.header_done:
            click.echo(f"{'PATH':<{self.width}}  {'LABEL':<9}  " + "  ".join(f"{c.upper():>9}" for c in CLASS_NAMES))
            self.header_done = True
        path = shown(result.path)
        path = path if len(path) <= self.width else "..." + path[-(self.width - 3):]
        if result.status == "rejected":
            click.echo(f"{path:<{self.width}}  {'REJECTED':<9}  {result.reason}")
            return
        probs = "  ".join(f"{result.probabilities[c]:>9.3f}" for c in CLASS_NAMES)
        click.echo(f"{path:<{self.width}}  {result.label:<9}  {probs}")
        if result.warning:
            click.echo(f"{'':<{self.width}}  warning: {result.warning}")


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one object per input.")
@click.option("--csv", "csv_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results to a CSV file.")
@click.option("--overwrite", is_flag=True, help="Allow --csv to replace an existing file.")
@model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads: files are decoded and classified in this many parallel lanes "
                   "(default: one per CPU, at most 8).")
@click.option("--no-ood", "no_ood", is_flag=True,
              help="Bypass the bundle's out-of-distribution gate: label every readable image.")
@allow_adults_option
@click.option("--heatmap", "heatmap_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Write a class-activation overlay <stem>-<hash>.heatmap.png per classified scan into DIR (hash: "
                   "8 hex digits of the sha256 of the scan's resolved path, so equal names in different "
                   "folders do not collide; an existing file is an error for that scan unless --overwrite).")
def classify(paths, as_json, csv_path, overwrite, model, backend, threads, no_ood, allow_adults, heatmap_dir) -> None:
    """Classify image files (JPEG, PNG, ..., DICOM), folders (recursively) and glob patterns.

    When the model bundle has an out-of-distribution gate, images that do not look like a chest X-ray
    (colour photos, documents, screenshots, blank images) are not labelled: they are shown as REJECTED with
    a reason ("status": "rejected" in --json). Rejections do not change the exit status (0 unless an input
    failed); --no-ood bypasses the gate."""
    if csv_path is not None and csv_path.exists() and not overwrite:
        raise click.UsageError(f"{csv_path} exists; pass --overwrite to replace it", ctx=click.get_current_context())
    inputs = expand_inputs(paths)
    if heatmap_dir is not None:
        _make_heatmap_dir(heatmap_dir)
        own = Path(heatmap_dir).resolve()
        inputs = [i for i in inputs if not _own_heatmap(i, own)]  # a rerun on a folder that holds DIR
    clf = load_classifier(ClassifierOptions(model, backend, threads, ood=not no_ood, allow_adults=allow_adults,
                                            heatmaps=heatmap_dir is not None))

    table = None if as_json else _Table(max((len(shown(getattr(i, "path", i))) for i in inputs), default=4))
    failed = done = rejected = 0
    heatmaps: dict = {}  # overlays written by this run: an input given twice finds its own, not a clash
    with contextlib.ExitStack() as stack:
        writer = None
        if csv_path is not None:
            try:
                # errors: a file name that is not valid text (bytes the file system gave undecoded) is written
                # with escapes, as --json writes it, instead of failing the whole CSV
                csv_file = stack.enter_context(open(csv_path, "w" if overwrite else "x", newline="", encoding="utf-8",
                                                    errors="backslashreplace"))
            except FileExistsError:
                raise click.UsageError(f"{csv_path} exists; pass --overwrite to replace it") from None
            except OSError as exc:
                raise click.UsageError(f"cannot write {csv_path}: {exc.strerror or exc}") from None
            writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
            writer.writeheader()
        results = _results(clf, inputs)
        if len(inputs) >= PROGRESS_MIN_FILES and sys.stderr.isatty():
            results = stack.enter_context(click.progressbar(results, length=len(inputs), label="classifying",
                                                            file=sys.stderr))
        for result in results:
            done += 1
            record = result.to_dict()
            if heatmap_dir is not None and result.ok and result.status != "rejected":
                key = str(Path(result.path).resolve())
                written, problem = ((heatmaps[key], None) if key in heatmaps
                                    else _write_heatmap(result, heatmap_dir, overwrite))
                if written:
                    heatmaps[key] = written
                if problem:
                    failed += 1
                    _err(result.path, problem)
                else:
                    record["heatmap"] = str(written)
            if result.status == "rejected":
                rejected += 1
            elif not result.ok:
                failed += 1
                _err(result.path, result.error)
            if as_json:
                click.echo(json.dumps(record))
            elif result.status != "error":
                table.row(result)
            if writer is not None:
                writer.writerow(csv_row(record, result.status))
    if rejected:
        click.echo(f"cxr-edge: {done - failed - rejected} classified, {rejected} rejected (not a chest X-ray), "
                   f"{failed} failed", err=True)
    elif failed:
        click.echo(f"cxr-edge: {done - failed} classified, {failed} failed", err=True)
    if failed:
        sys.exit(1)


def _own_heatmap(item, out_dir: Path) -> bool:
    """An input that is an overlay in the --heatmap folder ``out_dir`` (resolved; ``*.heatmap.png``): not a scan
    to classify (a :class:`Missing` never is)."""
    return isinstance(item, str) and item.endswith(".heatmap.png") and Path(item).resolve().parent == out_dir


def _make_heatmap_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(f"--heatmap: cannot create {out_dir}: {exc.strerror or exc}") from None


def _write_heatmap(result, out_dir: Path, overwrite: bool):
    """(path written, None) or (None, one-line reason). The map comes with the result (same model pass); the
    overlay is drawn on the original image, named by ``cxr_edge.heatmap.heatmap_path``."""
    from cxr_edge.heatmap import heatmap_path, overlay
    from cxr_edge.preprocess import PreprocessError, _open, _reason

    target = heatmap_path(out_dir, result.path)
    if target.exists() and not overwrite:
        return None, f"heatmap {target} exists; pass --overwrite to replace it"
    try:
        with _open(result.path) as img:
            overlay(img, result.heatmap).save(target, "PNG")
        return target, None
    except (OSError, PreprocessError) as exc:  # a heatmap failure never hides the label already given
        return None, f"heatmap not written ({_reason(exc)})"
