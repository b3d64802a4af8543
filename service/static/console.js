// loraswap console: plain JavaScript, no framework, no build step.
//
// Security rules this file keeps (docs/api.md, "Web console"):
// - everything from the server or the user is put on the page as text (textContent, setAttribute on
//   harmless attributes, img.src to blob:/data: URLs we made) — never innerHTML;
// - the token lives in sessionStorage and goes out only as the Authorization header, never in a URL;
// - no inline script or style and no eval: the page's CSP forbids them.
"use strict";

const TOKEN_KEY = "loraswap.token";
const state = { scopes: [], server: null, adapters: [], picked: [], job: null, stream: null, initImage: null,
  detail: null, uploadFiles: [], serverTimer: null };

// -- small helpers -------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) throw new Error("listeners are added with addEventListener");
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

function status(message, isError = false) {
  const node = $("status");
  node.textContent = message;
  node.classList.toggle("error", isError);
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(value) {
  if (!value) return "";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const isAdmin = () => state.scopes.includes("admin");
const enc = encodeURIComponent;

class ApiError extends Error {
  constructor(status, type, message) { super(message); this.status = status; this.type = type; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  if (!response.ok) {
    let type = "http_error", message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) { type = body.error.type; message = `${body.error.type}: ${body.error.message}`; }
    } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, type, message);
  }
  return response;
}
const getJSON = async (path) => (await api(path)).json();

function report(error) {
  status(error instanceof ApiError ? error.message : `error: ${error.message || error}`, true);
}

// -- token and views -----------------------------------------------------------------------------
function showView(name) {
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("active", button.dataset.view === name);
  }
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${name}`;
  clearInterval(state.serverTimer);
  if (name === "adapters") loadAdapters().catch(report);
  if (name === "server") {
    loadServer().catch(report);
    state.serverTimer = setInterval(() => loadServer().catch(report), 3000);
  }
}

async function loadServer() {
  const server = await getJSON("/v1/server");
  state.server = server;
  state.scopes = server.scopes;
  $("scopes").textContent = server.scopes.length ? `scopes: ${server.scopes.join(", ")}` : "";
  for (const node of document.querySelectorAll(".needs-admin")) node.hidden = !isAdmin();
  renderServer(server);
  return server;
}

async function connect() {
  try {
    const server = await loadServer();
    const sampler = $("sampler");
    if (!sampler.options.length) {
      for (const name of server.schedulers) sampler.append(el("option", { value: name, text: name }));
    }
    if (server.model && !$("width").value) {
      $("width").value = server.model.native_size;
      $("height").value = server.model.native_size;
    }
    $("steps").max = server.limits.max_steps;
    $("width").max = server.limits.max_width;
    $("height").max = server.limits.max_height;
    status(server.ready ? `connected: ${server.model ? server.model.name : ""} ready` : `server ${server.status}`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) status("enter a token (the server needs one)", true);
    else report(error);
  }
}

// -- generate ------------------------------------------------------------------------------------
function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: numberOrNull("steps") ?? 20,
    guidance_scale: numberOrNull("guidance") ?? 7.5,
    scheduler: $("sampler").value || "ddim",
  };
  for (const [field, id] of [["width", "width"], ["height", "height"], ["seed", "seed"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  if (state.picked.length) {
    body.adapters = state.picked.map((p) => {
      const spec = { id: p.id, scale: p.scale };
      if (p.version !== null) spec.version = p.version;
      return spec;
    });
  }
  if (state.initImage) {
    body.init_image = state.initImage;
    body.strength = numberOrNull("strength") ?? 0.8;
  }
  return body;
}

function progress(step, steps, label) {
  $("progress").max = Math.max(steps, 1);
  $("progress").value = step;
  $("progress-text").textContent = label;
}

function logEvent(text) {
  const list = $("events");
  list.append(el("li", { text }));
  list.scrollTop = list.scrollHeight;
}

async function generate(event) {
  event.preventDefault();
  clear($("events"));
  $("result-image").hidden = true;
  $("result-params").textContent = "";
  progress(0, 1, "submitting…");
  let job;
  try {
    const response = await api("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
    job = await response.json();
  } catch (error) { progress(0, 1, ""); report(error); return; }
  state.job = job.id;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  status(`job ${job.id} queued`);
  try {
    await follow(job.id);
  } catch (error) {
    if (error.name !== "AbortError") report(error);
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
    state.job = null;
  }
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function follow(jobId) {
  const controller = new AbortController();
  state.stream = controller;
  const response = await api(`/v1/jobs/${enc(jobId)}/events`, { signal: controller.signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data && (await onJobEvent(jobId, name, JSON.parse(data)))) { controller.abort(); return; }
    }
  }
}

async function onJobEvent(jobId, name, data) {
  if (name === "queued") { logEvent(`queued (position ${data.position ?? "?"})`); progress(0, 1, "queued"); }
  if (name === "started") { logEvent("started"); progress(0, data.steps || 1, "started"); }
  if (name === "step") { logEvent(`step ${data.step}/${data.steps}`); progress(data.step, data.steps, `step ${data.step}/${data.steps}`); }
  if (name === "done") {
    logEvent("done");
    const job = await getJSON(`/v1/jobs/${enc(jobId)}`);
    showResult(job.result);
    return true;
  }
  if (name === "failed" || name === "cancelled") {
    logEvent(name);
    const job = await getJSON(`/v1/jobs/${enc(jobId)}`);
    progress(0, 1, name);
    status(job.error ? `${job.error.type}: ${job.error.message}` : `job ${name}`, name === "failed");
    return true;
  }
  return false;
}

function showResult(result) {
  const image = result.images[0];
  const img = $("result-image");
  img.src = `data:image/png;base64,${image.png_base64}`;
  img.width = Math.max(image.width, 256);
  img.hidden = false;
  const steps = $("progress").max;
  progress(steps, steps, `done: seed ${result.seed}, ${result.timings.total_s.toFixed(2)} s`);
  const shown = { ...result.parameters, timings: result.timings, lora_path: result.lora_path };
  $("result-params").textContent = JSON.stringify(shown, null, 1);
  status(`generated in ${result.timings.total_s.toFixed(2)} s`);
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`/v1/jobs/${enc(state.job)}`, { method: "DELETE" });
    status("cancelled");
  } catch (error) { report(error); }
}

function shellQuote(text) { return `'${text.replace(/'/g, "'\\''")}'`; }

async function copyCurl() {
  const body = requestBody();
  if (body.init_image) body.init_image = `${body.init_image.slice(0, 40)}…`;
  const command = [
    `curl -sS -X POST ${shellQuote(`${location.origin}/v1/generate`)}`,
    `  -H "Authorization: Bearer $LORASWAP_TOKEN"`,
    "  -H 'Content-Type: application/json'",
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join(" \\\n");
  const pre = $("curl");
  pre.textContent = command;
  pre.hidden = false;
  try { await navigator.clipboard.writeText(command); status("curl command copied"); }
  catch (_) { status("curl command below (the clipboard is not available here)"); }
}

function readInitImage() {
  const file = $("init-image").files[0];
  state.initImage = null;
  if (!file) return;
  const reader = new FileReader();
  reader.addEventListener("load", () => { state.initImage = reader.result; status(`init image: ${file.name}`); });
  reader.readAsDataURL(file);
}

// -- the adapter picker ----------------------------------------------------------------------------
function renderPickerResults() {
  const query = $("picker-search").value.trim().toLowerCase();
  const list = clear($("picker-results"));
  if (!query) return;
  for (const summary of state.adapters.filter((a) => a.adapter_id.includes(query)).slice(0, 12)) {
    const button = el("button", { type: "button", "data-testid": "picker-add", text: `+ ${summary.adapter_id}` });
    button.addEventListener("click", () => pick(summary));
    list.append(el("li", {}, button));
  }
}

function pick(summary) {
  if (state.picked.some((p) => p.id === summary.adapter_id)) return;
  const latest = summary.latest || {};
  state.picked.push({ id: summary.adapter_id, version: null, scale: latest.scale_default ?? 1, versions: summary.versions });
  renderPicked();
}

function renderPicked() {
  const body = clear($("picked").tBodies[0]);
  state.picked.forEach((entry, index) => {
    const version = el("input", { type: "number", min: 1, placeholder: "latest", "aria-label": "version" });
    if (entry.version !== null) version.value = entry.version;
    version.addEventListener("change", () => { entry.version = version.value ? Number(version.value) : null; });
    const weight = el("input", { type: "number", min: -4, max: 4, step: 0.05, "aria-label": "weight" });
    weight.value = entry.scale;
    weight.addEventListener("change", () => { entry.scale = Number(weight.value); });
    const remove = el("button", { type: "button", text: "remove" });
    remove.addEventListener("click", () => { state.picked.splice(index, 1); renderPicked(); });
    body.append(el("tr", { "data-testid": "picked-adapter" }, el("td", { text: entry.id }),
      el("td", {}, "v ", version), el("td", {}, "weight ", weight), el("td", {}, remove)));
  });
}

// -- adapters --------------------------------------------------------------------------------------
async function loadAdapters() {
  const body = await getJSON("/v1/adapters");
  state.adapters = body.adapters;
  renderAdapters();
  renderPickerResults();
}

function renderAdapters() {
  const query = $("adapter-search").value.trim().toLowerCase();
  const body = clear($("adapter-list").tBodies[0]);
  for (const summary of state.adapters) {
    if (query && !summary.adapter_id.includes(query)) continue;
    const latest = summary.latest || {};
    const base = latest.base_model || {};
    const row = el("tr", { "data-testid": "adapter-row", "data-adapter": summary.adapter_id },
      el("td", { text: summary.adapter_id }), el("td", { text: `${summary.versions - summary.deleted} (latest ${latest.version ?? "-"})` }),
      el("td", { text: latest.kind ?? "" }), el("td", { text: base.family ?? base.name ?? "" }),
      el("td", { text: latest.rank ?? "" }), el("td", { text: bytes(latest.size) }), el("td", { text: when(latest.created_at) }));
    if (state.detail && state.detail.id === summary.adapter_id) row.classList.add("selected");
    row.addEventListener("click", () => showAdapter(summary.adapter_id).catch(report));
    body.append(row);
  }
}

async function showAdapter(adapterId, versionNumber = null) {
  const adapter = await getJSON(`/v1/adapters/${enc(adapterId)}`);
  const number = versionNumber ?? adapter.latest.version;
  const version = await getJSON(`/v1/adapters/${enc(adapterId)}/versions/${number}`);
  state.detail = { id: adapterId, version: number };
  renderAdapters();
  const panel = clear($("adapter-detail"));
  panel.hidden = false;
  const select = el("select", { "data-testid": "version-select", "aria-label": "version" });
  for (const v of adapter.versions) select.append(el("option", { value: v.version, text: `v${v.version}` }));
  select.value = String(number);
  select.addEventListener("change", () => showAdapter(adapterId, Number(select.value)).catch(report));
  panel.append(el("h2", { text: `${adapterId} ` }, select));
  panel.append(facts([
    ["ref", version.ref], ["kind", version.kind], ["base", `${version.base_model.name} (${version.base_model.family ?? "?"})`],
    ["rank / alpha", `${version.rank} / ${version.alpha}`], ["format", version.source_format], ["dtype", version.dtype],
    ["modules", `${version.num_modules} in ${version.components.join(", ")}`], ["size", bytes(version.size)],
    ["created", when(version.created_at)], ["sha256", version.sha256], ["default weight", version.scale_default ?? "1.0"],
  ]));
  const meta = version.metadata || {};
  const training = meta.training || {};
  panel.append(el("h2", { text: "Metadata" }), facts([
    ["title", meta.title], ["description", meta.description],
    ["trigger words", (meta.trigger_words || []).join(", ")],
    ...Object.entries(training).map(([k, v]) => [`training ${k}`, typeof v === "object" ? JSON.stringify(v) : v]),
    ...(meta.dataset ? [["dataset", JSON.stringify(meta.dataset)]] : []),
  ], "metadata"));
  panel.append(actions(adapterId, number));
  panel.append(el("h2", { text: "Pictures" }));
  const gallery = el("div", { class: "gallery", "data-testid": "pictures" });
  panel.append(gallery);
  if (!version.pictures || !version.pictures.length) gallery.append(el("p", { text: "no pictures" }));
  (version.pictures || []).forEach((picture, index) => {
    const img = el("img", { alt: `${picture.role}: ${picture.name}`, "data-testid": `picture-${picture.role}` });
    gallery.append(el("figure", {}, img, el("figcaption", { text: `${picture.role} · ${picture.name} · ${picture.width}×${picture.height}` })));
    loadPicture(img, `/v1/adapters/${enc(adapterId)}/versions/${number}/pictures/${index}`).catch(report);
  });
}

function facts(pairs, testid = null) {
  const list = el("dl", { class: "facts", "data-testid": testid });
  for (const [name, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    list.append(el("dt", { text: name }), el("dd", { text: String(value) }));
  }
  return list;
}

// Pictures need the token, which an <img src> cannot send: fetch, then show a blob: URL.
async function loadPicture(img, path) {
  const blob = await (await api(path)).blob();
  img.src = URL.createObjectURL(blob);
  img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
}

function actions(adapterId, number) {
  const box = el("div", { class: "actions needs-admin", "data-testid": "adapter-actions" });
  box.hidden = !isAdmin();
  const preload = el("button", { type: "button", "data-testid": "preload", text: "Preload" });
  const pin = el("button", { type: "button", "data-testid": "pin", text: "Preload and pin" });
  const remove = el("button", { type: "button", class: "danger", "data-testid": "delete-version", text: `Delete v${number}` });
  const load = async (pinned) => {
    const result = await (await api(`/v1/adapters/${enc(adapterId)}/preload?version=${number}&pin=${pinned}`, { method: "POST" })).json();
    status(`${result.ref} loaded in ${result.load_s.toFixed(3)} s${pinned ? " and pinned" : ""}`);
  };
  preload.addEventListener("click", () => load(false).catch(report));
  pin.addEventListener("click", () => load(true).catch(report));
  remove.addEventListener("click", async () => {
    if (remove.dataset.armed !== "1") { remove.dataset.armed = "1"; remove.textContent = `Really delete v${number}?`; return; }
    try {
      await api(`/v1/adapters/${enc(adapterId)}/versions/${number}`, { method: "DELETE" });
      status(`deleted ${adapterId}@${number}`);
      $("adapter-detail").hidden = true;
      state.detail = null;
      await loadAdapters();
    } catch (error) { report(error); }
  });
  box.append(preload, pin, remove);
  return box;
}

// -- upload ----------------------------------------------------------------------------------------
function chooseFiles(files) {
  for (const file of files) state.uploadFiles.push(file);
  const adapterFile = state.uploadFiles.find((f) => f.name.endsWith(".safetensors"));
  if (adapterFile && !$("upload-id").value) {
    $("upload-id").value = adapterFile.name.replace(/\.safetensors$/, "").toLowerCase().replace(/[^a-z0-9._-]/g, "-").slice(0, 64);
  }
  const list = clear($("upload-chosen"));
  for (const file of state.uploadFiles) list.append(el("li", { text: `${file.name} (${bytes(file.size)})` }));
}

async function upload(event) {
  event.preventDefault();
  const adapterFile = state.uploadFiles.find((f) => f.name.endsWith(".safetensors"));
  if (!adapterFile) { status("choose a .safetensors file", true); return; }
  const form = new FormData();
  form.append("id", $("upload-id").value.trim());
  form.append("file", adapterFile, adapterFile.name);
  const triggers = $("upload-triggers").value.split(",").map((w) => w.trim()).filter(Boolean);
  if (triggers.length) form.append("metadata", JSON.stringify({ trigger_words: triggers }));
  if ($("upload-scale").value) form.append("scale_default", $("upload-scale").value);
  for (const file of state.uploadFiles) if (file !== adapterFile) form.append("picture", file, file.name);
  try {
    const version = await (await api("/v1/adapters", { method: "POST", body: form })).json();
    status(version.created ? `registered ${version.ref}` : `${version.ref} already holds this content`);
    state.uploadFiles = [];
    clear($("upload-chosen"));
    $("upload-files").value = "";
    $("upload-id").value = "";
    await loadAdapters();
    await showAdapter(version.adapter_id, version.version);
  } catch (error) { report(error); }
}

// -- server ----------------------------------------------------------------------------------------
function renderServer(server) {
  const summary = clear($("server-summary"));
  const pairs = [
    ["readiness", server.status],
    ["model", server.model ? `${server.model.name} · ${server.model.fingerprint.slice(0, 12)}` : "not loaded"],
    ["queue", `${server.queue.depth} waiting of ${server.queue.max}`],
    ["adapter store", server.store ? `${server.store.state} (breaker ${server.store.breaker})` : ""],
    ["error", server.error],
  ];
  for (const [name, value] of pairs) {
    if (!value) continue;
    summary.append(el("dt", { text: name }), el("dd", { text: value, class: name === "readiness" ? (server.ready ? "ok" : "bad") : null }));
  }
  const tiers = clear($("server-tiers"));
  const cache = server.cache;
  if (!cache) tiers.append(el("p", { text: "no adapter cache yet" }));
  else {
    for (const name of ["device", "host"]) {
      const tier = cache[name];
      const used = tier.entries.reduce((sum, e) => sum + e.bytes, 0);
      const table = el("table", { "data-testid": `tier-${name}` },
        el("caption", { text: `${name}: ${tier.entries.length} adapters, ${bytes(used)} of ${bytes(tier.budget_bytes)}` }),
        el("tr", {}, ...["adapter", "size", "pinned", "sha256"].map((h) => el("th", { text: h }))));
      for (const entry of tier.entries) {
        table.append(el("tr", {}, el("td", { text: entry.ref }), el("td", { text: bytes(entry.bytes) }),
          el("td", { text: entry.pinned ? "pinned" : "" }), el("td", { text: entry.sha256.slice(0, 12) })));
      }
      tiers.append(table);
    }
    if (cache.disk) tiers.append(el("p", { text: `disk: ${cache.disk.entries} files, ${bytes(cache.disk.bytes)} of ${bytes(cache.disk.budget_bytes)}` }));
  }
  const recent = clear($("server-recent").tBodies[0]);
  for (const r of server.recent) {
    const timings = Object.entries(r.timings).map(([k, v]) => `${k.replace(/_s$/, "")} ${v.toFixed(3)}`).join(" · ");
    recent.append(el("tr", { "data-testid": "recent-request" },
      el("td", { text: when(r.finished_at) }), el("td", { text: r.outcome, class: r.outcome === "succeeded" ? "ok" : "bad" }),
      el("td", { text: r.mode }), el("td", { text: `${r.width}×${r.height}` }), el("td", { text: r.steps }),
      el("td", { text: r.scheduler }), el("td", { text: r.adapters.join(", ") }), el("td", { text: r.lora_path }),
      el("td", { text: timings })));
  }
}

// -- wiring ----------------------------------------------------------------------------------------
function wire() {
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("token").value = token();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    connect().then(() => loadAdapters()).catch(report);
  });
  $("gen-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("copy-curl").addEventListener("click", () => copyCurl().catch(report));
  $("init-image").addEventListener("change", readInitImage);
  $("clear-init").addEventListener("click", () => { $("init-image").value = ""; state.initImage = null; });
  $("picker-search").addEventListener("input", renderPickerResults);
  $("picker-search").addEventListener("focus", () => loadAdapters().catch(report), { once: true });
  $("adapter-search").addEventListener("input", renderAdapters);
  $("refresh-adapters").addEventListener("click", () => loadAdapters().catch(report));
  $("refresh-server").addEventListener("click", () => loadServer().catch(report));
  $("upload-form").addEventListener("submit", upload);
  $("upload-files").addEventListener("change", () => { chooseFiles($("upload-files").files); });
  const zone = $("upload");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    chooseFiles(event.dataTransfer.files);
  });
  connect().then(() => loadAdapters()).catch(() => {});
}

document.addEventListener("DOMContentLoaded", wire);
