"""What a ``cxr-edge batch`` worker does (cxr_edge/batch.py; a local worker process or a Ray actor): Parquet rows
for its items, local files classified where they are and URIs fetched into a temporary folder first."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional, Sequence

from cxr_edge.batch_inputs import is_uri
from cxr_edge.classifier import one_line
from cxr_edge.options import ClassifierOptions
from cxr_edge.rows import flat_row


def worker_options(model: Optional[str], backend: Optional[str], threads: Optional[int], ood: bool,
                   allow_adults: bool = False) -> ClassifierOptions:
    """A batch job's classifier options: one worker = one core, so single-threaded BLAS (``worker``), and
    decoding in the worker's own thread, no decode pool beside the model (``decode_threads=0``)."""
    return ClassifierOptions(model, backend, threads, ood, allow_adults, decode_threads=0, worker=True)


ModelArgs = worker_options  # its former name


def _stat(path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns // 1000
    except (OSError, ValueError):
        return None, None


def _row(record: dict, status: str, size, mtime, shard: int) -> dict:
    return {**flat_row(record, status), "size": size, "mtime": mtime, "shard": shard}


def _fetch(uri: str, folder: str, k: int):
    """A URI's bytes into a local temporary file: (local path, size, mtime µs) or (None, reason, None)."""
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None, "no such file", None
        if info.type == pafs.FileType.Directory:
            return None, "is a directory", None
        local = os.path.join(folder, f"{k}{os.path.splitext(path)[1]}")
        with filesystem.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        mtime = None if info.mtime_ns is None else info.mtime_ns // 1000
        return local, info.size, mtime
    except Exception as exc:
        return None, f"cannot read ({one_line(exc)})", None


def classify_rows(clf, items: Sequence[tuple[str, Optional[str], int]]) -> list[dict]:
    """Rows for ``(path, reason, shard)`` items, in order: ``clf.classify_many`` and ``Result.to_dict()``;
    items with a reason become error rows without touching the model."""
    from cxr_edge.classifier import ErrorResult

    rows: list[Optional[dict]] = [None] * len(items)
    local, remote = [], []
    for k, (path, reason, shard) in enumerate(items):
        if reason is not None:
            rows[k] = _row(ErrorResult(path, reason).to_dict(), "error", None, None, shard)
        elif is_uri(path):
            remote.append(k)
        else:
            local.append(k)
    for k, result in zip(local, clf.classify_many([items[k][0] for k in local])):
        rows[k] = _row(result.to_dict(), result.status, *_stat(items[k][0]), items[k][2])
    if remote:
        with tempfile.TemporaryDirectory(prefix="cxr-edge-batch-") as folder:
            fetched = {k: _fetch(items[k][0], folder, k) for k in remote}
            ok = [k for k in remote if fetched[k][0] is not None]
            for k in remote:
                if fetched[k][0] is None:
                    rows[k] = _row(ErrorResult(items[k][0], fetched[k][1]).to_dict(), "error", None, None, items[k][2])
            for k, result in zip(ok, clf.classify_many([fetched[k][0] for k in ok])):
                record = result.to_dict()
                record["path"] = items[k][0]
                rows[k] = _row(record, result.status, fetched[k][1], fetched[k][2], items[k][2])
    return rows
