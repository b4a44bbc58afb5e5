"""Archive-scale batch classification: ``cxr-edge batch SOURCE... --out RESULTS``.

Every file becomes one row of a Parquet dataset (the folder ``RESULTS``), computed by
:class:`cxr_edge.Classifier` (``classify_many`` and ``to_dict()``, exactly as ``cxr-edge classify --json``):

    path, status (ok / rejected / error), label, normal, bacterial, viral, reason, error,
    model_name, model_version, model_sha256, size, mtime

``path`` is the string ``cxr-edge classify`` prints for the same argument (``cxr_edge.inputs.expand_inputs``), or
the URI for files listed from a URI. Probabilities are those of ``to_dict()`` (rounded to 6 decimals).

Work is spread over a pool of workers that each load the bundle once: local processes (the default), or Ray
actors (``--ray auto|local|ray://HOST:PORT``: one CPU each, fed work units by this process). Results stream back
to this process, which writes them.

Resumable, exactly once. The sorted, de-duplicated input list is cut into shards of ``shard_size`` paths; a
shard's file is named after its index and a hash of its paths (``part-000012-<hash>.parquet``). A shard is
written to ``RESULTS/.tmp/`` and renamed into ``RESULTS`` only when complete (an atomic rename on one
filesystem), so a file in ``RESULTS`` is always a whole shard, and a killed run leaves at most temporary files
that Parquet readers ignore (names starting with ``.`` or ``_``). ``RESULTS/_job.json`` records the job
(input count and hash, shard size, model sha256, backend, gate); a rerun with the same arguments checks it,
skips the shards already there and writes the rest; a rerun over a different input list or model is refused.
When every shard is there, the dataset is checked (exactly one row per input path) and
``RESULTS/_manifest.json`` is written: its presence means the job is complete.

SOURCE: files, folders (recursive), glob patterns, text files listing one path / folder / glob / URI per
line (``.txt``, ``.lst``, ``.list``; blank lines and ``#`` comments skipped), or URIs that
``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``; a URI folder is listed
recursively).

The parts: cxr_edge/batch_inputs.py (SOURCE to paths), batch_store.py (the plan, RESULTS and its files),
batch_work.py (a worker's rows, flattened by cxr_edge/rows.py), batch_local.py (the process pool),
batch_ray.py (Ray); this module runs the job.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from cxr_edge.batch_inputs import (LIST_SUFFIXES, UNDECODABLE_NAME, URI_RE, is_uri,  # noqa: F401
                                   list_inputs)
from cxr_edge.batch_local import _run_local
from cxr_edge.batch_ray import (RAY_HINT, RayWorker, _ray_connect, _run_ray, _single_node,  # noqa: F401
                                have_ray)
from cxr_edge.batch_store import (FORMAT, JOB_FILE, LOCK_FILE, MANIFEST_FILE, MIN_UNIT, PART_RE,  # noqa: F401
                                  SCHEMA, TMP_DIR, BatchError, BatchFailed, Plan, _Collector, _counts, _locked,
                                  _prepare, _units, _write_json, default_shard_size, unit_sizes)
from cxr_edge.batch_work import ModelArgs, classify_rows, worker_options  # noqa: F401
from cxr_edge.classifier import one_line, usable_cpus


def _progress(total: int, start: int, enabled: bool):
    """(tick, close): a click progress bar with images/s on a terminal, nothing otherwise."""
    if not enabled or total == 0:
        return (lambda n: None), (lambda: None)
    import click

    t0 = time.perf_counter()
    state = {"n": 0}

    def show(_):
        dt = time.perf_counter() - t0
        return f"{state['n'] / dt:.1f} images/s" if dt > 0 and state["n"] else ""

    bar = click.progressbar(length=total, label="classifying", file=sys.stderr, item_show_func=show,
                            show_pos=True)
    bar.__enter__()
    bar.update(start)

    def tick(n: int) -> None:
        state["n"] += n
        bar.update(n)

    return tick, (lambda: bar.__exit__(None, None, None))


def run_batch(sources: Sequence[str], out, *, ray: Optional[str] = None, workers: Optional[int] = None,
              model=None, backend: Optional[str] = None, threads: Optional[int] = 1, ood: bool = True,
              shard_size: Optional[int] = None, progress: Optional[bool] = None, log=None,
              allow_adults: bool = False) -> dict:
    """Run (or resume) a batch job; returns its summary (also written to ``RESULTS/_manifest.json``).

    ``ray``: ``None`` for the local process pool, else ``"local"`` (start Ray here), ``"auto"`` (join the
    running cluster, e.g. under ``ray job submit``) or an address such as ``ray://head:10001``; an already
    initialised Ray (``ray.init()`` by the caller) is used as it is. ``workers``: processes or actors, each
    loading the bundle once with ``threads`` inference threads (default: one per CPU core here, or per CPU
    of the Ray cluster). Raises :class:`BatchError` for usage problems and :class:`BatchFailed` when the job
    stopped part-way (a rerun resumes it).
    """
    from cxr_edge.bundle import BundleError, load_bundle
    from cxr_edge.classifier import default_backend
    from cxr_edge.engines import EngineError

    t0 = time.perf_counter()
    out = Path(out)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if ray is not None and not have_ray():
        raise BatchError(f"--ray needs Ray: {RAY_HINT}")
    try:
        bundle = load_bundle(model)
        backend = backend or default_backend(bundle)
        _, sha = bundle.model_file(backend, verify=True)
        options = worker_options(str(bundle.root), backend, threads, ood, allow_adults)
        options.replace(worker=False).classifier()  # fail here, not in every worker
    except (BundleError, EngineError) as exc:
        raise BatchError(f"cannot load the model: {exc}") from None
    inputs = list_inputs(sources)
    t_list = time.perf_counter() - t0
    job = {"format": FORMAT, "inputs": len(inputs), "inputs_sha256": None, "shard_size": None, "shards": None,
           "model": {"name": bundle.name, "version": bundle.version, "sha256": sha, "backend": backend},
           "ood": bool(ood), "allow_adults": bool(allow_adults), "sources": list(sources)}
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, a file on the way, ...: a usage problem, not a bug
        raise BatchError(f"cannot make the results folder {out} ({one_line(exc)})") from None
    with _locked(out):
        size = shard_size
        if size is None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                old = json.loads((out / JOB_FILE).read_text())
                size = int(old["shard_size"]) if old.get("inputs") == len(inputs) else None
        plan = Plan(inputs, size or default_shard_size(len(inputs)))
        job.update(inputs_sha256=plan.digest, shard_size=plan.shard_size, shards=plan.n_shards)
        try:
            done = _prepare(out, plan, job)
        except OSError as exc:
            raise BatchError(f"cannot write to the results folder {out} ({one_line(exc)})") from None
        todo = [i for i in range(plan.n_shards) if i not in done]
        n_todo = sum(len(plan.shard(i)) for i in todo)
        started_ray = False
        t_ray = 0.0
        if todo and ray is not None:
            t1 = time.perf_counter()
            started_ray = _ray_connect(ray, workers)
            t_ray = time.perf_counter() - t1
        if ray is None:
            workers = workers or usable_cpus()
        elif todo:  # no more actors than the cluster has CPUs: the pool would wait for them forever
            import ray as ray_mod
            cpus = max(1, int(ray_mod.cluster_resources().get("CPU", 1)))
            workers = min(workers or cpus, cpus)
        workers = max(1, min(workers or 1, max(1, -(-n_todo // 8))))
        collector = _Collector(out, plan, todo)
        tick, close = _progress(len(inputs), len(inputs) - n_todo,
                                sys.stderr.isatty() if progress is None else progress)
        t1 = time.perf_counter()
        first: list[float] = []  # when the first results arrived: worker start-up before it

        def count(n: int, _tick=tick) -> None:
            if not first:
                first.extend((time.perf_counter() - t1, n))
            _tick(n)

        tick = count
        cpu_s: dict = {}  # worker -> its CPU seconds at its last result
        try:
            if todo:
                units = _units(plan, todo, workers)
                if ray is None:
                    _run_local(units, options, workers, collector, tick, cpu_s)
                else:
                    _run_ray(units, options.replace(model=None), bundle.root, workers, collector, tick, cpu_s,
                             single_node=_single_node)
        except (KeyboardInterrupt, BatchFailed) as exc:
            close()
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            have = sum((out / plan.part_name(i)).exists() for i in range(plan.n_shards))
            raise BatchFailed(f"{what}: {have} of {plan.n_shards} shards are in {out}; "
                              "rerun the same command to finish") from None
        finally:
            if started_ray:
                import ray as ray_mod
                ray_mod.shutdown()
        close()
        t_run = time.perf_counter() - t1
        if not collector.complete:
            raise BatchFailed(f"{len(collector.buf)} shards did not complete; rerun the same command to finish")
        try:
            counts = _counts(out, plan)
        except OSError as exc:  # a shard removed from the folder while the job ran
            raise BatchFailed(f"cannot read the results back from {out} ({one_line(exc)}); rerun the same "
                              "command to finish") from None
        wall = time.perf_counter() - t0
        summary = {"format": FORMAT, "out": str(out), "inputs": len(inputs), **counts,
                   "shards": plan.n_shards, "shards_resumed": len(done), "shards_written": collector.written,
                   "classified_now": n_todo, "mode": "local" if ray is None else f"ray ({ray})",
                   "workers": workers, "threads": threads, "model": job["model"], "ood": bool(ood),
                   "list_s": round(t_list, 3), "ray_start_s": round(t_ray, 3), "run_s": round(t_run, 3),
                   "wall_s": round(wall, 3),
                   "worker_cpu_s": round(sum(cpu_s.values()), 3) if cpu_s else None,
                   "images_per_s": round(n_todo / t_run, 2) if n_todo and t_run > 0 else None,
                   "first_result_s": round(first[0], 3) if first else None,
                   "steady_images_per_s": (round((n_todo - first[1]) / (t_run - first[0]), 2)
                                           if first and n_todo > first[1] and t_run > first[0] else None),
                   "parts": [plan.part_name(i) for i in range(plan.n_shards)]}
        try:
            _write_json(out / MANIFEST_FILE, summary)
        except OSError as exc:  # every shard is in place: a rerun only writes the manifest
            raise BatchFailed(f"cannot write {out / MANIFEST_FILE} ({one_line(exc)}); rerun the same command to "
                              "finish") from None
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    log(summary_line(summary))
    return summary


def summary_line(s: dict) -> str:
    st, lab = s["status"], s["labels"]
    labels = ", ".join(f"{k} {v}" for k, v in lab.items())
    rate = f", {s['images_per_s']:.1f} images/s" if s.get("images_per_s") else ""
    resumed = f"{s['shards_resumed']} already done, " if s["shards_resumed"] else ""
    return (f"cxr-edge: batch: {s['inputs']} inputs: {st['ok']} ok ({labels}), {st['rejected']} rejected, "
            f"{st['error']} error; {s['shards']} shards ({resumed}{s['shards_written']} written) in "
            f"{s['wall_s']:.1f} s{rate} -> {s['out']}")
