"""``cxr-edge batch --ray`` (cxr_edge/batch.py): Ray Data ``map_batches`` over a pool of actors that each load the
model once; the driver ships the bundle's files to them unless the cluster is this machine alone."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa

from cxr_edge.batch_store import _ROW_SCHEMA, BatchError, _Collector
from cxr_edge.batch_work import classify_rows
from cxr_edge.classifier import one_line, usable_cpus
from cxr_edge.options import ClassifierOptions

RAY_HINT = 'pip install "cxr-edge[ray]"'
_WORKER_COLUMNS = ["worker", "worker_cpu_s"]  # what a Ray batch carries besides its rows (not written)


class RayWorker:
    """A Ray Data ``map_batches`` actor: loads the bundle once (from the files shipped by the driver, so a
    cluster node needs cxr-edge installed but not the bundle), then classifies batches of paths."""

    def __init__(self, bundle_files, args: ClassifierOptions):
        import ray

        files = ray.get(bundle_files) if isinstance(bundle_files, ray.ObjectRef) else bundle_files
        if files:
            args = args.replace(model=str(_unpack_bundle(files)))
        self.clf = args.classifier()
        self.worker = f"{ray.util.get_node_ip_address()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = batch.to_pydict()
        rows = classify_rows(self.clf, list(zip(cols["path"], cols["missing"], cols["shard"])))
        table = pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)
        n = table.num_rows  # who did it and its CPU seconds so far (the process's whole life), for the summary
        return table.append_column("worker", pa.array([self.worker] * n, pa.string())).append_column(
            "worker_cpu_s", pa.array([time.process_time()] * n, pa.float64()))


def _unpack_bundle(files: dict[str, bytes]) -> Path:
    """The shipped bundle in this node's temporary folder, one copy per bundle content (actors share it; the
    Classifier checks every model file's sha256 against the card anyway)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    target = Path(tempfile.gettempdir()) / f"cxr-edge-bundle-{h.hexdigest()[:16]}"
    if not (target / "card.json").is_file():
        staging = Path(tempfile.mkdtemp(prefix=".cxr-edge-bundle-", dir=target.parent))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            os.rename(staging, target)  # atomic; another actor may have won the race: use its copy
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _bundle_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


def have_ray() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _ray_connect(address: str, workers: Optional[int]) -> bool:
    """Start or join Ray; True when this call did (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        if address == "local":  # a private single-node instance: its start-up notices are noise here
            kw["logging_level"] = "ERROR"
            ray.init(num_cpus=max(workers or 0, usable_cpus()), **kw)
        else:
            ray.init(address=address, **kw)
    except Exception as exc:
        raise BatchError(f"cannot connect to Ray at {address!r}: {one_line(exc)}") from None
    return True


def _single_node() -> bool:
    """The Ray cluster is this machine alone (actors can read the bundle folder where it is)."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
    except Exception:
        return False


def _run_ray(units, args: ClassifierOptions, bundle_root: Path, workers: int, collector: _Collector,
             tick: Callable[[int], None], cpu_s: dict, single_node: Callable[[], bool] = _single_node) -> None:
    import logging

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if single_node():
        files, args = {}, args.replace(model=str(bundle_root))
    else:  # ship the bundle: a node needs cxr-edge installed, not the bundle
        files = ray.put(_bundle_files(bundle_root))
    # One block per work unit, built here (from_blocks keeps the blocks as given, so the small units of the
    # end of the job stay small; from_items cuts equal blocks, from_arrow runs a remote task per block for
    # its metadata), and one map_batches call per block (batch_size=None): no read stage, no re-batching.
    blocks = [pa.table({"path": pa.array([p for p, _, _ in u], pa.string()),
                        "missing": pa.array([r for _, r, _ in u], pa.string()),
                        "shard": pa.array([i for _, _, i in u], pa.int64())}) for u in units]
    ds = ray.data.from_blocks(blocks).map_batches(
        RayWorker, fn_constructor_kwargs={"bundle_files": files, "args": args},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, batch_size=None,
        batch_format="pyarrow", zero_copy_batch=True)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):  # no lag
        if batch.num_rows:
            cpu_s[batch.column("worker")[0].as_py()] = batch.column("worker_cpu_s")[0].as_py()
        rows = batch.drop_columns(_WORKER_COLUMNS).to_pylist()
        collector.add(rows)
        tick(len(rows))
