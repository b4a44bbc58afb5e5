"""The shared preprocessing on real scans, in every image mode it promises to handle."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from _runtime_fixtures import image_files
from cxr_edge.preprocess import (DRAFT_FACTOR, DRAFT_TOLERANCE, MIN_SIDE, InputSpec, PreprocessError, load_gray,
                                 preprocess, to_input)

SIZE = 128


@pytest.fixture(scope="module")
def scan() -> Image.Image:
    """A real chest X-ray as 8-bit L, reduced to keep the tests quick (not square, so squashing shows)."""
    with Image.open(image_files("test")[0]) as img:
        return img.convert("L").resize((300, 260), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def reference(scan, tmp_path_factory) -> np.ndarray:
    path = tmp_path_factory.mktemp("ref") / "scan_L.png"
    scan.save(path)
    return load_gray(path, SIZE).astype(np.int16)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _variants(scan: Image.Image) -> dict:
    arr = np.asarray(scan)
    rgb = Image.merge("RGB", [scan] * 3)
    rgba = rgb.copy()
    rgba.putalpha(255)
    return {
        "L.png": (scan, {}),
        "RGB.png": (rgb, {}),
        "RGBA.png": (rgba, {}),
        "CMYK.tif": (rgb.convert("CMYK"), {}),
        "P.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), {}),
        "I16.png": (Image.fromarray(arr.astype(np.uint16) * 257), {}),  # full 16-bit range
        "I16_12bit.png": (Image.fromarray(arr.astype(np.uint16) * 16), {}),  # 12-bit content
        "LA.png": (scan.convert("LA"), {}),
        "1bit.png": (scan.convert("1"), {}),
    }


EXPECTED_MODE = {"L.png": "L", "RGB.png": "RGB", "RGBA.png": "RGBA", "CMYK.tif": "CMYK", "P.png": "P",
                 "I16.png": "I;16", "I16_12bit.png": "I;16", "LA.png": "LA", "1bit.png": "1"}
# Mean |difference| from the 8-bit L original, in gray levels: lossless modes match exactly (up to the
# rounding of 12-bit -> 8-bit); a 256-colour adaptive palette quantizes a little; 1-bit is dithered.
TOLERANCE = {"P.png": 2.0, "I16_12bit.png": 1.0, "1bit.png": 40.0}


@pytest.mark.parametrize("name", list(EXPECTED_MODE))
def test_every_mode_gives_the_same_gray(scan, reference, tmp_path, name):
    img, kw = _variants(scan)[name]
    path = _save(img, tmp_path / name, **kw)
    with Image.open(path) as check:
        assert check.mode == EXPECTED_MODE[name]  # the file really is in that mode
    out = load_gray(path, SIZE)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    assert _mad(out, reference) <= TOLERANCE.get(name, 0.5)


def test_transparent_pixels_become_black(scan, tmp_path):
    rgba = Image.merge("RGB", [scan] * 3)
    alpha = Image.new("L", scan.size, 255)
    alpha.paste(0, (0, 0, scan.size[0] // 2, scan.size[1]))  # left half fully transparent
    rgba.putalpha(alpha)
    out = load_gray(_save(rgba, tmp_path / "alpha.png"), SIZE)
    assert out[:, : SIZE // 2 - 4].max() == 0
    assert out[:, SIZE // 2 + 4:].mean() > 30


def test_exif_orientation_rotates(tmp_path):
    # 160x96, top half white, bottom half black; EXIF orientation 6 = "rotate 90 deg clockwise to view".
    img = Image.new("L", (160, 96), 0)
    img.paste(255, (0, 0, 160, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(img, tmp_path / "rot6.jpg", exif=exif.tobytes(), quality=95)
    plain = _save(img, tmp_path / "plain.jpg", quality=95)
    out, ref = load_gray(tagged, 64).astype(float), load_gray(plain, 64).astype(float)
    # Unrotated: bright on top. Rotated clockwise: the top lands on the right.
    assert ref[:28].mean() > 200 and ref[36:].mean() < 50
    assert out[:, 36:].mean() > 200 and out[:, :28].mean() < 50
    upright = load_gray(_save(img.transpose(Image.Transpose.ROTATE_270), tmp_path / "r.png"), 64)
    assert _mad(out, upright) < 3.0


@pytest.mark.parametrize("path", image_files("test"), ids=lambda p: p.name)
@pytest.mark.parametrize("size", [224, 64])
def test_jpeg_draft_is_close_to_full_decode(path, size):
    with Image.open(path) as img:
        full_size = img.size
        img.draft("L", (DRAFT_FACTOR * size, DRAFT_FACTOR * size))
        reduced = img.size != full_size
    if size == 64:
        assert reduced  # the full-resolution originals really take the draft path at small sizes
    fast = load_gray(path, size, draft=True)
    full = load_gray(path, size, draft=False)
    assert _mad(fast, full) < DRAFT_TOLERANCE


@pytest.mark.parametrize("size", [224, 64, 32])
def test_output_shape_and_dtype(size):
    for f in image_files("train")[:2] + image_files("test")[:1]:
        out = load_gray(f, size)
        assert out.shape == (size, size) and out.dtype == np.uint8


def test_sources_agree(scan, tmp_path):
    path = _save(scan, tmp_path / "s.png")
    a = load_gray(path, SIZE)
    b = load_gray(path.read_bytes(), SIZE)
    c = load_gray(str(path), SIZE)
    d = load_gray(scan, SIZE)
    for other in (b, c, d):
        assert np.array_equal(a, other)


def test_to_input_scaling():
    spec = InputSpec(size=4, scale=1 / 127.5, offset=-1.0)
    gray = np.array([[0, 64, 128, 255]] * 4, np.uint8)
    x = to_input(gray, spec)
    assert x.shape == (1, 4, 4, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, :, 0], np.array([0, 64, 128, 255]) / 127.5 - 1.0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == pytest.approx(1.0)
    batch = to_input(np.stack([gray, 255 - gray]), InputSpec(size=4))
    assert batch.shape == (2, 4, 4, 1)
    np.testing.assert_allclose(batch[1, 0, 0, 0], 1.0)
    with pytest.raises(ValueError):
        to_input(gray, InputSpec(size=8))


def test_preprocess_is_load_then_scale():
    spec = InputSpec(size=96, scale=0.0078125, offset=-0.9921875)
    f = image_files("train")[0]
    np.testing.assert_array_equal(preprocess(f, spec), to_input(load_gray(f, 96), spec))


def test_input_spec_card_round_trip():
    spec = InputSpec(size=160, scale=0.5, offset=-3.0)
    assert InputSpec.from_card(spec.to_card()) == spec


def test_too_small_is_refused():
    buf = io.BytesIO()
    Image.new("L", (MIN_SIDE - 1, 200), 128).save(buf, "PNG")
    with pytest.raises(PreprocessError, match="smaller than"):
        load_gray(buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (MIN_SIDE, MIN_SIDE), 128).save(buf, "PNG")
    assert load_gray(buf.getvalue(), 64).shape == (64, 64)
