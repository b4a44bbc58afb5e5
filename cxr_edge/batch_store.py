"""A ``cxr-edge batch`` job's plan and its RESULTS folder (cxr_edge/batch.py): the shards and work units, the job
and manifest files, the lock, the check of a folder to resume, shards written whole (write to ``.tmp/``, fsync,
atomic rename) and the dataset read back at the end."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_edge.classifier import one_line
from cxr_edge.labels import CLASS_NAMES

FORMAT = "cxr-edge-batch/2"  # 2: the warning column (allow_adults)
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
PART_RE = re.compile(r"^part-(\d{6})-([0-9a-f]{12})\.parquet$")

SCHEMA = pa.schema([  # cxr_edge.rows.ROW_COLUMNS, then size and mtime
    ("path", pa.string()), ("status", pa.string()), ("label", pa.string()),
    *[(c, pa.float64()) for c in CLASS_NAMES],
    ("reason", pa.string()), ("error", pa.string()), ("warning", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("model_sha256", pa.string()),
    ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC")),
])
_ROW_SCHEMA = SCHEMA.append(pa.field("shard", pa.int64()))


class BatchError(Exception):
    """A usage problem (exit status 2): RESULTS is not a batch output, belongs to another job, is in use..."""


class BatchFailed(Exception):
    """The job stopped before the end (exit status 1); finished shards are kept and a rerun resumes."""


# ------------------------------------------------------------------------------------------------ plan

def default_shard_size(n: int) -> int:
    """About 64 shards for a small job (workers stay balanced), at most 1000 paths per shard (few files for a
    big one). Depends only on the number of inputs, so a rerun gets the same shards."""
    return max(16, min(1000, -(-n // 64)))


def _digest(paths: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Plan:
    inputs: list  # sorted (path, reason) pairs
    shard_size: int
    digest: str = field(init=False)

    def __post_init__(self):
        self.digest = _digest(p for p, _ in self.inputs)

    @property
    def n_shards(self) -> int:
        return -(-len(self.inputs) // self.shard_size)

    def shard(self, i: int) -> list:
        return self.inputs[i * self.shard_size:(i + 1) * self.shard_size]

    def part_name(self, i: int) -> str:
        return f"part-{i:06d}-{_digest(p for p, _ in self.shard(i))[:12]}.parquet"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(out: Path):
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    try:
        f = open(out / LOCK_FILE, "a+")
    except OSError as exc:
        raise BatchError(f"cannot write to the results folder {out} ({one_line(exc)})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchError(f"{out} is in use by another cxr-edge batch run") from None
        yield


def _prepare(out: Path, plan: Plan, job: dict) -> set[int]:
    """Check RESULTS against the job (creating it when new); the shard indices already done."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / JOB_FILE
    if job_path.exists():
        try:
            old = json.loads(job_path.read_text())
        except (OSError, ValueError) as exc:
            raise BatchError(f"{job_path} is unreadable ({one_line(exc)}); use a new --out folder") from None
        if old.get("format") != FORMAT:
            raise BatchError(f"{job_path} was not written by this version of cxr-edge batch; use a new --out folder")
        for key, what in (("inputs_sha256", "input list"), ("model", "model"), ("ood", "gate setting"),
                          ("allow_adults", "--allow-adults setting")):
            if old.get(key) != job.get(key):
                detail = (f" ({old.get('inputs')} files then, {job['inputs']} now)" if key == "inputs_sha256" else
                          f" ({old.get(key)} then, {job.get(key)} now)")
                raise BatchError(f"{out} holds a job over a different {what}{detail}; rerun with the same "
                                 "arguments to resume it, or use a new --out folder")
        if old.get("shard_size") != job["shard_size"]:
            raise BatchError(f"{out} was started with --shard-size {old.get('shard_size')}; "
                             "rerun with that value to resume it")
    else:
        stray = [p.name for p in out.iterdir() if p.name not in (TMP_DIR, LOCK_FILE)]
        if stray:
            raise BatchError(f"{out} is not empty and holds no {JOB_FILE} (not a cxr-edge batch output); "
                             "use a new or empty --out folder")
        _write_json(job_path, job)
    tmp = out / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed run: never complete shards
    tmp.mkdir()
    names = {plan.part_name(i): i for i in range(plan.n_shards)}
    done = set()
    for p in out.iterdir():
        if not p.name.startswith("part-"):
            continue
        i = names.get(p.name)
        if i is None:
            raise BatchError(f"{p} does not belong to this job's shards; use a new --out folder")
        try:
            rows = pq.read_metadata(p).num_rows
        except Exception as exc:
            raise BatchError(f"{p} is unreadable ({one_line(exc)}); remove it to have it redone") from None
        if rows != len(plan.shard(i)):
            raise BatchError(f"{p} has {rows} rows, its shard {len(plan.shard(i))}; remove it to have it redone")
        done.add(i)
    return done


class _Collector:
    """Gathers rows per shard (a dict per path: a row seen twice counts once) and commits each complete shard
    with write-to-temporary + fsync + atomic rename."""

    def __init__(self, out: Path, plan: Plan, todo: Iterable[int]):
        self.out, self.plan = out, plan
        self.buf: dict[int, dict] = {i: {} for i in todo}
        self.expected = {i: {p for p, _ in plan.shard(i)} for i in self.buf}
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            i = row.pop("shard")
            bucket = self.buf.get(i)
            if bucket is None or row["path"] not in self.expected[i]:
                continue  # a shard already committed (a task retried by Ray): ignore the duplicate
            bucket[row["path"]] = row
            if len(bucket) == len(self.expected[i]):
                self._commit(i, bucket)

    def _commit(self, i: int, bucket: dict) -> None:
        table = pa.Table.from_pylist([bucket[p] for p in sorted(bucket)], schema=SCHEMA)
        name = self.plan.part_name(i)
        tmp = self.out / TMP_DIR / f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / name)
            _fsync_dir(self.out)
        except OSError as exc:  # disk full, the folder removed or made read-only part-way
            raise BatchFailed(f"cannot write {name} into {self.out} ({one_line(exc)})") from None
        del self.buf[i], self.expected[i]
        self.written += 1

    @property
    def complete(self) -> bool:
        return not self.buf


# ------------------------------------------------------------------------------------------ work units

MIN_UNIT = 4  # images: the smallest work unit (the end of a job)


def unit_sizes(n: int, workers: int) -> list[int]:
    """How ``n`` items are cut into work units for ``workers`` workers (guided self-scheduling): units of
    ``n / (8 workers)`` (8 to 64 items: few round trips) while there is much left, then each unit a
    ``1 / (4 workers)`` share of what remains, down to ``MIN_UNIT``, so that the workers run out of work
    within a few images of each other instead of one idling while another finishes a big unit."""
    top = max(8, min(64, n // (8 * workers)))
    sizes, left = [], n
    while left > 0:
        size = min(left, top if workers == 1 else max(MIN_UNIT, min(top, -(-left // (4 * workers)))))
        sizes.append(size)
        left -= size
    return sizes


def _units(plan: Plan, todo: list[int], workers: int) -> list[list[tuple]]:
    items = [(p, r, i) for i in todo for p, r in plan.shard(i)]
    units, k = [], 0
    for size in unit_sizes(len(items), workers):
        units.append(items[k:k + size])
        k += size
    return units


# ------------------------------------------------------------------------------------------- read back

def _counts(out: Path, plan: Plan) -> dict:
    """Read the whole dataset back: exactly one row per input path, or BatchFailed."""
    parts = [str(out / plan.part_name(i)) for i in range(plan.n_shards)]  # not the folder: a user's notes.txt
    table = pq.read_table(parts, columns=["path", "status", "label"]) if plan.n_shards else pa.table(
        {"path": pa.array([], pa.string()), "status": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    paths = sorted(table.column("path").to_pylist())
    if paths != [p for p, _ in plan.inputs]:
        raise BatchFailed(f"{out}: the dataset's {len(paths)} rows ({len(set(paths))} distinct paths) do not match "
                          f"the {len(plan.inputs)} inputs")
    status: dict[str, int] = {}
    labels = {c: 0 for c in CLASS_NAMES}
    for s, lab in zip(table.column("status").to_pylist(), table.column("label").to_pylist()):
        status[s] = status.get(s, 0) + 1
        if lab is not None:
            labels[lab] = labels.get(lab, 0) + 1
    return {"status": {k: status.get(k, 0) for k in ("ok", "rejected", "error")}, "labels": labels}
