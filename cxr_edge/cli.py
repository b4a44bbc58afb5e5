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

The commands: ``classify`` in cxr_edge/cli_classify.py, ``serve``, ``batch``, ``dicom-node``, ``journal`` and
``export-web`` in cxr_edge/cli_services.py, ``info`` here; what they share in cxr_edge/cli_common.py.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click

from cxr_edge import __version__
from cxr_edge.bundle import BundleError, load_bundle, sha256_file
from cxr_edge.cli_classify import PROGRESS_MIN_FILES, classify  # noqa: F401
from cxr_edge.cli_common import ModelLoadError, model_option
from cxr_edge.cli_services import batch, dicom_node, export_web, journal, serve
from cxr_edge.cpu import onnx_int8_fused
from cxr_edge.engines import available_backends
from cxr_edge.inputs import (GLOB_CHARS, IMAGE_SUFFIXES, Missing, dicom_style_suffix, expand_inputs,  # noqa: F401
                             shown)
from cxr_edge.rows import CSV_COLUMNS  # noqa: F401

EXIT_INTERNAL = 3  # an unexpected exception: a bug (1 means an input failed, 2 a usage error)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-edge")
def cli() -> None:
    """Chest X-ray classifier (normal / bacterial / viral pneumonia) for CPUs. Research use only:
    not a medical device."""


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
        if backend == "onnx" and backend in have and entry.get("precision") == "int8" and not onnx_int8_fused():
            runtime += ", run unfused on this CPU: x86 without VNNI (docs/runtimes.md)"
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


@click.command()
@model_option
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


for _command in (classify, info, serve, batch, dicom_node, journal, export_web):
    cli.add_command(_command)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: no tracebacks for anything but bugs shown with CXR_EDGE_DEBUG=1."""
    from cxr_edge.classifier import single_threaded_blas

    try:
        single_threaded_blas()  # the lanes, not BLAS threads, use the cores (see there)
        cli.main(args=argv, prog_name="cxr-edge", standalone_mode=True)
    except KeyboardInterrupt:  # Ctrl-C before click runs (it says the same for its own)
        click.echo("\nAborted!", err=True)
        sys.exit(1)
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
