// cxr-edge in the browser: the runtime's preprocessing (cxr_edge/preprocess.py), input gate (cxr_edge/ood.py)
// and heatmap (cxr_edge/heatmap.py) over one onnxruntime-web pass. Pure functions on typed arrays: the page
// (page.js) decodes the file; node runs the same code in tests/test_web_export.py against Pillow and numpy.

// ---- preprocessing ------------------------------------------------------------------------------------
export function reductionFactor(w, h, size, keep = 1) {  // preprocess.reduction_factor
  const m = Math.min(Math.floor(w / (keep * size)), Math.floor(h / (keep * size)));
  let f = 1;
  while (f * 2 <= m) f *= 2;
  return f;
}

const mult = (area) => Math.floor(Math.fround(4294967296 / Math.fround(256 * area)));  // Reduce.c division_UINT32

export function reduce(src, w, h, f, channels = 1) {  // Image.reduce(f): box means, partial boxes at the edges
  const ow = Math.ceil(w / f), oh = Math.ceil(h / f), out = new Uint8Array(ow * oh * channels);
  for (let y = 0; y < oh; y++) {
    const y0 = y * f, y1 = Math.min(h, y0 + f);
    for (let x = 0; x < ow; x++) {
      const x0 = x * f, x1 = Math.min(w, x0 + f), area = (y1 - y0) * (x1 - x0), m = mult(area);
      for (let c = 0; c < channels; c++) {
        let ss = Math.floor(area / 2);
        for (let yy = y0; yy < y1; yy++) for (let xx = x0; xx < x1; xx++) ss += src[(yy * w + xx) * channels + c];
        out[(y * ow + x) * channels + c] = Math.floor((ss * m) / 16777216);
      }
    }
  }
  return { data: out, w: ow, h: oh };
}

const sinc = (x) => (x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x));
const lanczos = (x) => (x > -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0);
const BITS = 22;  // Resample.c PRECISION_BITS (32 - 8 - 2)

function coeffs(inSize, outSize) {  // Resample.c precompute_coeffs + normalize_coeffs_8bpc
  const scale = inSize / outSize, fscale = Math.max(scale, 1), support = 3 * fscale;
  const ksize = Math.ceil(support) * 2 + 1, kk = new Int32Array(outSize * ksize), bounds = new Int32Array(outSize * 2);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5), xmax = Math.trunc(center + support + 0.5), ww = 0;
    if (xmin < 0) xmin = 0;
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    for (let x = 0; x < xmax; x++) { w[x] = lanczos((x + xmin - center + 0.5) * (1 / fscale)); ww += w[x]; }
    for (let x = 0; x < xmax; x++) {
      const v = (ww !== 0 ? w[x] / ww : w[x]) * (1 << BITS);
      kk[xx * ksize + x] = v < 0 ? Math.trunc(v - 0.5) : Math.trunc(v + 0.5);
    }
    bounds[xx * 2] = xmin; bounds[xx * 2 + 1] = xmax;
  }
  return { kk, bounds, ksize };
}

const clip8 = (ss) => Math.min(255, Math.max(0, Math.floor(ss / (1 << BITS))));

function pass(src, w, h, size, c, horizontal, offset = 0) {  // Resample.c ImagingResample{Horizontal,Vertical}_8bpc
  const ow = horizontal ? size : w, oh = horizontal ? h : size, out = new Uint8Array(ow * oh);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const j = horizontal ? x : y, min = c.bounds[j * 2] - (horizontal ? 0 : offset), n = c.bounds[j * 2 + 1], k = j * c.ksize;
      let ss = 1 << (BITS - 1);
      if (horizontal) for (let i = 0; i < n; i++) ss += src[(y + offset) * w + min + i] * c.kk[k + i];
      else for (let i = 0; i < n; i++) ss += src[(min + i) * w + x] * c.kk[k + i];
      out[y * ow + x] = clip8(ss);
    }
  }
  return out;
}

export function resizeLanczos(src, w, h, size) {  // Image.resize((size, size), LANCZOS) of an 8-bit L image
  const vert = coeffs(h, size), horiz = coeffs(w, size);
  // Pillow (>= 11): the vertical pass first when the height shrinks more than twice as much as the width
  const hFirst = !(h - size > 0 && h - size > (w - size) * 2);
  if (!hFirst) {
    const v = h !== size ? pass(src, w, h, size, vert, false) : src;
    return w !== size ? pass(v, w, size, size, horiz, true) : v;
  }
  if (w === size) return h !== size ? pass(src, w, h, size, vert, false) : src;
  const y0 = vert.bounds[0], y1 = vert.bounds[size * 2 - 2] + vert.bounds[size * 2 - 1];
  const t = pass(src, w, y1 - y0, size, horiz, true, y0);  // only the rows the vertical pass reads
  return h !== size ? pass(t, size, y1 - y0, size, vert, false, y0) : t;
}

export function toGray(rgba, n) {  // Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16
  const g = new Uint8Array(n);
  for (let i = 0; i < n; i++) g[i] = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >>> 16;
  return g;
}

// pixels.flat_border_box: [top, bottom, left, right] rows and columns of flat dark or bright border
export function flatBorderBox(g, w, h, range = 10, dark = 24, bright = 232, maxTrim = 0.25) {
  const flat = (x0, y0, dx, dy, n) => {  // the n pixels from (x0, y0) in steps (dx, dy)
    let lo = 255, hi = 0, sum = 0;
    for (let i = 0, k = y0 * w + x0; i < n; i++, k += dy * w + dx) { const v = g[k]; lo = Math.min(lo, v); hi = Math.max(hi, v); sum += v; }
    return hi - lo <= range && (sum / n <= dark || sum / n >= bright);
  };
  const limH = Math.floor(h * maxTrim), limW = Math.floor(w * maxTrim);
  let top = 0, bottom = 0, left = 0, right = 0;
  while (top < limH && flat(0, top, 1, 0, w)) top++;
  while (bottom < limH && flat(0, h - 1 - bottom, 1, 0, w)) bottom++;
  const rows = h - top - bottom;
  while (left < limW && flat(left, top, 0, 1, rows)) left++;
  while (right < limW && flat(w - 1 - right, top, 0, 1, rows)) right++;
  return [top, bottom, left, right];
}

export function crop(g, w, h, [top, bottom, left, right]) {  // Image.crop((left, top, w - right, h - bottom))
  const ow = w - left - right, oh = h - top - bottom, out = new Uint8Array(ow * oh);
  for (let y = 0; y < oh; y++) out.set(g.subarray((y + top) * w + left, (y + top) * w + left + ow), y * ow);
  return { data: out, w: ow, h: oh };
}

export function grayInput(gray, w, h, size, minSide = 32) {  // preprocess._load: reduce, trim flat borders, squash
  if (Math.min(w, h) < minSide) throw new Error(`image is ${w}x${h} pixels, smaller than ${minSide} a side`);
  const f = reductionFactor(w, h, size);
  let g = gray;
  if (f > 1) ({ data: g, w, h } = reduce(gray, w, h, f));
  const box = flatBorderBox(g, w, h);
  if (box.some((n) => n > 0)) ({ data: g, w, h } = crop(g, w, h, box));
  return w === size && h === size ? g : resizeLanczos(g, w, h, size);
}

// ---- the gate's pixel checks --------------------------------------------------------------------------
const median = (a) => { const s = Float64Array.from(a).sort(), n = s.length; return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2; };

export function chromaFraction(rgba, w, h, side = 64, level = 32, bins = 16, saturated = 96) {  // preprocess._chroma_fraction
  let gray = true;
  for (let i = 0; i < w * h && gray; i++) gray = rgba[4 * i] === rgba[4 * i + 1] && rgba[4 * i + 1] === rgba[4 * i + 2];
  if (gray) return 0;  // three equal channels: no chroma, whatever the tint reference
  let rgb = new Uint8Array(w * h * 3);
  for (let i = 0; i < w * h; i++) for (let c = 0; c < 3; c++) rgb[3 * i + c] = rgba[4 * i + c];
  if (Math.max(w, h) > side) ({ data: rgb, w, h } = reduce(rgb, w, h, Math.max(1, Math.floor(Math.max(w, h) / side)), 3));
  const n = w * h, bin = new Int32Array(n), ref = [];
  for (let i = 0; i < n; i++) {
    const lum = Math.floor((rgb[3 * i] * 299 + rgb[3 * i + 1] * 587 + rgb[3 * i + 2] * 114) / 1000);
    bin[i] = bins ? Math.min(Math.floor(lum * bins / 256), bins - 1) : 0;
  }
  for (let b = 0; b < Math.max(bins, 1); b++) {  // off_tint_chroma: each luminance bin's median colour
    const idx = []; for (let i = 0; bins && i < n; i++) if (bin[i] === b) idx.push(i);
    ref.push(idx.length ? [0, 1, 2].map((c) => median(idx.map((i) => rgb[3 * i + c]))) : [0, 0, 0]);
  }
  let hits = 0;
  for (let i = 0; i < n; i++) {
    const d = [0, 1, 2].map((c) => rgb[3 * i + c] - ref[bin[i]][c]);
    const px = [0, 1, 2].map((c) => rgb[3 * i + c]);  // a saturated colour counts whatever the tint
    if (Math.max(...d) - Math.min(...d) > level || Math.max(...px) - Math.min(...px) > saturated) hits++;
  }
  return hits / n;
}

export function thumbnail(gray, size, side = 16) {  // ood.thumbnail (size a multiple of side) and its std
  const b = size / side, t = new Float64Array(side * side);
  for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) t[Math.floor(y / b) * side + Math.floor(x / b)] += gray[y * size + x];
  for (let i = 0; i < t.length; i++) t[i] = Math.fround(t[i] / (b * b));
  const mu = t.reduce((a, v) => a + v, 0) / t.length;
  const sd = Math.sqrt(t.reduce((a, v) => a + (v - mu) ** 2, 0) / t.length);
  return { z: t.map((v) => (v - mu) / Math.max(sd, 1e-6)), sd };
}

// ---- the model's pass: probabilities, the gate's head, polarity, heatmap ----------------------------------
const logsumexp = (a) => { const m = Math.max(...a); return m + Math.log(a.reduce((s, v) => s + Math.exp(v - m), 0)); };

export function calibrate(p, t) {  // classifier.calibrate: softmax(log(p) / T)
  if (t === 1) return Array.from(p);
  const l = Array.from(p, (v) => Math.log(Math.min(1, Math.max(1e-12, v))) / t), m = Math.max(...l);
  const e = l.map((v) => Math.exp(v - m)), s = e.reduce((a, v) => a + v, 0);
  return e.map((v) => v / s);
}

const bins = (n, g) => Array.from({ length: g }, (_, i) => [Math.floor(i * n / g), Math.ceil((i + 1) * n / g)]);

export function embedding(f, h, w, c, gate) {  // ood.Gate.embedding_of: global average (+ projected grid cells)
  const avg = (r0, r1, c0, c1) => {
    const v = new Float64Array(c);
    for (let y = r0; y < r1; y++) for (let x = c0; x < c1; x++) for (let k = 0; k < c; k++) v[k] += f[(y * w + x) * c + k];
    return v.map((s) => Math.fround(s / ((r1 - r0) * (c1 - c0))));
  };
  const out = Array.from(avg(0, h, 0, w));
  if (!gate.grid) return out;
  const proj = gate.lay_proj, k = proj.length / c;
  for (const [r0, r1] of bins(h, gate.grid)) for (const [c0, c1] of bins(w, gate.grid)) {
    const cell = avg(r0, r1, c0, c1), z = new Float64Array(k);
    for (let i = 0; i < c; i++) { const d = cell[i] - gate.lay_mean[i]; for (let j = 0; j < k; j++) z[j] += d * proj[i * k + j]; }
    out.push(...z);
  }
  return out;
}

export function gateAfterModel(e, thumbZ, gate) {  // ood.Gate.check_after_model (allow_adults off)
  const n = gate.classes.length, logits = Array.from(gate.emb_bias);
  for (let i = 0; i < e.length; i++) {
    const x = (e[i] - gate.emb_mean[i]) / gate.emb_scale[i];
    for (let j = 0; j < n; j++) logits[j] += x * gate.emb_weights[i * n + j];
  }
  const score = logsumexp(logits.slice(1)) - logits[0], k = 1 + logits.slice(1).indexOf(Math.max(...logits.slice(1)));
  const what = gate.reasons[gate.classes[k]] || gate.classes[k], thr = gate.threshold;
  if (!(score <= thr)) {
    const tail = gate.classes[k] === gate.adult_class ? `${gate.population})` : "expects a frontal chest X-ray)";
    return { ok: false, reason: `${what} (gate score ${score.toFixed(2)} > ${thr.toFixed(2)}; ${tail}`, score };
  }
  if (gate.den_var) {
    const m = gate.den_var.length, d = e.length;
    let dist = 0;
    for (let j = 0; j < m; j++) {
      let z = 0;
      for (let i = 0; i < d; i++) z += ((e[i] - gate.den_mean[i]) / gate.den_scale[i]) * gate.den_components[j * d + i];
      dist += z * z / gate.den_var[j];
    }
    if (!(dist <= gate.density_threshold)) {
      return { ok: false, reason: `${what} (unlike the frontal chest X-rays the gate knows: distance ${dist.toFixed(0)} > ${gate.density_threshold.toFixed(0)})`, score };
    }
  }
  if (gate.adult_weights) {  // the intended population: an adult's film is refused (the page has no allow_adults)
    const lin = (w, b) => e.reduce((a, v, i) => a + ((v - gate.emb_mean[i]) / gate.emb_scale[i]) * w[i], b[0]);
    const a = lin(gate.adult_weights, gate.adult_bias), at = gate.adult_threshold;
    const ch = gate.adult_other_weights ? lin(gate.adult_other_weights, gate.adult_other_bias) : Infinity;
    if (!(a <= at) && !(ch > 0)) {
      return { ok: false, reason: `${what} (gate score ${score.toFixed(2)}; not a child's chest film: adult score ${a.toFixed(2)} > ${at.toFixed(2)}, chest score ${ch.toFixed(2)} <= 0; expects a frontal chest X-ray)`, score };
    }
    if (!(a <= at)) {
      return { ok: false, reason: `${gate.reasons[gate.adult_class]} (adult score ${a.toFixed(2)} > ${at.toFixed(2)}); ${gate.population}`, score };
    }
  }
  if (gate.pol_weights) {
    const s = thumbZ.reduce((a, v, i) => a + v * gate.pol_weights[i], gate.pol_bias[0]);
    if (!(s <= gate.pol_threshold)) {
      return { ok: false, reason: `${gate.reasons.inverted} (a negative: bones dark, air bright; polarity score ${s.toFixed(1)} > ${gate.pol_threshold.toFixed(1)})`, score: s };
    }
  }
  return { ok: true, reason: "", score };
}

export function cam(f, h, w, c, weights, label) {  // heatmap.cam_maps: relu(features[..., :C] @ weights[:, k]) / peak
  const nc = weights.length / 3, m = new Float32Array(h * w);
  for (let p = 0; p < h * w; p++) {
    let s = 0;
    for (let i = 0; i < nc; i++) s += f[p * c + i] * weights[i * 3 + label];
    m[p] = Math.max(0, s);
  }
  const peak = Math.max(...m);
  return peak > 0 ? m.map((v) => v / peak) : m;
}

// ---- cxr_edge.reorient: a turned or inverted chest film gets its true reason --------------------------------
export function turnView(gray, s, k) {  // np.rot90(gray, k): k quarter turns counterclockwise of an s x s image
  let g = gray;
  for (let t = 0; t < k; t++) {
    const o = new Uint8Array(s * s);
    for (let i = 0; i < s; i++) for (let j = 0; j < s; j++) o[i * s + j] = g[j * s + (s - 1 - i)];
    g = o;
  }
  return g;
}

const reorientView = (gray, s, k) => (k === null ? gray.map((v) => 255 - v) : turnView(gray, s, k));
// Gate.asks: a thumbnail question ("pol", "ud", "side": its arrays' prefix) flags the standardized thumbnail z
const asks = (z, gate, p) => Boolean(gate[`${p}_weights`]) &&
  z.reduce((a, v, i) => a + v * gate[`${p}_weights`][i], gate[`${p}_bias`][0]) > gate[`${p}_threshold`];

async function viewVerdict(run, P, g) {  // the gate's checks after the model, on one view: { ok, score }
  const spec = P.input, gate = P.gate, th = thumbnail(g, spec.size, gate.thumb);
  const { features, fshape } = await run(modelInput(g, spec));
  return gateAfterModel(embedding(features, ...fshape, gate), th.z, gate);
}

export async function reorientReason(run, P, gray, z) {  // reorient.reason over the views whose question agrees
  let best = null;
  const questions = P.reorient.views.map((v) => v[2]);
  for (const [k, what, p] of P.reorient.views) {
    if (!asks(z, P.gate, p)) continue;
    const g = reorientView(gray, P.input.size, k), vz = thumbnail(g, P.input.size, P.gate.thumb).z;
    if (questions.some((q) => asks(vz, P.gate, q))) continue;  // the view itself still reads as turned or inverted
    const v = await viewVerdict(run, P, g);
    if (v.ok && (best === null || v.score < best.score)) best = { score: v.score, k, what };
  }
  return best && `${best.k === null ? P.gate.reasons.inverted : P.gate.reasons.turned} (${best.what})`;
}

export async function upsideDown(run, P, gray, z, score) {  // reorient.explain, for an accepted input
  const [k, what, p] = P.reorient.views[P.reorient.upside_down];
  if (!asks(z, P.gate, p)) return null;
  const v = await viewVerdict(run, P, turnView(gray, P.input.size, k));
  return v.ok && v.score < score ? `${P.gate.reasons.turned} (${what})` : null;
}

const worthAsking = (reason, gate) => !reason.startsWith(gate.reasons.inverted);

function modelInput(gray, spec) {
  const x = new Float32Array(spec.size * spec.size);
  for (let i = 0; i < x.length; i++) x[i] = Math.fround(Math.fround(gray[i] * spec.scale) + spec.offset);
  return x;
}

// ---- one scan, start to end --------------------------------------------------------------------------
export async function classify(run, P, rgba, w, h) {
  const spec = P.input, gate = P.gate, n = w * h;
  const gray = grayInput(toGray(rgba, n), w, h, spec.size, spec.min_side);
  const refuse = (reason) => ({ status: "rejected", reason });
  const th = thumbnail(gray, spec.size, gate ? gate.thumb : 16);
  if (gate) {
    const colour = chromaFraction(rgba, w, h, P.colour.side, P.colour.level, P.colour.bins, P.colour.saturated);
    if (colour > gate.max_colour_fraction) {
      return refuse(`${gate.reasons.colour} (${Math.round(colour * 100)}% of pixels in colour; X-rays are gray)`);
    }
    if (th.sd < gate.min_std) return refuse(`${gate.reasons.blank} (no contrast; not an X-ray)`);
  }
  const { probs, features, fshape } = await run(modelInput(gray, spec));
  const [fh, fw, fc] = fshape;
  if (gate && gate.emb_weights) {
    const v = gateAfterModel(embedding(features, fh, fw, fc, gate), th.z, gate);
    if (!v.ok) return refuse((P.reorient && worthAsking(v.reason, gate) && await reorientReason(run, P, gray, th.z)) || v.reason);
    const turned = P.reorient && await upsideDown(run, P, gray, th.z, v.score);
    if (turned) return refuse(turned);
  }
  const p = calibrate(probs, P.temperature), label = p.indexOf(Math.max(...p));
  const out = { status: "ok", label: P.classes[label], probabilities: Object.fromEntries(P.classes.map((k, i) => [k, p[i]])) };
  if (P.cam_weights) out.heatmap = { h: fh, w: fw, map: cam(features, fh, fw, fc, P.cam_weights, label) };
  return out;
}
