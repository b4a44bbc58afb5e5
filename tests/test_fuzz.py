"""The decode path's fuzzer (``benchmarks/fuzz.py``): a short seeded run finds nothing; the harness catches
each kind of finding (an exception, memory past the limit, a hang, a dead worker); and every input the long
runs found (``tests/data/fuzz/``) now gives the project's own one-line error, quickly, in the same bounded
worker that found it."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import fuzz
from benchmarks.fuzz_inputs import mutate, seeds
from cxr_edge.preprocess import PreprocessError, load_gray

REGRESSIONS = Path(__file__).resolve().parent / "data" / "fuzz"
# file -> a fragment of its error: what each crashed, hung or aborted on before its fix
FOUND = {
    "gdcm-abort-jpeg-64-bits-allocated.dcm": "64 bits allocated",  # GDCM: C++ exception, process aborted
    "gdcm-abort-corrupt-jpeg.dcm": "cannot decode DICOM pixel data",  # GDCM again, on corrupt JPEG data
    "overlapping-strips.tif": "strips overlap",  # Pillow read 1.27 million pieces: 1.6 s (over 5 s fuzzed)
    "rational-strip-size.tif": "cannot decode image",  # TypeError in the check made for the one above
}


@pytest.fixture(scope="module")
def worker():
    w = fuzz.Worker()
    yield w
    w.close()


def test_every_regression_file_is_listed_and_refused_quickly(worker):
    assert sorted(p.name for p in REGRESSIONS.iterdir()) == sorted(FOUND)
    for name, fragment in FOUND.items():
        outcome, detail, seconds = worker.run((REGRESSIONS / name).read_bytes())
        assert outcome == "error" and fragment in detail, (name, outcome, detail)
        with pytest.raises(PreprocessError, match=fragment):
            load_gray(REGRESSIONS / name)  # from a path too
    t0 = time.perf_counter()
    outcome, _, _ = worker.run((REGRESSIONS / "overlapping-strips.tif").read_bytes())
    assert time.perf_counter() - t0 < 0.5


def test_the_harness_catches_each_kind_of_finding():
    w = fuzz.Worker("selftest")
    try:
        got = {data: w.run(data)[:2] for data in (b"fine", b"boom", b"mem", b"die", b"hang", b"after")}
    finally:
        w.close()
    assert got[b"fine"] == got[b"after"] == ("ok", "")  # a new worker replaces the killed one
    assert got[b"boom"][0] == "exception" and "KeyError" in got[b"boom"][1]
    assert got[b"mem"][0] == "memory"  # 2 GiB asked for under the 1 GiB address-space limit
    assert got[b"die"][0] == "died" and "signal 6" in got[b"die"][1]
    assert got[b"hang"][0] == "hang"


def test_mutations_are_reproducible_and_structure_aware():
    pool = seeds()
    names = sorted(pool)
    assert any(n.endswith(".dcm") for n in names) and any(n.endswith(".tif") for n in names)
    runs = []
    for _ in range(2):
        r = __import__("random").Random(7)
        runs.append([mutate(pool[r.choice(names)], r, list(pool.values())) for _ in range(50)])
    assert runs[0] == runs[1]
    # a PNG header tweak keeps the chunk's CRC right, so Pillow parses on to what the field does
    from benchmarks.fuzz_inputs import _png_tweak

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(buf, "PNG")
    r = __import__("random").Random(1)
    tweaked = 0
    for _ in range(30):
        b = bytearray(buf.getvalue())
        if not _png_tweak(b, r):  # an empty chunk (IEND) has no field to tweak
            continue
        tweaked += 1
        try:
            Image.open(io.BytesIO(bytes(b))).load()
        except Exception as exc:
            assert "crc" not in str(exc).lower(), exc
    assert tweaked >= 15


def test_a_short_seeded_run_finds_nothing(tmp_path):
    rep = fuzz.fuzz(0.5, engine="random", seed=0, max_inputs=1500, findings_dir=tmp_path / "found")
    assert rep["findings"] == [], rep["findings"]
    assert rep["inputs"] >= 300  # seeds plus mutations, even on a loaded machine
    assert rep["outcomes"].get("ok", 0) > 0 and rep["outcomes"].get("error", 0) > 0
    assert not (tmp_path / "found").exists()


def test_tiffs_in_many_strips_still_read():
    """The overlapping-strips check leaves real TIFFs alone: one row per strip, 8- and 16-bit, read exactly as
    the same pixels in a PNG."""
    from PIL import TiffImagePlugin

    with Image.open(sorted((REGRESSIONS.parent / "chest_xray" / "test").rglob("*.jpeg"))[0]) as img:
        gray = img.convert("L")
    png = io.BytesIO()
    gray.save(png, "PNG")
    for mode_img in (gray, Image.fromarray(np.asarray(gray, np.uint16) * 257)):
        tif = io.BytesIO()
        mode_img.save(tif, "TIFF", strip_size=1)  # one row per strip, 680 strips (read as one tile)
        assert np.array_equal(load_gray(tif.getvalue(), 144), load_gray(png.getvalue(), 144))
    assert TiffImagePlugin.STRIP_SIZE == 65536
    padded = padded_strips_tiff(np.asarray(gray), rows=4, pad=16)  # 170 separate strips, as some scanners write
    with Image.open(io.BytesIO(padded)) as back:
        assert len(back.tile) == -(-gray.height // 4)
    assert np.array_equal(load_gray(padded, 144), load_gray(png.getvalue(), 144))


def padded_strips_tiff(g: np.ndarray, rows: int, pad: int) -> bytes:
    """An uncompressed 8-bit TIFF whose strips of ``rows`` rows lie ``pad`` bytes apart: valid, not contiguous."""
    import struct

    h, w = g.shape
    strips = [g[i:i + rows].tobytes() for i in range(0, h, rows)]
    data, offsets, pos = b"", [], 8
    for s in strips:
        offsets.append(pos)
        data += s + b"\0" * pad
        pos += len(s) + pad
    arrays = pos
    counts_at = arrays + 4 * len(strips)
    ifd_at = counts_at + 4 * len(strips)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, len(strips), arrays), (277, 3, 1, 1), (278, 4, 1, rows), (279, 4, len(strips), counts_at)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return (b"II*\0" + struct.pack("<I", ifd_at) + data + struct.pack(f"<{len(strips)}I", *offsets)
            + struct.pack(f"<{len(strips)}I", *map(len, strips)) + ifd)
