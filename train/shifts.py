"""Acquisition shifts: how another clinic's films differ from Kermany's, as image operations.

One definition serves two jobs:

- **evaluation** (``benchmarks.robustness``): each named shift in ``SHIFTS`` turns a decoded film (``uint8[H, W]``
  at the file's own resolution) into the bytes of a new file, which then goes through ``cxr_edge.preprocess``
  and ``Classifier`` like any input; fixed strengths, seeded per image (``apply_shift``);
- **training** (``AcquisitionShift``, ``FitConfig.acquisition``): a share of the training images, at the stored
  224 px resolution and before the framing crop, gets one of the same operations at a random strength.

Strengths are relative to the image's long side, so a shift means the same on a 2,000 px original and on a
224 px training copy. Exposure and bit-depth shifts are exact pixel maps; noise is drawn on a 512 px grid
(what survives the reduction to the model's input); the portable-film look is ``train.ood.clinical``.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

NOISE_GRID = 512  # sensor noise is drawn on a grid of this many pixels on the long side, then resized
PNG_LEVEL = 0  # fast lossless encoding for shifts that are not about the encoding itself


def _lut(gray: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    table = np.clip(np.round(fn(np.arange(256, dtype=np.float64))), 0, 255).astype(np.uint8)
    return table[gray]


def gamma(gray: np.ndarray, g: float) -> np.ndarray:
    """Exposure: ``255 * (x / 255) ** g`` (g < 1 brighter, washed out; g > 1 darker)."""
    return _lut(gray, lambda x: 255.0 * (x / 255.0) ** g)


def contrast(gray: np.ndarray, c: float) -> np.ndarray:
    """Contrast about the image's mean: ``mean + c * (x - mean)``."""
    m = float(gray.mean())
    return _lut(gray, lambda x: m + c * (x - m))


def noise(gray: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian sensor noise of ``sigma`` gray levels, drawn on a ``NOISE_GRID`` px grid (so that it survives
    the reduction to the model's input as a low-dose film's grain does) and resized to the image."""
    h, w = gray.shape
    f = min(1.0, NOISE_GRID / max(h, w))
    gh, gw = max(1, round(h * f)), max(1, round(w * f))
    n = rng.normal(0.0, sigma, (gh, gw)).astype(np.float32)
    n = np.asarray(Image.fromarray(n, "F").resize((w, h), Image.Resampling.BILINEAR))
    return np.clip(gray + n, 0, 255).astype(np.uint8)


def blur(gray: np.ndarray, rel_radius: float) -> np.ndarray:
    """Gaussian blur of ``rel_radius`` times the long side (motion, a soft detector)."""
    r = rel_radius * max(gray.shape)
    return np.asarray(Image.fromarray(gray, "L").filter(ImageFilter.GaussianBlur(r)))


def low_res(gray: np.ndarray, long_side: int) -> np.ndarray:
    """The film reduced to ``long_side`` px on its long side (an archive's preview, a scanned print)."""
    h, w = gray.shape
    f = long_side / max(h, w)
    if f >= 1:
        return gray
    return np.asarray(Image.fromarray(gray, "L").resize((max(1, round(w * f)), max(1, round(h * f))),
                                                        Image.Resampling.LANCZOS))


def rotate(gray: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation inside the frame, the corners filled black (a patient not straight on the detector)."""
    return np.asarray(Image.fromarray(gray, "L").rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0))


def frame(gray: np.ndarray, keep: float) -> np.ndarray:
    """Tighter framing (``keep`` < 1: the middle ``keep`` of each side) or looser (``keep`` > 1: the film in a
    canvas ``keep`` times its size, the margin continuing the edge rows and columns, darkened: more of the body,
    less of it exposed)."""
    h, w = gray.shape
    if keep <= 1:
        kh, kw = max(1, round(h * keep)), max(1, round(w * keep))
        t, left = (h - kh) // 2, (w - kw) // 2
        return gray[t:t + kh, left:left + kw].copy()
    ph, pw = round(h * (keep - 1) / 2), round(w * (keep - 1) / 2)
    out = np.pad(gray, ((ph, ph), (pw, pw)), mode="edge").astype(np.float32)
    inside = np.zeros(out.shape, bool)
    inside[ph:ph + h, pw:pw + w] = True
    out[~inside] *= 0.5
    return out.astype(np.uint8)


def collimate(gray: np.ndarray, margins: tuple[float, float, float, float], level: int = 0) -> np.ndarray:
    """Collimation borders: ``margins`` (left, top, right, bottom, fractions of each side) set to ``level``."""
    h, w = gray.shape
    out = gray.copy()
    left, top, right, bottom = (round(m * s) for m, s in zip(margins, (w, h, w, h)))
    out[:, :left] = level
    out[:top, :] = level
    if right:
        out[:, w - right:] = level
    if bottom:
        out[h - bottom:, :] = level
    return out


MARKERS = ("L", "R", "PORTABLE", "AP", "PA", "SUPINE", "SEMI-ERECT", "2026-03-14 02:41")


def burn_text(gray: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """Burned-in text and a side marker: ``n`` labels from ``MARKERS`` (one a single-letter side marker), white,
    near the edges, sized as they are on a film (2-4% of the long side)."""
    h, w = gray.shape
    s = max(h, w)
    img = Image.fromarray(gray, "L")
    d = ImageDraw.Draw(img)
    words = [str(rng.choice(MARKERS[:2]))] + [str(rng.choice(MARKERS[2:])) for _ in range(n - 1)]
    for i, text in enumerate(words):
        font = ImageFont.load_default(size=float(s * rng.uniform(0.03, 0.045) * (1.5 if i == 0 else 1.0)))
        x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0, y1 - y0
        x = rng.uniform(0.02, 0.1) * w if rng.random() < 0.5 else w - tw - rng.uniform(0.02, 0.1) * w
        y = rng.uniform(0.02, 0.1) * h if rng.random() < 0.5 else h - th - rng.uniform(0.03, 0.1) * h
        d.text((max(0, x), max(0, y)), text, fill=int(rng.uniform(215, 256)), font=font)
    return np.asarray(img)


def portable(gray: np.ndarray, seed: int) -> np.ndarray:
    """The portable-film look ``train.ood.clinical`` makes (crops, letterboxing or tilt, collimation frame,
    edge enhancement, burned-in text), on the film brought to a square of its long side and back."""
    from train.gate_synth import clinical

    h, w = gray.shape
    s = max(h, w)
    sq = np.asarray(Image.fromarray(gray, "L").resize((s, s), Image.Resampling.BILINEAR))
    out = clinical(sq[None], seed)[0]
    return np.asarray(Image.fromarray(out, "L").resize((w, h), Image.Resampling.BILINEAR))


def encode(gray: np.ndarray, fmt: str = "png", quality: int = 95, bits: int = 8) -> bytes:
    """The bytes of a file holding ``gray``: PNG (8 bits, or 16-bit with the values of a ``bits``-bit
    detector: ``x * (2**bits - 1) / 255``) or JPEG at ``quality``."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(gray, "L").save(buf, "JPEG", quality=quality)
    elif bits == 8:
        Image.fromarray(gray, "L").save(buf, "PNG", compress_level=PNG_LEVEL)
    else:
        wide = np.round(gray.astype(np.float64) * ((1 << bits) - 1) / 255.0).astype(np.uint16)
        Image.fromarray(wide).save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _png(fn):
    return lambda g, rng, seed: encode(fn(g, rng, seed))


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


# name -> (what it is, function(gray uint8[H, W], rng, seed) -> file bytes); fixed strengths for evaluation
SHIFTS: dict[str, tuple[str, Callable]] = {
    "none": ("the film as it is, re-encoded as PNG (the reference)", _png(lambda g, r, s: g)),
    "brighter": ("gamma 0.67 (over-exposed, washed out)", _png(lambda g, r, s: gamma(g, 0.67))),
    "darker": ("gamma 1.5 (under-exposed)", _png(lambda g, r, s: gamma(g, 1.5))),
    "low_contrast": ("contrast x0.7 about the mean", _png(lambda g, r, s: contrast(g, 0.7))),
    "high_contrast": ("contrast x1.3 about the mean", _png(lambda g, r, s: contrast(g, 1.3))),
    "noise": (f"Gaussian noise, sigma 8 gray levels on a {NOISE_GRID} px grid", _png(lambda g, r, s: noise(g, 8.0, r))),
    "blur": ("Gaussian blur, radius 0.4% of the long side", _png(lambda g, r, s: blur(g, 0.004))),
    "jpeg_q30": ("re-encoded as JPEG quality 30", lambda g, r, s: encode(g, "jpeg", 30)),
    "low_res_512": ("reduced to 512 px on the long side", _png(lambda g, r, s: low_res(g, 512))),
    "rotate_10": ("rotated 10 degrees (sign seeded), corners black", _png(lambda g, r, s: rotate(g, 10 * _sign(r)))),
    "tighter": ("the middle 85% of each side", _png(lambda g, r, s: frame(g, 0.85))),
    "looser": ("in a canvas 1.2x its size, margins the darkened edge", _png(lambda g, r, s: frame(g, 1.2))),
    "collimated": ("black collimation borders: 8% left and right, 5% top and bottom",
                   _png(lambda g, r, s: collimate(g, (0.08, 0.05, 0.08, 0.05)))),
    "text_markers": ("burned-in text and a side marker (3 labels near the edges)", _png(lambda g, r, s: burn_text(g, r))),
    "portable": ("the portable-film look of train.ood.clinical", _png(lambda g, r, s: portable(g, s))),
    "bits12": ("a 12-bit detector's values in a 16-bit PNG", lambda g, r, s: encode(g, bits=12)),
    "bits16": ("16-bit values in a 16-bit PNG", lambda g, r, s: encode(g, bits=16)),
}


def apply_shift(name: str, gray: np.ndarray, seed: int) -> bytes:
    """The bytes of ``gray`` (a decoded film, ``uint8[H, W]``) under shift ``name``, seeded by ``seed``."""
    return SHIFTS[name][1](np.asarray(gray, np.uint8), np.random.default_rng(seed), seed)


TRAIN_KINDS = ("exposure", "noise", "blur", "jpeg", "low_res", "rotate", "frame", "collimate", "text", "portable")


def random_shift(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One acquisition shift of a random kind (``TRAIN_KINDS``) and strength, for training: the same operations
    as ``SHIFTS``, over a range around their evaluation strengths. Returns ``uint8[H, W]`` of the same shape."""
    h, w = gray.shape
    kind = TRAIN_KINDS[int(rng.integers(len(TRAIN_KINDS)))]
    if kind == "exposure":
        out = contrast(gamma(gray, float(np.exp(rng.uniform(-0.5, 0.5)))), float(rng.uniform(0.6, 1.4)))
    elif kind == "noise":
        out = noise(gray, float(rng.uniform(3, 12)), rng)
    elif kind == "blur":
        out = blur(gray, float(rng.uniform(0.002, 0.006)))
    elif kind == "jpeg":
        out = np.asarray(Image.open(io.BytesIO(encode(gray, "jpeg", int(rng.integers(20, 60))))).convert("L"))
    elif kind == "low_res":
        small = low_res(gray, int(rng.integers(max(h, w) // 3, max(h, w) * 3 // 4)))
        out = np.asarray(Image.fromarray(small, "L").resize((w, h), Image.Resampling.BILINEAR))
    elif kind == "rotate":
        out = rotate(gray, float(rng.uniform(-12, 12)))
    elif kind == "frame":
        out = frame(gray, float(rng.choice([rng.uniform(0.8, 0.95), rng.uniform(1.05, 1.3)])))
    elif kind == "collimate":
        out = collimate(gray, tuple(float(v) for v in rng.uniform(0, 0.12, 4)), int(rng.integers(0, 40)))
    elif kind == "text":
        out = burn_text(gray, rng, int(rng.integers(1, 5)))
    else:
        out = portable(gray, int(rng.integers(1 << 30)))
    if out.shape != gray.shape:
        out = np.asarray(Image.fromarray(out, "L").resize((w, h), Image.Resampling.LANCZOS))
    return out


class AcquisitionShift:
    """``transform(x, idx, rng)`` for ``train.batches.FixedBatches``: a share ``p`` of the images
    (``uint8[N, H, W]`` at the stored resolution, before the framing crop) gets one ``random_shift``."""

    def __init__(self, p: float):
        if not 0 < p <= 1:
            raise ValueError(f"acquisition: the share of shifted images must be in (0, 1], not {p}")
        self.p = float(p)

    def __call__(self, x: np.ndarray, idx, rng: np.random.Generator) -> np.ndarray:
        out = np.array(x, np.uint8, copy=True)
        for i in np.flatnonzero(rng.random(len(out)) < self.p):
            out[i] = random_shift(out[i], rng)
        return out


def shifted_copies(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image of ``x`` (``uint8[N, H, W]``, stored resolution) given one ``random_shift``, seeded: the fixed
    shifted validation set a run under ``acquisition`` validates on (``val_shifted_*``, ``val_robust_loss``)."""
    rng = np.random.default_rng(seed + 104729)
    return np.stack([random_shift(g, rng) for g in np.asarray(x, np.uint8)])


def annotate(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Annotations a reader or a viewer burns into a film, as they read once a colour annotation is turned to
    gray: 1-4 arrows, lines, circles or boxes at a random gray level (mid gray to white, sometimes black) and
    width, sometimes a label beside them. For the input gate's training: a film with arrows is still a film."""
    h, w = gray.shape
    s = max(h, w)
    img = Image.fromarray(gray, "L")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        ink = int(rng.uniform(90, 256)) if rng.random() < 0.85 else int(rng.uniform(0, 40))
        width = max(1, round(s * rng.uniform(0.004, 0.015)))
        x0, y0 = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        kind = int(rng.integers(3))
        if kind == 0:  # an arrow: a shaft and a head pointing at (x0, y0)
            ang = rng.uniform(0, 2 * np.pi)
            length = s * rng.uniform(0.06, 0.2)
            x1, y1 = x0 + length * np.cos(ang), y0 + length * np.sin(ang)
            d.line([(x1, y1), (x0, y0)], fill=ink, width=width)
            head = length * 0.3
            pts = [(x0, y0)] + [(x0 + head * np.cos(ang + a), y0 + head * np.sin(ang + a)) for a in (0.4, -0.4)]
            d.polygon(pts, fill=ink)
        elif kind == 1:  # a circle or an ellipse around a finding
            r = s * rng.uniform(0.04, 0.12)
            d.ellipse([x0 - r, y0 - r * rng.uniform(0.6, 1.4), x0 + r, y0 + r], outline=ink, width=width)
        else:  # a box or a measurement line
            dx, dy = s * rng.uniform(0.05, 0.2), s * rng.uniform(0.05, 0.2)
            if rng.random() < 0.5:
                d.rectangle([x0, y0, x0 + dx, y0 + dy], outline=ink, width=width)
            else:
                d.line([(x0, y0), (x0 + dx, y0 + dy)], fill=ink, width=width)
        if rng.random() < 0.3:
            font = ImageFont.load_default(size=float(s * rng.uniform(0.02, 0.04)))
            d.text((min(x0 + s * 0.02, w - 1), min(y0 + s * 0.02, h - 1)), str(rng.choice(("RLL", "LUL", "effusion",
                                                                                             "ETT", "1", "2", "A"))),
                   fill=ink, font=font)
    return np.asarray(img)
