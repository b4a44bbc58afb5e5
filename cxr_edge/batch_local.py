"""``cxr-edge batch`` on this machine (cxr_edge/batch.py): a pool of worker processes, each loading the model once,
fed work units a few at a time; their rows go to the job's collector as they come."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable

from cxr_edge.batch_store import BatchFailed, _Collector
from cxr_edge.batch_work import classify_rows
from cxr_edge.classifier import one_line
from cxr_edge.options import ClassifierOptions

_WORKER_CLF = None
_WORKER_PARENT = None


def _init_local_worker(args: ClassifierOptions) -> None:
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
        with _sigint_deferred():
            _start_forkserver()
        return ctx
    return multiprocessing.get_context("spawn")


def _start_forkserver() -> None:
    """Start the fork server (if not running) with SIGINT blocked, as CPython starts its resource tracker
    (bpo-33613). It is a new Python in the job's process group: a Ctrl-C reaches it too, and before it ignores
    SIGINT (after importing this module, about half a second) it died of it with a traceback on the terminal.
    Blocked, SIGINT never reaches it nor the workers it forks (they inherit the mask; ``_init_local_worker``
    ignores it too): Ctrl-C is this process's to handle."""
    from multiprocessing import forkserver, resource_tracker

    if not hasattr(signal, "pthread_sigmask"):
        return
    resource_tracker.ensure_running()  # first: it unblocks SIGINT when it returns (then it is already running)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back until the block ends, then deliver it (``KeyboardInterrupt``): for starting a worker
    process. Raised inside ``Process.start()`` it left a worker that the pool does not know (not in
    ``_processes``, so not terminated), which went on alone or died on the job's semaphores with a traceback.
    Only in the main thread (the only one where Python runs signal handlers and may set them)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    got: list = []
    old = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            signal.raise_signal(signal.SIGINT)  # to the handler that was there (KeyboardInterrupt)


def _run_local(units, args: ClassifierOptions, workers: int, collector: _Collector,
               tick: Callable[[int], None], cpu_s: dict) -> None:
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
                with _sigint_deferred():  # submit may start a worker process
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
