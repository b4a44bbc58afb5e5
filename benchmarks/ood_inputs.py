"""The images ``benchmarks.ood`` puts through the input gate, made here or copied: scikit-image's sample photographs
and ``train.ood.synth_non_radiographs`` (not radiographs), altered test scans (``EDGE_KINDS``), negatives of scans
and synthetic DICOM objects. ``python -m benchmarks.ood`` measures the gate on them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

SKIMAGE_FILES = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_GRAY.png",
                 "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png",
                 "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png",
                 "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "phantom.png",
                 "retina.jpg", "rocket.jpg", "text.png", "multipage_rgb.tif"]
SYNTH_SEED = 100  # train.ood fits on seed + 1 (1 by default): another draw of the same generator


def skimage_samples() -> list[Path]:
    """scikit-image's bundled sample files (``SKIMAGE_FILES``). Raises ``RuntimeError`` when scikit-image
    is missing or lacks one of them: a smaller set would be measured silently otherwise."""
    try:
        import skimage.data
    except ImportError:
        raise RuntimeError("benchmarks.ood needs scikit-image for its non-CXR set: "
                           "pip install 'cxr-edge[bench]'") from None
    src = Path(skimage.data.__file__).parent
    missing = [n for n in SKIMAGE_FILES if not (src / n).is_file()]
    if missing:
        raise RuntimeError(f"scikit-image {getattr(skimage, '__version__', '?')} lacks its sample files "
                           f"{', '.join(missing)} (in {src})")
    return [src / n for n in SKIMAGE_FILES]


def make_non_cxr(folder: Path, seed: int = SYNTH_SEED) -> list[tuple[Path, str]]:
    """Write the non-radiograph set into ``folder``; returns ``[(path, kind)]``."""
    from train.ood import synth_non_radiographs

    folder.mkdir(parents=True, exist_ok=True)
    out: list[tuple[Path, str]] = []
    for src in skimage_samples():
        shutil.copy(src, folder / f"skimage_{src.name}")
        out.append((folder / f"skimage_{src.name}", "skimage"))
    for img, kind, name in synth_non_radiographs(seed):
        path = folder / name
        if path.suffix == ".jpg" and img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        out.append((path, kind))
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


def make_inverted(files: list[tuple[str, str]], folder: Path) -> list[tuple[Path, str]]:
    """Negatives (255 - pixels, as a MONOCHROME1 image exported without its inversion reads) of ``(path,
    kind)`` images, as PNGs: the gate should refuse each as an inverted image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (f, kind) in enumerate(files):
        with Image.open(f) as im:
            neg = ImageOps.invert(im.convert("L"))
        path = folder / f"{i:03d}_{kind}.png"
        neg.save(path)
        out.append((path, kind))
    return out


def make_dicoms(folder: Path, scan: str) -> list[tuple[Path, str, str]]:
    """Synthetic DICOM objects ``[(path, kind, expected)]`` (expected: ``"refuse"`` or ``"classify"``); needs
    pydicom (the dicom extra, part of ``cxr-edge[bench]``)."""
    from cxr_edge.dicom import gray_to_dicom

    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(scan) as im:
        frontal = np.asarray(im.convert("L").resize((512, 512), Image.Resampling.LANCZOS))

    def write(name, pixels, bits=16, photometric="MONOCHROME2", frames=1, **tags):
        tags.setdefault("Modality", None)  # no Modality unless the case names one
        (folder / name).write_bytes(gray_to_dicom(pixels, photometric=photometric, bits_stored=bits, frames=frames,
                                                  sop_class="1.2.840.10008.5.1.4.1.1.7", **tags))
        return folder / name

    ramp = np.arange(256, dtype=np.uint16)
    palette = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    palette.update({"RedPaletteColorLookupTableData": (ramp * 257).astype("<u2").tobytes(),
                    "GreenPaletteColorLookupTableData": ((255 - ramp) * 257).astype("<u2").tobytes(),
                    "BluePaletteColorLookupTableData": ((ramp * 7 % 256) * 257).astype("<u2").tobytes()})
    ct = (frontal.astype(np.uint16) * 8)
    out = [
        (write("ct.dcm", ct, Modality="CT", RescaleSlope="1", RescaleIntercept="-1024", WindowCenter="40",
               WindowWidth="400"), "CT", "refuse"),
        (write("mr.dcm", ct, bits=12, Modality="MR"), "MR", "refuse"),
        (write("us_palette.dcm", frontal, bits=8, photometric="PALETTE COLOR", Modality="US", **palette),
         "US palette", "refuse"),
        (write("palette_no_modality.dcm", frontal, bits=8, photometric="PALETTE COLOR", **palette),
         "palette, no Modality", "refuse"),
        (write("rtdose.dcm", np.stack([ct, ct]).astype(np.uint32) * 1000, bits=32, frames=2, Modality="RTDOSE"),
         "RTDOSE 32-bit", "refuse"),
        (write("dose_no_modality.dcm", np.stack([ct, ct]).astype(np.uint32), bits=32, frames=2),
         "32-bit, no Modality", "refuse"),
        (write("dx_hand.dcm", ct, Modality="DX", BodyPartExamined="HAND"), "DX hand", "refuse"),
        (write("dx_lateral.dcm", ct, Modality="DX", BodyPartExamined="CHEST", ViewPosition="LL"),
         "DX lateral chest", "refuse"),
        (write("dx_frontal.dcm", frontal.astype(np.uint16) * 257, Modality="DX", BodyPartExamined="CHEST",
               ViewPosition="PA"), "DX frontal chest", "classify"),
        (write("cr_frontal_no_tags.dcm", frontal.astype(np.uint16) * 16, bits=12, Modality="CR"),
         "CR frontal chest, no body part/view", "classify"),
    ]
    return out
