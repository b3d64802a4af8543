// loraswap console: the adapters view (registry, versions, metadata, pictures, actions, upload).
// Loaded after console.js, whose helpers (el, clear, api, status …) it uses; the same rules hold:
// text only (never innerHTML), the token only in the Authorization header.
"use strict";

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
    $("upload-triggers").value = "";
    $("upload-scale").value = "";
    await loadAdapters();
    await showAdapter(version.adapter_id, version.version);
  } catch (error) { report(error); }
}
