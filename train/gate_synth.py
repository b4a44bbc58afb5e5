"""Images that teach the input gate (``train.ood``): seeded variants of scans (``augment``, ``variants``, the
clinic-style ``clinical`` films, the "long film" ``stretched`` ones) and generated images that are not
radiographs (``synth_non_radiographs``, also the benchmark's non-CXR set). Importable from ``train.ood`` too."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

DEFAULT_SYNTH = 12  # generated non-radiographs of each kind


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

