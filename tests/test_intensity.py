"""Input intensity normalisation (``cxr_edge.intensity``): what ``equalize`` does to a film, and that the model
card carries it into every stage (the spec, the bundle, the runtime's model input) or the runtime refuses."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge import BundleError, Classifier
from cxr_edge.bundle import load_bundle
from cxr_edge.intensity import equalize, normalise
from cxr_edge.preprocess import InputSpec, load_gray, to_input
from train.shifts import contrast, gamma


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    return np.stack([load_gray(f, 96) for f in image_files("train")[:6]])


def test_equalize_spreads_levels_and_keeps_their_order(films):
    out = equalize(films)
    assert out.shape == films.shape and out.dtype == np.uint8
    for src, eq in zip(films, out):
        assert eq.min() == 0 and eq.max() == 255
        order = np.argsort(src, axis=None, kind="stable")
        assert np.all(np.diff(eq.ravel()[order].astype(int)) >= 0)  # darker stays darker (or equal)
        hist = np.bincount(eq.ravel(), minlength=256)
        assert hist.max() < 0.05 * eq.size  # no level holds a large share after spreading


def test_equalize_undoes_exposure_changes(films):
    """A gamma or contrast change moves the raw film by many gray levels and its equalised copy by few."""
    for shifted in (gamma(films, 1.5), gamma(films, 0.67), contrast(films, 0.7)):
        raw = np.abs(shifted.astype(int) - films).mean()
        eq = np.abs(equalize(shifted).astype(int) - equalize(films)).mean()
        assert raw > 8 and eq < raw / 4


def test_clipped_equalisation_stretches_a_noisy_flat_region_far_less(films):
    """Half of each image a dark background with faint noise (levels 20..24): plain equalisation spreads those
    five levels over about half of 0..255, the clipped one over a few times their width at most."""
    rng = np.random.default_rng(0)
    img = films.copy()
    img[:, :, :48] = rng.integers(20, 25, img[:, :, :48].shape)
    img[:, :, 48:] = np.maximum(img[:, :, 48:], 40)
    for how, low, high in (("equalize", 80, 255), ("equalize_clip", 1, 5 * 2.5 * 2)):
        out = normalise(img, how)
        spread = out[:, :, :48].max(axis=(1, 2)).astype(int) - out[:, :, :48].min(axis=(1, 2))
        assert np.all((spread >= low) & (spread <= high)), (how, spread)
        assert np.all(out.max(axis=(1, 2)) == 255) and np.all(out.min(axis=(1, 2)) == 0)
    plain = normalise(films, "equalize_clip")
    for src, eq in zip(films, plain):  # still monotone
        order = np.argsort(src, axis=None, kind="stable")
        assert np.all(np.diff(eq.ravel()[order].astype(int)) >= 0)


def test_one_level_image_and_float_input():
    flat = np.full((2, 8, 8), 77, np.uint8)
    np.testing.assert_array_equal(equalize(flat), flat)
    ramp = np.tile(np.arange(0, 64, dtype=np.float32), (64, 1)) * 2.0
    np.testing.assert_array_equal(equalize(ramp), equalize(ramp.astype(np.uint8)))


def test_to_input_applies_the_spec(films):
    spec = InputSpec(96, 1 / 128, -127 / 128, "equalize")
    plain = InputSpec(96, 1 / 128, -127 / 128)
    np.testing.assert_array_equal(to_input(films, spec), to_input(equalize(films), plain))
    assert not np.array_equal(to_input(films, spec), to_input(films, plain))
    np.testing.assert_array_equal(normalise(films, "none"), films)
    with pytest.raises(ValueError, match="unknown intensity"):
        normalise(films, "clahe")


def test_card_round_trip_and_older_cards():
    spec = InputSpec(144, 0.5, -1.0, "equalize")
    assert spec.to_card()["intensity"] == "equalize" and InputSpec.from_card(spec.to_card()) == spec
    plain = InputSpec(144, 0.5, -1.0).to_card()
    assert "intensity" not in plain and InputSpec.from_card(plain).intensity == "none"


@pytest.fixture
def copy(bundle_dir, tmp_path):  # noqa: F811
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _set_intensity(root, value) -> None:
    card = json.loads((root / "card.json").read_text())
    card["input"]["intensity"] = value
    (root / "card.json").write_text(json.dumps(card))


def test_runtime_feeds_the_model_what_the_card_says(copy):
    scan = image_files("test")[0]
    before = Classifier(model=copy, ood=False)
    _set_intensity(copy, "equalize")
    after = Classifier(model=copy, ood=False)
    assert after.spec.intensity == "equalize"
    gray = load_gray(scan, after.spec.size)
    plain_spec = InputSpec(after.spec.size, after.spec.scale, after.spec.offset)
    want = after.engine.run(to_input(equalize(gray), plain_spec))[0]
    got = after.classify(scan).probabilities
    np.testing.assert_allclose([got[k] for k in got], want, atol=1e-3)
    plain = before.classify(scan).probabilities
    assert max(abs(plain[k] - got[k]) for k in got) > 1e-4  # the card changed what the model saw


def test_unknown_intensity_is_refused(copy):
    _set_intensity(copy, "clahe")
    with pytest.raises(BundleError, match="intensity 'clahe'"):
        load_bundle(copy)


def test_models_record_it():
    from train.models import build

    assert build("baseline", input_size=32, intensity="equalize").spec.intensity == "equalize"
    assert build("baseline", input_size=32).spec.intensity == "none"
    with pytest.raises(ValueError):
        build("baseline", input_size=32, intensity="clahe")


def test_web_page_refuses_a_model_it_would_feed_wrongly(copy):
    from cxr_edge.webexport import WebExportError, web_params

    assert web_params(load_bundle(copy))[0]["input"]["size"] > 0
    _set_intensity(copy, "equalize")
    with pytest.raises(WebExportError, match="intensity 'equalize'"):
        web_params(load_bundle(copy))
