"""What a gate fit reads (``train.ood``): gate_dev's and adult_dev's images (``gate_dev_items``,
``adult_dev_items``), and the embedded rows of a fit (``collect`` -> ``GateData``: training scans and their
variants, gate_dev with its variants, generated non-radiographs; the validation scans). Importable from
``train.ood`` too."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cxr_edge.ood import EMBED_CLASSES
from cxr_edge.preprocess import load_gray
from train.gate_synth import DEFAULT_SYNTH, augment, clinical, stretched, synth_non_radiographs, variants

DEFAULT_GATE_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gate_dev"
DEFAULT_ADULT_DEV = DEFAULT_GATE_DEV.parent / "adult_dev"
# gate_dev's frontal films are adults': the adult_chest class (refused as outside the population, not as
# something else), with adult_dev's
GATE_DEV_CLASSES = {"frontal_chest_other": "adult_chest", "lateral_chest": "lateral_chest",
                    "non_chest_radiograph": "other_body_part", "adult_dev": "adult_chest"}
ADULT_LABEL = len(EMBED_CLASSES)  # GateData.y of adult frontal films: frontal_chest to the head, adult to the
#                                   adult check (fit_adult)
DEFAULT_VARIANTS = 16
EMBED_BATCH = 16


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
