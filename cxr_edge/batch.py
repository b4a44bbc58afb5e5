"""Archive-scale batch classification: ``cxr-edge batch SOURCE... --out RESULTS``.

Every file becomes one row of a Parquet dataset (the folder ``RESULTS``), computed by
:class:`cxr_edge.Classifier` (``classify_many`` and ``to_dict()``, exactly as ``cxr-edge classify --json``):

    path, status (ok / rejected / error), label, normal, bacterial, viral, reason, error,
    model_name, model_version, model_sha256, size, mtime

``path`` is the string ``cxr-edge classify`` prints for the same argument (``cxr_edge.cli.expand_inputs``), or
the URI for files listed from a URI. Probabilities are those of ``to_dict()`` (rounded to 6 decimals).

Work is spread over a pool of workers that each load the bundle once: local processes (the default), or Ray
actors (``--ray auto|local|ray://HOST:PORT``: Ray Data ``map_batches`` over an actor pool). Results stream back
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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_edge.classifier import one_line, usable_cpus
from cxr_edge.labels import CLASS_NAMES

FORMAT = "cxr-edge-batch/2"  # 2: the warning column (allow_adults)
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
LIST_SUFFIXES = {".txt", ".lst", ".list"}
PART_RE = re.compile(r"^part-(\d{6})-([0-9a-f]{12})\.parquet$")
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RAY_HINT = 'pip install "cxr-edge[ray]"'
UNDECODABLE_NAME = ("file name is not UTF-8 text (shown with escapes); the results hold text paths, so rename "
                    "the file or classify it with cxr-edge classify")

SCHEMA = pa.schema([
    ("path", pa.string()), ("status", pa.string()), ("label", pa.string()),
    *[(c, pa.float64()) for c in CLASS_NAMES],
    ("reason", pa.string()), ("error", pa.string()), ("warning", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("model_sha256", pa.string()),
    ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC")),
])
_ROW_SCHEMA = SCHEMA.append(pa.field("shard", pa.int64()))
_WORKER_COLUMNS = ["worker", "worker_cpu_s"]  # what a Ray batch carries besides its rows (not written)


class BatchError(Exception):
    """A usage problem (exit status 2): RESULTS is not a batch output, belongs to another job, is in use..."""


class BatchFailed(Exception):
    """The job stopped before the end (exit status 1); finished shards are kept and a rerun resumes."""


# ---------------------------------------------------------------------------------------------- inputs

def is_uri(text: str) -> bool:
    return bool(URI_RE.match(text))


def _uri_looks_like_image(path: str) -> bool:
    from cxr_edge.cli import IMAGE_SUFFIXES, dicom_style_suffix

    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    # names as DICOM files often have are listed without reading them (a request per object): a file that is
    # no image becomes an error row, not a silent skip
    return not name.startswith(".") and (suffix in IMAGE_SUFFIXES or dicom_style_suffix(suffix))


def _list_uri(uri: str) -> list[tuple[str, Optional[str]]]:
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except Exception as exc:  # unknown scheme, no credentials, unreachable host...
        return [(uri, f"cannot open ({one_line(exc)})")]
    prefix = uri[: len(uri) - len(path)] if uri.endswith(path) else uri.split("://", 1)[0] + "://"
    if info.type != pafs.FileType.Directory:
        return [(uri, None)]  # a file, or a missing one whose error the worker reports
    try:
        found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as exc:
        return [(uri, f"cannot list ({one_line(exc)})")]
    base = path.rstrip("/")
    files = sorted(prefix + f.path for f in found if f.type == pafs.FileType.File
                   and _uri_looks_like_image(f.path)
                   and not any(part.startswith(".") for part in f.path[len(base):].split("/")))
    return [(f, None) for f in files] or [(uri, "folder holds no image files")]


def _expand(args: Iterable[str], allow_lists: bool = True) -> list[tuple[str, Optional[str]]]:
    from cxr_edge.cli import Missing, expand_inputs

    out: list[tuple[str, Optional[str]]] = []
    for arg in args:
        if is_uri(arg):
            out.extend(_list_uri(arg))
        elif allow_lists and Path(arg).suffix.lower() in LIST_SUFFIXES and Path(arg).is_file():
            try:
                lines = Path(arg).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                out.append((arg, f"cannot read the list ({one_line(exc)})"))
                continue
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            out.extend(_expand(entries, allow_lists=False) if entries else [(arg, "the list names no files")])
        else:
            out.extend((m.path, m.reason) if isinstance(m, Missing) else (m, None) for m in expand_inputs((arg,)))
    return out


def list_inputs(sources: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """Sorted, de-duplicated ``(path, reason)`` pairs: ``reason`` is ``None`` for a path to classify, or why
    the argument names nothing (an empty folder, a glob that matches nothing), which becomes an error row."""
    seen: dict[str, Optional[str]] = {}
    for path, reason in _expand(sources):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system gave undecoded: a Parquet string cannot hold them
            path, reason = path.encode("utf-8", "backslashreplace").decode("utf-8"), UNDECODABLE_NAME
        if path not in seen or (seen[path] is not None and reason is None):
            seen[path] = reason
    return sorted(seen.items())


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
    with open(out / LOCK_FILE, "a+") as f:
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
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / name)
        _fsync_dir(self.out)
        del self.buf[i], self.expected[i]
        self.written += 1

    @property
    def complete(self) -> bool:
        return not self.buf


# --------------------------------------------------------------------------------------------- workers

def _stat(path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns // 1000
    except (OSError, ValueError):
        return None, None


def _row(record: dict, status: str, size, mtime, shard: int) -> dict:
    probs = record.get("probabilities") or {}
    model = record.get("model") or {}
    return {"path": record["path"], "status": status, "label": record.get("label"),
            **{c: probs.get(c) for c in CLASS_NAMES}, "reason": record.get("reason"), "error": record.get("error"),
            "warning": record.get("warning"), "model_name": model.get("name"), "model_version": model.get("version"),
            "model_sha256": model.get("sha256"), "size": size, "mtime": mtime, "shard": shard}


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


@dataclass(frozen=True)
class ModelArgs:
    model: Optional[str]
    backend: str
    threads: Optional[int]
    ood: bool
    allow_adults: bool = False

    def classifier(self, worker: bool = True):
        from cxr_edge.classifier import Classifier, single_threaded_blas

        if worker:  # a worker process of this job: one core, so no BLAS thread pool either
            single_threaded_blas()
        # one worker = one core: decoding in the worker's own thread, no decode pool beside the model
        return Classifier(model=self.model, backend=self.backend, threads=self.threads, ood=self.ood,
                          decode_threads=0, allow_adults=self.allow_adults)


_WORKER_CLF = None
_WORKER_PARENT = None


def _init_local_worker(args: ModelArgs) -> None:
    global _WORKER_CLF, _WORKER_PARENT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_PARENT = os.getppid()  # the job's process, or its fork server (which exits with it)
    _WORKER_CLF = args.classifier()


def _local_task(items) -> tuple[list[dict], str, float]:
    """(rows, worker id, the worker's CPU seconds so far: start-up, model loading and work)."""
    if os.getppid() != _WORKER_PARENT:  # the job died (SIGKILL): do not work for nobody
        os._exit(1)
    return classify_rows(_WORKER_CLF, items), str(os.getpid()), time.process_time()


def _mp_context():
    """``forkserver`` where the platform has it: one clean server process imports cxr-edge once and forks the
    workers from it (each then loads the model), instead of every worker starting Python and importing
    everything anew (``spawn``). Never plain ``fork``: this process may run threads (Ray, pyarrow)."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # only before the server starts; it then stays for this process
        return ctx
    return multiprocessing.get_context("spawn")


class RayWorker:
    """A Ray Data ``map_batches`` actor: loads the bundle once (from the files shipped by the driver, so a
    cluster node needs cxr-edge installed but not the bundle), then classifies batches of paths."""

    def __init__(self, bundle_files, args: ModelArgs):
        import ray

        files = ray.get(bundle_files) if isinstance(bundle_files, ray.ObjectRef) else bundle_files
        if files:
            args = ModelArgs(str(_unpack_bundle(files)), args.backend, args.threads, args.ood, args.allow_adults)
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


# ---------------------------------------------------------------------------------------------- runners

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


def _run_local(units, args: ModelArgs, workers: int, collector: _Collector, tick: Callable[[int], None],
               cpu_s: dict) -> None:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_local_worker,
                               initargs=(args,))
    pending: set = set()
    queue = iter(units)
    try:
        while True:
            while len(pending) < 4 * workers:
                unit = next(queue, None)
                if unit is None:
                    break
                pending.add(pool.submit(_local_task, unit))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                rows, worker, cpu = fut.result()
                collector.add(rows)
                cpu_s[worker] = cpu
                tick(len(rows))
    except BaseException as exc:
        # Stop now (Ctrl-C, a failure): what the workers are doing is lost anyway, as its shards are not
        # complete; a rerun does them. (CPython keeps the worker processes in ``_processes``.)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        if type(exc).__name__ == "BrokenProcessPool":
            raise BatchFailed(f"a worker process died ({one_line(exc)})") from None
        raise
    pool.shutdown(wait=True)


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


def _run_ray(units, args: ModelArgs, bundle_root: Path, workers: int, collector: _Collector,
             tick: Callable[[int], None], cpu_s: dict) -> None:
    import logging

    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if _single_node():
        files, args = {}, ModelArgs(str(bundle_root), args.backend, args.threads, args.ood, args.allow_adults)
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


# ------------------------------------------------------------------------------------------------- job

def _counts(out: Path, plan: Plan) -> dict:
    """Read the whole dataset back: exactly one row per input path, or BatchFailed."""
    table = pq.read_table(out, columns=["path", "status", "label"]) if plan.n_shards else pa.table(
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
        ModelArgs(str(bundle.root), backend, threads, ood, allow_adults).classifier(worker=False)  # fail here, not in every worker
    except (BundleError, EngineError) as exc:
        raise BatchError(f"cannot load the model: {exc}") from None
    inputs = list_inputs(sources)
    t_list = time.perf_counter() - t0
    job = {"format": FORMAT, "inputs": len(inputs), "inputs_sha256": None, "shard_size": None, "shards": None,
           "model": {"name": bundle.name, "version": bundle.version, "sha256": sha, "backend": backend},
           "ood": bool(ood), "allow_adults": bool(allow_adults), "sources": list(sources)}
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        size = shard_size
        if size is None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                old = json.loads((out / JOB_FILE).read_text())
                size = int(old["shard_size"]) if old.get("inputs") == len(inputs) else None
        plan = Plan(inputs, size or default_shard_size(len(inputs)))
        job.update(inputs_sha256=plan.digest, shard_size=plan.shard_size, shards=plan.n_shards)
        done = _prepare(out, plan, job)
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
                    _run_local(units, ModelArgs(str(bundle.root), backend, threads, ood, allow_adults), workers, collector, tick,
                               cpu_s)
                else:
                    _run_ray(units, ModelArgs(None, backend, threads, ood, allow_adults), bundle.root, workers, collector, tick,
                             cpu_s)
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
        counts = _counts(out, plan)
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
        _write_json(out / MANIFEST_FILE, summary)
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
