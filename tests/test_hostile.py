"""Hostile and broken inputs: each is one line on stderr naming the file, exit status 1, the rest of the batch
still classified; and a fuzz test that ``load_gray`` raises nothing but PreprocessError on arbitrary bytes."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge.preprocess import PreprocessError, load_gray

REPO = Path(__file__).resolve().parent.parent


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (its pixel data is a few bytes): Pillow's
    decompression-bomb check must stop it at the header."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def hostile_files(root: Path) -> dict[str, str]:
    """File name -> a fragment its error message must contain."""
    scan = image_files("test")[0].read_bytes()
    small = io.BytesIO()
    Image.new("L", (31, 400), 100).save(small, "PNG")
    files = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpeg": (scan[: len(scan) // 2], "truncated"),
        "random.jpg": (np.random.default_rng(0).bytes(4096), "not an image"),
        "page.jpg": (b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>",
                     "not an image"),
        "bomb.png": (png_with_size(40_000, 40_000), "too large"),
        "bomb_warning.png": (png_with_size(11_000, 11_000), "too large"),  # over the limit, under twice it
        "tiny.png": (small.getvalue(), "smaller than 32"),
        "header_only.jpeg": (scan[:200], "truncated"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: fragment for name, (_, fragment) in files.items()}


def test_each_hostile_file_is_one_line_and_the_batch_goes_on(bundle_dir, tmp_path):
    expected = hostile_files(tmp_path)
    good = image_files("test")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "classify", str(tmp_path), *map(str, good),
                           "--json", "--model", str(bundle_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 120  # no hang on the bombs
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert all(ln.startswith("cxr-edge: ") for ln in proc.stderr.splitlines()), proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(expected) + len(good)
    for name, fragment in expected.items():
        row = by_name[name]
        assert set(row) == {"path", "error"}, row
        assert fragment in row["error"].lower(), (name, row["error"])
        lines = [ln for ln in proc.stderr.splitlines() if name in ln]
        assert len(lines) == 1 and lines[0].startswith(f"cxr-edge: error: {tmp_path / name}: ")
    for f in good:
        assert "label" in by_name[f.name]


def test_hostile_files_in_the_table_mode(bundle_dir, tmp_path):
    hostile_files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "classify", str(tmp_path), str(image_files("test")[0]),
                           "--model", str(bundle_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 2  # header + the good scan
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("cxr-edge: error:")]) == 8


def test_decompression_bomb_warning_becomes_an_error(monkeypatch):
    """A real scan just over a (lowered) pixel limit: Pillow only warns; we refuse, and leave the warning
    filters as they were."""
    scan = image_files("test")[0]
    with Image.open(scan) as img:
        pixels = img.size[0] * img.size[1]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(pixels * 0.75))
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        with pytest.raises(PreprocessError, match="too large"):
            load_gray(scan)
    assert warnings.filters == before
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels * 4)
    assert load_gray(scan).shape == (224, 224)


def test_directory_and_missing_file():
    with pytest.raises(PreprocessError, match="is a directory"):
        load_gray(str(REPO / "tests"))
    with pytest.raises(PreprocessError, match="no such file"):
        load_gray("/no/such/file.jpg")


# --- fuzzing ------------------------------------------------------------------------------------------------

def _seed_images() -> list[bytes]:
    """Small real images in several formats: the fuzzer mutates these."""
    with Image.open(image_files("train")[0]) as img:
        base = img.convert("L").resize((48, 40))
    seeds = []
    for fmt, mode in [("JPEG", "L"), ("PNG", "L"), ("PNG", "I;16"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "CMYK"), ("WEBP", "RGB"), ("PNG", "RGBA")]:
        buf = io.BytesIO()
        img = base.convert("I").convert(mode) if mode == "I;16" else base.convert(mode)
        try:
            img.save(buf, fmt)
        except (OSError, KeyError):  # a codec missing from this Pillow build
            continue
        seeds.append(buf.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "header" and len(data) > 32:  # hit the size / mode fields of the header
            i = draw(st.integers(0, 31))
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


def _only_preprocess_error(data: bytes) -> None:
    try:
        out = load_gray(data, 64)
    except PreprocessError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert out.shape == (64, 64) and out.dtype == np.uint8


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _only_preprocess_error(data)


@FUZZ
@given(mutated_images())
def test_fuzz_mutated_images(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow may warn about odd metadata; only exceptions matter here
        _only_preprocess_error(data)


@FUZZ
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                        b"RIFF\x00\x00\x00\x00WEBP", b"\x00" * 128 + b"DICM",
                        b"\x08\x00\x05\x00CS", b"\x08\x00\x16\x00\x1a\x00\x00\x00"]),  # bare DICOM data sets
       st.binary(max_size=1024))
@example(b"\x08\x00\x16\x00\x1a\x00\x00\x00", b"\x00\n\x01")  # a SOP class UID with a line break in it
def test_fuzz_magic_then_garbage(magic, tail):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _only_preprocess_error(magic + tail)
