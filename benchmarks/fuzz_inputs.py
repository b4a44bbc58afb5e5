"""Seeds and structure-aware mutations for ``python -m benchmarks.fuzz`` (the decode path's fuzzer).

Seeds: the scans in ``tests/data`` (as they are, and shrunk to 96 px so that most inputs decode in a
millisecond), re-encoded as PNG, TIFF, JPEG, BMP, GIF, WebP and JPEG 2000 in odd modes and bit depths, and
small DICOMs made by ``cxr_edge.dicom.gray_to_dicom`` (8/12/16 bits, MONOCHROME1, windows, rescale, several
frames, no pixels, RLE and JPEG encapsulated pixel data, a bare data set without the preamble).

Mutations (1 to 3 stacked per input): bit flips, interesting integers, truncation, chunk deletion and
duplication, splicing with another seed, header-field tweaks that keep the container valid (PNG chunks with
their CRC fixed, JPEG SOF fields, TIFF IFD entries, DICOM image attributes rewritten through pydicom), and
fresh re-encodings of random pixels in a random mode and format.
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent
SCANS = sorted((PROJECT / "tests" / "data" / "chest_xray").rglob("*.jpeg"))
INTERESTING = [0, 1, 2, 7, 8, 15, 16, 31, 32, 127, 128, 255, 256, 4095, 4096, 32767, 32768, 65535, 65536,
               2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
MODES = ["L", "I;16", "I", "F", "RGB", "RGBA", "P", "LA", "PA", "CMYK", "1", "YCbCr", "LAB", "HSV", "I;16B"]
FORMATS = ["PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP", "JPEG2000", "PPM", "DICOM"]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gray_scan(side: int = 96, which: int = 0) -> np.ndarray:
    with Image.open(SCANS[which % len(SCANS)]) as img:
        return np.asarray(img.convert("L").resize((side, side), Image.Resampling.BILINEAR))


def gray_to_dicom(pixels, **kw) -> bytes:
    """``cxr_edge.dicom.gray_to_dicom`` with a fixed instance UID (it draws a random one): the same seeds and
    mutations on every run."""
    import pydicom

    from cxr_edge import dicom

    ds = pydicom.dcmread(io.BytesIO(dicom.gray_to_dicom(pixels, **kw)))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_seeds(g: np.ndarray) -> dict[str, bytes]:
    """Small DICOMs of a gray scan ``g`` (uint8)."""

    g16 = g.astype(np.uint16)
    out = {
        "dx8.dcm": gray_to_dicom(g),
        "dx12.dcm": gray_to_dicom(g16 * 16, bits_stored=12),
        "dx16_mono1.dcm": gray_to_dicom(g16 * 257, bits_stored=16, photometric="MONOCHROME1"),
        "dx12_window.dcm": gray_to_dicom(g16 * 16, bits_stored=12, WindowCenter=2000, WindowWidth=3000,
                                         RescaleSlope=1, RescaleIntercept=-1024),
        "dx_frames.dcm": gray_to_dicom(np.stack([g, g]), frames=2),
        "no_pixels.dcm": gray_to_dicom(None),
        "ct.dcm": gray_to_dicom(g, Modality="CT"),
        "lateral.dcm": gray_to_dicom(g, ViewPosition="LL", BodyPartExamined="CHEST"),
    }
    out["bare.dcm"] = out["dx12.dcm"][132:]  # no preamble, no DICM: read by its first element
    try:
        import pydicom
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGBaseline8Bit, RLELossless

        ds = pydicom.dcmread(io.BytesIO(out["dx12.dcm"]))
        ds.compress(RLELossless, generate_instance_uid=False)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out["rle.dcm"] = buf.getvalue()
        ds = pydicom.dcmread(io.BytesIO(out["dx8.dcm"]))
        ds.PixelData = encapsulate([encode(Image.fromarray(g), "JPEG", quality=90)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out["jpeg.dcm"] = buf.getvalue()
    except Exception:  # an encoder missing here: those two seeds are left out
        pass
    return out


def image_seeds(g: np.ndarray) -> dict[str, bytes]:
    """``g`` re-encoded in the containers and modes Pillow reads."""
    img = Image.fromarray(g)
    rgb = Image.merge("RGB", (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img))
    wide = Image.fromarray(g.astype(np.uint16) * 257)  # mode I;16
    out = {
        "l.png": encode(img, "PNG"), "i16.png": encode(wide, "PNG"), "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "p.png": encode(rgb.convert("P"), "PNG"), "la.png": encode(img.convert("LA"), "PNG"),
        "one.png": encode(img.convert("1"), "PNG"), "interlaced.png": encode(img, "PNG", optimize=False),
        "i16.tif": encode(wide, "TIFF"), "f.tif": encode(img.convert("F"), "TIFF"),
        "i32.tif": encode(img.convert("I"), "TIFF"), "lzw.tif": encode(img, "TIFF", compression="tiff_lzw"),
        "deflate.tif": encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "packbits.tif": encode(img, "TIFF", compression="packbits"), "cmyk.tif": encode(rgb.convert("CMYK"), "TIFF"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"), "prog.jpg": encode(img, "JPEG", progressive=True),
        "rgb.jpg": encode(rgb, "JPEG", subsampling=2), "l.bmp": encode(img, "BMP"), "l.gif": encode(img, "GIF"),
        "l.webp": encode(img, "WEBP"), "l.jp2": encode(img, "JPEG2000"), "l.pgm": encode(img, "PPM"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    out["rotated.jpg"] = encode(img, "JPEG", exif=exif)
    return out


def seeds() -> dict[str, bytes]:
    """Name -> bytes of every seed."""
    out = {f"scan_{p.parent.parent.name}_{p.name}": p.read_bytes() for p in SCANS}
    g = gray_scan()
    out.update(image_seeds(g))
    try:
        out.update(dicom_seeds(g))
    except ImportError:  # no pydicom: image seeds only
        pass
    return out


# ------------------------------------------------------------------------------------------- mutations


def _flip(b: bytearray, r: random.Random) -> None:
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)


def _interesting(b: bytearray, r: random.Random) -> None:
    v = r.choice(INTERESTING)
    width, order = r.choice([(1, "<"), (2, "<"), (2, ">"), (4, "<"), (4, ">")])
    i = r.randrange(max(1, len(b) - width))
    b[i:i + width] = (v % (1 << (8 * width))).to_bytes(width, "little" if order == "<" else "big")


def _truncate(b: bytearray, r: random.Random) -> None:
    del b[r.randrange(len(b)):]


def _delete(b: bytearray, r: random.Random) -> None:
    i = r.randrange(len(b))
    del b[i:i + r.randint(1, max(1, len(b) // 8))]


def _duplicate(b: bytearray, r: random.Random) -> None:
    i = r.randrange(len(b))
    chunk = b[i:i + r.randint(1, 256)]
    j = r.randrange(len(b))
    b[j:j] = chunk * r.randint(1, 4)


def _splice(b: bytearray, r: random.Random, pool: list[bytes]) -> None:
    other = r.choice(pool)
    i, j = r.randrange(len(b)), r.randrange(len(other))
    if r.random() < 0.5:
        b[i:] = other[j:]
    else:
        b[i:i] = other[j:j + r.randint(1, 512)]


def _png_tweak(b: bytearray, r: random.Random) -> bool:
    if not b.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    chunks, pos = [], 8
    while pos + 8 <= len(b):
        n = struct.unpack(">I", b[pos:pos + 4])[0]
        chunks.append((pos, n, bytes(b[pos + 4:pos + 8])))
        pos += 12 + n
    if not chunks:
        return False
    pos, n, kind = r.choice(chunks)
    data = pos + 8
    if kind == b"IHDR" and n >= 13:
        field = r.choice([(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1)])
        value = r.choice(INTERESTING + [1, 2, 3, 4, 6, 16, 30000, 100000])
        b[data + field[0]:data + field[0] + field[1]] = (value % (1 << (8 * field[1]))).to_bytes(field[1], "big")
    elif n and data + n <= len(b):
        b[data + r.randrange(n)] = r.randrange(256)
    else:
        return False
    end = data + n
    if end + 4 <= len(b):  # the CRC made right again, so the parser goes on to what the field does
        b[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(b[pos + 4:end])))
    return True


def _jpeg_tweak(b: bytearray, r: random.Random) -> bool:
    if not b.startswith(b"\xff\xd8"):
        return False
    sofs = [i for i in range(2, len(b) - 10) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC1, 0xC2, 0xC3)]
    if not sofs:
        return False
    i = r.choice(sofs) + 4  # precision, height (2), width (2), components, then 3 bytes per component
    offset, width = r.choice([(0, 1), (1, 2), (3, 2), (5, 1), (7, 1), (8, 1), (9, 1)])
    value = r.choice(INTERESTING + [3, 4, 12, 0x11, 0x22, 0x44])
    b[i + offset:i + offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    return True


def _tiff_tweak(b: bytearray, r: random.Random) -> bool:
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(bytes(b[:4]))
    if order is None or len(b) < 8:
        return False
    ifd = struct.unpack(order + "I", b[4:8])[0]
    if ifd + 2 > len(b):
        return False
    n = struct.unpack(order + "H", b[ifd:ifd + 2])[0]
    if n == 0 or ifd + 2 + 12 * n > len(b):
        return False
    e = ifd + 2 + 12 * r.randrange(n)  # tag (2), type (2), count (4), value or offset (4)
    offset, width = r.choice([(2, 2), (4, 4), (8, 2), (8, 4)])
    value = r.choice(INTERESTING + [3, 5, 7, 12, 13, 32773, 34712])
    b[e + offset:e + offset + width] = struct.pack(order + ("H" if width == 2 else "I"), value % (1 << (8 * width)))
    return True


DICOM_FIELDS = {
    "Rows": [0, 1, 31, 65535], "Columns": [0, 1, 31, 65535], "BitsAllocated": [0, 1, 8, 12, 16, 32, 64],
    "BitsStored": [0, 1, 7, 9, 15, 16, 17, 32], "HighBit": [0, 7, 31, 40], "PixelRepresentation": [0, 1, 2],
    "SamplesPerPixel": [0, 2, 3, 4], "PlanarConfiguration": [0, 1, 5],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "HSV", ""],
    "NumberOfFrames": ["0", "3", "-1", "x"], "WindowCenter": ["0", "-1e30", "nan", "1\\2"],
    "WindowWidth": ["0", "0.5", "-5", "inf", "1\\2"], "RescaleSlope": ["0", "-1", "1e300", "nan"],
    "RescaleIntercept": ["-1e300", "inf", "x"], "Modality": ["OT", "MG", ""], "ViewPosition": ["LAT", "PA"],
}


def _dicom_tweak(b: bytearray, r: random.Random) -> bool:
    """An image attribute of a DICOM set to an odd value, written back through pydicom."""
    if b[128:132] != b"DICM":
        return False
    try:
        import warnings

        import pydicom

        warnings.filterwarnings("ignore", module="pydicom")
        ds = pydicom.dcmread(io.BytesIO(bytes(b)), force=True)
        for _ in range(r.randint(1, 2)):
            key = r.choice(sorted(DICOM_FIELDS))
            setattr(ds, key, r.choice(DICOM_FIELDS[key]))
        if r.random() < 0.2 and "PixelData" in ds:
            ds.PixelData = ds.PixelData[: r.randrange(len(ds.PixelData) + 1)]
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        b[:] = buf.getvalue()
        return True
    except Exception:
        return False


def random_image(r: random.Random) -> bytes:
    """Fresh pixels (noise, a gradient or a constant) in a random size, mode and container."""
    h, w = r.choice([1, 31, 32, 33, 64, 100, 257]), r.choice([1, 31, 32, 40, 64, 129])
    rng = np.random.default_rng(r.randrange(2 ** 32))
    kind = r.randrange(3)
    base = (rng.integers(0, 256, (h, w)) if kind == 0 else np.add.outer(np.arange(h), np.arange(w)) % 256
            if kind == 1 else np.full((h, w), r.randrange(256))).astype(np.uint8)
    fmt = r.choice(FORMATS)
    if fmt == "DICOM":
        bits = r.choice([1, 8, 10, 12, 14, 16])
        px = base.astype(np.uint16) * (2 ** bits // 256) if bits > 8 else base >> (8 - bits)
        return gray_to_dicom(px, bits_stored=bits, photometric=r.choice(["MONOCHROME1", "MONOCHROME2"]))
    img = Image.fromarray(base).convert(r.choice(MODES)) if r.random() < 0.9 else Image.fromarray(base)
    try:
        return encode(img, fmt)
    except Exception:  # this format cannot hold this mode: PNG holds most
        try:
            return encode(img, "TIFF")
        except Exception:
            return encode(Image.fromarray(base), "PNG")


STRUCTURED = (_png_tweak, _jpeg_tweak, _tiff_tweak, _dicom_tweak)
BLIND = (_flip, _interesting, _truncate, _delete, _duplicate)


def mutate(data: bytes, r: random.Random, pool: list[bytes], max_size: int = 1 << 22) -> bytes:
    """One to three stacked mutations of ``data`` (5% of the time: a fresh random image instead)."""
    if r.random() < 0.05 or not data:
        return random_image(r)[:max_size]
    b = bytearray(data)
    for _ in range(r.randint(1, 3)):
        if not b:
            break
        choice = r.random()
        if choice < 0.35:
            tweaks = list(STRUCTURED)
            r.shuffle(tweaks)
            if any(t(b, r) for t in tweaks):
                continue
        if choice < 0.5:
            _splice(b, r, pool)
        else:
            r.choice(BLIND)(b, r)
    return bytes(b[:max_size])
