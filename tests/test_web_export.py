"""``cxr-edge export-web``: the static in-browser classifier.

Two layers. The JavaScript's arithmetic (``cxr_edge/webapp/cxr.js``) run by node against Pillow and numpy:
the reduction and Lanczos squash bit for bit, the colour and blank checks, the gate's head on the model's
feature map, the polarity check and the heatmap. Then the exported folder in headless Chromium (Debian's
package, driven by Playwright) from a loopback static server: shipped scans, a colour photo and a broken file,
against ``cxr-edge classify --json --backend onnx`` (the page runs the bundle's ONNX model); no request leaves
the page's origin. Each layer skips with one line when node or Chromium is missing (``.ci/run`` installs
Chromium; node comes with Debian's ``nodejs``)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from _runtime_fixtures import image_files
from benchmarks import browser as browser_bench
from benchmarks.browser import static_server
from cxr_edge.bundle import load_bundle
from cxr_edge.webexport import WebExportError, export_web

ROOT = Path(__file__).resolve().parent.parent
CXR_JS = (ROOT / "cxr_edge" / "webapp" / "cxr.js").as_uri()
NODE = shutil.which("node")
CHROMIUM = next((p for p in (os.environ.get("CXR_EDGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"))
                 if p and Path(p).is_file()), None)
needs_node = pytest.mark.skipif(NODE is None, reason="no node (apt-get install nodejs) for the JavaScript parity test")
SIZE = load_bundle().spec.size


def _node(script: str, job: dict, tmp_path: Path):
    """Run ``script`` (an ES module body with ``m`` = cxr.js and ``job``) in node; its JSON on stdout."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    head = (f"import {{ readFileSync }} from 'fs'; const m = await import({json.dumps(CXR_JS)});\n"
            f"const job = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'job.json'))}));\n"
            "const b64 = (a) => Buffer.from(a).toString('base64'), bytes = (s) => Buffer.from(s, 'base64');\n")
    proc = subprocess.run([NODE, "--experimental-detect-module", "--input-type=module", "-e", head + script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _photo(path: Path) -> Path:
    yy, xx = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([xx * 255 // 400, yy * 255 // 300, 150 + 0 * xx], -1).astype(np.uint8)).save(path)
    return path


@needs_node
def test_js_preprocessing_is_pillows_bit_for_bit(tmp_path):
    """Real scans (reduced by 4 or 8, then squashed), random images whose sizes exercise partial reduction
    boxes, both orders of Pillow's two Lanczos passes, upscaling and no resize at all, a random colour image,
    a colour photo, a scan with flat borders to trim and a mostly flat image (trimmed to its limit): the same 144 px
    image, the same chroma fraction and thumbnail spread."""
    from cxr_edge.ood import features
    from cxr_edge.preprocess import load_gray_colour

    rng = np.random.default_rng(0)
    imgs = [Image.open(f).convert("RGB") for f in image_files("train")[:3] + image_files("test")[:1]]
    imgs += [Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)).convert("RGB")
             for w, h in [(301, 517), (151, 259), (517, 301), (1000, 77), (SIZE, SIZE), (2049, 1531), (50, 40)]]
    imgs += [Image.fromarray(rng.integers(0, 256, (333, 411, 3), np.uint8)), Image.open(_photo(tmp_path / "p.png"))]
    framed = np.asarray(imgs[0].convert("L")).copy()  # flat borders to trim: dark, bright, a whole flat image
    framed[:, :20], framed[:, -9:], framed[:7] = 3, 250, 240
    small = np.full((300, 200), 7, np.uint8)  # flat well past the 25% a side that may go
    small[130:170, 80:120] = rng.integers(0, 256, (40, 40), np.uint8)
    imgs += [Image.fromarray(framed).convert("RGB"), Image.fromarray(small).convert("RGB")]
    cases, want = [], []
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
        gray, colour = load_gray_colour(tmp_path / f"{i}.png", SIZE)
        want.append((gray, colour, features(gray[None])[1][0]))
        cases.append({"w": im.size[0], "h": im.size[1],
                      "rgba": base64.b64encode(np.asarray(im.convert("RGBA")).tobytes()).decode()})
    got = _node("""const out = job.cases.map((c) => { const rgba = bytes(c.rgba);
      const g = m.grayInput(m.toGray(rgba, c.w * c.h), c.w, c.h, job.size);
      return { gray: b64(g), chroma: m.chromaFraction(rgba, c.w, c.h), sd: m.thumbnail(g, job.size).sd }; });
    console.log(JSON.stringify(out));""", {"size": SIZE, "cases": cases}, tmp_path)
    for (gray, colour, sd), g, im in zip(want, got, imgs):
        js = np.frombuffer(base64.b64decode(g["gray"]), np.uint8).reshape(SIZE, SIZE)
        assert np.array_equal(js, gray), (im.size, int((js != gray).sum()))
        assert g["chroma"] == pytest.approx(colour, abs=1e-12) and g["sd"] == pytest.approx(sd, rel=1e-6)
    assert want[-3][1] > 0.5 and want[-4][1] > 0.02  # the colour images are seen as colour


@needs_node
def test_js_gate_heatmap_and_probabilities_match_python(tmp_path):
    """From the shipped model's own feature map: the gate's vector (global average + projected grid cells),
    its head's score, the polarity check (a negative is refused with Python's reason), the heatmap and the
    temperature-scaled probabilities. Then the gate is data-driven: a head with one more class (an adult
    refusal, say) refuses with that class's reason read from the exported parameters."""
    from cxr_edge import Classifier
    from cxr_edge.heatmap import cam_maps
    from cxr_edge.webexport import web_params

    bundle = load_bundle()
    params, blob = web_params(bundle)
    arrays = {k: np.frombuffer(blob, "<f4", v["length"], v["offset"]).tolist() for k, v in params["arrays"].items()}
    clf = Classifier(backend="onnx", ood=True)
    gray = np.stack([_gray(f) for f in image_files("test")])
    gray = np.concatenate([gray, 255 - gray[:1]])  # a negative of a scan
    from cxr_edge.preprocess import to_input

    raw, feats = clf.engine.run_full(to_input(gray, bundle.spec))  # the model's own output, before the temperature
    probs = clf.predict(gray)
    gate = clf.gate
    want = [gate.check_after_model(gate.embedding_of(f), g) for f, g in zip(feats, gray)]
    extra = dict(params["gate"], classes=params["gate"]["classes"] + ["adult_chest"],
                 reasons={**params["gate"]["reasons"], "adult_chest": "adult chest X-ray"}, adult_class="adult_chest",
                 population="trained on children")
    w = np.asarray(arrays["gate.emb_weights"]).reshape(-1, len(params["gate"]["classes"]))
    job = {"params": params, "arrays": arrays, "feats": [base64.b64encode(f.astype("<f4").tobytes()).decode() for f in feats],
           "shape": list(feats.shape[1:]), "thumbs": [], "raw": raw.tolist(), "extra": extra,
           "extra_w": np.concatenate([w, np.zeros((len(w), 1))], 1).ravel().tolist(),
           "extra_b": arrays["gate.emb_bias"] + [1e3], "gray": [base64.b64encode(g.tobytes()).decode() for g in gray]}
    got = _node("""const P = job.params, A = job.arrays, G = { ...P.gate };
      for (const k of Object.keys(A)) if (k.startsWith('gate.')) G[k.slice(5)] = A[k];
      const [h, w, c] = job.shape, out = [];
      job.feats.forEach((f64, i) => {
        const f = new Float32Array(bytes(f64).buffer.slice(bytes(f64).byteOffset, bytes(f64).byteOffset + h * w * c * 4));
        const e = m.embedding(f, h, w, c, G), th = m.thumbnail(new Uint8Array(bytes(job.gray[i])), P.input.size, G.thumb);
        const p = m.calibrate(job.raw[i], P.temperature), k = p.indexOf(Math.max(...p));
        const X = { ...job.extra, ...Object.fromEntries(Object.entries(G).filter(([k]) => !(k in job.extra))), emb_weights: job.extra_w, emb_bias: job.extra_b };
        out.push({ v: m.gateAfterModel(e, th.z, G), p, cam: Array.from(m.cam(f, h, w, c, A.cam_weights, k)), extra: m.gateAfterModel(e, th.z, X) });
      });
      console.log(JSON.stringify(out));""", job, tmp_path)
    for v, g, p, f in zip(want, got, probs, feats):
        assert g["v"]["ok"] == v.ok and g["v"]["reason"] == v.reason, (g["v"], v)
        if v.ok:
            assert g["v"]["score"] == pytest.approx(v.score, abs=1e-3)
        np.testing.assert_allclose(g["p"], p, atol=1e-5)
        np.testing.assert_allclose(np.reshape(g["cam"], f.shape[:2]), cam_maps(f[None], clf._cam_weights if clf._cam_weights
                                   is not None else _cam(bundle), [int(np.argmax(p))])[0], atol=1e-4)
        assert not g["extra"]["ok"] and g["extra"]["reason"].startswith("adult chest X-ray (gate score ")
        assert g["extra"]["reason"].endswith("; trained on children)")
    assert [v.ok for v in want] == [True] * (len(want) - 1) + [False] and "inverted image" in want[-1].reason


@needs_node
def test_js_adult_check_matches_python(tmp_path):
    """The intended-population check in the browser: with the shipped gate's adult arrays and its threshold
    moved below every score, the page refuses each scan exactly as ``Gate.embedding_verdicts`` does: as an
    adult chest X-ray when the chest score says chest, and as the head's other class when it says another
    radiograph (the chest bias moved so that each answer occurs)."""
    import copy

    from cxr_edge import Classifier
    from cxr_edge.preprocess import to_input
    from cxr_edge.webexport import web_params

    bundle = load_bundle()
    params, blob = web_params(bundle)
    arrays = {k: np.frombuffer(blob, "<f4", v["length"], v["offset"]).tolist() for k, v in params["arrays"].items()}
    clf = Classifier(backend="onnx", ood=True)
    if not clf.gate.has_adult_other or "gate.adult_other_weights" not in arrays:
        pytest.skip("the shipped gate has no adult check with its chest question")
    gray = np.stack([_gray(f) for f in image_files("test")])
    _, feats = clf.engine.run_full(to_input(gray, bundle.spec))
    emb = np.stack([clf.gate.embedding_of(f) for f in feats])
    want, cases = [], []
    for bias in (1e3, -1e3):
        g = copy.copy(clf.gate)
        g.adult_threshold, g.adult_other_bias = -1e9, bias
        want += [v.reason for v in g.embedding_verdicts(emb)]
        cases.append({"adult_threshold": -1e9, "bias": bias})
    job = {"params": params, "arrays": arrays, "emb": emb.tolist(), "cases": cases}
    got = _node("""const P = job.params, A = job.arrays, G = { ...P.gate };
      for (const k of Object.keys(A)) if (k.startsWith('gate.')) G[k.slice(5)] = A[k];
      const out = [];
      for (const c of job.cases) {
        const X = { ...G, adult_threshold: c.adult_threshold, adult_other_bias: [c.bias] };
        for (const e of job.emb) out.push(m.gateAfterModel(e, new Array(G.thumb * G.thumb).fill(0), X).reason);
      }
      console.log(JSON.stringify(out));""", job, tmp_path)
    n = len(emb)
    assert all(r.startswith("adult chest X-ray (adult score ") for r in want[:n])
    assert all("not a child's chest film" in r for r in want[n:])
    assert got == want


def _gray(path):
    from cxr_edge.preprocess import load_gray

    return load_gray(path, SIZE)


def _cam(bundle):
    from cxr_edge.heatmap import load_cam_weights

    return load_cam_weights(bundle)


def test_export_web_writes_the_folder_and_refuses_to_overwrite(tmp_path):
    out = export_web(tmp_path / "site")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.html", "page.js", "cxr.js", "model.onnx", "params.json", "params.bin", "card.json",
            "vendor/ort.wasm.min.mjs", "vendor/ort-wasm-simd-threaded.wasm"} <= names
    params = json.loads((out / "params.json").read_text())
    assert params["gate"]["classes"][0] == "frontal_chest" and params["gate"]["reasons"]["colour"] == "colour photo"
    assert sum(a["length"] for a in params["arrays"].values()) * 4 == (out / "params.bin").stat().st_size
    assert (out / "model.onnx").read_bytes() == load_bundle().model_file("onnx")[0].read_bytes()
    with pytest.raises(WebExportError, match="not empty"):
        export_web(out)
    (out / "mine.txt").write_text("kept")
    export_web(out, overwrite=True)
    assert (out / "mine.txt").read_text() == "kept"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "export-web", str(out)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 1 and "not empty" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The exported folder on a loopback static server (Python's http.server: any static server will do)."""
    with static_server(export_web(tmp_path_factory.mktemp("web") / "site")) as url:
        yield url


def run_page(url: str, files: list[Path]) -> tuple[list, list]:
    return browser_bench.run_page(url, files, CHROMIUM)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium) for the browser test")
def test_page_in_chromium_matches_the_cli(site, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    broken = tmp_path / "truncated-scan.jpeg"
    broken.write_bytes(image_files("test")[0].read_bytes()[:5000])
    turned, negative = tmp_path / "turned-scan.png", tmp_path / "negative-scan.png"
    Image.open(image_files("train")[0]).convert("L").transpose(Image.Transpose.ROTATE_270).save(turned)
    ImageOps.invert(Image.open(image_files("train")[1]).convert("L")).save(negative)
    files = (image_files("train")[:3] + image_files("test") + [turned, negative, _photo(tmp_path / "holiday-photo.jpg"),
                                                                broken])
    cli = subprocess.run([sys.executable, "-m", "cxr_edge", "classify", "--json", "--backend", "onnx", *map(str, files)],
                         capture_output=True, text=True, cwd=ROOT)
    want = [json.loads(line) for line in cli.stdout.splitlines()]
    got, outside = run_page(site, files)
    assert outside == []
    assert [r["path"] for r in got] == [f.name for f in files]
    for g, w in zip(got, want):
        if "error" in w:
            assert g["status"] == "error", g
        elif w["status"] == "rejected":
            assert g["status"] == "rejected" and g["reason"].split(" (")[0] == w["reason"].split(" (")[0], (g, w)
        else:
            assert g["status"] == "ok" and g["label"] == w["label"] and g["heatmap"], (g, w)
            assert max(abs(g["probabilities"][k] - v) for k, v in w["probabilities"].items()) <= 0.02, (g, w)
    assert [g["status"] for g in got[-2:]] == ["rejected", "error"] and got[-2]["reason"].startswith("colour photo")
    assert got[-4]["reason"] == want[-4]["reason"] and want[-4]["reason"].startswith("turned film (a frontal chest X-ray "
                                                                                       "turned 90 degrees clockwise")
    assert got[-3]["reason"] == want[-3]["reason"] and want[-3]["reason"].startswith("inverted image (")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium) for the browser test")
def test_serve_offers_classify_in_this_browser(tmp_path):
    """``cxr-edge serve``'s page links to /local/, the same page for the served bundle; it classifies there."""
    pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    pytest.importorskip("fastapi_offline", reason="needs the serve extra: pip install 'cxr-edge[serve]'")
    import urllib.request

    from benchmarks.serve import start_server, stop_server

    proc, url = start_server()
    try:
        assert 'href="/local/"' in urllib.request.urlopen(url).read().decode()
        got, outside = run_page(url + "local/", image_files("test")[:2])
        assert outside == [] and [g["status"] for g in got] == ["ok", "ok"]
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "local/../card.json".replace("../", "%2e%2e/"))
    finally:
        stop_server(proc)


@needs_node
def test_js_reorient_matches_python(tmp_path):
    """``cxr.js``'s ``classify`` against ``Classifier`` on a turned scan, a negative, an upright scan, and (the
    upside-down question's threshold moved below every score) an upright scan whose half turn the gate refuses,
    a half-turned scan whose half turn it accepts (the head's threshold moved above every score) and a turned
    scan whose every view the question flags (it keeps the head's reason). Node has
    no runtime: the model's outputs for every input Python's classifier ran are looked up by the input's exact
    float32 bytes, so the page must build the same views, bit for bit."""
    import copy

    from cxr_edge import Classifier
    from cxr_edge.labels import CLASS_NAMES
    from cxr_edge.webexport import web_params

    bundle = load_bundle()
    params, blob = web_params(bundle)
    arrays = {k: np.frombuffer(blob, "<f4", v["length"], v["offset"]).tolist() for k, v in params["arrays"].items()}
    clf = Classifier(backend="onnx", threads=1)
    if not {"updown", "sideways"} <= set(clf.gate.questions) or "reorient" not in params:
        pytest.skip("the shipped gate has no turn questions")
    seen = {}
    real = clf.engine.run_full

    def recording(x):  # every model input the classifier runs, and its outputs
        raw, feats = real(x)
        for xi, pi, fi in zip(x, raw, feats):
            seen[base64.b64encode(np.ascontiguousarray(xi, "<f4").tobytes()).decode()] = (pi.tolist(), fi)
        return raw, feats

    clf.engine.run_full = recording
    scan = Image.open(image_files("train")[0]).convert("L")
    # (image, Python's moved thresholds, the same in the page's parameters)
    cases = [(scan.transpose(Image.Transpose.ROTATE_270), {}, {}), (ImageOps.invert(scan), {}, {}), (scan, {}, {}),
             (scan, {"updown": -1e9}, {"ud_threshold": -1e9}),
             (scan.transpose(Image.Transpose.ROTATE_180), {"updown": -1e9, "emb_threshold": 1e9, "adult_threshold": 1e9},
              {"ud_threshold": -1e9, "threshold": 1e9, "adult_threshold": 1e9}),
             (scan.transpose(Image.Transpose.ROTATE_270), {"updown": -1e9}, {"ud_threshold": -1e9})]
    want, jobs = [], []
    shipped = clf.gate
    for img, moved, moved_js in cases:
        clf.gate = copy.copy(shipped)
        clf.gate.questions = dict(shipped.questions)
        for k, v in moved.items():
            if k in clf.gate.questions:
                clf.gate.questions[k] = (*clf.gate.questions[k][:2], v)
            else:
                setattr(clf.gate, k, v)
        path = tmp_path / f"case{len(jobs)}.png"
        img.save(path)
        r = clf.classify(path)
        want.append(r.to_dict().get("reason") or r.label)
        rgba = np.asarray(img.convert("RGBA"))
        jobs.append({"rgba": base64.b64encode(rgba.tobytes()).decode(), "w": img.width, "h": img.height,
                     "moved": moved_js})
    outputs = {k: {"probs": p, "features": base64.b64encode(f.astype("<f4").tobytes()).decode(), "shape": list(f.shape)}
               for k, (p, f) in seen.items()}
    got = _node("""const P0 = job.params, A = job.arrays, G0 = { ...P0.gate };
      for (const k of Object.keys(A)) if (k.startsWith('gate.')) G0[k.slice(5)] = A[k];
      const run = async (x) => {
        const o = job.outputs[b64(new Uint8Array(x.buffer, x.byteOffset, x.byteLength))];
        if (!o) throw new Error('an input Python never ran');
        const f = bytes(o.features);
        return { probs: o.probs, features: new Float32Array(f.buffer.slice(f.byteOffset, f.byteOffset + f.length)), fshape: o.shape };
      };
      const out = [];
      for (const c of job.cases) {
        const P = { ...P0, gate: { ...G0, ...c.moved } };
        const r = await m.classify(run, P, new Uint8Array(bytes(c.rgba)), c.w, c.h);
        out.push(r.reason || r.label);
      }
      console.log(JSON.stringify(out));""", {"params": params, "arrays": arrays, "outputs": outputs, "cases": jobs}, tmp_path)
    assert got == want
    assert want[0].startswith("turned film (a frontal chest X-ray turned 90 degrees clockwise")
    assert want[1].startswith("inverted image (") and want[2] == want[3] and want[2] in CLASS_NAMES
    assert want[4] == "turned film (a frontal chest X-ray upside down; rotate it upright)"
    assert not want[5].startswith("turned film") and want[5] not in CLASS_NAMES  # every view flagged: the head's reason
