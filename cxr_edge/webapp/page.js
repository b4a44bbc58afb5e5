// The page: loads the model and params.json/.bin from its own folder, decodes each file the user gives and
// shows what cxr.js makes of it. window.cxr (ready, results, classifyFiles) is for tests and benchmarks.
import * as ort from "./vendor/ort.wasm.min.mjs";
import { classify } from "./cxr.js";

ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href;
ort.env.wasm.numThreads = 1;  // no cross-origin isolation needed; one thread, like the Python benchmark
const $ = (id) => document.getElementById(id);

async function loadParams() {
  const [P, bin] = await Promise.all([fetch("params.json").then((r) => r.json()),
    fetch("params.bin").then((r) => r.arrayBuffer())]);
  const arr = (name) => { const a = P.arrays[name]; return a && new Float32Array(bin, a.offset, a.length); };
  P.cam_weights = arr("cam_weights");
  if (P.gate) for (const k of Object.keys(P.arrays)) if (k.startsWith("gate.")) P.gate[k.slice(5)] = arr(k);
  return P;
}

function complete(bytes) {  // a truncated JPEG or PNG is an error, as in Pillow, not a half-gray image
  const b = new Uint8Array(bytes), n = b.length;
  if (b[0] === 0xff && b[1] === 0xd8) return n > 4 && b.subarray(Math.max(0, n - 32)).some((v, i, s) => v === 0xff && s[i + 1] === 0xd9);
  if (b[0] === 0x89 && b[1] === 0x50) return String.fromCharCode(...b.subarray(Math.max(0, n - 12))).includes("IEND");
  return true;
}

async function decode(file) {
  const bytes = await file.arrayBuffer();
  if (bytes.byteLength === 0) throw new Error("empty file (0 bytes)");
  if (!complete(bytes)) throw new Error("cannot decode image (truncated file)");
  let bmp;
  try {
    bmp = await createImageBitmap(new Blob([bytes]), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (e) { throw new Error("not an image this browser can read"); }
  const c = new OffscreenCanvas(bmp.width, bmp.height), g = c.getContext("2d");
  g.fillStyle = "#000"; g.fillRect(0, 0, bmp.width, bmp.height);  // transparent pixels count as black
  g.drawImage(bmp, 0, 0);
  return { rgba: g.getImageData(0, 0, bmp.width, bmp.height).data, w: bmp.width, h: bmp.height, bmp };
}

function heatCanvas(bmp, hm) {
  const c = document.createElement("canvas"), s = 144;
  c.width = s; c.height = s;
  const g = c.getContext("2d");
  g.drawImage(bmp, 0, 0, s, s);
  const small = new OffscreenCanvas(hm.w, hm.h), sg = small.getContext("2d"), img = sg.createImageData(hm.w, hm.h);
  hm.map.forEach((v, i) => img.data.set([255 * Math.min(1, 2 * v), 255 * Math.max(0, 2 * v - 1), 0, 115 * v], 4 * i));
  sg.putImageData(img, 0, 0);
  g.imageSmoothingEnabled = true;
  g.drawImage(small, 0, 0, s, s);
  return c;
}

function show(file, r, bmp) {
  const tr = document.createElement("tr"), td = (t) => { const e = document.createElement("td"); e.textContent = t; tr.append(e); return e; };
  td(file.name);
  const res = td(r.status === "ok" ? r.label : r.status === "rejected" ? `rejected: ${r.reason}` : `error: ${r.error}`);
  res.className = r.status;
  td(r.probabilities ? Object.entries(r.probabilities).map(([k, v]) => `${k} ${(100 * v).toFixed(1)}%`).join(", ") : "");
  const h = td("");
  if (r.heatmap && bmp) h.append(heatCanvas(bmp, r.heatmap));
  $("results").tBodies[0].append(tr);
}

const ready = (async () => {
  const [P, session] = await Promise.all([loadParams(), ort.InferenceSession.create("model.onnx",
    { executionProviders: ["wasm"], graphOptimizationLevel: "all" })]);
  const S = P.input.size;
  const run = async (x) => {
    const out = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", x, [1, S, S, 1]) });
    return { probs: out.probs.data, features: out.features.data, fshape: out.features.dims.slice(1) };
  };
  $("status").textContent = `model ${P.model.name} ${P.model.version} ready (onnxruntime-web ${ort.env.versions.web}, WebAssembly, 1 thread)`;
  return { P, run };
})();
ready.catch((e) => { $("status").textContent = `the model failed to load: ${e.message}`; });

const results = [];
async function classifyFiles(files) {
  const { P, run } = await ready, out = [];
  for (const file of files) {
    const t0 = performance.now();
    let r, bmp;
    try {
      const d = await decode(file);
      bmp = d.bmp;
      r = await classify(run, P, d.rgba, d.w, d.h);
    } catch (e) { r = { status: "error", error: e.message }; }
    r.path = file.name; r.ms = performance.now() - t0;
    show(file, r, bmp);
    out.push(r); results.push(r);
  }
  return out;
}
window.cxr = { ready: ready.then(() => true), results, classifyFiles };

$("files").addEventListener("change", (e) => classifyFiles([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classifyFiles([...e.dataTransfer.files]); });
