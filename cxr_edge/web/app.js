// cxr-edge web page: uploads each dropped file to POST /v1/classify?heatmap=true and shows its record.
// No framework, no CDN: this file, index.html and style.css are all the page needs.
"use strict";

const CLASSES = ["normal", "bacterial", "viral"];
const CSV_COLUMNS = ["path", "status", "label", ...CLASSES, "reason", "warning", "model_name", "model_version",
                     "model_sha256"];
const PARALLEL = 2;
const $ = (id) => document.getElementById(id);
const rows = [];
const pending = [];
let running = 0;
let health = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function checkHealth() {
  try {
    const resp = await fetch("/healthz", { cache: "no-store" });
    health = await resp.json();
    $("token-row").hidden = !health.auth;
    $("version").textContent = "cxr-edge " + health.version;
    if (health.status === "ready") {
      const m = health.model;
      $("model").textContent = `model ${m.name} ${m.version} (${m.backend})` + (m.heatmaps ? "" : ", no heatmaps");
      $("model").className = "model ready";
      pump();
      return;
    }
    $("model").textContent = health.status === "failed" ? "the model failed to load: " + health.error
                                                        : "loading the model\u2026";
  } catch (err) {
    $("model").textContent = "server not reachable; retrying\u2026";
  }
  if (!health || health.status !== "failed") setTimeout(checkHealth, 1000);
}

function newCard(file) {
  const card = el("article", "card pending");
  card.append(el("h3", "name", file.name), el("p", "state", "waiting\u2026"));
  $("cards").append(card);
  return card;
}

function bars(probabilities, label) {
  const box = el("div", "bars");
  for (const c of CLASSES) {
    const p = probabilities[c];
    const row = el("div", "bar-row" + (c === label ? " top" : ""));
    const track = el("div", "bar");
    const fill = el("span", "fill " + c);
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    row.append(el("span", "bar-name", c), track, el("span", "bar-value", (100 * p).toFixed(1) + "%"));
    box.append(row);
  }
  return box;
}

function render(card, record) {
  card.querySelector(".state").remove();
  if (record.error !== undefined) {
    card.className = "card error";
    card.append(el("p", "verdict", record.server ? "Not classified" : "Unreadable file"), el("p", "reason", record.error));
  } else if (record.status === "rejected") {
    card.className = "card rejected";
    card.append(el("p", "verdict", "Rejected: not what the model reads"), el("p", "reason", record.reason));
  } else {
    card.className = "card ok";
    card.append(el("p", "verdict label", record.label), bars(record.probabilities, record.label));
    if (record.warning) card.append(el("p", "warning", "Warning: " + record.warning));
    if (record.heatmap) {
      const img = el("img", "heatmap");
      img.alt = "heatmap of " + record.path;
      img.src = record.heatmap;
      card.append(img);
    } else if (record.heatmap_error) {
      card.append(el("p", "reason", record.heatmap_error));
    }
  }
  addRow(record);
}

function addRow(record) {
  const status = record.error !== undefined ? "error" : (record.status || "ok");
  const probs = record.probabilities || {};
  const model = record.model || {};
  const row = {
    path: record.path, status, label: record.label || "",
    normal: probs.normal ?? "", bacterial: probs.bacterial ?? "", viral: probs.viral ?? "",
    reason: record.reason || record.error || "", warning: record.warning || "",
    model_name: model.name || "", model_version: model.version || "", model_sha256: model.sha256 || "",
  };
  rows.push(row);
  const tr = el("tr", status);
  for (const key of ["path", "status", "label", ...CLASSES, "reason", "warning"]) {
    const v = row[key];
    tr.append(el("td", "", typeof v === "number" ? v.toFixed(3) : v));
  }
  document.querySelector("#results tbody").append(tr);
  $("csv").disabled = $("clear").disabled = false;
}

// a busy server (503 "busy: ..." past --max-concurrency, 429) is asked again after its Retry-After; not a 503
// of --request-timeout, whose classification goes on in the background of a server already slow
const BUSY_RETRIES = 5;

async function upload(file, card) {
  const state = card.querySelector(".state");
  state.textContent = "classifying\u2026";
  let record;
  for (let attempt = 0; !record; attempt++) {
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const resp = await fetch("/v1/classify?heatmap=true", { method: "POST", body: form, headers: authHeaders() });
      const body = await resp.json().catch(() => ({}));
      if (body.results && body.results.length) {
        record = body.results[0];
      } else if ((resp.status === 429 || (resp.status === 503 && String(body.detail || "").startsWith("busy")))
                 && attempt < BUSY_RETRIES) {
        const wait = Math.min(10, Math.max(0, Number(resp.headers.get("Retry-After")) || 1));
        state.textContent = `server busy, trying again in ${wait} s\u2026`;
        await new Promise((done) => setTimeout(done, wait * 1000));
      } else {
        const why = body.detail || `HTTP ${resp.status}`;
        // the file was not judged (the server, the network or the token): not "unreadable"
        const server = resp.status >= 500 || resp.status === 429 || resp.status === 408 || resp.status === 401;
        record = { path: file.name, error: resp.status === 401 ? why + " (enter the access token above)" : why, server };
        if (resp.status === 401) $("token-row").hidden = false;
      }
    } catch (err) {
      record = { path: file.name, error: "upload failed: " + err.message, server: true };
    }
  }
  render(card, record);
}

function pump() {
  if (!health || health.status !== "ready") return;
  while (running < PARALLEL && pending.length) {
    const [file, card] = pending.shift();
    running++;
    upload(file, card).finally(() => { running--; pump(); });
  }
}

function addFiles(files) {
  for (const file of files) pending.push([file, newCard(file)]);
  pump();
}

function csvCell(v) {
  // A text cell that a spreadsheet would run as a formula (a file named "=HYPERLINK(...).jpg") gets a
  // leading apostrophe: the CSV is for opening in a spreadsheet.
  let s = String(v);
  if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) s = "'" + s;
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function downloadCsv() {
  const lines = [CSV_COLUMNS.join(",")];
  for (const r of rows) lines.push(CSV_COLUMNS.map((c) => csvCell(r[c])).join(","));
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = "cxr-edge-results.csv";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function clearAll() {
  rows.length = 0;
  $("cards").replaceChildren();
  document.querySelector("#results tbody").replaceChildren();
  $("csv").disabled = $("clear").disabled = true;
}

const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => addFiles(e.dataTransfer.files));
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("files").click(); });
$("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
$("csv").addEventListener("click", downloadCsv);
$("clear").addEventListener("click", clearAll);
checkHealth();
