"""How well the out-of-distribution gate (``cxr_edge/ood.py``) separates chest X-rays from everything else.

    python -m benchmarks.ood BUNDLE_DIR [--data DIR] [--edge-scans 60] [--out FILE.json]

``measure(bundle_dir, data_root)`` reports, with counts:

- ``test_false_reject``: the share of the official test scans (624) that the gate rejects (target <= 1%).
  The test split only measures here: the threshold was chosen on the grouped validation split.
- ``non_cxr_reject``: the share of a varied non-CXR set that it rejects (target >= 95%), per kind. The set is
  made locally, without internet: scikit-image's bundled sample images (``skimage.data``'s shipped files:
  astronaut, coffee, chelsea, camera, text, page, rocket, horse, ...) plus images synthesized
  deterministically with Pillow (document pages, screenshots, photo-like gradients/noise, solid colours,
  textures), written as JPEG/PNG files into a temporary folder.
- ``edge_accept``: the share of altered test scans (10% border crop, aspect-ratio crops, +-5 degree rotation,
  brightness/contrast/gamma changes, downscaled PNG) that are still accepted. No adult chest X-rays are
  available here: these stand in for "other chest X-rays should still be accepted", which is *not* measured.

Every image goes through the runtime's own path: ``cxr_edge.preprocess.load_gray_colour`` from the file on
disk at the bundle's input size, then ``Gate.check``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from cxr_edge.bundle import load_bundle
from cxr_edge.ood import Gate
from cxr_edge.preprocess import PreprocessError

SKIMAGE_FILES = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_GRAY.png",
                 "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png",
                 "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png",
                 "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "phantom.png",
                 "retina.jpg", "rocket.jpg", "text.png", "multipage_rgb.tif"]

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


def make_non_cxr(folder: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """Write the non-CXR set into ``folder``; returns ``[(path, kind)]``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: list[tuple[Path, str]] = []

    def save(img: Image.Image, name: str, kind: str) -> None:
        path = folder / name
        if path.suffix == ".jpg" and img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        out.append((path, kind))

    try:
        import skimage.data
        src = Path(skimage.data.__file__).parent
        for name in SKIMAGE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, folder / f"skimage_{name}")
                out.append((folder / f"skimage_{name}", "skimage"))
    except ImportError:
        pass
    for i in range(12):
        img = _document(rng, columns=1 + i % 2, tilt=float(rng.uniform(-2, 2)) if i % 3 == 0 else 0.0,
                        noise=8.0 if i % 4 == 1 else 0.0, bg=255 if i % 5 else 235,
                        colour_header=tuple(int(v) for v in rng.integers(0, 256, 3)) if i % 4 == 3 else None)
        save(img, f"document_{i:02d}.{'jpg' if i % 2 else 'png'}", "document")
    for i in range(12):
        img = _screenshot(rng, size=(1280, 800) if i % 2 else (1920, 1080), dark=i % 3 == 0, colourful=i % 4 != 2)
        save(img, f"screenshot_{i:02d}.{'png' if i % 3 else 'jpg'}", "screenshot")
    for i in range(12):
        img = _photo_like(rng, size=(640, 480) if i % 2 else (480, 640), colour=i % 3 != 0)
        save(img, f"photo_like_{i:02d}.jpg", "photo_like")
    for i, c in enumerate([(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (30, 120, 220),
                           (250, 240, 200)]):
        save(Image.new("RGB", (400, 300), c), f"solid_{i:02d}.{'png' if i % 2 else 'jpg'}", "solid")
    for i, kind in enumerate(["noise", "cloud", "stripes", "checker", "gradient", "wood"] * 2):
        save(_texture(rng, kind), f"texture_{kind}_{i:02d}.{'png' if i < 6 else 'jpg'}", "texture")
    return out


EDGE_KINDS = ("crop10", "crop_wide", "crop_tall", "rotate+5", "rotate-5", "bright_contrast", "dark_gamma",
              "small_png")


def _edge(img: Image.Image, kind: str) -> Image.Image:
    w, h = img.size
    if kind == "crop10":
        return img.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    if kind == "crop_wide":  # 4:3 landscape from the middle
        nh = int(w * 3 / 4)
        top = max(0, (h - nh) // 2)
        return img.crop((0, top, w, min(h, top + nh)))
    if kind == "crop_tall":  # 3:4 portrait
        nw = int(h * 3 / 4)
        left = max(0, (w - nw) // 2)
        return img.crop((left, 0, min(w, left + nw), h))
    if kind in ("rotate+5", "rotate-5"):
        return img.rotate(5 if kind == "rotate+5" else -5, resample=Image.Resampling.BILINEAR, fillcolor=0)
    if kind == "bright_contrast":
        return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.2)).enhance(0.75)
    if kind == "dark_gamma":
        lut = [int(round(255 * (v / 255) ** 1.5)) for v in range(256)]
        return img.point(lut)
    if kind == "small_png":
        return img.resize((max(64, w // 4), max(64, h // 4)), Image.Resampling.LANCZOS)
    raise ValueError(kind)


def make_edge_cases(scans: list[str], folder: Path) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, scan in enumerate(scans):
        with Image.open(scan) as im:
            img = im.convert("L")
        for kind in EDGE_KINDS:
            path = folder / f"{i:03d}_{kind}.{'png' if kind == 'small_png' else 'jpg'}"
            e = _edge(img, kind)
            e.save(path, quality=92) if path.suffix == ".jpg" else e.save(path)
            out.append((path, kind))
    return out


def _rate(rows: list[dict], want_ok: bool) -> dict:
    rows = [r for r in rows if not r["reason"].startswith("error: ")]  # unreadable: counted apart
    n = len(rows)
    k = sum(r["ok"] == want_ok for r in rows)
    return {"n": n, "count": k, "rate": round(k / n, 4) if n else None}


def measure(gate_bundle_dir, data_root, edge_scans: int = 60, seed: int = 0, keep_rows: bool = False) -> dict:
    """Rejection rates of the bundle's gate on the official test scans, a non-CXR set and CXR edge cases."""
    from train.data import list_split

    bundle = load_bundle(gate_bundle_dir)
    gate = Gate.from_bundle(bundle.root, bundle.card)
    if gate is None:
        raise ValueError(f"{gate_bundle_dir}: the card has no 'ood' gate")
    size = bundle.spec.size

    def run(items):
        rows = []
        for path, kind in items:
            try:
                ok, reason, score = gate.check_source(path, size)
            except PreprocessError as exc:  # never labelled either: the classifier reports an error
                ok, reason, score = False, f"error: {exc}", float("inf")
            rows.append({"path": str(path), "kind": kind, "ok": ok, "reason": reason,
                         "score": None if not np.isfinite(score) else round(score, 2)})
        return rows

    test = [r.path for r in list_split(Path(data_root), "test")]
    test_rows = run([(p, "test") for p in test])
    with tempfile.TemporaryDirectory(prefix="cxr_ood_") as tmp:
        non_rows = run(make_non_cxr(Path(tmp) / "non_cxr", seed))
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(test), min(edge_scans, len(test)), replace=False))
        edge_rows = run(make_edge_cases([test[i] for i in pick], Path(tmp) / "edge"))
    result = {
        "bundle": str(bundle.root), "threshold": gate.threshold,
        "test_false_reject": _rate(test_rows, False),
        "non_cxr_reject": {**_rate(non_rows, False),
                           "by_kind": {k: _rate([r for r in non_rows if r["kind"] == k], False)
                                       for k in sorted({r["kind"] for r in non_rows})},
                           "accepted": [Path(r["path"]).name for r in non_rows if r["ok"]],
                           "unreadable_not_counted": [Path(r["path"]).name for r in non_rows
                                                      if r["reason"].startswith("error: ")]},
        "edge_accept": {**_rate(edge_rows, True),
                        "by_kind": {k: _rate([r for r in edge_rows if r["kind"] == k], True) for k in EDGE_KINDS},
                        "note": "official test scans altered (crops, rotation, brightness/contrast): a stand-in; "
                                "no adult chest X-rays are available here, so their acceptance is not measured"},
        "test_rejected": [{"path": Path(r["path"]).name, "reason": r["reason"]} for r in test_rows if not r["ok"]],
        "targets": {"test_false_reject_max": 0.01, "non_cxr_reject_min": 0.95},
    }
    if keep_rows:
        result["rows"] = {"test": test_rows, "non_cxr": non_rows, "edge": edge_rows}
    return result


def main(argv: list[str] | None = None) -> None:
    from train.data import data_dir

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ood", description="OOD gate rejection rates")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", default=None)
    ap.add_argument("--edge-scans", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    res = measure(args.bundle, data_dir(args.data), edge_scans=args.edge_scans)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
