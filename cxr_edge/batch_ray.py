"""``cxr-edge batch --ray`` (cxr_edge/batch.py): a pool of Ray actors that each load the model once, fed work units
by the driver; the driver ships the bundle's files to them unless the cluster is this machine alone."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from cxr_edge.batch_store import BatchError, BatchFailed, _Collector
from cxr_edge.batch_work import classify_rows
from cxr_edge.classifier import one_line, usable_cpus
from cxr_edge.options import ClassifierOptions

RAY_HINT = 'pip install "cxr-edge[ray]"'


class RayWorker:
    """A Ray actor (``_run_ray`` makes it one): loads the bundle once (from the files shipped by the driver, so a
    cluster node needs cxr-edge installed but not the bundle), then classifies work units of paths."""

    def __init__(self, bundle_files, args: ClassifierOptions):
        import ray

        node = ray.util.get_node_ip_address()
        self.worker, self.clf, self.error = f"{node}:{os.getpid()}", None, None
        try:
            files = ray.get(bundle_files) if isinstance(bundle_files, ray.ObjectRef) else bundle_files
            if files:
                args = args.replace(model=str(_unpack_bundle(files)))
            self.clf = args.classifier()
        except Exception as exc:  # told with the first unit, in one line (Ray would pass a constructor's traceback)
            self.error = f"a Ray worker on {node} could not load the model: {one_line(exc)}"

    def run(self, unit: list[tuple]) -> tuple[list[dict], str, float, Optional[str]]:
        """(rows, this actor's name, its process's CPU seconds so far: start-up, model loading and work, None),
        or ([], name, seconds, why) when the model did not load here."""
        if self.clf is None:
            return [], self.worker, time.process_time(), self.error
        return classify_rows(self.clf, unit), self.worker, time.process_time(), None


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


_IN_FLIGHT = 2  # work units queued on each actor: one running, the next waiting, so it never waits on the driver
_LOST_WAIT_S = 300.0  # with every actor lost, how long replacements may take to start before the job stops


def _run_ray(units, args: ClassifierOptions, bundle_root: Path, workers: int, collector: _Collector,
             tick: Callable[[int], None], cpu_s: dict, single_node: Callable[[], bool] = _single_node) -> None:
    """``workers`` Ray actors (one CPU each), each fed ``_IN_FLIGHT`` work units at a time in job order; rows go
    to the collector as units finish. A unit whose actor dies (its node lost) goes back to the front of the
    queue for the actors left, and a replacement actor is started, given work once it runs; an actor whose
    constructor fails stops the job with its error."""
    import collections

    import ray
    from ray.exceptions import ObjectLostError, RayActorError

    if single_node():
        files, args = {}, args.replace(model=str(bundle_root))
    else:  # ship the bundle: a node needs cxr-edge installed, not the bundle
        files = ray.put(_bundle_files(bundle_root))
    actor_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(RayWorker)
    queue = collections.deque(units)
    tasks: dict = {}  # ObjectRef of a unit's rows -> (actor, unit)
    starting: dict = {}  # ObjectRef of a replacement's readiness -> the replacement
    load: dict = {}  # live actor -> units queued on it
    replacements = 2 * workers  # at most this many over the job: a cluster that keeps losing nodes stops it

    def feed(actor) -> None:
        while load[actor] < _IN_FLIGHT and queue:
            unit = queue.popleft()
            tasks[actor.run.remote(unit)] = (actor, unit)
            load[actor] += 1

    def lost(actor) -> None:
        nonlocal replacements
        if load.pop(actor, None) is not None and replacements > 0:
            replacements -= 1
            new = actor_cls.remote(files, args)
            starting[new.__ray_ready__.remote()] = new

    for _ in range(workers):
        actor = actor_cls.remote(files, args)
        load[actor] = 0
        feed(actor)
    try:
        while tasks or queue:
            waiting = list(tasks) + list(starting)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=None if tasks else _LOST_WAIT_S) if waiting else ([], [])
            if not ready:
                raise BatchFailed("every Ray worker was lost and none could be started again"
                                  + (f" in {_LOST_WAIT_S:.0f} s" if waiting else ""))
            ref = ready[0]
            if ref in starting:  # a replacement is up (or could not start)
                actor = starting.pop(ref)
                load[actor] = 0
                try:
                    ray.get(ref)
                except RayActorError as exc:
                    _raise_if_init_failed(exc)
                    lost(actor)
            else:
                actor, unit = tasks.pop(ref)
                try:
                    rows, worker, cpu, error = ray.get(ref)
                except RayActorError as exc:
                    _raise_if_init_failed(exc)
                    queue.appendleft(unit)  # its other queued units come back too (their refs fail the same way)
                    lost(actor)
                except ObjectLostError:  # the actor is fine, its result was lost with a node: do the unit again
                    queue.appendleft(unit)
                    if actor in load:
                        load[actor] -= 1
                else:
                    if error:  # the model does not load there: every actor would fail so
                        raise BatchFailed(error)
                    collector.add(rows)
                    cpu_s[worker] = cpu
                    tick(len(rows))
                    if actor in load:
                        load[actor] -= 1
            for actor in load:  # the actor that has room now, or any (units that came back from a lost one)
                feed(actor)
    finally:
        for actor in [*load, *starting.values()]:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def _raise_if_init_failed(exc) -> None:
    """An actor that died in its constructor (before ``RayWorker`` could catch it: cxr-edge not importable on
    that node, say) stops the job, with the last line of Ray's report (the exception)."""
    if getattr(exc, "actor_init_failed", False):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise BatchFailed(f"a Ray worker could not start: {lines[-1] if lines else type(exc).__name__}") from None
