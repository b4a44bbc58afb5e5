"""The ``cxr-edge`` command line.

    cxr-edge classify PATH...        files, folders (recursively) and globs; a table on stdout
        --json                       JSON Lines on stdout, one object per input
        --csv FILE [--overwrite]     also write a CSV (an existing FILE is refused unless --overwrite)
        --model PATH --backend tflite|onnx --threads N
        --no-ood                     bypass the bundle's out-of-distribution gate
    cxr-edge info [--model PATH] [--json]
    cxr-edge batch SOURCE... --out RESULTS [--ray auto|local|ray://HOST:PORT] [--workers N]
                                     an archive into a Parquet dataset, resumable (cxr_edge/batch.py)

Out-of-distribution gate: when the bundle has one (``"ood"`` in its card, ``cxr_edge/ood.py``), inputs that do
not look like a chest X-ray (colour photos, documents, screenshots, blank images) get no label: the table shows
``REJECTED`` and the reason, JSON Lines give ``{"path", "status": "rejected", "reason", "model"}``, and accepted
inputs carry ``"status": "ok"`` besides the usual fields (bundles without a gate: no ``status`` key). The CSV
has ``status`` and ``reason`` columns. A rejection is an answer, not a failure: it does not change the exit
status; a summary line on stderr counts the rejected inputs.

Exit status: 0 every input classified or rejected by the gate, 1 any input failed (the others are still
classified), 2 usage error (bad option, CSV file exists, model bundle or its gate cannot be loaded, e.g. a
sha256 mismatch), 3 internal error (a bug in cxr-edge; ``CXR_EDGE_DEBUG=1`` shows its traceback). A bad input never gives a traceback: one line on stderr, ``cxr-edge: error: PATH: reason``.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import click

from cxr_edge import __version__
from cxr_edge.bundle import BundleError, load_bundle, sha256_file
from cxr_edge.engines import EngineError, available_backends
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import DICOM_MAGIC_OFFSET, has_dicom_magic, looks_like_bare_dicom

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm",
                  ".ppm", ".pnm", ".jp2", ".j2k", ".dcm", ".dicom"}
PROGRESS_MIN_FILES = 20
CSV_COLUMNS = ["path", "label", *CLASS_NAMES, "model_name", "model_version", "model_sha256", "error", "status",
               "reason", "warning"]
GLOB_CHARS = set("*?[")
EXIT_INTERNAL = 3  # an unexpected exception: a bug (1 means an input failed, 2 a usage error)


class ModelLoadError(click.ClickException):
    """The model bundle cannot be loaded: a usage problem (exit status 2), shown without the usage text."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(f"cannot load the model: {message}")


class Missing:
    """An input argument that names nothing to classify (a missing file, an empty glob or folder)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


def _looks_like_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if not dicom_style_suffix(suffix):
        return False
    try:  # accept those with the DICM magic, or that start as a bare DICOM data set does
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return has_dicom_magic(head) or looks_like_bare_dicom(head)


def dicom_style_suffix(suffix: str) -> bool:
    """DICOM files often have no suffix ("IM0001") or are named by their UID ("1.2.840.113619.2.55.3.211",
    whose last part reads as a numeric suffix)."""
    return not suffix or suffix[1:].isdigit()


def _walk(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(str(Path(root) / f) for f in sorted(files) if _looks_like_image(Path(root) / f))
    return found


def expand_inputs(args: tuple[str, ...]) -> list:
    """Paths (str) to classify, in argument order, and :class:`Missing` for arguments that give none."""
    out: list = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = _walk(path)
            out.extend(files or [Missing(arg, "folder holds no image files")])
        elif path.exists() or not (GLOB_CHARS & set(arg)):
            out.append(arg)  # a file, or a missing path whose error the classifier reports
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                out.append(Missing(arg, "no files match this pattern"))
            for m in matches:
                out.extend(_walk(Path(m)) if Path(m).is_dir() else [m])
    return out


def _load_classifier(model: Optional[str], backend: Optional[str], threads: Optional[int], ood: bool = True,
                     heatmaps: bool = False, allow_adults: bool = False):
    from cxr_edge.classifier import Classifier
    try:
        return Classifier(model=model, backend=backend, threads=threads, ood=ood, heatmaps=heatmaps,
                          allow_adults=allow_adults)
    except (BundleError, EngineError) as exc:
        raise ModelLoadError(str(exc)) from None


def shown(path: str) -> str:
    """A path for one line of a terminal: control characters (a line break in a file name) and bytes that
    are not text in the file system's encoding are written as escapes (``\\n``, ``\\udcff``), so that every
    input stays one line; printable characters, non-ASCII letters included, are kept."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(path))


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


def _csv_row(result) -> dict:
    if result.status == "rejected":
        return {"path": result.path, "model_name": result.model.name, "model_version": result.model.version,
                "model_sha256": result.model.sha256, "status": "rejected", "reason": result.reason}
    if not result.ok:
        return {"path": result.path, "error": result.error, "status": "error"}
    return {"path": result.path, "label": result.label,
            **{c: f"{result.probabilities[c]:.6f}" for c in CLASS_NAMES},
            "model_name": result.model.name, "model_version": result.model.version,
            "model_sha256": result.model.sha256, "error": "", "status": "ok", "warning": result.warning}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-edge")
def cli() -> None:
    """Chest X-ray classifier (normal / bacterial / viral pneumonia) for CPUs. Research use only:
    not a medical device."""


_allow_adults_option = click.option(
    "--allow-adults", "allow_adults", is_flag=True,
    help="Classify adult chest X-rays (DICOM PatientAge >= 18 years, or the input gate's adult check) instead of "
         "refusing them; their records carry a 'warning' (the model was trained on children aged 1 to 5).")
_model_option = click.option("--model", "model", metavar="BUNDLE", default=None,
                             help="Model bundle folder or its card.json (default: the bundled model).")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one object per input.")
@click.option("--csv", "csv_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results to a CSV file.")
@click.option("--overwrite", is_flag=True, help="Allow --csv to replace an existing file.")
@_model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads: files are decoded and classified in this many parallel lanes "
                   "(default: one per CPU, at most 8).")
@click.option("--no-ood", "no_ood", is_flag=True,
              help="Bypass the bundle's out-of-distribution gate: label every readable image.")
@_allow_adults_option
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
    clf = _load_classifier(model, backend, threads, ood=not no_ood, heatmaps=heatmap_dir is not None,
                           allow_adults=allow_adults)

    table = None if as_json else _Table(max((len(shown(getattr(i, "path", i))) for i in inputs), default=4))
    failed = done = rejected = 0
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
                written, problem = _write_heatmap(result, heatmap_dir, overwrite)
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
                writer.writerow(_csv_row(result))
    if rejected:
        click.echo(f"cxr-edge: {done - failed - rejected} classified, {rejected} rejected (not a chest X-ray), "
                   f"{failed} failed", err=True)
    elif failed:
        click.echo(f"cxr-edge: {done - failed} classified, {failed} failed", err=True)
    if failed:
        sys.exit(1)


def _make_heatmap_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(f"--heatmap: cannot create {out_dir}: {exc.strerror or exc}") from None


def _write_heatmap(result, out_dir: Path, overwrite: bool):
    """(path written, None) or (None, one-line reason). The map comes with the result (same model pass); the
    overlay is drawn on the original image, named by ``cxr_edge.heatmap.heatmap_path``."""
    from cxr_edge.heatmap import heatmap_path, overlay
    from cxr_edge.preprocess import PreprocessError, _open

    target = heatmap_path(out_dir, result.path)
    if target.exists() and not overwrite:
        return None, f"heatmap {target} exists; pass --overwrite to replace it"
    try:
        with _open(result.path) as img:
            overlay(img, result.heatmap).save(target, "PNG")
        return target, None
    except (OSError, PreprocessError) as exc:  # a heatmap failure never hides the label already given
        return None, f"heatmap not written ({type(exc).__name__}: {' '.join(str(exc).split())})"


def _print_card(bundle) -> None:
    card = bundle.card
    click.echo(f"model      {card['name']} {card['version']}")
    click.echo(f"bundle     {bundle.root}")
    click.echo(f"classes    {', '.join(card['classes'])}")
    spec = card["input"]
    click.echo(f"input      {spec.get('size')}x{spec.get('size')} grayscale, x = gray * {spec.get('scale')} "
               f"+ {spec.get('offset')}")
    if "temperature" in card:
        click.echo(f"temperature {card['temperature']}")
    ood = card.get("ood")
    if isinstance(ood, dict):
        path = bundle.root / str(ood.get("path", ""))
        if not path.is_file():
            state = "MISSING"
        else:
            state = "checksum matches" if sha256_file(path) == ood.get("sha256") else "SHA256 MISMATCH"
        click.echo(f"ood gate   {ood.get('path')} (threshold {ood.get('threshold')}, {ood.get('bytes', '?')} bytes, "
                   f"{state}; bypass with --no-ood)")
    for key in ("training_run", "date"):
        if key in card:
            click.echo(f"{key:<10} {card[key]}")
    have = available_backends()
    for backend, entry in card.get("files", {}).items():
        path = bundle.root / entry.get("path", "")
        if not path.is_file():
            state = "MISSING"
        else:
            state = "sha256 ok" if sha256_file(path) == entry.get("sha256") else "SHA256 MISMATCH"
        runtime = "" if backend in have else ", runtime not installed"
        click.echo(f"{backend:<10} {entry.get('path')} ({entry.get('precision', '?')}, {entry.get('bytes', '?')} "
                   f"bytes, {state}{runtime})")
    metrics = card.get("metrics")
    if metrics:
        click.echo("metrics")
        for split, values in metrics.items():
            if isinstance(values, dict):
                flat = ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                 for k, v in values.items() if not isinstance(v, (dict, list)))
                click.echo(f"  {split}: {flat}")
            else:
                click.echo(f"  {split}: {values}")


@cli.command()
@_model_option
@click.option("--json", "as_json", is_flag=True, help="Print the model card as JSON.")
def info(model, as_json) -> None:
    """Show the model card of a bundle (default: the bundled model)."""
    try:
        bundle = load_bundle(model)
    except BundleError as exc:
        raise ModelLoadError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(bundle.card, indent=2))
    else:
        _print_card(bundle)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token or --insecure-no-auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@_model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for inference.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances serving requests in parallel.")
@click.option("--token", envvar="CXR_EDGE_TOKEN", default=None,
              help="Require 'Authorization: Bearer TOKEN' on /v1 (also $CXR_EDGE_TOKEN).")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=64, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@_allow_adults_option
@click.option("--max-concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most POST /v1 requests in progress at once; past it 503 with Retry-After.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a request may take to arrive and be answered (408 slow upload, 503 slow answer).")
def serve(host, port, model, backend, threads, workers, token, insecure_no_auth, max_upload_mb, no_ood,
          allow_adults, max_concurrency, request_timeout) -> None:
    """Web page and REST API (/v1/classify, /v1/model, /docs) on http://HOST:PORT/."""
    try:
        from cxr_edge.serve import serve_command
    except ImportError as exc:
        missing = click.ClickException(f'the web service needs its extra ({exc.name} is not installed): '
                                       f'pip install "cxr-edge[serve]"')
        missing.exit_code = 2
        raise missing from None
    serve_command(host, port, model, backend, threads, workers, token, insecure_no_auth, max_upload_mb,
                  ood=not no_ood, allow_adults=allow_adults, max_concurrency=max_concurrency,
                  request_timeout=request_timeout)


class _BatchUsage(click.ClickException):
    exit_code = 2


@cli.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--out", "out", required=True, metavar="RESULTS", type=click.Path(file_okay=False, path_type=Path),
              help="Parquet dataset folder; rerun the same command to resume a killed job.")
@click.option("--ray", "ray_address", metavar="ADDRESS", default=None,
              help="Run on Ray: auto (the running cluster), local (start one here) or ray://HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes / Ray actors, each loading the model once (default: one per CPU core).")
@_model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Inference threads per worker.")
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Paths per output file (default: from the number of inputs, at most 1000).")
@_allow_adults_option
def batch(sources, out, ray_address, workers, model, backend, threads, no_ood, shard_size, allow_adults) -> None:
    """Classify an archive (files, folders, globs, .txt lists of paths, pyarrow URIs) into a Parquet dataset,
    one row per input, resumable and exactly once (see cxr_edge/batch.py). Exit status 0 when the job is
    complete (bad files are error rows), 1 when it stopped part-way (rerun to resume), 2 usage error."""
    try:
        from cxr_edge import batch as batch_mod
    except ImportError as exc:
        raise click.UsageError(f'batch needs pyarrow ({exc}): pip install "cxr-edge[batch]"') from None
    try:
        batch_mod.run_batch(sources, out, ray=ray_address, workers=workers, model=model, backend=backend,
                            threads=threads, ood=not no_ood, shard_size=shard_size, allow_adults=allow_adults,
                            log=lambda msg: click.echo(msg, err=True))
    except batch_mod.BatchError as exc:
        raise _BatchUsage(str(exc)) from None
    except batch_mod.BatchFailed as exc:
        click.echo(f"cxr-edge: error: {exc}", err=True)
        sys.exit(1)


def _pacs():
    """cxr_edge.dicomnode, or a usage error naming the extra it needs."""
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401

        from cxr_edge import dicomnode
        return dicomnode
    except ImportError as exc:
        raise _BatchUsage(f'the DICOM node needs its extra ({exc.name} is not installed): '
                          'pip install "cxr-edge[pacs]"') from None


@cli.command("dicom-node")
@click.option("--send-to", required=True, metavar="AET@HOST:PORT", help="Where results go (usually the PACS).")
@click.option("--ae-title", default="CXREDGE", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True)
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default="cxr-edge-spool",
              show_default=True, help="Received instances, results waiting and the journal (journal.sqlite).")
@click.option("--allow", multiple=True, metavar="AET", help="Accept associations only from these calling AE titles.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Classifying threads.")
@_model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None)
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@_allow_adults_option
@click.option("--sc-uncompressed", "sc_uncompressed", is_flag=True,
              help="Send the heatmap Secondary Capture uncompressed (RGB) instead of JPEG Baseline (for a PACS that "
                   "does not accept JPEG).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS on the listening port (PEM certificate).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="CA certificates: require client certificates, and send to the destination over TLS.")
@click.option("--retry-max", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Longest wait (s) between tries to reach the destination.")
def dicom_node(send_to, ae_title, host, port, spool, allow, workers, model, backend, no_ood, allow_adults,
               sc_uncompressed, tls_cert, tls_key, tls_ca, retry_max) -> None:
    """A DICOM node (C-ECHO, C-STORE) that classifies every image a PACS sends and stores the results (an SR,
    and a heatmap Secondary Capture) back with C-STORE to --send-to. See docs/pacs.md."""
    node = _pacs()
    try:
        node.run_node(spool=spool, send_to=send_to, ae_title=ae_title, host=host, port=port, allow=allow,
                      workers=workers, model=model, backend=backend, ood=not no_ood, allow_adults=allow_adults,
                      sc_jpeg=not sc_uncompressed, tls_cert=tls_cert,
                      tls_key=tls_key, tls_ca=tls_ca, retry_max=retry_max)
    except node.NodeError as exc:
        raise _BatchUsage(str(exc)) from None


@cli.command()
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default="cxr-edge-spool",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per row.")
def journal(spool, as_json) -> None:
    """Print the journal of a dicom-node spool: every instance received, its status and results."""
    node = _pacs()
    try:
        node.print_journal(spool, as_json, echo=click.echo)
    except node.NodeError as exc:
        raise _BatchUsage(str(exc)) from None


@cli.command("export-web")
@click.argument("dest", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@_model_option
@click.option("--overwrite", is_flag=True, help="Write into a non-empty DIR (replacing the files export-web writes).")
def export_web(dest, model, overwrite) -> None:
    """Write a static folder that classifies scans in the browser (no install, works offline; docs/runtimes.md)."""
    from cxr_edge.webexport import WebExportError, export_web as write

    try:
        out = write(dest, model, overwrite)
    except (WebExportError, BundleError, OSError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    click.echo(f"wrote {out}: serve it with any static web server, e.g. python -m http.server -d {out} -b 127.0.0.1")


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: no tracebacks for anything but bugs shown with CXR_EDGE_DEBUG=1."""
    from cxr_edge.classifier import single_threaded_blas

    single_threaded_blas()  # the lanes, not BLAS threads, use the cores (see there)
    try:
        cli.main(args=argv, prog_name="cxr-edge", standalone_mode=True)
    except BrokenPipeError:  # e.g. `cxr-edge classify ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("CXR_EDGE_DEBUG"):
            raise
        click.echo(f"cxr-edge: internal error (a bug in cxr-edge, not a problem with your input; please report "
                   f"it with the output of CXR_EDGE_DEBUG=1): {type(exc).__name__}: {' '.join(str(exc).split())}",
                   err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
