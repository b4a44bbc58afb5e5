"""The shared preprocessing on real scans, in every image mode it promises to handle."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from _runtime_fixtures import image_files
from cxr_edge.preprocess import (MIN_SIDE, InputRejected, InputSpec, PreprocessError, load_gray, load_gray_colour,
                                  preprocess, reduction_factor, to_input)

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
        "I16_shifted.png": (Image.fromarray(arr.astype(np.uint16) << 8), {}),  # widened by a shift
        "I16_14bit.png": (Image.fromarray(arr.astype(np.uint16) << 6), {}),  # 14-bit detector content
        "I16_10bit.png": (Image.fromarray(arr.astype(np.uint16) << 2), {}),  # 10-bit content
        "LA.png": (scan.convert("LA"), {}),
    }


EXPECTED_MODE = {"L.png": "L", "RGB.png": "RGB", "RGBA.png": "RGBA", "CMYK.tif": "CMYK", "P.png": "P",
                 "I16.png": "I;16", "I16_12bit.png": "I;16", "I16_shifted.png": "I;16",
                 "I16_14bit.png": "I;16", "I16_10bit.png": "I;16", "LA.png": "LA"}
# Mean |difference| from the 8-bit L original, in gray levels: lossless modes match exactly (16-bit ones
# whether widened by scaling or by shifting: preprocess.high_bits); a 256-colour adaptive palette quantizes a
# little. (1-bit images are refused:
# test_one_bit_image_is_refused.)
TOLERANCE = {"P.png": 2.0}


@pytest.mark.parametrize("name", list(EXPECTED_MODE))
def test_every_mode_gives_the_same_gray(scan, reference, tmp_path, name):
    img, kw = _variants(scan)[name]
    path = _save(img, tmp_path / name, **kw)
    with Image.open(path) as check:
        assert check.mode == EXPECTED_MODE[name]  # the file really is in that mode
    out, _ = load_gray_colour(path, SIZE)  # the runtime's call (it also measures colour)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    assert _mad(out, reference) <= TOLERANCE.get(name, 0.0)


def test_transparent_pixels_become_black(scan, tmp_path):
    rgba = Image.merge("RGB", [scan] * 3)
    alpha = Image.new("L", scan.size, 255)
    w = scan.size[0]  # the middle third fully transparent (a band at the edge would be trimmed as a flat border)
    alpha.paste(0, (w // 3, 0, 2 * w // 3, scan.size[1]))
    rgba.putalpha(alpha)
    out = load_gray(_save(rgba, tmp_path / "alpha.png"), SIZE)
    assert out[:, SIZE // 3 + 4: 2 * SIZE // 3 - 4].max() == 0
    assert out[:, : SIZE // 3 - 4].mean() > 30 and out[:, 2 * SIZE // 3 + 4:].mean() > 30


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


def test_a_jpeg_and_a_png_of_the_same_pixels_give_the_same_array(tmp_path):
    """The reduction does not depend on the decoder: a JPEG and a PNG of its decoded pixels give the same
    array, bit for bit, also when the scan is big enough to be reduced first (an enlarged scan at 224, the
    originals at 64)."""
    with Image.open(image_files("test")[0]) as img:
        big = img.convert("L").resize((img.size[0] * 2, img.size[1] * 2), Image.Resampling.BICUBIC)
    jpeg = _save(big, tmp_path / "big.jpeg", quality=90)
    cases = [(jpeg, 224)] + [(f, 64) for f in image_files("test")]
    for path, size in cases:
        with Image.open(path) as img:
            assert reduction_factor(*img.size, size) > 1
            png = _save(img.convert("L"), tmp_path / "same.png", compress_level=1)
        assert np.array_equal(load_gray(path, size), load_gray(png, size)), (path, size)


@pytest.mark.parametrize("w, h, size, want", [(224, 224, 224, 1), (447, 1000, 224, 1), (448, 1000, 224, 2),
                                              (895, 900, 224, 2), (896, 900, 224, 4), (1266, 1044, 224, 4),
                                              (2900, 2000, 224, 8), (4000, 4000, 224, 16), (1000, 700, 64, 8)])
def test_reduction_factor(w, h, size, want):
    # the largest power of two that leaves both sides at least the target (KEEP = 1), never less
    assert reduction_factor(w, h, size) == want == reduction_factor(h, w, size)
    assert min(w, h) // want >= size
    assert min(w, h) // (2 * want) < size


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


# --- one answer whatever the container ----------------------------------------------------------------------

FORMAT_TOL = 0.02  # max |probability difference| from the original JPEG, through the shipped model


@pytest.mark.parametrize("jpeg, upscale", [(image_files("test")[0], 1), (image_files("test")[2], 2)],
                         ids=lambda v: getattr(v, "name", f"x{v}"))
def test_every_container_gives_the_same_probabilities(jpeg, upscale, tmp_path):
    """The same scan as baseline JPEG, progressive JPEG, 8-bit PNG, 16-bit PNG (scaled, shifted), palette PNG,
    RGBA PNG, TIFF and DICOM (8-bit, 12-bit):
    the same reduction whatever the decoder, so the shipped model's probabilities agree within FORMAT_TOL."""
    from cxr_edge import Classifier
    from cxr_edge.labels import CLASS_NAMES

    pytest.importorskip("pydicom")  # the [dicom] extra; part of [test]
    from benchmarks.latency import containers

    files = containers(jpeg, tmp_path, upscale)  # the benchmark's own set of containers
    assert "DICOM" in files and len(files) == 11
    if upscale > 1:
        with Image.open(files["baseline JPEG"]) as img:
            assert reduction_factor(*img.size, 224) > 1  # this one takes the reduction (DCT vs Image.reduce)
    clf = Classifier(ood=False)
    results = dict(zip(files, clf.classify_many(list(files.values()))))
    probs = {k: np.array([r.probabilities[c] for c in CLASS_NAMES]) for k, r in results.items()}
    for name, p in probs.items():
        if name == "baseline JPEG q95":  # the progressive JPEG's lossy twin (as in the benchmark): a reference,
            continue  # new pixels rather than a container of the same ones
        ref = probs["baseline JPEG q95" if name == "progressive JPEG" else "baseline JPEG"]
        assert np.abs(p - ref).max() <= FORMAT_TOL, (name, p, ref)


def test_palette_images_read_like_their_gray_pixels():
    """Palette PNGs and GIFs (what some exporters and converters write) read as their pixels: a gray palette
    gives exactly the gray image's array, a coloured one is seen in colour."""
    with Image.open(image_files("test")[0]) as img:
        gray = img.convert("L").resize((300, 280))
    as_png = io.BytesIO()
    gray.save(as_png, "PNG")
    ref = load_gray(as_png.getvalue(), 64)
    for fmt in ("PNG", "GIF"):
        buf = io.BytesIO()
        gray.convert("P").save(buf, fmt)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            assert back.mode == "P"
        pixels, chroma = load_gray_colour(buf.getvalue(), 64)
        assert np.array_equal(pixels, ref) and chroma == 0.0, fmt
    tinted = Image.merge("RGB", (gray, gray.point(lambda x: x // 3), gray.point(lambda x: 255 - x)))
    buf = io.BytesIO()
    tinted.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    assert load_gray_colour(buf.getvalue(), 64)[1] > 0.5


def test_one_bit_image_is_refused():
    """A black-and-white (1-bit) picture of a scan has no gray levels to read: refused, not classified."""
    with Image.open(image_files("test")[0]) as img:
        bilevel = img.convert("L").resize((300, 280)).convert("1")
    buf = io.BytesIO()
    bilevel.save(buf, "PNG")
    with pytest.raises(InputRejected, match="1-bit"):
        load_gray(buf.getvalue())
