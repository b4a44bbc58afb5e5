"""``cxr-edge batch`` (cxr_edge/batch.py): records equal ``cxr-edge classify --json``, in local and Ray mode;
a job killed with SIGKILL and rerun ends with exactly one row per input, equal to an uninterrupted run.

Uses the embedded default bundle (no TensorFlow). One local Ray instance (``ray.init(num_cpus=2)``) serves
the whole module."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from _processes import processes, with_descendants  # noqa: E402
from cxr_edge import batch as batch_mod  # noqa: E402
from cxr_edge.batch import BatchError, run_batch  # noqa: E402
from cxr_edge.cli import cli  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bad")
    real = (DATA / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg").read_bytes()
    (d / "truncated.jpeg").write_bytes(real[:600])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image\n")
    rng = np.random.default_rng(0)  # a colour photo-like image: the default bundle's gate rejects it
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(d / "colour.png")
    return {p.name: str(p) for p in d.iterdir()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bad_files) -> Path:
    """About 250 distinct scans (crops, sizes, rotations, JPEG qualities and PNGs of the test images, so a
    row given to the wrong path would show) plus the bad files."""
    d = tmp_path_factory.mktemp("corpus")
    bases = [Image.open(p).convert("L") for p in sorted(DATA.rglob("*.jpeg"))]
    for k in range(27):
        sub = d / f"batch{k % 3}"
        sub.mkdir(exist_ok=True)
        for b, img in enumerate(bases):
            w, h = img.size
            m = 0.02 * (k % 5)
            im = img.crop((int(w * m), int(h * m * 0.5), w - int(w * m * 0.5), h - int(h * m)))
            im = im.rotate((k % 7) - 3, resample=Image.BILINEAR).resize((160 + 8 * k, 150 + 7 * k))
            name = sub / f"scan_{b}_{k:02d}"
            if k % 4 == 0:
                im.save(f"{name}.png")
            else:
                im.save(f"{name}.jpeg", quality=70 + k)
    for name, path in bad_files.items():
        (d / name).write_bytes(Path(path).read_bytes())
    return d


def cli_records(args: list[str]) -> dict:
    res = CliRunner().invoke(cli, ["classify", "--json", *args])
    assert res.exit_code in (0, 1), res.output
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["path"]: r for r in recs}


def as_cli_record(row: dict, like: dict) -> dict:
    """A batch row in the shape of ``cxr-edge classify --json`` (keys as in ``like``, the CLI's record)."""
    model = {"name": row["model_name"], "version": row["model_version"], "sha256": row["model_sha256"]}
    rec = {"path": row["path"]}
    if row["status"] == "error":
        rec["error"] = row["error"]
    elif row["status"] == "rejected":
        rec.update(status="rejected", reason=row["reason"], model=model)
    else:
        rec.update(label=row["label"], model=model,
                   probabilities={c: row[c] for c in ("normal", "bacterial", "viral")})
        if "status" in like:
            rec["status"] = "ok"
    return rec


def read_rows(out: Path) -> list[dict]:
    rows = pq.read_table(out).to_pylist()
    return sorted(rows, key=lambda r: r["path"])


def test_ray_and_local_equal_cli(tmp_path, ray_session, bad_files, monkeypatch):
    # As on a multi-node cluster: the driver ships the bundle's files to the actors.
    monkeypatch.setattr(batch_mod, "_single_node", lambda: False)
    sources = [str(DATA), bad_files["truncated.jpeg"], bad_files["notes.jpg"], bad_files["colour.png"],
               str(tmp_path / "nothing" / "*.jpeg")]
    expected = cli_records(sources)
    assert len(expected) == 13

    out = tmp_path / "ray"
    summary = run_batch(sources, out, ray="local", workers=2, progress=False, log=lambda m: None)
    rows = read_rows(out)
    assert [r["path"] for r in rows] == sorted(expected)  # one row per input, same paths as the CLI prints
    for row in rows:
        assert as_cli_record(row, expected[row["path"]]) == expected[row["path"]], row["path"]
        if row["status"] != "error" or Path(row["path"]).is_file():
            st = os.stat(row["path"])
            assert row["size"] == st.st_size
            assert int(row["mtime"].timestamp() * 1e6) == st.st_mtime_ns // 1000
    statuses = {r["path"]: r["status"] for r in rows}
    assert statuses[bad_files["truncated.jpeg"]] == statuses[bad_files["notes.jpg"]] == "error"
    assert statuses[str(tmp_path / "nothing" / "*.jpeg")] == "error"
    assert summary["status"] == {s: list(statuses.values()).count(s) for s in ("ok", "rejected", "error")}
    assert summary["status"]["ok"] == 9
    assert summary["worker_cpu_s"] > 0  # the actors report their CPU time
    assert (out / "_manifest.json").exists()

    # Local mode (a process pool, no Ray), with file:// URIs for three of the scans: the same rows.
    uri = (DATA / "test").resolve().as_uri()
    local = tmp_path / "local"
    run_batch([*sources, uri], local, workers=2, progress=False, log=lambda m: None)
    by_path = {r["path"]: r for r in read_rows(local)}
    assert {p: r for p, r in by_path.items() if not p.startswith("file://")} == {r["path"]: r for r in rows}
    uris = {p: r for p, r in by_path.items() if p.startswith("file://")}
    assert len(uris) == 3
    for p, r in uris.items():
        same = by_path[p[len("file://"):]]  # DATA is absolute: the plain path of the same file
        assert {k: v for k, v in r.items() if k != "path"} == {k: v for k, v in same.items() if k != "path"}

    # A rerun of a finished job does nothing and changes nothing; another job in the same folder is refused.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = run_batch(sources, out, ray="local", workers=2, progress=False, log=lambda m: None)
    assert again["shards_written"] == 0 and again["classified_now"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before
    with pytest.raises(BatchError, match="different input list"):
        run_batch(sources[:2], out, progress=False, log=lambda m: None)
    with pytest.raises(BatchError, match="different gate setting"):
        run_batch(sources, out, ood=False, progress=False, log=lambda m: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(BatchError, match="not a cxr-edge batch output"):
        run_batch(sources, tmp_path / "other", progress=False, log=lambda m: None)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"

    # The CLI: the same job again gives exit status 0 and the one-line summary.
    res = CliRunner().invoke(cli, ["batch", *sources, "--out", str(out), "--ray", "local"])
    assert res.exit_code == 0, res.output
    assert "13 inputs: 9 ok" in res.stderr and "0 written" in res.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actor processes through /proc")
def test_a_ray_actor_killed_part_way_loses_no_row(tmp_path, corpus, ray_session, monkeypatch):
    # An actor's process killed (as the OOM killer would) once the first rows are in: its queued units go
    # back to the queue, a replacement actor starts, and the job ends with every row, as the local pool's.
    killed: list[int] = []

    class KillOnce(batch_mod._Collector):
        def add(self, rows):
            if not killed:
                procs = processes()
                actors = [pid for pid in with_descendants({os.getpid()}, procs) - {os.getpid()}
                          if "RayWorker" in procs[pid][1]]
                assert len(actors) == 2, actors
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
            super().add(rows)

    local = tmp_path / "local"
    run_batch([str(corpus)], local, workers=2, shard_size=8, progress=False, log=lambda m: None)
    monkeypatch.setattr(batch_mod, "_Collector", KillOnce)
    summary = run_batch([str(corpus)], tmp_path / "ray", ray="local", workers=2, shard_size=8, progress=False,
                        log=lambda m: None)
    assert killed and not Path(f"/proc/{killed[0]}").exists()
    assert summary["classified_now"] == summary["inputs"] > 240
    assert read_rows(tmp_path / "ray") == read_rows(local)  # none lost, none twice, the same labels
    assert (tmp_path / "ray" / "_manifest.json").exists()


def test_a_ray_worker_that_cannot_load_the_model_stops_the_job(tmp_path, ray_session, monkeypatch):
    # The bundle shipped to the actors is damaged (one byte of the model changed): every actor's constructor
    # fails, and the job must stop at once with that error in one line, not start replacements or wait.
    from cxr_edge import batch_ray

    real = batch_ray._bundle_files

    def damaged(root):
        files = real(root)
        files["model.tflite"] = files["model.tflite"][:-1] + bytes([files["model.tflite"][-1] ^ 1])
        return files

    monkeypatch.setattr(batch_mod, "_single_node", lambda: False)
    monkeypatch.setattr(batch_ray, "_bundle_files", damaged)
    t0 = time.monotonic()
    with pytest.raises(batch_mod.BatchFailed) as info:
        run_batch([str(DATA)], tmp_path / "out", ray="local", workers=2, progress=False, log=lambda m: None)
    msg = str(info.value)
    assert "could not load the model" in msg and "sha256" in msg and "\n" not in msg, msg
    assert "rerun the same command" in msg
    assert time.monotonic() - t0 < 60
    assert not list((tmp_path / "out").glob("part-*"))


def test_ray_missing_gives_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_mod, "have_ray", lambda: False)
    res = CliRunner().invoke(cli, ["batch", str(DATA), "--out", str(tmp_path / "o"), "--ray", "auto"])
    assert res.exit_code == 2
    assert 'pip install "cxr-edge[ray]"' in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_sigkill_then_rerun_is_exactly_once(tmp_path, corpus, ray_session):
    n = len(batch_mod.list_inputs([str(corpus)]))
    assert n > 240
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cxr_edge", "batch", str(corpus), "--out", str(killed), "--workers", "2",
           "--shard-size", "8"]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its worker processes, part-way
    proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    shards = -(-n // 8)
    parts = {p.name: p.stat().st_mtime_ns for p in killed.glob("part-*.parquet")}
    assert 3 <= len(parts) < shards, err  # killed part-way, after some shards were committed
    assert not (killed / "_manifest.json").exists()
    # Whatever a reader finds is whole shards only: partial files stay under .tmp/, which readers skip.
    assert all(pq.read_metadata(killed / name).num_rows == 8 for name in parts)
    assert pq.read_table(killed).num_rows == 8 * len(parts)

    # Rerun (local mode, same arguments): finishes the job without redoing the committed shards.
    resumed = run_batch([str(corpus)], killed, workers=2, shard_size=8, progress=False, log=lambda m: None)
    assert resumed["shards_resumed"] == len(parts)
    assert resumed["worker_cpu_s"] > 0  # the local workers (forked by a fork server) report their CPU time
    assert resumed["shards_written"] == shards - len(parts)
    assert {name: (killed / name).stat().st_mtime_ns for name in parts} == parts
    rows = read_rows(killed)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == n
    assert paths == [p for p, _ in batch_mod.list_inputs([str(corpus)])]

    # An uninterrupted run (Ray mode) gives the same rows.
    clean = tmp_path / "clean"
    summary = run_batch([str(corpus)], clean, ray="local", workers=2, shard_size=8, progress=False,
                        log=lambda m: None)
    assert read_rows(clean) == rows
    assert summary["status"]["error"] == 3 and summary["status"]["rejected"] >= 1
    ok = [(r["normal"], r["viral"]) for r in rows if r["status"] == "ok"]
    # distinct scans, mostly distinct answers (an int8 model's outputs are coarse, so some coincide): a row
    # given to another path would show in the comparison with the clean run above
    assert len(ok) > 150 and len(set(ok)) > 0.6 * len(ok)


def test_sources_list_file_and_stable_shards(tmp_path):
    listing = tmp_path / "scans.txt"
    test_dir = DATA / "test"
    listing.write_text(f"# scans to do\n{DATA / 'train' / 'NORMAL'}\n\n{test_dir}/PNEUMONIA/*.jpeg\n"
                       f"{tmp_path / 'gone.jpeg'}\n{DATA / 'train' / 'NORMAL' / 'IM-0115-0001.jpeg'}\n")
    items = batch_mod.list_inputs([str(listing), str(test_dir / "NORMAL")])
    paths = [p for p, _ in items]
    assert paths == sorted(set(paths)) and len(paths) == 6  # the duplicate listed twice counts once
    assert dict(items)[str(tmp_path / "gone.jpeg")] is None  # a missing file: the classifier reports it
    assert str(test_dir / "PNEUMONIA" / "person100_bacteria_477.jpeg") in paths
    # Shards depend only on the set of inputs, not on the order of the arguments.
    again = batch_mod.list_inputs([str(test_dir / "NORMAL"), str(listing)])
    a, b = batch_mod.Plan(items, 4), batch_mod.Plan(again, 4)
    assert a.digest == b.digest and [a.part_name(i) for i in range(2)] == [b.part_name(i) for i in range(2)]
    assert a.part_name(0) != a.part_name(1)


def test_work_units_shrink_toward_the_end():
    for n, workers in ((624, 1), (624, 2), (250, 2), (13, 2), (1, 4), (100_000, 16)):
        sizes = batch_mod.unit_sizes(n, workers)
        assert sum(sizes) == n and all(s >= 1 for s in sizes) and max(sizes) <= 64
        assert sizes == batch_mod.unit_sizes(n, workers)  # deterministic
        if workers > 1 and n > 64 * workers:
            # the last units are small: the workers run out of work within a few images of each other
            assert max(sizes[-2 * workers:]) <= batch_mod.MIN_UNIT
    assert set(batch_mod.unit_sizes(624, 1)[:-1]) == {64}  # one worker: no need for small units


def test_uri_folder_listing_keeps_uid_named_and_suffixless_files(tmp_path):
    """Object-store listings are not read file by file: files named as DICOM exports name them (no suffix, a
    UID) are listed, and a non-image among them becomes an error row instead of a silent skip."""
    for name in ("a.jpeg", "IM0001", "1.2.840.113619.2.55.3.211", "notes.txt", "table.csv", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    listed = {Path(p).name for p, reason in batch_mod.list_inputs([tmp_path.as_uri()]) if reason is None}
    assert listed == {"a.jpeg", "IM0001", "1.2.840.113619.2.55.3.211"}


def test_an_undecodable_file_name_is_an_error_row_not_a_failed_job(tmp_path):
    """Parquet holds text: a file whose name is not UTF-8 becomes an error row with its name escaped, and the
    job still completes with every other file classified."""
    src = DATA / "test" / "NORMAL"
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.jpeg"
    good.write_bytes(next(src.glob("*.jpeg")).read_bytes())
    bad = os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.jpeg")
    Path(bad).write_bytes(good.read_bytes())
    summary = run_batch([str(folder)], tmp_path / "out", workers=1, progress=False, log=lambda m: None)
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == {str(good), f"{folder}/bad\\udcff.jpeg"}
    assert rows[str(good)]["status"] in ("ok", "rejected")
    assert rows[f"{folder}/bad\\udcff.jpeg"]["status"] == "error"
    assert rows[f"{folder}/bad\\udcff.jpeg"]["error"] == batch_mod.UNDECODABLE_NAME
    assert summary["status"]["error"] == 1
