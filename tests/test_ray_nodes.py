"""A lost Ray node: a local two-node cluster (``ray start --head --num-cpus 1`` and a second ``ray start
--address ... --num-cpus 1`` with its own temp dir, on this machine), ``cxr-edge batch --ray auto`` over 300
generated scans, and the second node's processes (its raylet, its agents and its actor) killed with SIGKILL
once the job has written a shard and the second node holds a working actor. The job must end with exactly
one row per input, equal to a local-pool run of the same files. The job should finish it itself (the work units
of the lost actor go to the actors left, and a replacement actor is started); if it cannot, the rerun of the
same command must, and the test says which happened.

Every process this test starts is found by its temp dirs and ports (and their descendants) and killed at the
end, whatever happened; ``ray stop`` is never used (it would stop every Ray on this machine). About a minute
on two cores; marked ``ray_nodes`` (``pytest -m "not ray_nodes"`` leaves it out)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from _processes import processes, with_descendants  # noqa: E402
from cxr_edge.batch import run_batch  # noqa: E402

pytestmark = pytest.mark.ray_nodes
DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
BIN = Path(sys.executable).parent
N_SCANS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(marks: list[str]) -> set[int]:
    """Processes whose command line holds one of ``marks`` (a temp dir, ``--port=N``), with their
    descendants (the workers a raylet forks do not name the temp dir)."""
    procs = processes()
    procs.pop(os.getpid(), None)  # never this test itself, nor through it its other children
    return with_descendants({pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in marks)}, procs)


def kill_all(marks: list[str], timeout: float = 15.0) -> set[int]:
    """SIGKILL what ``ours(marks)`` finds until nothing is left; returns what is left (empty)."""
    end = time.monotonic() + timeout
    while (left := ours(marks)) and time.monotonic() < end:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return ours(marks)


def make_scans(folder: Path) -> None:
    """300 scans of 768x640 px (the three official-test scans with a little noise each, so that every file
    differs): enough work (decode, reduce, resize) for the kill to land part-way."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = [np.asarray(Image.open(p).convert("L").resize((768, 640))) for p in sorted((DATA / "test").rglob("*.jpeg"))]
    for i in range(N_SCANS):
        g = base[i % len(base)].astype(np.int16) + rng.integers(-3, 4, base[0].shape)
        Image.fromarray(np.clip(g, 0, 255).astype(np.uint8)).save(folder / f"scan{i:04d}.jpeg", quality=90)


def ray_start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def started(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"{what} did not start: {out[-2000:]}"


def rows(out: Path) -> list[dict]:
    table = pq.read_table(out, columns=["path", "status", "label", "normal", "bacterial", "viral", "error"])
    return sorted(table.to_pylist(), key=lambda r: r["path"])


def test_a_lost_node_loses_no_row(tmp_path):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray command is not installed next to this Python")
    scans, root = tmp_path / "scans", Path(f"/tmp/cxr-ray-{os.getpid()}")  # short: Ray's socket paths
    head_dir, node_dir = root / "head", root / "node2"
    port, client_port = free_port(), free_port()
    marks = [str(root), f"--port={port}", f":{port} ", f"--port={client_port}"]
    # A private cluster without token authentication: since Ray 2.59 ``ray start --head`` turns it on whenever
    # ~/.ray/auth_token exists (``ray.init()`` writes one), and a second ``ray start --address`` then cannot join.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    driver = None
    try:
        started(ray_start(["--head", "--num-cpus", "1", "--port", str(port), "--node-ip-address", "127.0.0.1",
                           "--ray-client-server-port", str(client_port), "--include-dashboard", "false",
                           "--temp-dir", str(head_dir)], env), "the head node")
        node2 = ray_start(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                           "--temp-dir", str(node_dir)], env)
        make_scans(scans)  # while the second node starts
        local = run_batch([str(scans)], tmp_path / "local", workers=1, progress=False, log=lambda m: None)
        assert local["status"]["ok"] == N_SCANS
        started(node2, "the second node")

        out = tmp_path / "ray"
        cmd = [str(BIN / "cxr-edge"), "batch", str(scans), "--out", str(out), "--ray", "auto", "--shard-size", "10"]
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end = time.monotonic() + 120
        while True:  # part-way: a shard written, an actor working on the second node, shards still to come
            node2_procs = processes()
            raylet = [p for p, (_, c) in node2_procs.items() if "raylet" in c and str(node_dir) in c]
            actor = [p for p, (pp, c) in node2_procs.items() if pp in raylet and "RayWorker" in c]
            written = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
            if actor and written >= 1:
                break
            assert driver.poll() is None, f"the job ended before the node could be killed: {driver.stdout.read()}"
            assert time.monotonic() < end, "no actor ever ran on the second node"
            time.sleep(0.1)
        killed = ours([str(node_dir)])
        assert kill_all([str(node_dir)]) == set()
        assert written < N_SCANS // 10, "the job had finished before the kill"

        try:
            log, _ = driver.communicate(timeout=150)
            finished_by = "ray" if driver.returncode == 0 else None
        except subprocess.TimeoutExpired:
            driver.kill()
            log, _ = driver.communicate()
            finished_by = None
        if finished_by is None:  # Ray could not finish it: the same command, on the one node left, must
            rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
            assert rerun.returncode == 0, rerun.stderr[-2000:]
            finished_by, log = "the rerun", rerun.stderr
        print(f"node loss: killed {len(killed)} processes of the second node with {written} of "
              f"{N_SCANS // 10} shards written; finished by {finished_by}")
        assert "300 inputs: 300 ok" in log, log[-2000:]
        got, want = rows(out), rows(tmp_path / "local")
        assert [r["path"] for r in got] == sorted({r["path"] for r in got})  # no duplicates
        assert got == want  # no row lost, labels and probabilities as the local run
        assert (out / "_manifest.json").exists()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        left = kill_all(marks)
        shutil.rmtree(root, ignore_errors=True)
    assert left == set(), f"Ray processes left running: {sorted(left)}"
