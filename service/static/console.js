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
