"""What reading an input shares between ``cxr_edge.preprocess`` (every image) and ``cxr_edge.dicom`` (DICOM
files): the errors an input ends with, one-line exception reasons and the bit-depth helpers that turn 10- to
16-bit pixels into 8 bits. Imports neither module, so that both can import it."""
from __future__ import annotations

import numpy as np

CONTENT_BITS = (10, 12, 14, 16)  # bit depths of radiographs in 16-bit containers (see preprocess._to_gray8)


class PreprocessError(ValueError):
    """The input could not be turned into a model input (not an image, too small, ...)."""


class InputRejected(PreprocessError):
    """A readable input that the model is not for (a CT slice, a lateral view, ...): it is refused with
    ``reason`` (a ``"rejected"`` record), not reported as an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    """One line for an exception: its message, or its type when the message is empty."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def content_bits(top: int) -> int:
    """The bit depth of integer pixels whose maximum is ``top``: the first of ``CONTENT_BITS`` that holds it,
    else as many bits as it needs."""
    return next((b for b in CONTENT_BITS if top < 2 ** b), max(CONTENT_BITS[-1], int(top).bit_length()))


def high_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit integers (0 .. 2**bits - 1) to 8 bits by their top 8 bits, ``floor(v / 2**(bits - 8))``.
    Unlike rounding ``v * 255 / (2**bits - 1)``, this undoes both usual ways of widening 8-bit pixels exactly:
    shifting (``v * 256``, ``v * 16``) and full-range scaling (``v * 257``, ``round(v * 4095 / 255)``), so
    the widened copy of a scan gives the scan's own pixels."""
    v = np.asarray(values)
    if bits <= 8:
        return np.clip(v, 0, 255).astype(np.uint8)
    if v.dtype.kind not in "iu":
        v = v.astype(np.int64)
    top = min(2 ** bits - 1, int(np.iinfo(v.dtype).max))
    # in the array's own integer type: a 9400 x 9400 16-bit film took 1.9 GB through int64 copies
    v = np.minimum(v, v.dtype.type(top)) if v.dtype.kind == "u" else np.clip(v, 0, top)
    return (v >> (bits - 8)).astype(np.uint8)


FLAT_RANGE = 10  # a border line's gray levels span at most this (JPEG noise on a flat field)
FLAT_DARK, FLAT_BRIGHT = 24, 232  # ... and its mean is at most FLAT_DARK or at least FLAT_BRIGHT
MAX_TRIM = 0.25  # at most this share of each side is trimmed


def _leading(flags: np.ndarray) -> int:
    """How many of ``flags`` are true from the start."""
    return int(np.argmin(flags)) if not flags.all() else len(flags)


def _flat(lines: np.ndarray, axis: int) -> np.ndarray:
    """Which lines of ``uint8`` ``lines`` (along ``axis``) are flat: range at most ``FLAT_RANGE``, mean at most
    ``FLAT_DARK`` or at least ``FLAT_BRIGHT`` (compared as integer sums: exact, no float conversion)."""
    n = lines.shape[axis]
    total = lines.sum(axis=axis, dtype=np.uint32)  # exact: a line has < 2.8M pixels (89M over a 32 px side)
    spread = lines.max(axis=axis).astype(np.int16) - lines.min(axis=axis)
    return (spread <= FLAT_RANGE) & ((total <= FLAT_DARK * n) | (total >= FLAT_BRIGHT * n))


def flat_border_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: the rows and columns of flat border around a film (collimation, letterboxing,
    a scanner's edge) to trim before the squash: the outermost rows, then columns over the rows kept, whose range
    is at most ``FLAT_RANGE`` gray levels and whose mean is at most ``FLAT_DARK`` or at least ``FLAT_BRIGHT``, up to
    ``MAX_TRIM`` of each side. ``(0, 0, 0, 0)`` for a film without."""
    a = np.asarray(gray, dtype=np.uint8)
    h, w = a.shape
    lim_h, lim_w = int(h * MAX_TRIM), int(w * MAX_TRIM)
    # most films have none: their four edge lines decide (about 30 us)
    if not (_flat(a[[0, -1]], 1).any() or _flat(a[:, [0, -1]], 0).any()):
        return 0, 0, 0, 0
    top = _leading(_flat(a[:lim_h], 1))
    bottom = _leading(_flat(a[h - lim_h:], 1)[::-1])
    kept = a[top:h - bottom]
    return top, bottom, _leading(_flat(kept[:, :lim_w], 0)), _leading(_flat(kept[:, w - lim_w:], 0)[::-1])
