"""The ``cxr-edge`` commands that run a service or a job (registered in cxr_edge/cli.py): ``serve`` (cxr_edge/serve.py),
``batch`` (cxr_edge/batch.py), ``dicom-node`` and ``journal`` (cxr_edge/dicomnode.py) and ``export-web``
(cxr_edge/webexport.py). Each imports its module, and the extra that module needs, only when it runs."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_edge.bundle import BundleError
from cxr_edge.cli_common import UsageFailure, allow_adults_option, model_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token or --insecure-no-auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per model instance (--workers): a request's files are decoded and classified "
                   "in this many parallel lanes (default: one per CPU, at most 8).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances serving requests in parallel.")
@click.option("--token", envvar="CXR_EDGE_TOKEN", default=None,
              help="Require 'Authorization: Bearer TOKEN' on /v1 (also $CXR_EDGE_TOKEN).")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=64, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@allow_adults_option
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


@click.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--out", "out", required=True, metavar="RESULTS", type=click.Path(file_okay=False, path_type=Path),
              help="Parquet dataset folder; rerun the same command to resume a killed job.")
@click.option("--ray", "ray_address", metavar="ADDRESS", default=None,
              help="Run on Ray: auto (the running cluster), local (start one here) or ray://HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes / Ray actors, each loading the model once (default: one per CPU core).")
@model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None,
              help="Inference runtime (default: tflite if installed, else onnx).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Inference threads per worker.")
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Paths per output file (default: from the number of inputs, at most 1000).")
@allow_adults_option
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
        raise UsageFailure(str(exc)) from None
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
        raise UsageFailure(f'the DICOM node needs its extra ({exc.name} is not installed): '
                           'pip install "cxr-edge[pacs]"') from None


@click.command("dicom-node")
@click.option("--send-to", required=True, metavar="AET@HOST:PORT", help="Where results go (usually the PACS).")
@click.option("--ae-title", default="CXREDGE", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True)
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default="cxr-edge-spool",
              show_default=True, help="Received instances, results waiting and the journal (journal.sqlite).")
@click.option("--allow", multiple=True, metavar="AET", help="Accept associations only from these calling AE titles.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Classifying threads.")
@model_option
@click.option("--backend", type=click.Choice(["tflite", "onnx"]), default=None)
@click.option("--no-ood", "no_ood", is_flag=True, help="Bypass the bundle's out-of-distribution gate.")
@allow_adults_option
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
        raise UsageFailure(str(exc)) from None


@click.command()
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default="cxr-edge-spool",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per row.")
def journal(spool, as_json) -> None:
    """Print the journal of a dicom-node spool: every instance received, its status and results."""
    node = _pacs()
    try:
        node.print_journal(spool, as_json, echo=click.echo)
    except node.NodeError as exc:
        raise UsageFailure(str(exc)) from None


@click.command("export-web")
@click.argument("dest", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@model_option
@click.option("--overwrite", is_flag=True, help="Write into a non-empty DIR (replacing the files export-web writes).")
def export_web(dest, model, overwrite) -> None:
    """Write a static folder that classifies scans in the browser (no install, works offline; docs/runtimes.md)."""
    from cxr_edge.webexport import WebExportError, export_web as write

    try:
        out = write(dest, model, overwrite)
    except (WebExportError, BundleError, OSError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    click.echo(f"wrote {out}: serve it with any static web server, e.g. python -m http.server -d {out} -b 127.0.0.1")
