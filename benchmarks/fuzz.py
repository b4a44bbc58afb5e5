"""Fuzzing of the decode path (``cxr_edge.preprocess.load_gray_colour``, and through it ``cxr_edge.dicom``):
every input must give the model's ``uint8[S, S]`` image, a refusal (``InputRejected``) or the project's own
error (``PreprocessError``) with a one-line message; anything else is a finding: another exception, a hang
over 5 s, memory past 1 GiB (a ``MemoryError`` under the address-space limit, or the worker killed), or a
worker that dies (a crash in a C decoder).

    python -m benchmarks.fuzz --minutes N [--engine atheris|random] [--seed S]

Each input runs in a bounded worker process (``resource.setrlimit(RLIMIT_AS, 1 GiB)``, a 5 s limit per
input; a worker that breaks is replaced). Engines:

- ``atheris`` (default when it is installed, ``pip install atheris``): coverage-guided (libFuzzer) over the
  Python code of Pillow, pydicom and cxr-edge, with the structure-aware mutations of
  ``benchmarks.fuzz_inputs`` as its custom mutator (and libFuzzer's own byte mutations for a third of
  inputs); libFuzzer enforces the limits (``-timeout=5 -rss_limit_mb=1024``) and the driver restarts it
  after a finding, keeping the corpus it grew.
- ``random``: the same mutations drawn from ``random.Random(seed)``, one input at a time through a worker
  that the driver times out (reproducible: the CI test, ``tests/test_fuzz.py``, runs it).

Writes ``benchmarks/results/fuzz.json`` and ``fuzz.md`` (inputs tried, outcomes, findings); findings are
saved under ``--findings`` (default ``benchmarks/results/fuzz-findings/``, not committed: each one is
minimised into ``tests/data/fuzz/`` with a fix and a test).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
TIME_LIMIT_S = 5.0
MEMORY_LIMIT = 1 << 30
SIZE = 144  # the shipped model's input side (its card's input.size)
FINDING_KINDS = ("exception", "bad output", "memory", "hang", "died")


# ----------------------------------------------------------------------------------------- the target


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def check(data: bytes, target: str = "decode") -> tuple[str, str]:
    """(outcome, detail) for one input: ``ok`` / ``rejected`` / ``error`` (the detail is the message), or a
    finding kind (the detail says what and where)."""
    if target == "selftest":  # a target that misbehaves on purpose: the harness must catch each kind
        if data == b"hang":
            time.sleep(60)
        elif data == b"boom":
            raise_from = {}
            return _finding(lambda: raise_from["missing"])
        elif data == b"mem":
            return _finding(lambda: bytearray(2 * MEMORY_LIMIT))
        elif data == b"die":
            os.abort()
        return "ok", ""
    from cxr_edge.preprocess import InputRejected, PreprocessError, load_gray_colour

    try:
        gray, chroma = load_gray_colour(bytes(data), SIZE)
    except InputRejected as exc:
        return _message("rejected", exc)
    except PreprocessError as exc:
        return _message("error", exc)
    except MemoryError:
        return "memory", "MemoryError (past the 1 GiB address-space limit)"
    except Exception as exc:
        return "exception", _where(exc)
    if getattr(gray, "shape", None) != (SIZE, SIZE) or str(gray.dtype) != "uint8" or not 0.0 <= chroma <= 1.0:
        return "bad output", f"{getattr(gray, 'shape', None)} {getattr(gray, 'dtype', None)} chroma {chroma}"
    return "ok", ""


def _finding(fn) -> tuple[str, str]:
    try:
        fn()
    except MemoryError:
        return "memory", "MemoryError (past the 1 GiB address-space limit)"
    except Exception as exc:
        return "exception", _where(exc)
    return "ok", ""


def _message(outcome: str, exc: Exception) -> tuple[str, str]:
    text = " ".join(str(exc).split())
    return (outcome, text) if text else ("bad output", f"{type(exc).__name__} without a message")


def _where(exc: BaseException) -> str:
    """The exception and the innermost frame that raised it: what a finding is de-duplicated by."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}{at}"


def worker_main(target: str) -> None:
    """``--worker``: read length-prefixed inputs on stdin, answer one JSON line each on the original stdout
    (fd 1 then points at stderr, so that a decoder's prints cannot break the protocol)."""
    limit_memory()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import warnings

    warnings.simplefilter("ignore")
    check(b"", target)  # imports done before the first timed input
    stdin = sys.stdin.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        data = stdin.read(struct.unpack("<I", head)[0])
        outcome, detail = check(data, target)
        out.write(json.dumps([outcome, detail]) + "\n")


class Worker:
    """A bounded worker process; :meth:`run` gives one input's (outcome, detail, seconds)."""

    def __init__(self, target: str = "decode"):
        self.target, self.proc = target, None

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fuzz", "--worker", "--target", self.target],
                                     cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)

    def run(self, data: bytes) -> tuple[str, str, float]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], TIME_LIMIT_S + (30 if self._fresh() else 0))
            line = self.proc.stdout.readline() if ready else None
        except BrokenPipeError:
            line = b""
        dt = time.perf_counter() - t0
        if line is None:
            self.close()
            return "hang", f"no answer within {TIME_LIMIT_S:g} s", dt
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return "died", f"worker exited with status {rc}" + (f" (signal {-rc})" if rc < 0 else ""), dt
        outcome, detail = json.loads(line)
        return outcome, detail, dt

    def _fresh(self) -> bool:  # the first input of a new worker also waits for its imports
        fresh, self._was_fresh = not getattr(self, "_was_fresh", False), True
        return fresh

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc, self._was_fresh = None, False


# ------------------------------------------------------------------------------------------ the engines


class Tally:
    def __init__(self, findings_dir: Path):
        self.inputs, self.outcomes, self.findings, self.dir = 0, {}, {}, findings_dir

    def add(self, data: bytes, outcome: str, detail: str, origin: str = "") -> None:
        self.inputs += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome in FINDING_KINDS:
            sig = re.sub(r"\d{3,}", "N", f"{outcome}: {detail}")
            f = self.findings.setdefault(sig, {"kind": outcome, "detail": detail, "count": 0, "origin": origin})
            f["count"] += 1
            if "file" not in f:
                self.dir.mkdir(parents=True, exist_ok=True)
                path = self.dir / f"{outcome.replace(' ', '_')}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
                path.write_bytes(data)
                f.update(file=str(path), bytes=len(data))


def run_random(tally: Tally, seconds: float, max_inputs: Optional[int], seed: int, target: str = "decode") -> None:
    from benchmarks.fuzz_inputs import mutate, seeds

    pool = seeds()
    names = sorted(pool)
    r = random.Random(seed)
    worker = Worker(target)
    end = time.monotonic() + seconds
    try:
        for name in names:  # every seed as it is first
            tally.add(pool[name], *worker.run(pool[name])[:2], origin=name)
        while time.monotonic() < end and (max_inputs is None or tally.inputs < max_inputs):
            name = r.choice(names)
            data = mutate(pool[name], r, [pool[n] for n in names])
            tally.add(data, *worker.run(data)[:2], origin=f"mutated {name}")
    finally:
        worker.close()


def run_atheris(tally: Tally, seconds: float, seed: int, work: Path) -> dict:
    """libFuzzer runs in a bounded worker (``--atheris-worker``) until the time is spent; after a finding it
    is restarted on the corpus it grew. The worker writes its outcome counts to ``work/counts.json``."""
    from benchmarks.fuzz_inputs import seeds

    corpus, artifacts = work / "corpus", work / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (corpus / f"seed-{name}").write_bytes(data)
    end, restarts, stats = time.monotonic() + seconds, 0, {"runs": []}
    replay = Worker()
    while (left := int(end - time.monotonic())) > 5:
        counts = work / "counts.json"
        counts.unlink(missing_ok=True)
        args = [sys.executable, "-m", "benchmarks.fuzz", "--atheris-worker", str(counts), str(corpus),
                f"-seed={seed + restarts}", f"-max_total_time={left}", f"-timeout={int(TIME_LIMIT_S)}",
                f"-rss_limit_mb={MEMORY_LIMIT >> 20}", "-max_len=4194304", "-print_final_stats=1",
                f"-artifact_prefix={artifacts}/", "-reload=0"]
        proc = subprocess.run(args, cwd=PROJECT, capture_output=True, text=True, errors="replace")
        done = json.loads(counts.read_text()) if counts.exists() else {"inputs": 0, "outcomes": {}}
        units = re.findall(r"stat::number_of_executed_units: (\d+)", proc.stderr)
        n = max(done["inputs"], int(units[-1]) if units else 0)
        tally.inputs += n
        for k, v in done["outcomes"].items():
            tally.outcomes[k] = tally.outcomes.get(k, 0) + v
        stats["runs"].append({"exit": proc.returncode, "inputs": n, "cov": _last(r"cov: (\d+)", proc.stderr),
                              "corpus": _last(r"corp: (\d+)", proc.stderr)})
        for art in sorted(artifacts.iterdir()):  # each finding replayed in a bounded worker for its detail
            data = art.read_bytes()
            outcome, detail, _ = replay.run(data)
            if outcome not in FINDING_KINDS:  # libFuzzer's own limit (a slow input, RSS), or fixed since
                kind = art.name.split("-")[0]
                detail = f"libFuzzer {kind}; replayed alone in a fresh worker: {outcome} ({detail[:120]})"
                outcome = {"timeout": "hang", "oom": "memory"}.get(kind, "died")
            tally.inputs -= 1  # counted once by the worker already
            tally.add(data, outcome, detail, origin="atheris")
            art.unlink()
        if proc.returncode == 0:
            break
        restarts += 1
    replay.close()
    stats["corpus_files"] = sum(1 for _ in corpus.iterdir())
    return stats


def _last(pattern: str, text: str) -> Optional[int]:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def atheris_worker_main(argv: list[str]) -> None:
    """``--atheris-worker COUNTS [libFuzzer args]``: the libFuzzer loop in this (bounded) process."""
    limit_memory()
    import atheris
    import warnings

    warnings.simplefilter("ignore")
    import cxr_edge.dicom  # noqa: F401  (everything the target runs, imported before instrumenting)
    import cxr_edge.preprocess  # noqa: F401
    from benchmarks.fuzz_inputs import mutate, seeds

    atheris.instrument_all()
    pool = list(seeds().values())
    counts_path, state = Path(argv[0]), {"inputs": 0, "outcomes": {}}

    def save() -> None:
        counts_path.write_text(json.dumps(state))

    def one(data: bytes) -> None:
        outcome, detail = check(data)
        state["inputs"] += 1
        state["outcomes"][outcome] = state["outcomes"].get(outcome, 0) + 1
        if state["inputs"] % 500 == 0 or outcome in FINDING_KINDS:
            save()
        if outcome in FINDING_KINDS:
            raise RuntimeError(f"{outcome}: {detail}")

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        r = random.Random(seed)
        if r.random() < 1 / 3:
            return atheris.Mutate(data, max_size)
        return mutate(data, r, pool, max_size)

    import atexit

    atexit.register(save)
    atheris.Setup([sys.argv[0], *argv[1:]], one, custom_mutator=mutator)
    atheris.Fuzz()


# ------------------------------------------------------------------------------------------- the report


def have_atheris() -> bool:
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


def fuzz(minutes: float, engine: str = "auto", seed: int = 0, max_inputs: Optional[int] = None,
         findings_dir: Path = RESULTS / "fuzz-findings", target: str = "decode") -> dict:
    """Fuzz for ``minutes`` (or ``max_inputs``, random engine); returns the report."""
    engine = ("atheris" if have_atheris() else "random") if engine == "auto" else engine
    tally = Tally(Path(findings_dir))
    t0, extra = time.monotonic(), {}
    if engine == "atheris":
        work = Path(tempfile.mkdtemp(prefix="cxr-edge-fuzz-"))
        try:
            extra = run_atheris(tally, minutes * 60, seed, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        run_random(tally, minutes * 60, max_inputs, seed, target)
    wall = time.monotonic() - t0
    from benchmarks import machine
    from benchmarks.fuzz_inputs import seeds

    return {"command": "python -m benchmarks.fuzz " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
            "engine": engine, "seed": seed, "target": f"cxr_edge.preprocess.load_gray_colour(bytes, {SIZE})",
            "limits": {"seconds_per_input": TIME_LIMIT_S, "address_space_bytes": MEMORY_LIMIT},
            "seeds": len(seeds()), "inputs": tally.inputs, "wall_s": round(wall, 1),
            "inputs_per_s": round(tally.inputs / wall, 1) if wall else None, "outcomes": tally.outcomes,
            "findings": list(tally.findings.values()), **({"atheris": extra} if extra else {}),
            "machine": machine.describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(rep: dict) -> str:
    lines = ["# Fuzzing the decode path", "",
             f"`{rep['command']}` on {rep['machine']['cpu']} ({rep['machine']['usable_cores']} cores, shared), "
             f"{rep['date']}; engine {rep['engine']}, seed {rep['seed']}, {rep['seeds']} seeds; target "
             f"`{rep['target']}`; each input in a worker limited to {rep['limits']['seconds_per_input']:g} s and "
             f"{rep['limits']['address_space_bytes'] >> 20} MiB of address space.", "",
             f"- **{rep['inputs']:,} inputs** in {rep['wall_s'] / 60:.1f} min ({rep['inputs_per_s']} inputs/s)",
             "- outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(rep["outcomes"].items())),
             f"- findings: {len(rep['findings'])}" + ("" if rep["findings"] else " (no crash, hang or memory blow-up)")]
    for f in rep["findings"]:
        lines.append(f"  - {f['kind']} x{f['count']}: {f['detail']} ({f.get('bytes')} bytes, {f.get('origin')})")
    if rep.get("atheris"):
        runs = rep["atheris"]["runs"]
        lines.append(f"- libFuzzer: {len(runs)} run(s), final coverage {runs[-1]['cov']} edges, "
                     f"corpus {rep['atheris']['corpus_files']} files")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[argv.index("--target") + 1] if "--target" in argv else "decode")
        return 0
    if argv[:1] == ["--atheris-worker"]:
        atheris_worker_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-inputs", type=int, help="random engine: stop after this many inputs")
    ap.add_argument("--findings", type=Path, default=RESULTS / "fuzz-findings")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for fuzz.json and fuzz.md")
    args = ap.parse_args(argv)
    rep = fuzz(args.minutes, args.engine, args.seed, args.max_inputs, args.findings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / "fuzz.md").write_text(markdown(rep))
    print(markdown(rep))
    return 1 if rep["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
