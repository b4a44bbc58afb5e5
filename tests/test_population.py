"""The intended-population check (issue 30): adult films are refused as adult, by their DICOM tags or by the
gate's adult class, and classified with a warning only under ``allow_adults``; tinted or annotated films are
not called colour photos."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from cxr_edge.classifier import Classifier
from cxr_edge.cli import cli
from cxr_edge.ood import EMBED_CLASSES, Gate
from cxr_edge.preprocess import load_gray_colour

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402

from cxr_edge.dicom import gray_to_dicom, patient_age  # noqa: E402

DATA = Path(__file__).parent / "data"
CHILD = DATA / "chest_xray" / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"
ADULT_FILMS = sorted((DATA / "gate" / "frontal_chest_other").glob("*.jpg"))
SHARED_ADULTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult_dev"


def _ds(**tags) -> Dataset:
    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("tags, years, source", [
    ({"PatientAge": "034Y"}, 34, "PatientAge 034Y"),
    ({"PatientAge": "018Y"}, 18, "PatientAge 018Y"),
    ({"PatientAge": "017Y"}, 17, "PatientAge 017Y"),
    ({"PatientAge": "006M"}, 0.5, "PatientAge 006M"),
    ({"PatientAge": "012W"}, 12 * 7 / 365.25, "PatientAge 012W"),
    ({"PatientAge": "010D"}, 10 / 365.25, "PatientAge 010D"),
    ({"PatientAge": "034y"}, 34, "PatientAge 034Y"),  # lower case, as some writers do
    ({"PatientBirthDate": "19800101", "StudyDate": "20200101"}, 40.0, "StudyDate"),
    ({"PatientBirthDate": "20180601", "AcquisitionDate": "20200601"}, 2.0, "AcquisitionDate"),
    ({"PatientAge": "34Y", "PatientBirthDate": "19900101", "StudyDate": "20200101"}, 30.0, "StudyDate"),
])
def test_patient_age_forms(tags, years, source):
    age, where = patient_age(_ds(**tags))
    assert age == pytest.approx(years, abs=0.01) and source in where


@pytest.mark.parametrize("tags", [
    {}, {"PatientAge": ""}, {"PatientAge": "34Y"}, {"PatientAge": "ABCY"}, {"PatientAge": "034X"},
    {"PatientAge": "999Y"}, {"PatientBirthDate": "19800101"}, {"PatientBirthDate": "1980", "StudyDate": "20200101"},
    {"PatientBirthDate": "19801341", "StudyDate": "20200101"},  # month 13: not a date
    {"PatientBirthDate": "20200101", "StudyDate": "19800101"},  # taken before birth
])
def test_missing_or_malformed_ages_fall_through(tags):
    assert patient_age(_ds(**tags)) is None


def _dicom(tmp_path: Path, name: str, **tags) -> Path:
    gray = np.asarray(Image.open(CHILD).convert("L"))
    path = tmp_path / name
    path.write_bytes(gray_to_dicom(gray, **tags))
    return path


@pytest.fixture(scope="module")
def clf():
    return Classifier(threads=1)


@pytest.fixture(scope="module")
def adult_clf():
    return Classifier(threads=1, allow_adults=True)


def test_dicom_adult_refused_by_its_tags_and_classified_with_a_warning_when_allowed(tmp_path, clf, adult_clf):
    adult = _dicom(tmp_path, "adult.dcm", PatientAge="034Y")
    child = _dicom(tmp_path, "child.dcm", PatientAge="004Y")
    by_dates = _dicom(tmp_path, "dates.dcm", PatientBirthDate="19700312", StudyDate="20250101")
    refused = clf.classify(adult)
    assert refused.status == "rejected" and refused.reason.startswith("adult patient (PatientAge 034Y)")
    assert "children" in refused.reason
    assert clf.classify(by_dates).reason.startswith("adult patient (PatientBirthDate 19700312, StudyDate 20250101)")
    ok = clf.classify(child)
    assert ok.status == "ok" and not ok.warning and "warning" not in ok.to_dict()
    allowed = adult_clf.classify(adult)
    assert allowed.status == "ok" and allowed.warning.startswith("adult patient (PatientAge 034Y)")
    assert allowed.to_dict()["warning"] == allowed.warning
    assert allowed.label == ok.label and allowed.probabilities == ok.probabilities  # the same pixels, same pass


def test_cli_allow_adults_shows_the_warning_in_json_csv_and_table(tmp_path):
    adult = _dicom(tmp_path, "adult.dcm", PatientAge="052Y")
    out = tmp_path / "r.csv"
    runner = CliRunner()
    refused = runner.invoke(cli, ["classify", "--json", str(adult)])
    assert refused.exit_code == 0 and json.loads(refused.stdout)["status"] == "rejected"
    res = runner.invoke(cli, ["classify", "--json", "--allow-adults", "--csv", str(out), str(adult)])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["status"] == "ok" and record["warning"].startswith("adult patient (PatientAge 052Y)")
    assert "adult patient" in out.read_text().splitlines()[1]
    table = runner.invoke(cli, ["classify", "--allow-adults", str(adult)])
    assert "warning: adult patient (PatientAge 052Y)" in table.output


def _adult_gate(threshold: float = 0.0) -> Gate:
    """The four-class head on logits = e[:4], and the adult check on e[4] (adult score = e[4] - 1)."""
    k = len(EMBED_CLASSES)
    w = np.zeros((k + 1, k))
    w[np.arange(k), np.arange(k)] = 1.0
    aw = np.zeros(k + 1)
    aw[k] = 1.0
    arrays = {"emb_mean": np.zeros(k + 1), "emb_scale": np.ones(k + 1), "emb_weights": w, "emb_bias": np.zeros(k),
              "adult_weights": aw, "adult_bias": np.float64(-1.0)}
    return Gate(arrays, {"embedding": {"classes": list(EMBED_CLASSES), "threshold": threshold,
                                       "adult": {"threshold": 0.5}}})


def test_gate_adult_check_refuses_as_adult_and_warns_under_allow_adults():
    gate = _adult_gate()
    assert gate.knows_adults
    adult = np.array([6.0, 0, 0, 0, 4.0])  # a frontal chest film (head), an adult's (score 3.0 > 0.5)
    v = gate.check_embedding(adult)
    assert not v.ok and v.reason.startswith("adult chest X-ray (adult score 3.00 > 0.50)") and "children" in v.reason
    w = gate.check_embedding(adult, allow_adults=True)
    assert w.ok and w.warning.startswith("adult chest X-ray") and "less reliable" in w.warning
    lateral = adult.copy()
    lateral[EMBED_CLASSES.index("lateral_chest")] = 9.0  # an adult's lateral view is still a lateral view
    for allow in (False, True):
        v = gate.check_embedding(lateral, allow_adults=allow)
        assert not v.ok and v.reason.startswith("lateral view (")
    child = np.array([6.0, 0, 0, 0, 1.2])  # adult score 0.2 <= 0.5
    assert gate.check_embedding(child).ok and not gate.check_embedding(child, allow_adults=True).warning
    assert not gate.check_embedding(np.array([6.0, 0, 0, 0, np.nan])).ok  # a broken score is not waved through
    with pytest.raises(ValueError, match="adult check"):
        Gate({"emb_mean": np.zeros(5), "emb_scale": np.ones(5), "emb_weights": np.zeros((5, 4)), "emb_bias": np.zeros(4),
              "adult_weights": np.zeros(3), "adult_bias": np.float64(0)},
             {"embedding": {"classes": list(EMBED_CLASSES), "threshold": 0.0, "adult": {"threshold": 0.5}}})


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_tinted_and_annotated_films_are_not_colour_photos():
    gate = Gate({}, {"max_colour_fraction": 0.10})  # the default gate's pixel checks
    g = Image.open(CHILD).convert("L")
    sepia = Image.merge("RGB", [g.point(lambda v: min(255, v + 25)), g.point(lambda v: v + 8), g.point(
        lambda v: int(v * 0.8))])
    arrows = g.convert("RGB")
    d = ImageDraw.Draw(arrows)
    w, h = arrows.size
    for k in range(3):
        d.line([(w * (0.2 + 0.25 * k), h * 0.2), (w * (0.3 + 0.25 * k), h * 0.35)], fill=(255, 0, 0), width=w // 90)
    d.text((w * 0.1, h * 0.9), "RLL consolidation", fill=(0, 255, 0))
    yy, xx = np.mgrid[0:300, 0:400]
    photo = Image.fromarray(np.stack([xx * 255 // 400, yy * 255 // 300, 150 + 0 * xx], -1).astype(np.uint8))
    for img in (sepia, arrows):
        gray, colour = load_gray_colour(_png(img), 144)
        assert colour < 0.10 and gate.check_pixels(gray, colour).ok, colour
    gray, colour = load_gray_colour(_png(photo), 144)
    v = gate.check_pixels(gray, colour)
    assert not v.ok and v.reason.startswith("colour photo")


def test_shipped_gate_refuses_shipped_adult_films_as_adult_and_keeps_children(clf, adult_clf):
    assert clf.gate is not None and clf.gate.knows_adults, "the shipped gate has no adult check"
    results = list(clf.classify_many(ADULT_FILMS))
    assert all(r.status == "rejected" and r.reason.startswith("adult chest X-ray") for r in results), \
        [(Path(r.path).name, r.to_dict().get("reason")) for r in results]
    allowed = list(adult_clf.classify_many(ADULT_FILMS))
    assert all(r.status == "ok" and r.warning.startswith("adult chest X-ray") for r in allowed)
    children = sorted((DATA / "chest_xray").rglob("*.jpeg"))
    assert all(r.status == "ok" and not r.warning for r in clf.classify_many(children))


@pytest.mark.skipif(not SHARED_ADULTS.is_dir(), reason="../shared/data/adult_dev is absent")
def test_shipped_gate_on_adult_dev_with_annotations_gives_the_adult_reason(clf):
    """adult_dev trained the gate, so this is a guard, not a measure (benchmarks cross-validate): its films,
    also with coloured arrows burned in, are refused as adult, never as a colour photo or a lateral view."""
    files = sorted(SHARED_ADULTS.rglob("*.png"))[:12]
    blobs = []
    for f in files:
        img = Image.open(f).convert("RGB")
        d = ImageDraw.Draw(img)
        d.line([(300, 300), (420, 420)], fill=(255, 40, 40), width=8)
        d.text((60, 960), "L", fill=(255, 255, 0))
        blobs.append(_png(img))
    for f, r in zip(files + files, list(clf.classify_many(files)) + list(clf.classify_many(blobs))):
        assert r.status == "rejected" and r.reason.startswith("adult chest X-ray"), (f.name, r.to_dict())
