"""Flat borders (collimation, letterboxing, a scanner's edge) are trimmed before the squash
(``cxr_edge.pixels.flat_border_box`` inside ``cxr_edge.preprocess``): a film with them gives nearly the image of
the film without them, in every container, and what is not a flat border (the chest's dark air, a mid-gray frame,
noise) stays. ``tests/test_web_export.py`` holds the browser runtime to the same pixels."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from _runtime_fixtures import image_files
from cxr_edge import Classifier
from cxr_edge.pixels import MAX_TRIM, flat_border_box
from cxr_edge.preprocess import load_gray

SIZE = 144


def _film(i: int = 0) -> np.ndarray:
    return np.asarray(Image.open(image_files("test")[i]).convert("L"))


def _framed(film: np.ndarray, level: int, margins=(0.08, 0.05)) -> np.ndarray:
    """``film`` inside a flat frame of ``level``: ``margins`` (left and right, top and bottom) of the result."""
    h, w = film.shape
    mx, my = round(w * margins[0] / (1 - 2 * margins[0])), round(h * margins[1] / (1 - 2 * margins[1]))
    out = np.full((h + 2 * my, w + 2 * mx), level, np.uint8)
    out[my:my + h, mx:mx + w] = film
    return out


def _jpeg(arr: np.ndarray, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


@pytest.mark.parametrize("level", [0, 255])
def test_a_framed_film_gives_the_films_own_image(level):
    """Black collimation or a white frame, saved as a noisy JPEG: the model's image is within a few gray levels of
    the bare film's; squashed with its frame it would be many times further off."""
    film = _film()
    framed = _framed(film, level)
    got, want = load_gray(_jpeg(framed), SIZE), load_gray(_jpeg(film), SIZE)
    squashed = np.asarray(Image.fromarray(framed).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    assert _mad(got, want) < 3.0
    assert _mad(squashed, want) > 4 * _mad(got, want)


def test_the_shipped_model_reads_a_collimated_film_as_the_film():
    """The shipped classifier on the shipped test films, bare and inside black collimation borders: same label,
    probabilities within 0.1 (squashed with its borders, the viral film is called normal)."""
    clf = Classifier(threads=1)
    for i in range(len(image_files("test"))):
        film = _film(i)
        a, b = clf.classify(_jpeg(film, 92)), clf.classify(_jpeg(_framed(film, 0), 92))
        assert a.ok and b.ok and a.label == b.label
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 0.1


def test_what_is_not_a_flat_border_stays():
    """Shipped films (their dark air and the body's edges), a mid-gray frame, and a dark frame with noise of more
    than the flat range are not trimmed."""
    for f in image_files("train") + image_files("test"):
        gray = np.asarray(Image.open(f).convert("L"))
        top, bottom, left, right = flat_border_box(gray)
        assert max(top, bottom) <= 0.02 * gray.shape[0] and max(left, right) <= 0.02 * gray.shape[1], f.name
    film = _film()
    assert flat_border_box(_framed(film, 128)) == (0, 0, 0, 0)
    rng = np.random.default_rng(0)
    noisy = _framed(film, 0)
    noisy[noisy == 0] = rng.integers(0, 40, int((noisy == 0).sum()))
    assert flat_border_box(noisy)[:2] == (0, 0)


def test_exact_box_and_its_limit():
    """The box is the frame's own width on each side, and never more than ``MAX_TRIM`` of a side, even for an
    image that is flat almost everywhere."""
    rng = np.random.default_rng(1)
    core = rng.integers(40, 200, (100, 160), np.uint8)
    img = np.zeros((130, 200), np.uint8)
    img[10:110, 25:185] = core
    img[:10] = 250
    assert flat_border_box(img) == (10, 20, 25, 15)
    mostly_flat = np.full((300, 200), 7, np.uint8)
    mostly_flat[140:160, 90:110] = core[:20, :20]
    assert flat_border_box(mostly_flat) == (int(300 * MAX_TRIM),) * 2 + (int(200 * MAX_TRIM),) * 2


def test_the_same_framed_pixels_in_every_container_give_the_same_image(tmp_path):
    """Trimming works on the decoded 8-bit pixels: an 8-bit PNG, a 16-bit PNG of a 12-bit detector and a TIFF of
    one framed film give one array."""
    framed = _framed(_film(), 0)
    framed16 = (framed.astype(np.int64) * 4095 // 255).astype(np.uint16)
    out = []
    for name, arr in (("f.png", framed), ("f16.png", framed16), ("f.tiff", framed)):
        Image.fromarray(arr).save(tmp_path / name)
        out.append(load_gray(tmp_path / name, SIZE))
    assert all(np.array_equal(out[0], o) for o in out[1:])
