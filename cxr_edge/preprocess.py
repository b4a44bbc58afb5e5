"""The one definition of preprocessing, shared by training, export calibration and the runtime.

Two steps, kept apart so that training can cache the expensive one:

1. ``load_gray(source, size)``: decode any Pillow-readable image (8/16-bit, L/RGB/RGBA/CMYK/palette,
   EXIF orientation applied) or DICOM, convert to 8-bit grayscale and squash it (aspect ratio not kept) to
   ``size x size``. Returns ``uint8[size, size]``.
2. ``to_input(gray, spec)``: the card's intensity normalisation (``cxr_edge.intensity``, none by default), then
   ``x * spec.scale + spec.offset``. Returns ``float32[N, size, size, 1]``.

The reduction is the same whatever the container, so that a scan gives the same answer as a JPEG, PNG
(8/16-bit, RGBA), TIFF or DICOM: the decoded 8-bit gray image is first reduced by an integer factor ``f``
with ``Image.reduce`` (a box filter; ``f`` is the largest power of two that keeps both sides at least
``KEEP * size``, ``reduction_factor``), stripped of flat borders (``cxr_edge.pixels.flat_border_box``: rows and
columns of one dark or bright level, as collimation, letterboxing or a scanner's edge leave, which would otherwise
shrink the chest in the squash), then squashed to ``size x size`` by one Lanczos resize. The same pixels in any
container therefore give the same array, bit for bit.

Why not libjpeg's DCT scaling (``draft()``), which would skip part of a JPEG's decode: it equals the box
filter of the *unrounded* inverse DCT, while every other container holds rounded pixels, so the two differ
by rounding noise (a fraction of a gray level). The int8 models turn that noise into probability differences
beyond 0.02 on some scans (``python -m benchmarks`` measures it: ``fast_path.dct_scaling``), so container
agreement would be lost. Why ``KEEP = 1``: the Lanczos resize costs in proportion to its input, and from 2-4x
the output size it was the largest cost after the model; from 1-2x it is a few times cheaper. The result is a
little softer than a Lanczos squash of the full decode (``fast_path.resize_fidelity`` measures both settings
on the official ``val/`` scans), within how the training images themselves were made (two thirds of them are
a public 224 px copy made by another resizer). Training images already ``size`` pixels a side are not
resized at all; colour JPEGs are decoded as luminance only.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# the errors and bit-depth helpers live in cxr_edge.pixels (shared with cxr_edge.dicom); importable from here too
from cxr_edge.intensity import check, normalise
from cxr_edge.pixels import (CONTENT_BITS, InputRejected, PreprocessError, _reason,  # noqa: F401
                             content_bits, flat_border_box, high_bits)

Source = Union[str, os.PathLike, bytes, Image.Image]

DEFAULT_SIZE = 224
# The integer reduction keeps at least KEEP * size pixels a side; the Lanczos resize does the rest (from 1-2x
# the output size: cheap). KEEP = 2 stays closer to a Lanczos squash of the full decode but makes the resize
# several times dearer (see the module docstring).
KEEP = 1
EXIF_ORIENTATION = 0x0112
TIFF_PHOTOMETRIC = 262
MAX_TIFF_IN_MEMORY = 512 * 2 ** 20  # a TIFF stored on its side is read into memory up to this size
MIN_SIDE = 32  # smaller images are not a chest X-ray a model can read


RESIZE_NOTE = ("box-reduce by the largest 2^k keeping >= size a side (Image.reduce), trim flat borders "
               "(pixels.flat_border_box), then squash, Pillow LANCZOS")


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its input: square side in pixels, ``cxr_edge.intensity``'s normalisation, then
    ``x * scale + offset`` on 0..255."""

    size: int = DEFAULT_SIZE
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    intensity: str = "none"

    @classmethod
    def from_card(cls, card_input: dict) -> "InputSpec":
        return cls(size=int(card_input["size"]), scale=float(card_input["scale"]),
                   offset=float(card_input["offset"]), intensity=check(card_input.get("intensity", "none")))

    def to_card(self) -> dict:
        extra = {} if self.intensity == "none" else {"intensity": self.intensity}  # older cards stay as they were
        return {"size": self.size, "channels": 1, "layout": "NHWC", "color": "grayscale",
                "resize": RESIZE_NOTE, **extra, "scale": self.scale, "offset": self.offset,
                "formula": "x = gray_uint8 * scale + offset"}


DICOM_MAGIC_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"


def _head(source: Union[str, os.PathLike, bytes, bytearray]) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:DICOM_MAGIC_OFFSET + 4])
    mode = os.stat(source).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a named pipe would wait for a writer forever
        raise PreprocessError("not a regular file (a named pipe, socket or device)")
    with open(source, "rb") as f:
        return f.read(DICOM_MAGIC_OFFSET + 4)


def has_dicom_magic(head: bytes) -> bool:
    """``head`` (a file's first bytes) is a DICOM Part 10 file's: ``DICM`` after the 128-byte preamble."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the Part 10 preamble and ``DICM`` (older archives, ACR-NEMA style files): it
    starts with a data element of group 0002 (file meta) or 0008 (identification), little- or big-endian,
    followed by an explicit VR (two capital letters) or an implicit 32-bit length. Checked only after Pillow
    has failed to recognise the file."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        element = int.from_bytes(head[2:4], order)
        if group in (0x0002, 0x0008) and element < 0x0100:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return True
            if order == "little" and int.from_bytes(head[4:8], "little") < 1 << 16:
                return True
    return False


MAX_TILE_READS = 250_000  # pieces Pillow may read one image's tiles in (about a quarter of a second)


def _check_tiles(img: Image.Image, source) -> None:
    """Pillow reads a tile in pieces no longer than the gap to the next tile's offset, so tiles that overlap
    (offsets a few bytes apart, each declaring a large strip) cost millions of Python-level reads for a small
    file (found by fuzzing: a 133 kB TIFF took 1.6 s; minutes are possible within the pixel limit). Refused
    when the reads would pass ``MAX_TILE_READS`` (an estimate from each tile's size, capped at the file's)."""
    tiles = getattr(img, "tile", None) or []
    if len(tiles) < 2:
        return
    try:
        length = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
    except (OSError, TypeError):
        return
    try:  # as integers: a hostile TIFF can give rationals (a fraction, or NaN) for sizes and offsets
        tiles = sorted(((t[0], [int(v) for v in t[1]], int(t[2])) for t in tiles), key=lambda t: t[2])
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return  # Pillow's own decoding refuses these
    reads = 0  # tiles in the order Pillow reads them (by offset)
    for i, (codec, (x0, y0, x1, y1), offset) in enumerate(tiles):
        if codec == "libtiff":  # reads the file itself, in one go
            continue
        need = min((x1 - x0) * (y1 - y0) * 4 * len(img.getbands()), max(0, length - offset))
        gap = tiles[i + 1][2] - offset if i + 1 < len(tiles) else 0
        reads += -(-max(0, need) // (gap if gap > 0 else getattr(img, "decodermaxblock", 65536)))
    if reads > MAX_TILE_READS:
        raise PreprocessError(f"malformed image: its {len(tiles)} tiles or strips overlap (decoding would read "
                              f"the file in {reads} pieces)")


def _check_pixels(img: Image.Image) -> None:
    """Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) as an error, never just a warning."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise PreprocessError(f"image too large ({w}x{h} = {w * h} pixels, limit {limit}; "
                              "possible decompression bomb)")


def _open(source: Source) -> Image.Image:
    """An image, lazily decoded, from a path, bytes, or a PIL image; DICOM files are read with pydicom
    (``cxr_edge.dicom``) and arrive here as 8-bit grayscale."""
    if isinstance(source, Image.Image):
        return source
    try:
        head = _head(source)  # read once: the DICM magic now, a bare DICOM data set if Pillow fails
        if has_dicom_magic(head):
            from cxr_edge.dicom import read_dicom  # imports pydicom only when a DICOM shows up
            return read_dicom(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd files (a TIFF tag's count): not our output
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray)):
                img = Image.open(io.BytesIO(source))
            else:
                img = Image.open(source)
                if (img.format == "TIFF" and img.tag_v2.get(EXIF_ORIENTATION) in (5, 6, 7, 8)
                        and os.path.getsize(source) <= MAX_TIFF_IN_MEMORY):
                    # Pillow memory-maps an uncompressed TIFF from a path at its turned size and garbles a
                    # film stored on its side (Pillow 13): read from memory, where it is turned after decoding
                    with open(source, "rb") as f:
                        data = f.read()
                    img.close()
                    img = Image.open(io.BytesIO(data))
    except PreprocessError:
        raise
    except UnidentifiedImageError:
        if not head:
            raise PreprocessError("empty file (0 bytes)") from None
        if looks_like_bare_dicom(head):
            from cxr_edge.dicom import read_dicom
            return read_dicom(source, force=True)
        raise PreprocessError("not an image Pillow can read") from None
    except FileNotFoundError:
        raise PreprocessError("no such file") from None
    except IsADirectoryError:
        raise PreprocessError("is a directory") from None
    except PermissionError:
        raise PreprocessError("permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PreprocessError(f"image too large ({exc})") from None
    except Exception as exc:  # any other failure to parse a header is a bad input, not a crash
        raise PreprocessError(f"cannot read image ({_reason(exc)})") from None
    _check_pixels(img)
    _check_tiles(img, source)
    return img


def _min_is_white(img: Image.Image) -> bool:
    """A TIFF whose Photometric Interpretation is WhiteIsZero (0: low values white, as DICOM's MONOCHROME1),
    which Pillow inverts for 1- and 8-bit images but not for 16-bit or float ones."""
    tags = getattr(img, "tag_v2", None)
    return getattr(img, "format", None) == "TIFF" and tags is not None and tags.get(TIFF_PHOTOMETRIC) == 0


def _to_gray8(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit L. 16- and 32-bit integer data keeps the top 8 bits of its bit depth (``high_bits``),
    the depth read from the content: the first of 10, 12, 14, 16 bits that holds its maximum (detectors store
    10 to 16 bits in 16-bit files), else as many bits as the maximum needs; float images are mapped by their
    own min..max."""
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        out = high_bits(arr, content_bits(int(arr.max(initial=0))))
        return Image.fromarray(255 - out if _min_is_white(img) else out, "L")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        span = hi - lo if hi > lo else 1.0
        out = np.rint((arr - lo) * (255.0 / span)).astype(np.uint8)
        return Image.fromarray(255 - out if _min_is_white(img) else out, "L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become black (the background of an X-ray), not whatever colour they hide.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "1", "P", "RGB", "RGBX"):
        return img.convert("RGB").convert("L") if mode in ("CMYK", "YCbCr", "LAB", "HSV") else img.convert("L")
    raise PreprocessError(f"unsupported image mode {mode!r}")


COLOUR_SIDE = 64  # the colour check looks at a thumbnail at most this many pixels a side
CHROMA_LEVEL = 32  # a pixel is "coloured" when max(R,G,B) - min(R,G,B) exceeds this (0..255)
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


SATURATED_LEVEL = 96  # chroma no tinted film display has: coloured whatever the image's tint
TINT_BINS = 16  # luminance bins of the tint reference (``off_tint_chroma``)


def off_tint_chroma(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's chroma apart from the image's own tint, for ``rgb[..., 3]``: ``max - min`` over the channels of
    its difference from the median colour of the image's pixels of its luminance (``TINT_BINS`` bins). A gray
    image has none; so has a gray film shown through a colour map (sepia, a blue tint), whose colour follows
    its luminance; coloured arrows or outlines drawn on a film have it on their own pixels only; a photo has it
    wherever two colours share a brightness."""
    px = np.asarray(rgb, np.int16).reshape(-1, 3)
    lum = (px.astype(np.int32) @ np.array([299, 587, 114])) // 1000
    bins = np.minimum(lum * TINT_BINS // 256, TINT_BINS - 1)
    ref = np.zeros((TINT_BINS, 3), np.float64)
    for b in np.unique(bins):
        ref[b] = np.median(px[bins == b], axis=0)
    d = px - ref[bins]
    return (d.max(axis=1) - d.min(axis=1)).reshape(np.shape(rgb)[:-1])


def _chroma_fraction(img: Image.Image) -> float:
    """Share of pixels of a (small) image whose chroma apart from the image's own tint (``off_tint_chroma``)
    exceeds ``CHROMA_LEVEL``, or whose plain chroma exceeds ``SATURATED_LEVEL`` (a saturated colour map). Gray modes (L, I;16, F, 1, LA) have none; transparent pixels count as black (as in
    ``_to_gray8``)."""
    if img.mode not in _COLOUR_MODES:
        return 0.0
    if img.mode in ("P", "PA"):  # Image.reduce works on pixel values, not palette indices
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if max(img.size) > COLOUR_SIDE:
        img = img.reduce(max(1, max(img.size) // COLOUR_SIDE))
    if img.mode in ("RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    rgb = np.asarray(img.convert("RGB"))
    saturated = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1) > SATURATED_LEVEL
    return float(np.mean((off_tint_chroma(rgb) > CHROMA_LEVEL) | saturated))


def _jpeg_chroma(source: Source) -> float:
    """The chroma fraction of a colour JPEG from a second, cheap decode at the smallest DCT scale."""
    if isinstance(source, Image.Image):
        return 0.0  # the caller's image was already decoded to gray by ``draft``; nothing cheap left
    with (Image.open(io.BytesIO(source)) if isinstance(source, (bytes, bytearray)) else Image.open(source)) as img:
        img.draft("RGB", (COLOUR_SIDE, COLOUR_SIDE))
        return _chroma_fraction(img)


def reduction_factor(width: int, height: int, size: int, keep: int = KEEP) -> int:
    """The integer reduction applied before the final resize: the largest power of two ``f`` with
    ``min(width, height) // (keep * size) >= f`` (1 for images under ``2 * keep * size``), applied with
    ``Image.reduce`` to every format."""
    m = min(width // (keep * size), height // (keep * size))
    f = 1
    while f * 2 <= m:
        f *= 2
    return f


@dataclass(frozen=True)
class Loaded:
    """What ``load_with_info`` reads: the model's gray image, the chroma fraction (``load_gray_colour``) and the
    patient's age where the file says it (DICOM: ``(years, the tags it came from)``, else ``None``)."""

    gray: np.ndarray
    colour: float
    patient_age: Optional[tuple[float, str]] = None


def _load(source: Source, size: int, colour: bool) -> Loaded:
    img = opened = _open(source)
    chroma = 0.0
    age = opened.info.get("patient_age") if isinstance(opened.info.get("patient_age"), tuple) else None
    try:
        w0, h0 = img.size
        if min(w0, h0) < MIN_SIDE:
            raise PreprocessError(f"image is {w0}x{h0} pixels, smaller than {MIN_SIDE} a side")
        if img.mode == "1":  # two levels (a fax or a dithered print), no gray levels a radiograph has
            raise InputRejected("not a radiograph (1-bit black-and-white image)")
        factor = reduction_factor(w0, h0, size)
        luminance = img.format == "JPEG" and img.mode != "L"
        if luminance:  # a colour JPEG: decode its luminance only, at full size (no DCT scaling)
            if colour:
                chroma = _jpeg_chroma(source)
            img.draft("L", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd files (a TIFF tag's count): not our output
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # only then: exif_transpose copies the image
                img = ImageOps.exif_transpose(img)
        if colour and not luminance:
            chroma = _chroma_fraction(img)
        gray = _to_gray8(img)
        if factor > 1:
            gray = gray.reduce(factor)
        top, bottom, left, right = flat_border_box(np.asarray(gray))  # collimation, letterboxing: not the chest
        if top or bottom or left or right:
            gray = gray.crop((left, top, gray.width - right, gray.height - bottom))
        if gray.size != (size, size):
            gray = gray.resize((size, size), Image.Resampling.LANCZOS)
        return Loaded(np.asarray(gray, dtype=np.uint8), chroma, age)
    except PreprocessError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PreprocessError(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PreprocessError(f"cannot decode image ({_reason(exc)})") from None
    except Exception as exc:  # decoders raise odd things on hostile bytes (struct.error, IndexError, ...)
        raise PreprocessError(f"cannot decode image ({_reason(exc)})") from None
    finally:
        if opened is not source:  # close the file we opened (never the caller's image)
            opened.close()


def load_gray(source: Source, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Decode ``source`` and return it as ``uint8[size, size]`` grayscale (reduced, then squashed with
    Lanczos)."""
    return _load(source, size, colour=False).gray


def load_gray_colour(source: Source, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, float]:
    """``load_gray`` (same pixels) plus the image's chroma fraction: the share of its pixels with real colour
    (``max(R,G,B) - min(R,G,B) > CHROMA_LEVEL``), measured on a thumbnail of the original before the gray
    conversion. 0.0 for gray images (L, 16-bit, DICOM) at no extra cost; a colour JPEG costs one more decode
    at 1/8 DCT scale (the gray pixels are decoded with ``draft("L")``, which drops colour)."""
    loaded = _load(source, size, colour=True)
    return loaded.gray, loaded.colour


def load_with_info(source: Source, size: int = DEFAULT_SIZE, colour: bool = True) -> Loaded:
    """``load_gray_colour`` (``colour=False``: the chroma fraction left at 0.0, as ``load_gray``) and the
    patient's age where a DICOM file gives it (``cxr_edge.dicom.patient_age``): what the classifier reads."""
    return _load(source, size, colour=colour)


def to_input(gray: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8[H, W]`` or ``uint8[N, H, W]`` to the model's ``float32[N, H, W, 1]`` (``spec.intensity`` first)."""
    arr = normalise(np.asarray(gray), spec.intensity)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[1:] != (spec.size, spec.size):
        raise ValueError(f"expected {spec.size}x{spec.size} images, got {arr.shape[1:]}")
    out = arr.astype(np.float32) * np.float32(spec.scale) + np.float32(spec.offset)
    return out[..., None]


def preprocess(source: Source, spec: InputSpec) -> np.ndarray:
    """Full path from a file (or bytes, or PIL image) to the model input ``float32[1, size, size, 1]``."""
    return to_input(load_gray(source, spec.size), spec)
