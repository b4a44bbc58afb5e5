"""Long films (a whole spine, a long leg, a panoramic dental film): refused by their shape before the model's
square input hides it, with a reason that says so, in every door (Python, CLI, DICOM, the browser's cxr.js)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_edge.classifier import Classifier
from cxr_edge.cli import cli
from cxr_edge.ood import REASONS, Gate

DATA = Path(__file__).parent / "data"
CHILD = DATA / "chest_xray" / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"
ROOT = Path(__file__).resolve().parent.parent
LONG = REASONS["long"]


@pytest.fixture(scope="module")
def clf():
    return Classifier(threads=1)


def _film(tmp_path: Path, width: int, height: int, name: str) -> Path:
    """The child's scan stretched to ``width x height`` (what a long film's proportions are), as PNG."""
    path = tmp_path / name
    Image.open(CHILD).convert("L").resize((width, height), Image.Resampling.BILINEAR).save(path)
    return path


def test_long_films_are_refused_by_shape_and_chest_proportions_are_not(clf, tmp_path):
    wide, tall = _film(tmp_path, 2400, 800, "wide.png"), _film(tmp_path, 500, 1200, "tall.png")
    r = clf.classify(wide)
    assert r.status == "rejected" and r.reason == f"{LONG} (2400x800 pixels, more than 2.2 times as wide as tall)"
    r = clf.classify(tall)
    assert r.status == "rejected" and r.reason == f"{LONG} (500x1200 pixels, more than 2.2 times as tall as wide)"
    for w, h in ((1600, 800), (800, 1000), (1320, 600)):  # 2:1, a portrait film, 2.2:1 exactly: not by shape
        r = clf.classify(_film(tmp_path, w, h, f"{w}x{h}.png"))
        assert not (r.status == "rejected" and r.reason.startswith(LONG)), (w, h, r.to_dict())


def test_shape_is_read_after_exif_orientation_and_bypassed_with_no_ood(clf, tmp_path):
    img = Image.open(CHILD).convert("L").resize((2400, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown 800x2400
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    (tmp_path / "turned.jpg").write_bytes(buf.getvalue())
    r = clf.classify(tmp_path / "turned.jpg")
    assert r.status == "rejected" and r.reason.startswith(f"{LONG} (800x2400 pixels")
    out = CliRunner().invoke(cli, ["classify", "--json", "--no-ood", str(tmp_path / "turned.jpg")])
    assert out.exit_code == 0 and "label" in json.loads(out.output.splitlines()[0])


def test_long_dicom_is_refused_by_shape(clf, tmp_path):
    pytest.importorskip("pydicom")
    from cxr_edge.dicom import gray_to_dicom

    gray = np.asarray(Image.open(CHILD).convert("L").resize((1800, 600)))
    path = tmp_path / "long.dcm"
    path.write_bytes(gray_to_dicom(gray))
    r = clf.classify(path)
    assert r.status == "rejected" and r.reason.startswith(f"{LONG} (1800x600 pixels"), r.to_dict()


def test_card_sets_the_limit():
    assert not Gate({}, {"max_aspect": 1.5}).check_shape(1600, 1000).ok
    assert Gate({}, {}).check_shape(1600, 1000).ok and Gate({}, {}).check_shape(0, 10).ok
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_aspect"):
            Gate({}, {"max_aspect": bad})


@pytest.mark.skipif(shutil.which("node") is None, reason="no node (apt-get install nodejs) for the JavaScript test")
def test_browser_shape_check_says_what_python_says(tmp_path):
    from cxr_edge.bundle import load_bundle
    from cxr_edge.webexport import web_params

    params, _ = web_params(load_bundle())
    sizes = [(2400, 800), (800, 2400), (1320, 600), (1321, 600), (1600, 800), (1, 3), (100, 100)]
    gate = Gate({}, {"max_aspect": params["gate"]["max_aspect"]})
    want = [gate.check_shape(w, h).reason for w, h in sizes]
    script = (f"const m = await import({json.dumps((ROOT / 'cxr_edge' / 'webapp' / 'cxr.js').as_uri())});\n"
              f"const g = {json.dumps(params['gate'])};\n"
              f"console.log(JSON.stringify({json.dumps(sizes)}.map(([w, h]) => m.shapeVerdict(w, h, g).reason)));")
    proc = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert json.loads(proc.stdout) == want and sum(bool(r) for r in want) == 4
