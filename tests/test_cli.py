"""The ``cxr-edge`` command line: output formats, exit codes, batches with bad files."""
from __future__ import annotations

import csv
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from _runtime_fixtures import DATA, bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge.cli import cli
from cxr_edge.labels import CLASS_NAMES

REPO = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six real scans in nested folders, plus one corrupt JPEG and a non-image file that is skipped."""
    root = tmp_path / "scans"
    for f in image_files("train"):
        dst = root / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    good = image_files("train")[0].read_bytes()
    (root / "NORMAL" / "corrupt.jpeg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not a scan")
    return root


def check_result(obj: dict, card: dict, backend: str = "tflite") -> None:
    # a bundle with a non-CXR gate adds "status": "ok" to accepted inputs
    assert set(obj) - {"status"} == {"path", "label", "probabilities", "model"}
    assert obj.get("status", "ok") == "ok" and ("status" in obj) == ("ood" in card)
    assert obj["label"] in CLASS_NAMES
    probs = obj["probabilities"]
    assert list(probs) == list(CLASS_NAMES)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in probs.values())
    assert abs(sum(probs.values()) - 1.0) < 0.02
    assert obj["label"] == max(probs, key=probs.get)
    assert obj["model"] == {"name": card["name"], "version": card["version"],
                            "sha256": card["files"][backend]["sha256"]}


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_json_lines_schema(bundle_dir, backend):
    card = json.loads((bundle_dir / "card.json").read_text())
    result = run("classify", DATA, "--json", "--model", bundle_dir, "--backend", backend, "--threads", 1)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    files = sorted(str(p) for p in DATA.rglob("*.jpeg"))
    assert sorted(r["path"] for r in rows) == files
    for row in rows:
        check_result(row, card, backend)
    assert result.stderr == ""


def test_directory_with_one_corrupt_file(bundle_dir, folder):
    result = run("classify", folder, "--json", "--model", bundle_dir)
    assert result.exit_code == 1
    rows = jsonl(result.stdout)
    assert len(rows) == 7  # six scans + the corrupt one; notes.txt is not an image file
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 1 and errors[0]["path"].endswith("corrupt.jpeg")
    assert set(errors[0]) == {"path", "error"}
    assert all("label" in r for r in rows if "error" not in r)
    err_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cxr-edge: error:")]
    assert len(err_lines) == 1 and "corrupt.jpeg" in err_lines[0] and "truncated" in err_lines[0]
    assert "Traceback" not in result.output


def test_table_output(bundle_dir, monkeypatch):
    # relative paths: the table shortens paths over 80 characters, and a checkout's location must not matter
    root, bundle_dir = image_files("test")[0].parents[1], Path(bundle_dir).resolve()
    monkeypatch.chdir(root)
    files = [f.relative_to(root) for f in image_files("test")]
    result = run("classify", *files, "--model", bundle_dir)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PATH", "LABEL", "NORMAL", "BACTERIAL", "VIRAL"]
    assert len(lines) == 1 + len(files)
    for f, line in zip(files, lines[1:]):
        cells = line.split()
        assert cells[0] == str(f) and cells[1] in CLASS_NAMES
        probs = [float(c) for c in cells[2:]]
        assert len(probs) == 3 and abs(sum(probs) - 1) < 0.03


def test_globs_and_missing_inputs(bundle_dir):
    pattern = str(DATA / "train" / "**" / "*virus*.jpeg")
    result = run("classify", pattern, "--json", "--model", bundle_dir)
    assert result.exit_code == 0, result.output
    assert len(jsonl(result.stdout)) == 2
    result = run("classify", pattern, str(DATA / "nope" / "*.jpeg"), "/no/such/scan.jpg", "--json",
                 "--model", bundle_dir)
    assert result.exit_code == 1
    rows = jsonl(result.stdout)
    assert len(rows) == 4
    assert rows[2] == {"path": str(DATA / "nope" / "*.jpeg"), "error": "no files match this pattern"}
    assert rows[3] == {"path": "/no/such/scan.jpg", "error": "no such file"}
    assert len(result.stderr.strip().splitlines()) == 3  # two error lines and the summary


def test_csv_and_refusal_to_overwrite(bundle_dir, folder, tmp_path):
    out = tmp_path / "out.csv"
    result = run("classify", folder, "--csv", out, "--model", bundle_dir)
    assert result.exit_code == 1  # the corrupt file
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(r["label"] in CLASS_NAMES for r in good)
    assert all(abs(sum(float(r[c]) for c in CLASS_NAMES) - 1) < 0.02 for r in good)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("corrupt.jpeg") and not bad[0]["label"]
    before = out.read_bytes()

    refused = run("classify", image_files("test")[0], "--csv", out, "--model", bundle_dir, "--json")
    assert refused.exit_code == 2
    assert "exists" in refused.stderr and "--overwrite" in refused.stderr
    assert refused.stdout == ""  # refused before any work
    assert out.read_bytes() == before

    again = run("classify", image_files("test")[0], "--csv", out, "--overwrite", "--model", bundle_dir)
    assert again.exit_code == 0
    assert len(list(csv.DictReader(out.open()))) == 1


@pytest.mark.parametrize("args", [
    ["classify"],                                   # no PATH
    ["classify", "x.jpg", "--backend", "tensorrt"],
    ["classify", "x.jpg", "--threads", "0"],
    ["classify", "x.jpg", "--no-such-option"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(args):
    result = run(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_bad_model_path_is_a_usage_error(tmp_path):
    result = run("classify", image_files("test")[0], "--model", tmp_path)
    assert result.exit_code == 2 and "not a model bundle" in result.stderr


def test_info(bundle_dir, monkeypatch):
    card = json.loads((bundle_dir / "card.json").read_text())
    result = run("info", "--model", bundle_dir / "card.json")
    assert result.exit_code == 0, result.output
    assert card["name"] in result.stdout and card["version"] in result.stdout
    assert result.stdout.count("sha256 ok") == 2
    as_json = run("info", "--model", bundle_dir, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == card
    for mode, said in (("unfused", True), ("fused", False)):  # the ONNX int8 kernels this CPU gets (cxr_edge.cpu)
        monkeypatch.setenv("CXR_EDGE_ONNX_INT8", mode)
        out = run("info", "--model", bundle_dir).stdout
        assert ("run unfused on this CPU" in out) is said, out


def test_no_progress_bar_when_stderr_is_not_a_terminal(bundle_dir, tmp_path):
    src = image_files("train")[0]
    for i in range(25):
        shutil.copy(src, tmp_path / f"scan{i:02d}.jpeg")
    result = run("classify", tmp_path, "--json", "--model", bundle_dir)
    assert result.exit_code == 0
    assert len(jsonl(result.stdout)) == 25 and result.stderr == ""


def test_real_entry_point_bad_file(bundle_dir, tmp_path):
    """Through ``python -m cxr_edge`` (the console script's ``main``): one line per bad file, no traceback."""
    bad = tmp_path / "page.jpg"
    bad.write_text("<!doctype html><html><body>404</body></html>")
    good = image_files("test")[0]
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "classify", str(bad), str(good), "--json",
                           "--model", str(bundle_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    rows = jsonl(proc.stdout)
    assert rows[0] == {"path": str(bad), "error": "not an image Pillow can read"}
    assert rows[1]["path"] == str(good) and "label" in rows[1]
    assert "Traceback" not in proc.stderr
    assert f"cxr-edge: error: {bad}: not an image Pillow can read" in proc.stderr.splitlines()
    version = subprocess.run([sys.executable, "-m", "cxr_edge", "--version"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and "cxr-edge" in version.stdout


def test_progress_bar_when_stderr_is_a_terminal(bundle_dir, tmp_path):
    pty = pytest.importorskip("pty")
    import os

    src = image_files("train")[0]
    for i in range(25):
        shutil.copy(src, tmp_path / f"scan{i:02d}.jpeg")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cxr_edge", "classify", str(tmp_path), "--json",
                                 "--model", str(bundle_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert len(jsonl(out.decode())) == 25  # stdout stays clean JSON Lines
    assert b"classifying" in b"".join(chunks)


def test_shipped_model_labels_the_shipped_scans_through_the_cli():
    """``cxr-edge classify --json`` with the embedded default model on tests/data: the labels are the
    model's (8 of the 9 scans right; see test_engines), not a schema-shaped stub."""
    from _runtime_fixtures import label_of

    result = run("classify", DATA, "--json", "--threads", 2)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert len(rows) == 9
    right = [CLASS_NAMES.index(r["label"]) == label_of(Path(r["path"])) for r in rows]
    assert sum(right) >= 8, rows
    assert {r["label"] for r in rows} == set(CLASS_NAMES)


def test_an_internal_error_has_its_own_exit_status_and_says_it_is_a_bug(monkeypatch, capsys):
    from cxr_edge import cli as cli_mod
    from cxr_edge.classifier import Classifier

    def broken(self, paths):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(Classifier, "classify_many", broken)
    monkeypatch.delenv("CXR_EDGE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_mod.main(["classify", str(image_files("test")[0])])
    assert exit_info.value.code == cli_mod.EXIT_INTERNAL == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "bug" in err and "ZeroDivisionError: simulated bug" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_odd_file_names_stay_one_line_and_do_not_break_the_csv(bundle_dir, tmp_path):
    """A line break in a file name, and bytes that are not text in the file system's encoding, are shown with
    escapes: every error is still one line naming the file, the table one row per file, and --csv (which
    used to fail the whole run on the undecodable name) writes every row."""
    scan = image_files("test")[0].read_bytes()
    broken = tmp_path / "new\nline.jpg"
    broken.write_bytes(b"not an image")
    undecodable = os.fsdecode(os.fsencode(str(tmp_path)) + b"/scan\xff.jpg")
    Path(undecodable).write_bytes(scan)
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "classify", str(broken), undecodable, "--csv", str(out),
                           "--model", str(bundle_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert f"cxr-edge: error: {tmp_path}/new\\nline.jpg: not an image Pillow can read" in proc.stderr.splitlines()
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith(str(tmp_path))]
    assert len(table) == 1 and table[0].split()[0] == f"{tmp_path}/scan\\udcff.jpg"
    import csv
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(broken), f"{tmp_path}/scan\\udcff.jpg"]
    assert rows[0]["status"] == "error" and rows[1]["status"] in ("ok", "rejected")


_BLAS_PROBE = r"""
import contextlib, io, json, sys
import numpy  # noqa: F401  (loads the BLAS library)
from threadpoolctl import threadpool_info
blas = lambda: sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
before = blas()
from cxr_edge import Classifier
Classifier()  # a program that imports the runtime keeps its own BLAS threads
library = blas()
if sys.argv[1] == "cli":
    from cxr_edge.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["info", "--json"])
else:  # what a batch worker process does first
    from cxr_edge.batch import ModelArgs
    ModelArgs(None, "tflite", 1, True).classifier()
print(json.dumps({"before": before, "library": library, "after": blas()}))
"""


@pytest.mark.parametrize("entry", ["cli", "batch worker"])
def test_own_processes_run_blas_on_one_thread(entry):
    """The command line and batch workers cap numpy's BLAS pool at one thread (their lanes and workers use
    the cores; OpenBLAS' busy-waiting pools made `cxr-edge batch --workers 2` 2-11x slower on 2 cores);
    importing the runtime into another program changes nothing."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}  # a pool to cap, on any machine
    out = subprocess.run([sys.executable, "-c", _BLAS_PROBE, entry], capture_output=True, text=True, env=env,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    if not got["before"]:
        pytest.skip("numpy reports no BLAS thread pool here")
    assert got["before"] == got["library"] == [2]
    assert got["after"] == [1]
