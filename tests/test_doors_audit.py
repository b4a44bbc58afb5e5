"""What an audit of the command-line doors found (2026-12-06), each case made here: a named pipe among the
inputs (it hung ``classify`` and ``batch``), a folder that cannot be read (its scans were left out without a
word), results folders that cannot be written or hold a user's file (a traceback, "internal error"), an
object-store listing with a non-UTF-8 name (the job crashed), Pillow's own warnings on stderr, and ``--heatmap``
with an input given twice or a rerun on the folder that holds the overlays."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("pyarrow")

from cxr_edge import batch as batch_mod  # noqa: E402
from cxr_edge.cli import cli  # noqa: E402
from cxr_edge.inputs import Missing, expand_inputs  # noqa: E402
from cxr_edge.preprocess import PreprocessError, load_gray  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SCAN = next((DATA / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))


@pytest.fixture()
def scans(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpeg").write_bytes(SCAN.read_bytes())
    return folder


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_an_error_not_a_hang(scans):
    """Opening a FIFO waits for a writer forever; it is refused before it is opened, in a folder too (with a
    suffix it is listed and gets its error line; without one it is not a scan and is left alone)."""
    os.mkfifo(scans / "pipe.jpg")
    os.mkfifo(scans / "IM0002")
    with pytest.raises(PreprocessError, match=r"^not a regular file"):
        load_gray(scans / "pipe.jpg", 64)
    result = CliRunner().invoke(cli, ["classify", str(scans), "--json"])
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"a.jpeg", "pipe.jpg"} and result.exit_code == 1
    assert rows["pipe.jpg"]["error"].startswith("not a regular file") and "label" in rows["a.jpeg"]


def test_an_unreadable_folder_is_told(scans, monkeypatch):
    """A sub-folder that cannot be listed gives a line of its own; the others are classified. (Made by
    refusing the listing: as root, permissions would not bite.)"""
    locked = scans / "locked"
    locked.mkdir()
    (locked / "b.jpeg").write_bytes(SCAN.read_bytes())
    real = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = expand_inputs((str(scans),))
    assert [f for f in found if isinstance(f, str)] == [str(scans / "a.jpeg")]
    told = [f for f in found if isinstance(f, Missing)]
    assert [(m.path, m.reason) for m in told] == [(str(locked), "cannot read folder (permission denied)")]
    only = expand_inputs((str(locked),))  # the folder named itself: why it gives nothing
    assert [(m.path, m.reason) for m in only] == [(str(locked), "cannot read folder (permission denied)")]


def test_results_folder_that_cannot_be_made_is_a_usage_error(scans, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(cli, ["batch", str(scans), "--out", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 2, result.output
    assert "cannot make the results folder" in result.output and "Traceback" not in result.output


def test_a_users_file_in_the_results_folder_does_not_break_a_rerun(scans, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["batch", str(scans), "--out", str(out)]).exit_code == 0
    (out / "notes.txt").write_text("sent to the PACS on Monday")
    again = CliRunner().invoke(cli, ["batch", str(scans), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "_manifest.json").read_text())["status"]["ok"] + \
        json.loads((out / "_manifest.json").read_text())["status"]["rejected"] == 1


def test_a_shard_that_cannot_be_written_stops_the_job_resumably(scans, tmp_path, monkeypatch):
    import cxr_edge.batch_store as store

    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.pq, "write_table", full)
    with pytest.raises(batch_mod.BatchFailed, match=r"cannot write part-.*No space left on device.*rerun the same"):
        batch_mod.run_batch([str(scans)], tmp_path / "out", workers=1, progress=False, log=lambda m: None)


def test_uri_listing_with_a_name_that_is_not_utf8(scans):
    """A URI cannot name such a file: the folder gets an error row saying so, the other files are listed."""
    Path(os.fsdecode(os.fsencode(str(scans)) + b"/bad\xff.jpeg")).write_bytes(SCAN.read_bytes())
    rows = batch_mod.list_inputs([scans.as_uri()])
    assert [Path(p).name for p, reason in rows if reason is None] == ["a.jpeg"]
    assert [reason for _, reason in rows if reason] == [
        "cannot list 1 file name(s) under it that are not UTF-8; give the folder as a plain path"]


def test_pillows_own_warnings_stay_quiet():
    """A TIFF whose tags Pillow warns about gives our one error line, not Pillow's two-line warning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for path in sorted((DATA / "fuzz").glob("*.tif")):
            try:
                load_gray(path, 64)
            except PreprocessError:
                pass
    assert [str(w.message) for w in seen if "PIL" in (w.filename or "")] == []


def test_heatmap_for_an_input_given_twice_and_a_rerun_on_its_folder(scans):
    hm = scans / "heatmaps"
    twice = CliRunner().invoke(cli, ["classify", str(scans / "a.jpeg"), str(scans / "a.jpeg"), "--json",
                                     "--heatmap", str(hm)])
    rows = [json.loads(line) for line in twice.stdout.splitlines()]
    assert twice.exit_code == 0, twice.output
    assert len(rows) == 2 and rows[0]["heatmap"] == rows[1]["heatmap"] and len(list(hm.iterdir())) == 1
    rerun = CliRunner().invoke(cli, ["classify", str(scans), "--json", "--heatmap", str(hm), "--overwrite"])
    rows = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert rerun.exit_code == 0, rerun.output
    assert [Path(r["path"]).name for r in rows] == ["a.jpeg"]  # its overlay is not an input


def test_ctrl_c_while_a_runtime_loads_is_not_read_as_a_missing_runtime():
    """pybind11 turns a Ctrl-C during a module's initialisation into ImportError("initialization failed") from
    it; read as "not installed", the Ctrl-C was lost and a batch job ran to the end (3 in 70 early Ctrl-Cs)."""
    from cxr_edge.engines import _reraise_interrupt

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise ImportError("initialization failed") from ki
    except ImportError as exc:
        with pytest.raises(KeyboardInterrupt):
            _reraise_interrupt(exc)
    _reraise_interrupt(ImportError("No module named 'onnxruntime'"))  # a missing runtime stays one


def test_ctrl_c_while_a_worker_starts_is_delivered_after_it():
    """A Ctrl-C inside Process.start() left a worker the pool did not know: it is held until the start is done,
    then raised."""
    import signal

    from cxr_edge.batch_local import _sigint_deferred

    reached = False
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            reached = True  # not interrupted inside the block
    assert reached


def test_a_manifest_that_cannot_be_written_stops_the_job_resumably(scans, tmp_path, monkeypatch):
    real = batch_mod._write_json

    def write(path, data):
        if Path(path).name == "_manifest.json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(batch_mod, "_write_json", write)
    with pytest.raises(batch_mod.BatchFailed, match=r"cannot write .*_manifest\.json.*rerun the same command"):
        batch_mod.run_batch([str(scans)], tmp_path / "out", workers=1, progress=False, log=lambda m: None)
    monkeypatch.setattr(batch_mod, "_write_json", real)
    assert batch_mod.run_batch([str(scans)], tmp_path / "out", workers=1, progress=False,
                               log=lambda m: None)["shards_resumed"] >= 1
