"""A chest film turned or inverted is refused with its true reason (``cxr_edge.reorient``), through the shipped
model and gate, on the shipped scans; other refusals keep theirs, and the upright scans pay no extra pass."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from _runtime_fixtures import image_files
from cxr_edge import Classifier, reorient
from cxr_edge.engines import EngineError

TURNS = {"clockwise": Image.Transpose.ROTATE_270, "counterclockwise": Image.Transpose.ROTATE_90,
         "upside down": Image.Transpose.ROTATE_180}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clf():
    return Classifier(threads=1)


@pytest.fixture(scope="module")
def scans():
    return [Image.open(f).convert("L") for f in image_files("train")[:3] + image_files("test")[:2]]


def test_views_are_the_quarter_turns_and_the_negative():
    g = np.arange(16, dtype=np.uint8).reshape(4, 4)
    for k, _, _ in reorient.VIEWS:
        np.testing.assert_array_equal(reorient.view(g, k), 255 - g if k is None else np.rot90(g, k))


@pytest.mark.parametrize("way", sorted(TURNS))
def test_a_turned_chest_film_is_refused_as_turned(clf, scans, way):
    got = list(clf.classify_many([_png(s.transpose(TURNS[way])) for s in scans]))
    assert all(r.status == "rejected" for r in got), [r.to_dict() for r in got]
    turned = [r for r in got if r.reason.startswith("turned film (")]
    assert len(turned) >= len(scans) - 1, [r.reason for r in got]  # the gate may miss one, never give another turn
    assert all(f"a frontal chest X-ray {way if way == 'upside down' else 'turned 90 degrees ' + way};" in r.reason
               for r in turned), [r.reason for r in turned]


def test_a_negative_is_refused_as_inverted(clf, scans):
    got = list(clf.classify_many([_png(ImageOps.invert(s)) for s in scans]))
    assert [r.reason.split(" (")[0] for r in got] == ["inverted image"] * len(scans), [r.to_dict() for r in got]


def test_upright_and_mirrored_films_are_labelled_without_another_pass(clf, scans, monkeypatch):
    calls = []
    real = clf.predict_full
    monkeypatch.setattr(clf, "predict_full", lambda g, engine=None: calls.append(len(g)) or real(g, engine))
    got = list(clf.classify_many([_png(s) for s in scans] + [_png(ImageOps.mirror(s)) for s in scans]))
    assert [r.status for r in got] == ["ok"] * (2 * len(scans))
    assert sum(calls) == 2 * len(scans)  # the first pass only: no question flagged them, no view was run


def test_other_refusals_keep_their_reason(clf, tmp_path):
    """A radiograph of another body part, a colour photo and an image with no contrast: the views of the first
    are not accepted either, and the others never reach the model."""
    from pathlib import Path

    other = sorted((Path(__file__).parent / "data" / "gate" / "non_chest_radiograph").iterdir())[0]
    yy, xx = np.mgrid[0:300, 0:400]
    photo = Image.fromarray(np.stack([xx * 255 // 400, yy * 255 // 300, 150 + 0 * xx], -1).astype(np.uint8))
    blank = Image.new("L", (300, 300), 128)
    got = list(clf.classify_many([other, _png(photo), _png(blank)]))
    assert [r.status for r in got] == ["rejected"] * 3
    assert [r.reason.split(" (")[0] for r in got] == ["another body part", "colour photo", "blank image"]


def test_a_failing_second_pass_leaves_the_first_reason(clf, scans, monkeypatch):
    first = clf.classify(_png(scans[0].transpose(Image.Transpose.ROTATE_90)))
    real, calls = clf.predict_full, []

    def failing(g, engine=None):
        calls.append(len(g))
        if len(calls) > 1:  # the views' pass, after the first
            raise EngineError("the runtime failed")
        return real(g, engine)

    monkeypatch.setattr(clf, "predict_full", failing)
    got = clf.classify(_png(scans[0].transpose(Image.Transpose.ROTATE_90)))
    assert got.status == "rejected" and not got.reason.startswith("turned film")
    assert first.reason.startswith("turned film") and got.score == pytest.approx(first.score) and len(calls) == 2


def _moved(gate, **changes):
    """A copy of ``gate`` with thresholds moved: ``emb_threshold``, or a question's (``updown=-1e9``)."""
    import copy

    g = copy.copy(gate)
    g.questions = dict(gate.questions)
    for key, value in changes.items():
        if key in g.questions:
            g.questions[key] = (*g.questions[key][:2], value)
        else:
            setattr(g, key, value)
    return g


def test_a_reason_needs_its_question_to_agree(clf, scans):
    """A turned film whose thumbnail question does not flag it keeps the head's reason, though its view would
    pass; an upside-down one whose half turn passes is refused as upside down only while its question agrees."""
    from cxr_edge.preprocess import load_gray

    gate = clf.gate
    if not {"updown", "sideways"} <= set(gate.questions):
        pytest.skip("the shipped gate has no turn questions")
    turned = [np.rot90(load_gray(_png(s), clf.spec.size), 1) for s in scans]  # a quarter turn counterclockwise
    embed = lambda g: gate.embedding_of(clf.predict_full(g)[2])  # noqa: E731
    why, _ = reorient.explain(gate, turned, [], [], embed)
    assert sum(w is not None and "counterclockwise" in w for w in why) >= len(scans) - 1, why
    why, _ = reorient.explain(_moved(gate, sideways=1e9), turned, [], [], embed)
    assert why == [None] * len(scans)


def test_a_view_that_still_reads_as_turned_gives_no_reason(clf, scans):
    """The wrong quarter turn of a film on its side leaves it upside down, and the updown question flags that
    view; a view any question flags gives no reason, however well the head scores it (here every view is
    flagged, so no turned film gets a reason, while the shipped gate gives each its own turn)."""
    from cxr_edge.preprocess import load_gray

    gate = clf.gate
    if not {"updown", "sideways"} <= set(gate.questions):
        pytest.skip("the shipped gate has no turn questions")
    turned = [np.rot90(load_gray(_png(s), clf.spec.size), 1) for s in scans]  # a quarter turn counterclockwise
    wrong = [reorient.view(g, 1) for g in turned]  # turned on the same way: upside down
    assert sum("updown" in gate.flags(g) for g in wrong) >= len(scans) - 1
    embed = lambda g: gate.embedding_of(clf.predict_full(g)[2])  # noqa: E731
    loose = _moved(gate, emb_threshold=1e9, adult_threshold=1e9)  # every view passes after the model
    why, _ = reorient.explain(loose, turned, [], [], embed)
    assert all(w is not None and "counterclockwise" in w for w in why), why
    why, _ = reorient.explain(_moved(loose, updown=-1e9), turned, [], [], embed)  # every view flagged upside down
    assert why == [None] * len(scans), why


def test_the_upside_down_question_needs_the_half_turn_better(clf, scans):
    """For accepted inputs: an upright film flagged by the question (its threshold moved below every score)
    stays accepted, its half turn scoring worse; a film upside down that the head accepts (its threshold moved
    above every score) is refused as upside down, its half turn scoring better; never when the question is off."""
    from cxr_edge.preprocess import load_gray

    gate = clf.gate
    if "updown" not in gate.questions:
        pytest.skip("the shipped gate has no upside-down question")
    up = [load_gray(_png(s), clf.spec.size) for s in scans]
    down = [np.rot90(g, 2) for g in up]
    embed = lambda g: gate.embedding_of(clf.predict_full(g)[2])  # noqa: E731
    score = lambda gs: list(gate.embedding_scores(embed(np.stack(gs)))[0])  # noqa: E731
    assert not any("updown" in gate.flags(g) for g in up) and sum("updown" in gate.flags(g) for g in down) >= len(down) - 1
    flag_all = _moved(gate, updown=-1e9)
    assert reorient.explain(flag_all, [], up, score(up), embed)[1] == [None] * len(up)
    loose = _moved(flag_all, emb_threshold=1e9, adult_threshold=1e9)
    _, turned = reorient.explain(loose, [], down, score(down), embed)
    assert turned == ["turned film (a frontal chest X-ray upside down; rotate it upright)"] * len(down)
    assert reorient.explain(_moved(loose, updown=1e9), [], down, score(down), embed)[1] == [None] * len(down)


def test_orientation_benchmark_targets():
    """``benchmarks.orientation``'s two targets read its counts: each kind of turned film at >= 95% with the true
    reason, and no other image given either reason."""
    from benchmarks import orientation

    kinds = {name: {"n": 100, "expected": "x", ("true_reason" if want else "labelled"): 100, "outcomes": {}}
             for name, _, want in orientation.KINDS}
    res = {"split": "val", "kinds": kinds, "others": {"n": 193, "given_turned_or_inverted": []}}
    assert [t["met"] for t in orientation.targets(res)] == [True, True]
    kinds["upside_down"]["true_reason"] = 94
    res["others"]["given_turned_or_inverted"] = [["horse.png", "non_radiograph", "turned film (...)"]]
    rows = orientation.targets(res)
    assert [t["met"] for t in rows] == [False, False] and "upside_down 94/100" in rows[0]["measured"]
    assert "horse.png" in rows[1]["measured"] and rows[0]["target"].startswith("input gate: validation scans")
    assert "| upside_down | x | 94/100 |" in "\n".join(orientation.markdown(res))
