"""``python -m train.ood`` end to end (``main``) on the shipped default bundle's embeddings, a tiny Kaggle-layout
folder made of the shipped Kermany scans and a tiny gate_dev made of the shipped other radiographs
(``tests/data/gate``); one frontal and one other radiograph are held out of the fit and judged. The official-test
hygiene: the fit reads only the train/ folder (its test/ folder here is garbage) and its threshold is the one the
validation split gives. Also ``fit_gate``, ``choose_threshold`` and ``train.ood.clinical`` by themselves."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from _ood_common import FRONTAL, OTHER, non_cxr  # noqa: F401  (fixture)
from _runtime_fixtures import image_files
from cxr_edge.bundle import DEFAULT_BUNDLE, load_bundle
from cxr_edge.ood import EMBED_CLASSES, Gate, embedder
from cxr_edge.preprocess import load_gray
from train import ood as fit
from train.ood import choose_threshold


# -- python -m train.ood end to end, on the shipped default bundle's embeddings -------------------------------
def _kaggle_folder(root: Path) -> Path:
    """train/ from the shipped Kermany scans (each scan four times: as it is, mirrored, cropped, brighter; named as
    other patients: the grouped split needs 7 per class), and a test/ folder of garbage named like scans: the
    fit must never read it."""
    n = {"NORMAL": 0, "bacteria": 0, "virus": 0}
    for f in image_files("train"):
        kind = "NORMAL" if "NORMAL" in f.parts else "bacteria" if "bacteria" in f.name else "virus"
        folder = root / "train" / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            img = im.convert("L")
        w, h = img.size
        for copy in (img, ImageOps.mirror(img), img.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
                     img.point(lambda v: min(255, int(v * 1.15)))):
            n[kind] += 1
            name = f"IM-{n[kind]:04d}-0001.jpeg" if kind == "NORMAL" else f"person{n[kind]}_{kind}_1.jpeg"
            copy.save(folder / name, quality=95)
    for folder in ("NORMAL", "PNEUMONIA"):
        (root / "test" / folder).mkdir(parents=True)
        (root / "test" / folder / ("IM-9999-0001.jpeg" if folder == "NORMAL" else "person999_virus_1.jpeg")
         ).write_bytes(b"not an image: the official test split is never read by the fit")
    return root


HELD_OUT = {"frontal_chest_other": FRONTAL[-1], "non_chest_radiograph": OTHER[0]}


def _gate_dev(root: Path) -> Path:
    """A gate_dev folder (with MANIFEST.csv) of the shipped other radiographs, minus ``HELD_OUT``."""
    rows = []
    for category, files in (("frontal_chest_other", FRONTAL), ("non_chest_radiograph", OTHER)):
        (root / category).mkdir(parents=True)
        for f in files:
            if f != HELD_OUT[category]:
                shutil.copy(f, root / category / f.name)
                rows.append({"category": category, "file": f"{category}/{f.name}"})
    with (root / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["category", "file"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    if not (DEFAULT_BUNDLE / "card.json").is_file():
        pytest.skip("no default bundle installed")
    tmp = tmp_path_factory.mktemp("fit")
    bundle = tmp / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    before = json.loads((bundle / "card.json").read_text())
    data = _kaggle_folder(tmp / "chest_xray")
    fit.main([str(bundle), "--data", str(data), "--gate-dev", str(_gate_dev(tmp / "gate_dev")),
              "--variants", "3", "--n-synth", "4", "--folds", "2", "--threads", "2",
              "--density-components", "0",  # a density of a handful of scans is noise: the head only
              "--grid-components", "8",  # the layout part, small for a handful of scans
              "--stretched", "0",  # long films of a handful of train scans (copies of six) are noise too
              "--clinical-variants", "1", "--adult-variants", "1",  # few variants: a test's time
              "--adult-dev", str(tmp / "no-adult-dev")])  # the shipped adult frontals stand for adult_dev
    return bundle, before, data


def test_fit_writes_a_gate_and_keeps_the_card(fitted):
    bundle, before, _ = fitted
    card = json.loads((bundle / "card.json").read_text())
    assert {k: v for k, v in card.items() if k != "ood"} == {k: v for k, v in before.items() if k != "ood"}
    ood = card["ood"]
    emb = ood["embedding"]
    assert ood["path"] == "ood.npz" and emb["classes"] == list(EMBED_CLASSES) and emb["dim"] > 0
    assert (bundle / "ood.npz").stat().st_size == ood["bytes"]
    assert set(ood["fitted_on"]["gate_dev_cv"]["by_category"]) == {"frontal_chest_other", "non_chest_radiograph"}
    gate = Gate.from_bundle(bundle, card)  # sha256-checked
    assert gate.has_embedding and not gate.has_appearance and gate.emb_dim == emb["dim"]
    assert gate.has_layout and emb["layout"]["grid"] == fit.DEFAULT_GRID  # the default fit reads the layout
    assert gate.emb_dim == gate.feature_channels + fit.DEFAULT_GRID ** 2 * emb["layout"]["components"]
    assert ood["fitted_on"]["stretched_per_gate_dev"] == fit.DEFAULT_STRETCHED_DEV  # "--stretched 0" above
    # cxr_edge.reorient's thumbnail questions come with every fit, their thresholds from validation
    assert set(gate.questions) == {"polarity", "updown", "sideways"}
    for key in ("updown", "sideways"):
        q = ood[key]
        assert gate.questions[key][2] == q["threshold"] >= 0 and q["val_images"] > 0
        assert q["val_turned"] == q["val_images"] * (2 if key == "sideways" else 1)
        assert q["val_turned_flagged"] >= q["val_turned"] // 2  # even this tiny fit tells most turned scans


def test_fit_threshold_comes_from_validation_only(fitted):
    """Issue 14: the threshold is what the grouped validation split's scores give (the test/ folder is garbage,
    so reading it would have failed the fit)."""
    from train.data import load_images, protocol_splits

    bundle, _, data = fitted
    card = json.loads((bundle / "card.json").read_text())
    gate = Gate.from_bundle(bundle, card)
    b = load_bundle(bundle)
    val = protocol_splits(data, "grouped")["val"]
    assert val and all("/train/" in r.path for r in val)
    embed = embedder(b, threads=2, gate=gate)  # the gate's own vectors (layout part included)
    scores, _ = gate.embedding_scores(fit.embed_images(embed, load_images(val, b.spec.size)))
    expected = choose_threshold(scores, card["ood"]["embedding"].get("max_val_reject", fit.DEFAULT_MAX_VAL_REJECT))
    assert card["ood"]["embedding"]["threshold"] == pytest.approx(expected, abs=1e-5)
    emb = card["ood"]["embedding"]
    if gate.has_density:  # the density threshold too: the same quantile of the validation scans' distances
        embed_val = fit.embed_images(embedder(b, threads=2, gate=gate), load_images(val, b.spec.size))
        q = np.quantile(gate.density(embed_val), 1 - emb["max_val_reject"])
        assert emb["density_threshold"] == pytest.approx(q, rel=1e-4)
    assert card["ood"]["embedding"]["val_images"] == len(val)


def test_fit_gate_with_and_without_layout():
    """``fit_gate`` on pooled rows: ``grid=0`` gives the older global-average gate (no lay_* arrays, D = C);
    a grid gives the layout arrays, fitted on frontal rows only, and a gate whose vectors come from them."""
    rng = np.random.default_rng(0)
    c, g = 6, 2
    n = 160
    y = np.repeat(np.arange(4), n // 4)
    gap = rng.normal(size=(n, c)) + y[:, None]
    cells = rng.normal(size=(n, g * g, c))
    cells[y == 2, 0, :] += 4.0  # "another body part": something in the top-left cell
    val = np.concatenate([gap[y == 0][:20], cells[y == 0][:20].reshape(20, -1)], 1)
    rows = np.concatenate([gap, cells.reshape(n, -1)], 1)
    arrays0, params0 = fit.fit_gate(fit.GateData(gap, y, np.full(n, -1)), gap[y == 0][:20], 1.0, 0.05, 0, 0)
    assert "lay_proj" not in arrays0 and "layout" not in params0 and params0["dim"] == c
    arrays, params = fit.fit_gate(fit.GateData(rows, y, np.full(n, -1)), val, 1.0, 0.05, 0, 0, grid=g,
                                  grid_components=3, channels=c)
    assert arrays["lay_proj"].shape == (c, 3) and params["layout"]["grid"] == g and params["dim"] == c + g * g * 3
    np.testing.assert_allclose(arrays["lay_mean"], cells[y == 0].reshape(-1, c).mean(axis=0), rtol=1e-4, atol=1e-5)
    gate = Gate(arrays, {"embedding": params})
    vec = fit.gate_vectors(arrays, rows, g)
    assert vec.shape == (n, params["dim"])
    maps = np.zeros((1, 4, 4, c), np.float32)  # a 4x4 map whose 2x2 cells are the rows' cells
    for k, (r, q) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        maps[0, r:r + 2, q:q + 2] = cells[0, k]
    np.testing.assert_allclose(gate.embedding_of(maps)[0, c:], vec[0, c:], rtol=1e-4, atol=1e-5)



def test_choose_threshold_follows_validation():
    val = np.array([-5.0, -4.0, 1.0, 2.0])  # two validation scans would be refused at 0
    assert choose_threshold(val, 0.25) == pytest.approx(np.quantile(val, 0.75))
    assert choose_threshold(val - 3, 0.25) == 0.0  # at most 25% refused at 0 already: the head boundary
    assert choose_threshold(val, 0.0) == 2.0  # none may be refused
    # no floor (the adult check's option): the quantile whatever its sign, so the refusal budget is spent
    assert choose_threshold(val - 3, 0.25, None) == pytest.approx(np.quantile(val - 3, 0.75))
    assert np.mean((val - 3) > choose_threshold(val - 3, 0.25, None)) <= 0.25


def test_fitted_gate_on_held_out_images(fitted, non_cxr):
    """The fitted gate (the shipped model's embedding) accepts the held-out adult frontal X-ray and the official
    test scans, refuses the other radiographs it was fitted on as another body part, and a held-out document
    page as not a radiograph.

    Not asserted any more: that this fit, from three other radiographs (knee, pelvis, wrist) and their
    variants, refuses a held-out fourth (a hand PA). With the 224 px model's 7x7 map it did (and so for each of
    the four held out in turn); with the shipped 144 px model's finer map it does not (1 of 4 held out in turn
    refused, measured 2026-11-27). How the shipped gate, fitted on all of gate_dev, treats body parts it has not
    seen is measured by gate_dev's cross-validation grouped by body part (``python -m benchmarks``,
    ``train.ood``'s card entry), not by a fit on three images."""
    bundle, _, _ = fitted
    b = load_bundle(bundle)
    gate = Gate.from_bundle(b.root, b.card)
    embed = embedder(b, threads=2, gate=gate)
    for f in [HELD_OUT["frontal_chest_other"], *image_files("test")]:  # an adult's film: a chest film all the same
        v = gate.check_source(f, b.spec.size, embed, allow_adults=True)
        assert v.ok, (f.name, v)
    for f in OTHER:
        if f != HELD_OUT["non_chest_radiograph"]:
            v = gate.check_source(f, b.spec.size, embed)
            assert not v.ok and v.reason.startswith("another body part ("), (f.name, v)
    v = gate.check_source(non_cxr["document"], b.spec.size, embed)
    assert not v.ok and v.reason.startswith("not a radiograph ("), v


def test_clinical_variants_are_seeded_frontal_films():
    """``train.ood.clinical``: one seeded variant per scan, same shape and dtype, every scan changed; and a fit
    keeps such rows out of the layout basis and the density model (``GateData.basis``)."""
    gray = np.stack([load_gray(f, 224) for f in image_files("train")])
    a, b2 = fit.clinical(gray, 3), fit.clinical(gray, 3)
    assert a.shape == gray.shape and a.dtype == np.uint8 and np.array_equal(a, b2)
    assert not np.array_equal(a, fit.clinical(gray, 4))
    assert all((x != g).any() for x, g in zip(a, gray))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2 + 9 * 2)).astype(np.float32)
    y = np.repeat([0, 2], 20)
    plain = fit.fit_gate(fit.GateData(x[:30], y[:30], np.full(30, -1)), x[:5], 1.0, grid=3, channels=2,
                         grid_components=2, density_components=2)[0]
    x2 = np.concatenate([x[:30], 50 + x[:10]])
    y2 = np.concatenate([y[:30], np.zeros(10, int)])
    basis = np.concatenate([np.ones(30, bool), np.zeros(10, bool)])
    mixed = fit.fit_gate(fit.GateData(x2, y2, np.full(40, -1), basis), x[:5], 1.0, grid=3, channels=2,
                         grid_components=2, density_components=2)[0]
    for k in ("lay_mean", "lay_proj", "den_mean", "den_var"):  # the far-off rows changed neither
        np.testing.assert_allclose(mixed[k], plain[k], rtol=1e-6, atol=1e-6)




def test_the_adult_check_takes_its_own_c():
    """``fit_gate(adult_c=...)``: the adult check (and only it) is fitted with that C, which the card records;
    a stronger penalty gives smaller adult weights, and the head is the same either way."""
    rng = np.random.default_rng(1)
    children = rng.normal(size=(60, 6))
    adults = rng.normal(size=(20, 6)) + np.array([1.5, -1.0, 0, 0, 0, 0])
    others = rng.normal(size=(20, 6)) + np.array([0, 0, 3.0, 0, 0, 0])
    x = np.concatenate([children, adults, others]).astype(np.float32)
    y = np.concatenate([np.zeros(60, int), np.full(20, fit.ADULT_LABEL), np.full(20, 2)])
    data = fit.GateData(x, y, np.full(100, -1))
    val = children[:30].astype(np.float32)
    shared, p_shared = fit.fit_gate(data, val, 10.0, 0.05, 0, 0)
    own, p_own = fit.fit_gate(data, val, 10.0, 0.05, 0, 0, adult_c=0.01)
    assert "C" not in p_shared["adult"] and p_own["adult"]["C"] == 0.01
    np.testing.assert_array_equal(shared["emb_weights"], own["emb_weights"])
    assert np.linalg.norm(own["adult_weights"]) < 0.5 * np.linalg.norm(shared["adult_weights"])
