"""Fit the input gate (``cxr_edge/ood.py``) of a model bundle and write it into the bundle.

    python -m train.ood BUNDLE_DIR [--data DIR] [--gate-dev DIR] [--n-train 1200] [--C 5] [--grid 3]
                                   [--grid-components 64] [--stretched 1] [--stretched-dev 4]
                                   [--clinical-variants 1] [--seed 0]

The shipped gate (cxr_edge/models/default) is refitted with exactly
``python -m train.ood cxr_edge/models/default --C 5`` (every other setting at its default; the card's
``ood.fitted_on.command`` spells them all out).

The gate reads the bundle model's own last feature map (``cxr_edge.ood.embedder``: ``Classifier.predict_full``
on dual-output bundles, else ``features.tflite``): its global average (the penultimate embedding) and, with
``--grid G`` (default 3; 0: the older global-average gates), its layout: the map average-pooled on a ``G x G``
grid, each cell's vector projected onto the first ``--grid-components`` principal components of frontal
training scans' cells (``fit_layout``). Where things are in the frame tells a frontal chest X-ray from a knee, a
hand or a whole-spine film that the global average alone confuses with one. A bundle exported with
``--fine-features`` (``export.cam.feature_tensor``) gives a finer map: the last map on the stride-16 grid
plus the stride-16 layer's own channels (9x9x1952 for Lite0 at 144 px, whose last map is only 5x5), and the
gate reads all of it. Its head is a linear softmax over
four classes (``frontal_chest``, ``lateral_chest``, ``other_body_part``, ``not_radiograph``), fitted
(scikit-learn, multinomial logistic regression, balanced class weights) on:

- positives: a seeded subsample of the patient-grouped protocol's **train** split, each scan as it is, one
  geometric variant (framing, aspect ratio, tilt: ``augment``) and ``--train-variants`` ``variants`` (flips,
  tilt, brightness/contrast/gamma: washed-out portable films are frontal chest X-rays too), ``--clinical-variants``
  ``clinical`` variants (films as clinics produce them: collimation frames, letterboxing to a landscape frame,
  tall/wide crops keeping the lungs, tilt, edge enhancement, burned-in text and lead markers; these teach the head
  only: the layout basis and the density model are fitted on the other frontal rows, ``GateData.basis``), plus the adult
  frontal chest X-rays of ``gate_dev`` (``--gate-dev``, by default ``../shared/data/gate_dev``) with variants
  (``--variants`` + ``--frontal-variants``);
- negatives: gate_dev's lateral chest views and radiographs of other body parts, with seeded variants
  (``variants``: flips, crops, rotations, brightness/contrast/gamma); "long films" (``stretched``: a strip of
  2.5-4.5x the frame's aspect ratio squashed back to a square, as a whole-spine or long-leg film reaches the
  model) made from train scans (``--stretched`` per scan) and from gate_dev's lateral views and other
  radiographs (``--stretched-dev`` each), as ``other_body_part``; and generated images that are not
  radiographs (``make_non_cxr``: document pages, screenshots, photo-like scenes, textures, gray and colour).

The rejection threshold on the score ``logsumexp(other logits) - frontal logit`` is chosen on the grouped
**validation** split only (``choose_threshold``): the decision boundary 0, raised just enough that at most
``--max-val-reject`` of the validation scans would be refused. A density check (``fit_density``: Mahalanobis
distance in the first ``--density-components`` principal components of the frontal training vectors) catches
what none of the head's classes describes; its threshold is the ``1 - max_val_reject`` quantile of the
validation scans' distances. A polarity check (``fit_polarity``: a logistic regression on the standardized
16x16 thumbnail, train scans against their negatives, no gate_dev) refuses negative images; its threshold is
chosen on the validation split the same way. The official test split is never read.
``gate_dev`` is cross-validated (``cross_validate``: folds grouped by patient / body part and source; each fold
refits everything, layout projection included, without the fold's images and any variant of them) and the
per-category rates go into the card's ``ood.fitted_on.gate_dev_cv``. The 3-class classifier never sees
gate_dev: this only fits the gate. Writes ``ood.npz`` into BUNDLE_DIR and an ``"ood"`` entry (with its sha256)
into its ``card.json``; every other field of the card is kept.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from cxr_edge.bundle import CARD_NAME, load_bundle, sha256_file
from cxr_edge.ood import (CHROMA_LEVEL, DEFAULT_MAX_COLOUR_FRACTION, DEFAULT_MIN_STD, DEFAULT_THUMB, EMBED_CLASSES,
                          REASONS, Gate, density_distance, embedder, features, head_logits, head_score, layout_vector)
from cxr_edge.preprocess import load_gray

GATE_FILE = "ood.npz"
DEFAULT_GATE_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gate_dev"
DEFAULT_ADULT_DEV = DEFAULT_GATE_DEV.parent / "adult_dev"
# gate_dev's frontal films are adults': the adult_chest class (refused as outside the population, not as
# something else), with adult_dev's
GATE_DEV_CLASSES = {"frontal_chest_other": "adult_chest", "lateral_chest": "lateral_chest",
                    "non_chest_radiograph": "other_body_part", "adult_dev": "adult_chest"}
ADULT_LABEL = len(EMBED_CLASSES)  # GateData.y of adult frontal films: frontal_chest to the head, adult to the
#                                   adult check (fit_adult)
DEFAULT_MAX_VAL_REJECT = 0.002
# The shipped gate's settings are the defaults: `python -m train.ood BUNDLE` rebuilds it
DEFAULT_C = 10.0
ADULT_VAL_SHARE = 0.5  # the adult check may refuse half the validation share the head may: together within 0.5%
DEFAULT_DENSITY_COMPONENTS = 0
DEFAULT_ADULT_VARIANTS = 6  # acquisition shifts (train.shifts.random_shift) and annotations per adult frontal film
DEFAULT_VARIANTS = 16
DEFAULT_FRONTAL_VARIANTS = 0  # more variants of each gate_dev adult frontal X-ray
DEFAULT_TRAIN_VARIANTS = 1  # photometric + geometric variants per train scan (frontal_chest)
DEFAULT_CLINICAL = 5  # clinic-style variants per train scan (frontal_chest: frames, text, crops; ``clinical``)
DEFAULT_SYNTH = 12  # generated non-radiographs of each kind
DEFAULT_GRID = 3  # layout: the feature map pooled on a 3 x 3 grid (0: global average only, the older gates)
DEFAULT_GRID_COMPONENTS = 64  # principal components per grid cell
DEFAULT_STRETCHED = 1  # "long film" variants per train scan (other_body_part)
DEFAULT_STRETCHED_DEV = 4  # "long film" variants per gate_dev lateral view / other radiograph (other_body_part)
EMBED_BATCH = 16


# ---------------------------------------------------------------------------------------------------------
# image variants
AUGMENTATIONS = ("border crop 5-15%", "central crop to 75-90% of the width or of the height (another aspect "
                 "ratio, squashed back)", "rotation -7..7 degrees", "shift up to 6%")


def augment(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """One random geometric variant per ``uint8[N, S, S]`` image (seeded): what other chest X-rays differ
    by (framing, aspect ratio, tilt), so that the gate does not learn this data set's exact framing."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(gray)
    s = gray.shape[1]
    for i, g in enumerate(gray):
        img = Image.fromarray(g, "L")
        kind = int(rng.integers(4))
        if kind == 0:
            m = int(s * rng.uniform(0.05, 0.15))
            img = img.crop((m, m, s - m, s - m))
        elif kind == 1:
            f = rng.uniform(0.75, 0.9)
            cut = int(s * (1 - f) / 2)
            img = img.crop((cut, 0, s - cut, s) if rng.random() < 0.5 else (0, cut, s, s - cut))
        elif kind == 2:
            img = img.rotate(float(rng.uniform(-7, 7)), resample=Image.Resampling.BILINEAR, fillcolor=0)
        else:
            dx, dy = (int(v) for v in rng.integers(-int(0.06 * s), int(0.06 * s) + 1, 2))
            img = img.rotate(0, translate=(dx, dy), fillcolor=0)
        out[i] = np.asarray(img.resize((s, s), Image.Resampling.LANCZOS) if img.size != (s, s) else img)
    return out


def variants(gray: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded variants of each ``uint8[N, S, S]`` image (``[N * n, S, S]``, image-major): a geometric
    ``augment``, a horizontal flip half of the time, rotation up to 15 degrees a third of the time, and
    brightness / contrast / gamma changes."""
    rng = np.random.default_rng(seed)
    out = []
    for i, g in enumerate(np.asarray(gray, np.uint8)):
        geo = augment(np.repeat(g[None], n, 0), seed * 7919 + i)
        for v in geo:
            img = Image.fromarray(v, "L")
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            if rng.random() < 0.33:
                img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=0)
            img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
            img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.75, 1.25)))
            gamma = float(rng.uniform(0.7, 1.4))
            img = img.point([int(round(255 * (k / 255) ** gamma)) for k in range(256)])
            out.append(np.asarray(img, np.uint8))
    s = np.asarray(gray).shape[-1]
    return np.stack(out) if out else np.empty((0, s, s), np.uint8)


CLINICAL = ("frontal films as clinics produce them: at most one of a tall (75-90% of the width) or wide (70-90% of "
            "the height) crop keeping the lungs, letterboxing to a 1.1-1.4 landscape frame (black, white, gray or "
            "mirrored, darkened tissue at the sides), or a 3-12 degree tilt; then a collimation frame (55%: 1-4 "
            "sides, margins 3-20%, black, white, or the anatomy darkened/brightened, hard or soft edge), edge "
            "enhancement (20%: unsharp mask) and burned-in text and markers (60%: PIL default font, 5-12 px, side "
            "markers 8-16 px at 224 px; PORTABLE, AP, PA, L, R, SEMI-ERECT, SUPINE, dates and times; white, sometimes "
            "black or in a marker box); at least one change per film")
MARKER_WORDS = ("PORTABLE", "AP", "PA", "L", "R", "SEMI-ERECT", "AP PORTABLE", "SUPINE", "UPRIGHT", "ERECT",
                "AP SUPINE", "PORT", "CHEST", "INSP", "L", "R", "AP PORT SEMI-ERECT", "MOBILE", "SITTING")


def _marker_text(rng) -> str:
    k = int(rng.integers(4))
    if k == 0:  # a timestamp
        return (f"{int(rng.integers(2000, 2030))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d} "
                f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}")
    if k == 1:
        return f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:{int(rng.integers(0, 60)):02d}"
    return str(rng.choice(MARKER_WORDS))


def _collimate(arr: np.ndarray, rng) -> np.ndarray:
    """Margins on 1-4 sides outside a collimation rectangle: black, white, or the anatomy darkened/brightened."""
    s = arr.shape[0]
    sides = rng.permutation(4)[:int(rng.integers(1, 5))]
    m = [0, 0, 0, 0]  # left, top, right, bottom
    for k in sides:
        m[int(k)] = int(s * rng.uniform(0.03, 0.2))
    mask = np.zeros((s, s), np.float32)
    mask[m[1]:s - m[3], m[0]:s - m[2]] = 1.0
    if rng.random() < 0.5:  # the shutter's penumbra
        mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8), "L").filter(
            ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3)))), np.float32) / 255
    a = arr.astype(np.float32)
    mode = int(rng.integers(4))
    if mode == 0:
        out = np.full_like(a, rng.uniform(0, 40))
    elif mode == 1:
        out = np.full_like(a, rng.uniform(200, 255))
    elif mode == 2:  # the margin still shows the body, darker (the unexposed side of a shutter)
        out = a * rng.uniform(0.2, 0.6)
    else:  # or brighter
        out = 255 - (255 - a) * rng.uniform(0.2, 0.6)
    if rng.random() < 0.3:
        out = out + rng.normal(0, 4, a.shape)
    inside = a if rng.random() < 0.6 else np.clip((a - a.mean()) * rng.uniform(1.0, 1.3) + a.mean() + rng.uniform(0, 25), 0, 255)
    return np.clip(mask * inside + (1 - mask) * out, 0, 255).astype(np.uint8)


def _letterbox(img: Image.Image, rng) -> Image.Image:
    """The film padded to another aspect ratio (black, white, gray or mirrored tissue), squashed back."""
    s = img.size[0]
    pad = int(s * (rng.uniform(1.1, 1.4) - 1) / 2)
    arr = np.asarray(img)
    wide = True  # a landscape canvas: the anatomy narrower (the other way is the long films' way)
    widths = ((0, 0), (pad, pad)) if wide else ((pad, pad), (0, 0))
    mode = int(rng.integers(4 if wide else 3))
    if mode == 3:  # the body beyond the film's sides (arms, soft tissue), mirrored and darker
        out = np.pad(arr, widths, mode="reflect").astype(np.float32)
        out[:, :pad] *= rng.uniform(0.3, 0.9)
        out[:, out.shape[1] - pad:] *= rng.uniform(0.3, 0.9)
    else:
        out = np.pad(arr, widths, mode="constant", constant_values=int((0, 255, rng.integers(60, 180))[mode]))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L").resize((s, s), Image.Resampling.LANCZOS)


def _aspect_crop(img: Image.Image, rng) -> Image.Image:
    """A tall (60-90% of the width) or wide (65-90% of the height) crop that keeps the lungs, squashed back."""
    s = img.size[0]
    if rng.random() < 0.5:
        w = int(s * rng.uniform(0.75, 0.9))
        left = int(np.clip((s - w) / 2 + s * rng.uniform(-0.05, 0.05), 0, s - w))
        box = (left, 0, left + w, s)
    else:
        h = int(s * rng.uniform(0.7, 0.9))
        top = int(np.clip(s * rng.uniform(0.0, 0.1) * (s - h) / s * 2, 0, s - h))
        box = (0, top, s, top + h)
    return img.crop(box).resize((s, s), Image.Resampling.LANCZOS)


def _burn_text(img: Image.Image, rng) -> Image.Image:
    """1-3 burned-in labels (``_marker_text``), white (sometimes black or in a marker box), mostly near the edges,
    at the size they have once a film is reduced to the model's input: 5-12 px for words and times, 8-16 px for
    a single-letter side marker (at 224 px)."""
    from PIL import ImageFont

    s = img.size[0]
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        text = _marker_text(rng)
        lo, hi = (8, 16) if len(text) == 1 else (5, 12)
        font = ImageFont.load_default(size=float(rng.uniform(lo, hi) * s / 224))
        x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0, y1 - y0
        if rng.random() < 0.7:  # near an edge or a corner
            x = int(rng.choice([rng.uniform(0.01, 0.12) * s, s - tw - rng.uniform(0.01, 0.12) * s,
                                rng.uniform(0, max(1, s - tw))]))
            y = int(rng.choice([rng.uniform(0.01, 0.15) * s, s - th - rng.uniform(0.02, 0.15) * s]))
        else:
            x, y = int(rng.uniform(0, max(1, s - tw))), int(rng.uniform(0, max(1, s - th)))
        ink = int(rng.uniform(200, 256)) if rng.random() < 0.85 else int(rng.uniform(0, 40))
        if rng.random() < 0.2:  # a lead marker: a box around the letter
            pad = max(2, th // 3)
            box = [x - pad, y - pad + y0, x + tw + pad, y + th + pad + y0]
            if rng.random() < 0.5:
                d.rectangle(box, fill=255 - ink)
            d.rectangle(box, outline=ink, width=1)
        d.text((x, y), text, fill=ink, font=font)
    return img


def clinical(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """One seeded clinic-style variant per ``uint8[N, S, S]`` frontal scan (``CLINICAL``): the film cropped to
    another aspect ratio, letterboxed or tilted, collimated, edge-enhanced, with burned-in text and markers
    (each with its own probability, at least one). Labelled ``frontal_chest``: a portable AP film with a
    collimation frame and "PORTABLE" burned in is a frontal chest X-ray."""
    rng = np.random.default_rng(seed)
    gray = np.asarray(gray, np.uint8)
    out = np.empty_like(gray)
    for i, g in enumerate(gray):
        img = Image.fromarray(g, "L")
        geo = int(rng.choice(4, p=(0.35, 0.25, 0.2, 0.2)))  # none, crop, letterbox, tilt: one of them at most
        todo = rng.random(3) < (0.55, 0.2, 0.6)  # frame, sharpen, text
        if geo == 0 and not todo.any():
            todo[int(rng.integers(3))] = True
        if geo == 1:
            img = _aspect_crop(img, rng)
        elif geo == 2:
            img = _letterbox(img, rng)
        elif geo == 3:
            angle = float(rng.uniform(3, 12)) * (1 if rng.random() < 0.5 else -1)
            fill = int((0, 255, int(np.asarray(img).mean()))[int(rng.integers(3))])
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
        if todo[0]:
            img = Image.fromarray(_collimate(np.asarray(img), rng), "L")
        if todo[1]:
            img = img.filter(ImageFilter.UnsharpMask(radius=float(rng.uniform(1.5, 4)),
                                                     percent=int(rng.integers(80, 250)), threshold=0))
        if todo[2]:
            img = _burn_text(img, rng)
        out[i] = np.asarray(img, np.uint8)
    return out


STRETCH = ("a strip of 1/2.5 to 1/4.5 of the width (60%) or of the height (40%), at a random offset, squashed "
           "back to a square: what a long film (whole spine, whole leg) or a wide one (dental panoramic) becomes "
           "in the model's square input")


def stretched(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """One seeded "long film" per ``uint8[N, S, S]`` image (``STRETCH``): a narrow strip stretched 2.5-4.5x
    across the frame. A radiograph 3-4 times taller than wide (whole-spine, long-leg films) reaches the model
    like this: chest-like texture, but nothing where a frontal chest X-ray has it. Labelled
    ``other_body_part``; far from the mild aspect changes (up to 1.33x) that frontal chest X-rays get."""
    rng = np.random.default_rng(seed)
    gray = np.asarray(gray, np.uint8)
    out = np.empty_like(gray)
    s = gray.shape[1]
    for i, g in enumerate(gray):
        w = int(round(s / rng.uniform(2.5, 4.5)))
        off = int(rng.integers(0, s - w + 1))
        box = (off, 0, off + w, s) if rng.random() < 0.6 else (0, off, s, off + w)
        out[i] = np.asarray(Image.fromarray(g, "L").crop(box).resize((s, s), Image.Resampling.LANCZOS))
    return out


# ---------------------------------------------------------------------------------------------------------
# generated images that are not radiographs (also the benchmark's non-CXR set)
WORDS = ("the of and to in is for on that with as by this are be from at an or which report patient "
         "results total invoice date page section figure table summary account payment").split()


def _text_line(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _document(rng, size=(850, 1100), bg=255, ink=0, columns=1, tilt=0.0, noise=0.0, colour_header=None,
              scale=2) -> Image.Image:
    w, h = size
    small = Image.new("L", (w // scale, h // scale), bg)
    d = ImageDraw.Draw(small)
    y = 40 // scale
    if colour_header is not None:
        y += 60 // scale
    col_w = (w // scale - 60 // scale) // columns
    while y < h // scale - 40 // scale:
        for c in range(columns):
            x = 30 // scale + c * col_w
            if rng.random() < 0.08:
                continue  # paragraph break
            d.text((x, y), _text_line(rng, int(rng.integers(3, 9 if columns == 1 else 5))), fill=ink)
        y += 14 if rng.random() > 0.1 else 24
    img = small.resize((w, h), Image.Resampling.BILINEAR)
    if colour_header is not None:
        img = img.convert("RGB")
        ImageDraw.Draw(img).rectangle([0, 0, w, 70], fill=colour_header)
    if tilt:
        img = img.rotate(tilt, resample=Image.Resampling.BILINEAR, fillcolor=200 if img.mode == "L" else (200,) * 3)
    if noise:
        arr = np.asarray(img, np.float32)
        arr = arr + rng.normal(0, noise, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), img.mode)
    return img


def _screenshot(rng, size=(1280, 800), dark=False, colourful=True) -> Image.Image:
    w, h = size
    bg = (30, 30, 30) if dark else (245, 245, 245)
    fg = (220, 220, 220) if dark else (20, 20, 20)
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)

    def colour():
        if not colourful:
            v = int(rng.integers(60, 200))
            return (v, v, v)
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    d.rectangle([0, 0, w, 36], fill=colour())  # title bar
    d.rectangle([0, 36, 220, h], fill=(50, 50, 50) if dark else (225, 225, 230))  # sidebar
    for i in range(12):
        d.text((16, 60 + 28 * i), _text_line(rng, 2), fill=fg)
    for _ in range(int(rng.integers(4, 9))):  # panels / buttons
        x0, y0 = int(rng.integers(240, w - 200)), int(rng.integers(60, h - 100))
        d.rectangle([x0, y0, x0 + int(rng.integers(80, 300)), y0 + int(rng.integers(24, 120))], fill=colour(),
                    outline=fg)
    for i in range(int(rng.integers(8, 20))):
        d.text((250, 70 + 30 * i), _text_line(rng, int(rng.integers(4, 12))), fill=fg)
    for i in range(6):  # a colour bar chart
        bh = int(rng.integers(20, 200))
        d.rectangle([w - 180 + 25 * i, h - 40 - bh, w - 160 + 25 * i, h - 40], fill=colour())
    return img


def _photo_like(rng, size=(640, 480), colour=True) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3 if colour else 1):
        a, b, c = rng.normal(0, 1, 3)
        base = 128 + 60 * np.sin(a * xx / w * 3 + b * yy / h * 3 + c)
        chans.append(base)
    arr = np.stack(chans, -1) if colour else chans[0]
    for _ in range(int(rng.integers(3, 8))):  # blobs ("objects")
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 150)
        m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        arr[m] = rng.uniform(0, 255, 3) if colour else rng.uniform(0, 255)
    arr = arr + rng.normal(0, 12, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB" if colour else "L")
    return img.filter(ImageFilter.GaussianBlur(1.5))


def _texture(rng, kind: str, size=(512, 512)) -> Image.Image:
    w, h = size
    if kind == "noise":
        arr = rng.integers(0, 256, (h, w)).astype(np.uint8)
        return Image.fromarray(arr, "L")
    if kind == "cloud":
        arr = rng.normal(0, 1, (h // 16, w // 16))
        img = Image.fromarray(((arr - arr.min()) / np.ptp(arr) * 255).astype(np.uint8), "L")
        return img.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    if kind == "stripes":
        xx = np.arange(w)[None, :].repeat(h, 0)
        return Image.fromarray((127 + 120 * np.sin(xx / rng.uniform(4, 30))).astype(np.uint8), "L")
    if kind == "checker":
        n = int(rng.integers(4, 40))
        yy, xx = np.mgrid[0:h, 0:w]
        return Image.fromarray((((xx // n + yy // n) % 2) * 255).astype(np.uint8), "L")
    if kind == "gradient":
        g = np.linspace(0, 255, w)[None, :].repeat(h, 0)
        return Image.fromarray(g.astype(np.uint8), "L").rotate(float(rng.uniform(0, 360)))
    if kind == "wood":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot(xx - w * rng.uniform(0, 1), yy - h * rng.uniform(0, 1))
        arr = 127 + 100 * np.sin(r / rng.uniform(5, 15) + rng.normal(0, 0.5, (h, w)))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    raise ValueError(kind)


TEXTURES = ("noise", "cloud", "stripes", "checker", "gradient", "wood")


def synth_non_radiographs(seed: int = 0, n: int = DEFAULT_SYNTH) -> list[tuple[Image.Image, str, str]]:
    """Seeded images that are not radiographs, ``[(image, kind, file name)]``: ``n`` each of document
    pages, screenshots and photo-like scenes, 6 solid colours, and ``n`` textures."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = _document(rng, columns=1 + i % 2, tilt=float(rng.uniform(-2, 2)) if i % 3 == 0 else 0.0,
                        noise=8.0 if i % 4 == 1 else 0.0, bg=255 if i % 5 else 235,
                        colour_header=tuple(int(v) for v in rng.integers(0, 256, 3)) if i % 4 == 3 else None)
        out.append((img, "document", f"document_{i:02d}.{'jpg' if i % 2 else 'png'}"))
    for i in range(n):
        img = _screenshot(rng, size=(1280, 800) if i % 2 else (1920, 1080), dark=i % 3 == 0, colourful=i % 4 != 2)
        out.append((img, "screenshot", f"screenshot_{i:02d}.{'png' if i % 3 else 'jpg'}"))
    for i in range(n):
        img = _photo_like(rng, size=(640, 480) if i % 2 else (480, 640), colour=i % 3 != 0)
        out.append((img, "photo_like", f"photo_like_{i:02d}.jpg"))
    for i, c in enumerate([(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (30, 120, 220),
                           (250, 240, 200)]):
        out.append((Image.new("RGB", (400, 300), c), "solid", f"solid_{i:02d}.{'png' if i % 2 else 'jpg'}"))
    for i in range(n):
        kind = TEXTURES[i % len(TEXTURES)]
        out.append((_texture(rng, kind), "texture", f"texture_{kind}_{i:02d}.{'png' if i < n // 2 else 'jpg'}"))
    return out


# ---------------------------------------------------------------------------------------------------------
# gate_dev
@dataclass(frozen=True)
class DevItem:
    path: str
    category: str  # gate_dev folder
    cls: str  # one of EMBED_CLASSES, or "adult_chest" (an adult's frontal film: ADULT_LABEL)
    group: str  # cross-validation group: the patient, or the body part for other radiographs


def body_part(file_name: str) -> str:
    """The body part a ``non_chest_radiograph`` file name starts with (``wrist_pa_...`` -> ``wrist``)."""
    return Path(file_name).name.split("_")[0].lower()


def patient_of(file_name: str) -> str:
    """The patient of an NIH ChestX-ray14 file name (``nih_00000129_000.png``, ``00000129_000.png`` ->
    ``00000129``); the file name itself for other sources (one patient a file)."""
    parts = Path(file_name).stem.split("_")
    digits = [p for p in parts if p.isdigit() and len(p) == 8]
    return f"nih/{digits[0]}" if digits else Path(file_name).name


def adult_dev_items(root: str | Path) -> list[DevItem]:
    """adult_dev's adult frontal films (``MANIFEST.csv``'s ``file`` column, or every image below ``root``),
    as ``adult_chest``, grouped by patient; empty when the folder is absent."""
    root = Path(root)
    manifest = root / "MANIFEST.csv"
    if manifest.is_file():
        with manifest.open(newline="") as f:
            files = [r["file"] for r in csv.DictReader(f)]
    elif root.is_dir():
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg",
                                                                                              ".jpeg", ".dcm"))
    else:
        return []
    return [DevItem(str(root / f), "adult_dev", "adult_chest", patient_of(f)) for f in files]


def gate_dev_items(root: str | Path) -> list[DevItem]:
    """gate_dev's images from its ``MANIFEST.csv`` (``category, file, ...``), or from its folders when there
    is no manifest. Other radiographs are grouped by body part (a fold never sees the held-out body part),
    frontal and lateral chest views by file (one patient each)."""
    root = Path(root)
    manifest = root / "MANIFEST.csv"
    if manifest.is_file():
        with manifest.open(newline="") as f:
            rows = [(r["category"], r["file"]) for r in csv.DictReader(f)]
    else:
        rows = [(p.parent.name, str(p.relative_to(root))) for cat in GATE_DEV_CLASSES
                for p in sorted((root / cat).glob("*")) if p.is_file()]
    out = []
    for category, file in rows:
        if category not in GATE_DEV_CLASSES:
            continue
        cls = GATE_DEV_CLASSES[category]
        group = (f"{category}/{body_part(file)}" if cls == "other_body_part" else
                 patient_of(file) if cls == "adult_chest" else f"{category}/{Path(file).name}")
        out.append(DevItem(str(root / file), category, cls, group))
    if not out:
        raise FileNotFoundError(f"{root}: no gate_dev images (expected MANIFEST.csv or the folders "
                                f"{', '.join(GATE_DEV_CLASSES)})")
    return out


# ---------------------------------------------------------------------------------------------------------
# embeddings, head, threshold
def embed_images(embed: Callable[[np.ndarray], np.ndarray], gray: np.ndarray, batch: int = EMBED_BATCH) -> np.ndarray:
    """Embeddings ``float32[N, C]`` of ``uint8[N, S, S]`` in batches."""
    gray = np.asarray(gray, np.uint8)
    if len(gray) == 0:
        raise ValueError("no images to embed")
    return np.concatenate([np.asarray(embed(gray[i:i + batch]), np.float32) for i in range(0, len(gray), batch)])


def _f32(arrays: dict) -> dict:
    """Stored as float32 (half the bytes); thresholds are computed from these very numbers."""
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


HALF_ARRAYS = ("lay_proj", "den_components")  # the large projection matrices: stored as float16


def _f16(arrays: dict) -> dict:
    """float32 arrays holding float16 values (``HALF_ARRAYS``): ``ood.npz`` stores them in half the bytes again
    (the bundle must stay within 8 MiB) and the thresholds are computed from these very numbers."""
    return {k: (np.asarray(v, np.float16).astype(np.float32) if k in HALF_ARRAYS else v) for k, v in arrays.items()}


ABSENT_LOGIT = -30.0  # the bias of a class without training images: never the most likely


def fit_head(x: np.ndarray, y: np.ndarray, c: float = DEFAULT_C, seed: int = 0) -> dict:
    """Arrays for ``ood.npz`` (``emb_mean``, ``emb_scale``, ``emb_weights[C, K]``, ``emb_bias[K]``): a
    multinomial logistic regression with balanced class weights on standardized embeddings ``x[N, C]``,
    labels ``y`` (indices into ``EMBED_CLASSES``). ``frontal_chest`` and at least one other class must occur; a
    class without images gets zero weights and bias ``ABSENT_LOGIT``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    present = [k for k in range(len(EMBED_CLASSES)) if np.any(y == k)]
    if 0 not in present or len(present) < 2:
        raise ValueError("the gate needs frontal chest X-rays and images of at least one other class, got "
                         f"{[EMBED_CLASSES[k] for k in present]}")
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit((x - mean) / scale, y)
    coef, icpt = clf.coef_, clf.intercept_
    if len(present) == 2:  # scikit-learn's binary form: one row for the second class, against the first
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
    weights = np.zeros((x.shape[1], len(EMBED_CLASSES)))
    bias = np.full(len(EMBED_CLASSES), ABSENT_LOGIT)
    for row, k in enumerate(clf.classes_):
        weights[:, int(k)], bias[int(k)] = coef[row], icpt[row]
    return _f32({"emb_mean": mean, "emb_scale": scale, "emb_weights": weights, "emb_bias": bias})


def fit_density(x_frontal: np.ndarray, k: int = 64) -> dict:
    """Arrays ``den_mean``, ``den_scale``, ``den_components[k, C]``, ``den_var[k]``: the first ``k`` principal
    components of standardized frontal chest X-ray embeddings (``k`` at most a tenth of their number)."""
    x = np.asarray(x_frontal, np.float64)
    k = int(min(k, max(1, len(x) // 10), x.shape[1]))
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    var, comps = _principal((x - mean) / scale, k)
    return _f16(_f32({"den_mean": mean, "den_scale": scale, "den_components": comps,
                      "den_var": np.maximum(var, 1e-9)}))


def _principal(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(variances ``[k]``, components ``[k, D]``) of centred rows ``z[N, D]``: the eigenvectors of the ``D x D``
    covariance with the ``k`` largest eigenvalues (the SVD's answer, much faster for ``N >> D``)."""
    w, v = np.linalg.eigh(z.T @ z / max(1, len(z) - 1))
    order = np.argsort(w)[::-1][:k]
    return w[order], v[:, order].T


def fit_layout(pooled_frontal: np.ndarray, channels: int, grid: int, k: int = DEFAULT_GRID_COMPONENTS) -> dict:
    """Arrays ``lay_mean[C]``, ``lay_proj[C, k]``: the mean and the first ``k`` principal components of the grid
    cells (``C``-vectors, all cells pooled) of frontal chest X-rays' ``pooled`` rows ``[N, C + g*g*C]``."""
    x = np.asarray(pooled_frontal, np.float64)
    cells = x[:, channels:].reshape(-1, channels)
    if cells.shape[0] != len(x) * grid * grid:
        raise ValueError(f"pooled rows of {x.shape[1]} numbers are not {channels} + {grid}x{grid}x{channels}")
    k = int(min(k, channels, max(1, len(cells) - 1)))
    mean = cells.mean(axis=0)
    _, comps = _principal(cells - mean, k)
    return _f16(_f32({"lay_mean": mean, "lay_proj": comps.T}))


ADULT_CHECK = ("a logistic regression (balanced class weights) on the head's standardized vector: adult frontal films "
               "(and their variants) against the training scans' frontal rows (children, and their variants); "
               "asked for what the head accepts as a frontal chest X-ray; refused as an adult chest X-ray when "
               "its score > threshold (the validation scans' quantile)")


CHEST_CHECK = ("what the adult score flags is asked a second question, a logistic regression (balanced class weights) "
               "on the same vector: adult frontal chest films (and their variants) against lateral views and other "
               "body parts (gate_dev's, their variants and long films); a chest score <= 0 is refused as the head's "
               "most likely other class, not as an adult chest X-ray")


def fit_adult(x: np.ndarray, y: np.ndarray, dev: np.ndarray, arrays: dict, val_x: np.ndarray, c: float = DEFAULT_C,
              max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0) -> tuple[dict, dict, np.ndarray]:
    """The intended-population check (``Gate.adult_scores``): arrays ``adult_weights[D]``, ``adult_bias`` on the
    head's standardization (``emb_mean``, ``emb_scale``), fitted on the adult rows (``ADULT_LABEL``) against the
    children's frontal rows (training scans and their variants: ``dev == -1``); its threshold from the
    validation scans (``choose_threshold``). Returns (arrays, card parameters, validation scores)."""
    from sklearn.linear_model import LogisticRegression

    frontal = EMBED_CLASSES.index("frontal_chest")
    keep = (y == ADULT_LABEL) | ((y == frontal) & (dev == -1))
    z = (np.asarray(x, np.float64)[keep] - arrays["emb_mean"]) / arrays["emb_scale"]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
    model.fit(z, (y[keep] == ADULT_LABEL).astype(int))
    out = _f32({"adult_weights": model.coef_[0], "adult_bias": np.float64(model.intercept_[0])})
    others = np.isin(y, [EMBED_CLASSES.index("lateral_chest"), EMBED_CLASSES.index("other_body_part")])
    chest = None
    if others.any():  # what is not a child's film may be another radiograph: adult chest films against those
        keep2 = (y == ADULT_LABEL) | others
        z2 = (np.asarray(x, np.float64)[keep2] - arrays["emb_mean"]) / arrays["emb_scale"]
        chest = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
        chest.fit(z2, (y[keep2] == ADULT_LABEL).astype(int))
        out.update(_f32({"adult_other_weights": chest.coef_[0], "adult_other_bias": np.float64(chest.intercept_[0])}))
    val = ((np.asarray(val_x, np.float64) - arrays["emb_mean"]) / arrays["emb_scale"]) @ out["adult_weights"] \
        + float(out["adult_bias"])
    threshold = choose_threshold(val, max_val_reject)
    params = {"threshold": round(threshold, 6), "model": ADULT_CHECK,
              "threshold_rule": f"max(0, {1 - max_val_reject:.4f} quantile of the validation scans' scores)",
              "train_rows": {"adult": int((y[keep] == ADULT_LABEL).sum()), "child": int((y[keep] == frontal).sum())},
              "val_rejected": int((val > threshold).sum())}
    if chest is not None:
        params["chest"] = CHEST_CHECK
        params["train_rows"]["other_radiograph"] = int(others.sum())
    return out, params, val


def scores_of(arrays: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head scores, most likely non-frontal class index) of embeddings ``x[N, C]`` under ``arrays``."""
    logits = head_logits(x, arrays["emb_mean"], arrays["emb_scale"], arrays["emb_weights"], arrays["emb_bias"])
    return head_score(logits), 1 + logits[:, 1:].argmax(axis=1)


def choose_threshold(val_scores: np.ndarray, max_reject: float = DEFAULT_MAX_VAL_REJECT) -> float:
    """The threshold from **validation** scans' scores: the head's own decision boundary (0: frontal more
    likely than anything else), raised to the ``1 - max_reject`` quantile of the validation scores when more
    than ``max_reject`` of them would be refused at 0."""
    v = np.asarray(val_scores, np.float64)
    if v.size == 0:
        raise ValueError("no validation scores")
    return float(max(0.0, np.quantile(v, 1.0 - max_reject)))


@dataclass
class GateData:
    """Embeddings for a fit: ``x[N, C]``, class indices ``y``, and for each row its gate_dev item index
    (``dev[i]``, -1 for rows that are not from gate_dev: Kermany train scans, generated images). ``basis``: the
    frontal rows that the layout basis and the density model are fitted on (False for the ``clinical`` variants:
    they teach the head that frames and burned-in text do not make a film something else, but the layout
    projection and the density describe the anatomy of frontal films as they are). ``head``: the rows the head
    is fitted on (False for the adult films' acquisition-shifted and clinic-style variants: they teach the adult
    check, but in the head they widen "frontal chest" towards other radiographs; gate_dev cross-validation:
    other radiographs 21/22 refused with their own reason without them, 20/22 with them)."""

    x: np.ndarray
    y: np.ndarray
    dev: np.ndarray
    basis: np.ndarray | None = None  # rows the layout basis and the density model may use (default: all)
    head: np.ndarray | None = None  # rows the head is fitted on (default: all; not the adults' shifted variants)

    def __post_init__(self):
        if self.basis is None:
            self.basis = np.ones(len(self.y), bool)
        if self.head is None:
            self.head = np.ones(len(self.y), bool)

    def subset(self, keep: np.ndarray) -> "GateData":
        return GateData(self.x[keep], self.y[keep], self.dev[keep], self.basis[keep], self.head[keep])


def gate_vectors(arrays: dict, x: np.ndarray, grid: int) -> np.ndarray:
    """The vectors the gate's head reads, from ``pooled`` rows ``x`` (the rows themselves without a layout)."""
    if not grid:
        return np.asarray(x, np.float32)
    return layout_vector(x, arrays["lay_mean"], arrays["lay_proj"], grid)


def fit_gate(data: GateData, val_x: np.ndarray, c: float = DEFAULT_C,
             max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0,
             density_components: int = DEFAULT_DENSITY_COMPONENTS, grid: int = 0,
             grid_components: int = DEFAULT_GRID_COMPONENTS, channels: int | None = None) -> tuple[dict, dict]:
    """(arrays, ``embedding`` card parameters) from training rows and validation scans' rows (``pooled``: the
    global average, then with ``grid`` > 0 the ``grid x grid`` cells of ``channels`` each). With a grid, the
    layout projection (``fit_layout``) comes from the frontal training rows first. Both thresholds (head score;
    density distance when ``density_components`` > 0) come from the validation scans."""
    arrays: dict = {}
    layout = None
    if grid:
        channels = int(channels or data.x.shape[1] // (1 + grid * grid))
        basis = (data.y == EMBED_CLASSES.index("frontal_chest")) & data.basis
        arrays.update(fit_layout(data.x[basis], channels, grid, grid_components))
        layout = {"grid": int(grid), "components": int(arrays["lay_proj"].shape[1]), "channels": channels,
                  "rule": f"the model's feature map average-pooled on a {grid}x{grid} grid of adaptive (overlapping) "
                          "cells, each cell's vector minus lay_mean projected onto lay_proj (the first principal "
                          "components of frontal training scans' cells), after the global average"}
    x = gate_vectors(arrays, data.x, grid)
    val_x = gate_vectors(arrays, val_x, grid)
    head_y = np.where(data.y == ADULT_LABEL, EMBED_CLASSES.index("frontal_chest"), data.y)  # a frontal film
    in_head = data.head
    arrays.update(fit_head(x[in_head], head_y[in_head], c, seed))
    head_y = head_y[in_head]
    val_scores, _ = scores_of(arrays, val_x)
    threshold = choose_threshold(val_scores, max_val_reject)
    params = {"classes": list(EMBED_CLASSES), "threshold": round(threshold, 6), "dim": int(x.shape[1]),
              "score": "logsumexp(logits[1:]) - logits[0], logits = ((e - emb_mean) / emb_scale) @ emb_weights "
                       "+ emb_bias; refused when score > threshold",
              "threshold_rule": f"max(0, {1 - max_val_reject:.4f} quantile of the validation scans' scores)",
              "max_val_reject": max_val_reject, "val_images": int(len(val_x)),
              "val_score_quantiles": {q: round(float(np.quantile(val_scores, float(q))), 4)
                                      for q in ("0.5", "0.99", "0.998")},
              "train_rows": {**{EMBED_CLASSES[k]: int((head_y == k).sum()) for k in range(len(EMBED_CLASSES))},
                             "of which adult_chest": int((data.y == ADULT_LABEL).sum())},
              "classes_without_images": [EMBED_CLASSES[k] for k in range(len(EMBED_CLASSES))
                                         if not np.any(head_y == k)],
              "C": c}
    if layout:
        params["layout"] = layout
    rejected = val_scores > threshold
    if np.any(data.y == ADULT_LABEL):
        adult_arrays, adult_params, val_adult = fit_adult(x, data.y, data.dev, arrays, val_x, c,
                                                          max_val_reject * ADULT_VAL_SHARE, seed)
        arrays.update(adult_arrays)
        params["adult"] = adult_params
        rejected |= val_adult > adult_params["threshold"]
    if density_components > 0:
        arrays.update(fit_density(x[(data.y == EMBED_CLASSES.index("frontal_chest")) & data.basis],
                                  density_components))
        val_dist = density_distance(val_x, arrays["den_mean"], arrays["den_scale"], arrays["den_components"],
                                    arrays["den_var"])
        den_threshold = float(np.quantile(val_dist, 1.0 - max_val_reject))
        rejected |= val_dist > den_threshold
        params.update({"density_threshold": round(den_threshold, 4),
                       "density_components": int(len(arrays["den_var"])),
                       "density": "squared Mahalanobis distance in the first density_components principal "
                                  "components of the standardized frontal training vectors; refused when > "
                                  f"density_threshold (the {1 - max_val_reject:.4f} quantile of the validation "
                                  "scans' distances)"})
    params["val_rejected"] = int(rejected.sum())
    return arrays, params


def cross_validate(data: GateData, val_x: np.ndarray, items: list[DevItem], folds: int = 5,
                   c: float = DEFAULT_C, max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0,
                   density_components: int = None, grid: int = 0,
                   grid_components: int = DEFAULT_GRID_COMPONENTS, channels: int | None = None) -> dict:
    """gate_dev cross-validated: its groups (patients; body parts for other radiographs) are dealt into
    ``folds`` folds per category; each fold's original images are judged by a gate fitted without any row of
    that fold (nor their variants, "long film" ones included), its layout projection, head, density and
    thresholds fitted as always (thresholds on validation). Per-category counts."""
    density_components = DEFAULT_DENSITY_COMPONENTS if density_components is None else density_components
    rng = np.random.default_rng(seed)
    fold_of_group: dict[str, int] = {}
    for category in sorted({it.category for it in items}):
        groups = sorted({it.group for it in items if it.category == category})
        for k, g in enumerate(rng.permutation(groups)):
            fold_of_group[str(g)] = k % folds
    item_fold = np.array([fold_of_group[it.group] for it in items])
    rows: list[dict] = []
    for k in range(folds):
        held = np.flatnonzero(item_fold == k)
        if held.size == 0:
            continue
        keep = ~np.isin(data.dev, held)
        arrays, params = fit_gate(data.subset(keep), val_x, c, max_val_reject,
                                  seed, density_components, grid, grid_components, channels)
        gate = Gate(arrays, {"embedding": params})
        orig = np.array([np.flatnonzero((data.dev == i))[0] for i in held])  # first row of an item: the original
        vectors = gate_vectors(arrays, data.x[orig], grid)
        for i, v, va in zip(held, gate.embedding_verdicts(vectors), gate.embedding_verdicts(vectors, True)):
            rows.append({"file": Path(items[i].path).name, "category": items[i].category, "fold": k,
                         "accepted": v.ok, "score": round(float(v.score), 3), "reason": v.reason,
                         "accepted_allow_adults": va.ok, "reason_allow_adults": va.reason})
    out = {"folds": folds, "grouping": "other radiographs by body part, chest views by patient",
           "by_category": {}}
    for category in sorted({r["category"] for r in rows}):
        out["by_category"][category] = cv_summary([r for r in rows if r["category"] == category],
                                                  GATE_DEV_CLASSES[category])
    out["rows"] = rows
    return out


def expected_outcome(cls: str) -> str:
    """What the gate should do with an image of class ``cls``: accept a child's frontal film, refuse an adult's
    as adult, refuse anything else (with its own reason)."""
    return {"frontal_chest": "accept", "adult_chest": "reject as adult"}.get(cls, "reject")


def cv_summary(rows: list[dict], cls: str) -> dict:
    """Counts for one category's cross-validated rows (``accepted``, ``reason``; ``accepted_allow_adults``):
    how many the gate got right by ``expected_outcome``, the refusal reasons, and for adult films how many
    ``allow_adults`` would classify (with a warning)."""
    want = expected_outcome(cls)
    adult = REASONS["adult_chest"]

    def right(r):
        if want == "accept":
            return r["accepted"]
        if want == "reject as adult":
            return not r["accepted"] and r["reason"].startswith(adult)
        return not r["accepted"] and not r["reason"].startswith(adult)

    reasons: dict[str, int] = {}
    for r in rows:
        if not r["accepted"]:
            key = r["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    out = {"n": len(rows), "expected": want, "accepted": sum(r["accepted"] for r in rows),
           "rejected": sum(not r["accepted"] for r in rows), "correct": sum(map(right, rows)),
           "correct_rate": round(sum(map(right, rows)) / max(1, len(rows)), 4), "reasons": reasons,
           "wrong": [f"{r['file']} ({'accepted' if r['accepted'] else 'rejected: ' + r['reason']}, "
                     f"head score {r['score']})" for r in rows if not right(r)]}
    if cls == "adult_chest" and rows and "accepted_allow_adults" in rows[0]:
        out["accepted_allow_adults"] = sum(r["accepted_allow_adults"] for r in rows)
    return out


def shifted(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """One seeded variant per ``uint8[N, S, S]`` film: an acquisition shift (``train.shifts.random_shift``) or,
    a third of the time, burned-in annotations (``train.shifts.annotate``)."""
    from train.shifts import annotate, random_shift

    rng = np.random.default_rng(seed)
    return np.stack([annotate(g, rng) if rng.random() < 1 / 3 else random_shift(g, rng)
                     for g in np.asarray(gray, np.uint8)])


def collect(embed: Callable[[np.ndarray], np.ndarray], size: int, train_gray: np.ndarray, val_gray: np.ndarray,
            items: list[DevItem], n_variants: int = DEFAULT_VARIANTS, seed: int = 0,
            log: Callable[[str], None] = lambda s: None,
            n_synth: int = DEFAULT_SYNTH, n_stretched: int = 0,
            n_stretched_dev: int = 0, n_frontal_variants: int = 0,
            n_train_variants: int = 0, n_clinical: int = 0, n_adult_variants: int = 0) -> tuple[GateData, np.ndarray]:
    """Embed everything a fit needs: train scans (+ one ``augment`` variant each) as ``frontal_chest``; each
    gate_dev item as it is (its first row) and ``n_variants`` variants (+ for lateral views and other
    radiographs ``n_stretched_dev`` "long film" variants, ``stretched``, as ``other_body_part``, with the item's
    index so that cross-validation drops them with it; adult frontal X-rays get ``n_frontal_variants`` more
    variants: they are few against the training scans, and the layout part must not read their framing as
    another body part); ``n_train_variants`` ``variants`` of each train scan (exposure as well as framing) as
    ``frontal_chest``; ``n_clinical`` ``clinical`` variants of each train scan (collimation, letterboxing,
    aspect-ratio crops, tilt, edge enhancement, burned-in text) as ``frontal_chest``, outside the layout basis and
    the density model (``GateData.basis``); ``n_stretched`` "long film" variants of each train scan as ``other_body_part``; generated
    non-radiographs (+ one variant each). Returns (training data, validation scans' embeddings)."""
    frontal = EMBED_CLASSES.index("frontal_chest")
    xs, ys, devs, basis, head = [], [], [], [], []

    def add(gray, cls, dev, in_basis=True, in_head=True):
        xs.append(embed_images(embed, gray))
        ys.append(np.full(len(gray), cls))
        devs.append(np.full(len(gray), dev))
        basis.append(np.full(len(gray), in_basis))
        head.append(np.full(len(gray), in_head))

    train_gray = np.asarray(train_gray, np.uint8)
    other = EMBED_CLASSES.index("other_body_part")
    add(np.concatenate([train_gray, augment(train_gray, seed)]), frontal, -1)
    log(f"train scans embedded: {2 * len(train_gray)}")
    for k in range(n_train_variants):  # exposure too: washed-out, dark, low-contrast frontal films stay frontal
        add(variants(train_gray, 1, seed + 11 + k), frontal, -1)
    if n_train_variants:
        log(f"photometric variants of train scans embedded: {n_train_variants * len(train_gray)}")
    for k in range(n_clinical):  # collimated, letterboxed, cropped, labelled films: still frontal chest X-rays
        add(clinical(train_gray, seed + 21 + k), frontal, -1, in_basis=False)
    if n_clinical:
        log(f"clinic-style variants of train scans embedded: {n_clinical * len(train_gray)}")
    if n_adult_variants:  # the same acquisition shifts and annotations as the adult films get: not adult cues
        add(shifted(train_gray, seed + 31), frontal, -1, in_basis=False)
        log(f"shifted and annotated variants of train scans embedded: {len(train_gray)}")
    for k in range(n_stretched):
        add(stretched(train_gray, seed + 5 + k), other, -1)
    if n_stretched:
        log(f"long-film variants of train scans embedded: {n_stretched * len(train_gray)}")
    for i, it in enumerate(items):
        g = load_gray(it.path, size)[None]
        k = ADULT_LABEL if it.cls == "adult_chest" else EMBED_CLASSES.index(it.cls)
        add(np.concatenate([g, variants(g, n_variants, seed + 1 + i)]), k, i)
        if it.cls == "adult_chest":  # adult films as other clinics make them: they are few, and from one hospital
            if n_frontal_variants:
                add(variants(g, n_frontal_variants, seed + 1000 + i), k, i)
            if n_adult_variants:
                add(shifted(np.repeat(g, n_adult_variants, 0), seed * 7919 + 2000 + i), k, i, in_head=False)
                add(clinical(np.repeat(g, n_adult_variants, 0), seed * 7919 + 3000 + i), k, i, in_head=False)
        elif n_stretched_dev:  # not the frontal X-rays: kept away from the reject side
            add(stretched(np.repeat(g, n_stretched_dev, 0), seed * 7919 + 6 + i), other, i)
    log(f"gate_dev embedded: {len(items)} x {1 + n_variants} (+ {n_stretched_dev} long-film variants of each "
        "lateral view and other radiograph)")
    synth = np.stack([load_gray(img, size) for img, _, _ in synth_non_radiographs(seed + 1, n_synth)])
    add(np.concatenate([synth, variants(synth, 1, seed + 2)]), EMBED_CLASSES.index("not_radiograph"), -1)
    log(f"generated non-radiographs embedded: {2 * len(synth)}")
    val_x = embed_images(embed, val_gray)
    log(f"validation scans embedded: {len(val_x)}")
    return GateData(np.concatenate(xs), np.concatenate(ys), np.concatenate(devs), np.concatenate(basis),
                    np.concatenate(head)), val_x


POLARITY = ("a logistic regression (scikit-learn defaults, C 1) on the standardized 16x16 thumbnail: train "
            "scans and one train.ood.variants variant each, against the same images inverted (255 - x); "
            "threshold from the validation scans")


def fit_polarity(train_gray: np.ndarray, val_gray: np.ndarray, seed: int = 0,
                 max_val_reject: float = DEFAULT_MAX_VAL_REJECT, thumb: int = DEFAULT_THUMB,
                 n_clinical: int = 0) -> tuple[dict, dict]:
    """The polarity check (``Gate.check_polarity``): a linear function of the standardized thumbnail that tells
    a radiograph from its negative (``POLARITY``), from train scans only (no gate_dev: its frontal films are a
    held-out check, ``benchmarks.ood``), each with one ``variants`` copy and ``n_clinical`` ``clinical`` ones
    (collimation frames, letterboxing and burned-in text change a thumbnail's dark and bright areas: without
    them such films were refused as negatives), every one against its negative. Threshold:
    ``choose_threshold`` on the validation scans. Returns (arrays ``pol_weights``, ``pol_bias``; card
    parameters)."""
    from sklearn.linear_model import LogisticRegression

    g = np.asarray(train_gray, np.uint8)
    imgs = np.concatenate([g, variants(g, 1, seed + 41)] + [clinical(g, seed + 43 + k) for k in range(n_clinical)])
    x = np.concatenate([features(imgs, thumb)[0], features(255 - imgs, thumb)[0]])
    y = np.r_[np.zeros(len(imgs)), np.ones(len(imgs))]
    model = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])
    arrays = {"pol_weights": w, "pol_bias": np.float64(b)}
    gate = Gate(arrays, {"thumb": thumb, "polarity": {"threshold": 0.0}})  # the runtime's own scoring
    val = np.asarray(val_gray, np.uint8)
    val_scores = gate.polarity_scores(val)
    threshold = choose_threshold(val_scores, max_val_reject)
    inverted_scores = gate.polarity_scores(255 - val)
    params = {"threshold": round(threshold, 6), "model": POLARITY,
              "threshold_rule": f"max(0, {1 - max_val_reject:.4f} quantile of the validation scans' scores)",
              "train_images": int(len(imgs)), "clinical_variants": int(n_clinical), "val_images": int(len(val)),
              "val_rejected": int((val_scores > threshold).sum()),
              "val_inverted_refused": int((inverted_scores > threshold).sum()),
              "val_margin": round(float(inverted_scores.min() - val_scores.max()), 3)}
    return arrays, params


def write_gate(bundle_dir: str | Path, arrays: dict, card_params: dict) -> dict:
    """Save ``ood.npz`` into ``bundle_dir`` and set the card's ``"ood"`` entry (path, sha256, bytes + params);
    the card's other fields are kept as they are. Returns the new ``"ood"`` entry."""
    Gate({k: np.asarray(v) for k, v in arrays.items()}, card_params)  # ValueError before anything is written
    root = Path(bundle_dir)
    card_path = root / CARD_NAME
    card = json.loads(card_path.read_text())
    path = root / GATE_FILE
    stored = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if k in HALF_ARRAYS:
            half = v.astype(np.float16)
            if not np.array_equal(half.astype(v.dtype), v):
                raise ValueError(f"{k}: not float16 values (fit it through fit_layout / fit_density)")
            v = half
        stored[k] = v
    np.savez(path, **stored)
    entry = {"path": GATE_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size, **card_params}
    card["ood"] = entry
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    Gate.from_bundle(root, card)  # what was written loads
    return entry


def _shown(folder: Path) -> str:
    """A folder as a card may name it: relative to this checkout's parent (``../shared/data/gate_dev``), or
    its name alone; never a path of the machine that fitted the gate."""
    here = Path(__file__).resolve().parent.parent
    try:
        return str(Path("..") / Path(folder).resolve().relative_to(here.parent))
    except ValueError:
        return Path(folder).name


def card_entry(emb_params: dict, fitted_on: dict, cv: dict | None) -> dict:
    """The card's ``"ood"`` parameters (without path/sha256/bytes)."""
    return {
        "max_colour_fraction": DEFAULT_MAX_COLOUR_FRACTION, "chroma_level": CHROMA_LEVEL, "min_std": DEFAULT_MIN_STD,
        "threshold": emb_params.get("threshold"),  # the embedding head's, as `cxr-edge info` shows it
        "embedding": emb_params,
        "features": ("before the model: colour photo (share of pixels with max(R,G,B)-min(R,G,B) > "
                     f"{CHROMA_LEVEL} above {DEFAULT_MAX_COLOUR_FRACTION}) and blank image (16x16 thumbnail std < "
                     f"{DEFAULT_MIN_STD} gray levels); after it: a linear softmax head and a density check on the "
                     "model's penultimate global-average-pooled embedding"
                     + (" and the layout of its last feature map ({0}x{0} grid cells, {1} principal components "
                        "each)".format(emb_params["layout"]["grid"], emb_params["layout"]["components"])
                        if emb_params.get("layout") else "")
                     + " over " + ", ".join(EMBED_CLASSES)
                     + ("; for what it accepts, an adult-vs-child check on the same vector (the intended "
                        "population)" if emb_params.get("adult") else "")),
        "fitted_on": {**fitted_on, **({"gate_dev_cv": {k: v for k, v in cv.items() if k != "rows"}} if cv else {})},
    }


def main(argv: list[str] | None = None) -> None:
    from train.data import data_dir, load_images, protocol_splits

    ap = argparse.ArgumentParser(prog="python -m train.ood", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="model bundle folder to write ood.npz + card entry into")
    ap.add_argument("--data", default=None, help="chest_xray folder (Kaggle layout); only train/ is read")
    ap.add_argument("--gate-dev", type=Path, default=DEFAULT_GATE_DEV, help="gate_dev folder (MANIFEST.csv)")
    ap.add_argument("--adult-dev", type=Path, default=DEFAULT_ADULT_DEV,
                    help="adult frontal films for the adult_chest class (MANIFEST.csv; skipped when absent)")
    ap.add_argument("--adult-variants", type=int, default=DEFAULT_ADULT_VARIANTS,
                    help="acquisition-shifted and clinic-style variants of each adult frontal film (each kind)")
    ap.add_argument("--n-train", type=int, default=1200, help="seeded subsample of the grouped train split")
    ap.add_argument("--variants", type=int, default=DEFAULT_VARIANTS, help="variants per gate_dev image")
    ap.add_argument("--frontal-variants", type=int, default=DEFAULT_FRONTAL_VARIANTS,
                    help="more variants of each gate_dev frontal chest X-ray (on top of --variants)")
    ap.add_argument("--train-variants", type=int, default=DEFAULT_TRAIN_VARIANTS,
                    help="variants (flip, tilt, brightness/contrast/gamma) per train scan, on top of the geometric one")
    ap.add_argument("--clinical-variants", type=int, default=DEFAULT_CLINICAL,
                    help="clinic-style variants (collimation, letterboxing, crops, tilt, burned-in text) per train scan")
    ap.add_argument("--n-synth", type=int, default=DEFAULT_SYNTH, help="generated non-radiographs per kind")
    ap.add_argument("--max-val-reject", type=float, default=DEFAULT_MAX_VAL_REJECT)
    ap.add_argument("--C", type=float, default=DEFAULT_C, help="inverse L2 strength of the head")
    ap.add_argument("--density-components", type=int, default=DEFAULT_DENSITY_COMPONENTS,
                    help="principal components of the density check (0: head only)")
    ap.add_argument("--grid", type=int, default=DEFAULT_GRID,
                    help="layout: pool the model's feature map on a GRID x GRID grid too (0: global average only)")
    ap.add_argument("--grid-components", type=int, default=DEFAULT_GRID_COMPONENTS,
                    help="principal components kept per grid cell")
    ap.add_argument("--stretched", type=int, default=DEFAULT_STRETCHED,
                    help="'long film' variants (other_body_part) per train scan")
    ap.add_argument("--stretched-dev", type=int, default=DEFAULT_STRETCHED_DEV,
                    help="'long film' variants (other_body_part) per gate_dev lateral view / other radiograph")
    ap.add_argument("--folds", type=int, default=5, help="gate_dev cross-validation folds (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the embedded rows: read when it exists (and was made with the same settings), "
                         "else written after embedding; a refit of the heads then takes minutes, not the embedding")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="inference threads for the embeddings")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    if not (args.bundle / CARD_NAME).is_file():
        ap.error(f"{args.bundle} has no {CARD_NAME}")
    bundle = load_bundle(args.bundle)
    size = bundle.spec.size
    root = data_dir(args.data)
    splits = protocol_splits(root, "grouped")  # the official test/ is not listed, let alone read
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(args.seed)
    if len(train) > args.n_train:
        train = [train[i] for i in sorted(rng.choice(len(train), args.n_train, replace=False))]
    try:
        items = gate_dev_items(args.gate_dev)
    except FileNotFoundError as exc:
        ap.error(f"{exc}; pass --gate-dev DIR (see ../shared/data/gate_dev/README.md)")
    items += adult_dev_items(args.adult_dev)
    train_gray = load_images(train, size, workers=args.workers)
    val_gray = load_images(val, size, workers=args.workers)
    settings = json.dumps({k: str(v) for k, v in sorted(vars(args).items())
                           if k not in ("bundle", "cache", "folds", "C", "max_val_reject", "density_components",
                                        "grid_components", "workers", "threads")}
                          | {"model": bundle.card.get("training_run", ""), "items": len(items)})
    cached = None
    if args.cache and args.cache.is_file():
        with np.load(args.cache) as z:
            if str(z["settings"]) == settings:
                cached = (GateData(z["x"], z["y"], z["dev"], z["basis"], z["head"]), z["val_x"])
                log(f"embedded rows read from {args.cache}")
            else:
                log(f"{args.cache} was made with other settings: embedding again")
    if cached is None:
        embed = embedder(bundle, threads=args.threads, grid=args.grid)
        cached = collect(embed, size, train_gray, val_gray, items, args.variants, args.seed, log,
                         args.n_synth, args.stretched, args.stretched_dev, args.frontal_variants,
                         args.train_variants, args.clinical_variants, args.adult_variants)
        if args.cache:
            d = cached[0]
            np.savez(args.cache, x=d.x, y=d.y, dev=d.dev, basis=d.basis, head=d.head, val_x=cached[1], settings=settings)
    data, val_x = cached
    cv = None
    if args.folds:
        cv = cross_validate(data, val_x, items, args.folds, args.C, args.max_val_reject, args.seed,
                            args.density_components, args.grid, args.grid_components)
        for cat, r in cv["by_category"].items():
            log(f"gate_dev CV {cat}: {r['correct']}/{r['n']} right (expected: {r['expected']}; reasons "
                f"{r['reasons']}); wrong: {r['wrong']}")
    arrays, params = fit_gate(data, val_x, args.C, args.max_val_reject, args.seed, args.density_components,
                              args.grid, args.grid_components)
    fitted_on = {
        "data": "train/ grouped protocol (patient-grouped, seed 0): head on a seeded subsample of its train "
                "split (+ one geometric variant, --train-variants photometric ones and --stretched long films "
                "each), thresholds on its val split; official test/ not read",
        "train_images": len(train), "gate_dev": _shown(args.gate_dev), "gate_dev_images": len(items),
        "adult_dev": _shown(args.adult_dev), "adult_variants": args.adult_variants,
        "adult": "adult frontal films (gate_dev's frontal_chest_other and adult_dev) as adult_chest, each with "
                 "--variants variants and --adult-variants acquisition-shifted (train.shifts.random_shift) or "
                 "annotated (train.shifts.annotate) and --adult-variants clinic-style ones (these two kinds in the adult "
                 "check only, not in the head); one shifted or annotated variant of each train scan as frontal_chest",
        "gate_dev_variants": args.variants, "gate_dev_frontal_variants": args.frontal_variants,
        "train_variants": args.train_variants,
        "clinical_variants": args.clinical_variants,
        "clinical": f"{args.clinical_variants} per train scan (train.ood.clinical: {CLINICAL}), as frontal_chest; "
                    "not in the layout basis nor the density model",
        "augmentation": "; ".join(AUGMENTATIONS),
        "generated": "document pages, screenshots, photo-like scenes, solid colours, textures (train.ood."
                     "synth_non_radiographs, seed %d, %d per kind)" % (args.seed + 1, args.n_synth),
        "generated_per_kind": args.n_synth,
        "long_films": f"{args.stretched} per train scan, {args.stretched_dev} per gate_dev lateral view and other "
                      f"radiograph (train.ood.stretched: "
                      f"{STRETCH}), as other_body_part",
        "stretched_per_train": args.stretched, "stretched_per_gate_dev": args.stretched_dev,
        "command": (f"python -m train.ood BUNDLE --C {args.C:g} --grid {args.grid} --grid-components "
                    f"{args.grid_components} --density-components {args.density_components} --stretched "
                    f"{args.stretched} --stretched-dev {args.stretched_dev} --n-train "
                    f"{args.n_train} --train-variants {args.train_variants} --clinical-variants {args.clinical_variants} "
                    f"--variants "
                    f"{args.variants} --frontal-variants {args.frontal_variants} --n-synth {args.n_synth} "
                    f"--max-val-reject {args.max_val_reject:g} --adult-variants {args.adult_variants} "
                    f"--seed {args.seed}"),
        "seed": args.seed, "date": datetime.date.today().isoformat(),
        "seconds": round(time.monotonic() - t0, 1)}
    pol_arrays, pol_params = fit_polarity(train_gray, val_gray, args.seed, args.max_val_reject,
                                          n_clinical=args.clinical_variants)
    arrays.update(pol_arrays)
    log(f"polarity check: threshold {pol_params['threshold']}, validation scans refused "
        f"{pol_params['val_rejected']}/{pol_params['val_images']}, their negatives refused "
        f"{pol_params['val_inverted_refused']}/{pol_params['val_images']}")
    entry = write_gate(args.bundle, arrays, {**card_entry(params, fitted_on, cv), "polarity": pol_params})
    log(f"wrote {args.bundle / GATE_FILE}: threshold {params['threshold']}, "
        f"validation scans refused {params['val_rejected']}/{params['val_images']}")
    print(json.dumps({k: v for k, v in entry.items() if k != "fitted_on"}, indent=2))


if __name__ == "__main__":
    main()
