// eri ui: one page, five views, no build step. The server's JSON API is in eridiffusion/ui/server.py.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (sel, el = document) => el.querySelector(sel);
const state = { schema: [], presets: [], health: {}, rows: [], live: null, follow: null };

// ------------------------------------------------------------------ helpers

function url(path, params = {}) {
  const q = new URLSearchParams(params);
  if (TOKEN) q.set("token", TOKEN);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

async function api(path, { params = {}, body } = {}) {
  const opts = { headers: {} };
  if (TOKEN) opts.headers["X-Eri-Token"] = TOKEN;
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(url(path, params), opts);
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (!res.ok) throw Object.assign(new Error(data.error || res.statusText), { data, status: res.status });
  return data;
}

// the call's result, or null with its error written into `el`
async function shown(el, path, opts) {
  try {
    return await api(path, opts);
  } catch (e) {
    el.textContent = e.message;
    return null;
  }
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

// `code` spans of the docs' markdown, everything else as text
function docHTML(text) {
  const esc = text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return esc.replace(/`([^`]+)`/g, "<code>$1</code>");
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// ------------------------------------------------------------------ pages

function show(page) {
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === `page-${page}`));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  if (page === "runs") loadRuns();
  if (page === "sample") loadWeights();
  if (page === "dataset" && !$("#ds-grid").children.length) syncBuckets();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "dataset"));

// ------------------------------------------------------------------ Dataset

async function loadFolders() {
  const folders = await api("/api/folders");
  const sel = $("#ds-folder");
  sel.replaceChildren(...folders.map((f) => h("option", { value: f.dir }, `${f.dir} (${f.images})`)));
  const data = formValue("data.dir");
  if (data && folders.some((f) => f.dir === data.replace(/^\.\//, ""))) sel.value = data.replace(/^\.\//, "");
}

function syncBuckets() {
  for (const k of ["resolution", "bucket_step", "bucket_min", "bucket_max"]) $(`#ds-${k}`).value = formValue(`data.${k}`) ?? "";
}

async function scanDataset() {
  const dir = $("#ds-folder").value;
  if (!dir) return;
  const params = { dir };
  for (const k of ["resolution", "bucket_step", "bucket_min", "bucket_max"]) params[k] = $(`#ds-${k}`).value;
  $("#ds-error").textContent = "";
  const d = await shown($("#ds-error"), "/api/dataset", { params });
  if (!d) return;
  if (d.error) $("#ds-error").textContent = d.error;
  $("#ds-report").textContent = d.report || "";
  $("#ds-grid").replaceChildren(...d.items.map(captionCard));
  $("#ds-skipped").replaceChildren(...(d.skipped.length ? d.skipped.map((s) => h("li", {}, h("code", {}, s.path), ` — ${s.reason}`)) : [h("li", { class: "muted" }, "none")]));
  renderStats(d.stats);
}

function captionCard(item) {
  const status = h("span", { class: "saved muted" }, item.has_caption ? "" : "no .txt yet (uses the default)");
  const area = h("textarea", { rows: 3, "data-path": item.path }, item.caption);
  const tokens = h("span", { class: item.tokens > 75 ? "warn" : "muted" }, `${item.tokens} tokens`);
  const save = async () => {
    status.textContent = "saving…";
    try {
      const r = await api("/api/caption", { body: { path: item.path, caption: area.value } });
      tokens.textContent = `${r.tokens} tokens`;
      status.textContent = "saved ✓";
      status.className = "saved ok";
    } catch (e) {
      status.textContent = e.message;
      status.className = "saved error";
    }
  };
  area.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) save(); });
  const [bh, bw] = item.bucket, [ih, iw] = item.size;
  return h("div", { class: "card", "data-path": item.path },
    h("img", { src: url("/api/thumb", { path: item.path }), loading: "lazy", alt: item.path }),
    h("div", { class: "name" }, item.path.split("/").pop()),
    h("div", { class: "muted" }, `${iw}×${ih} → bucket ${bw}×${bh}`, item.repeats > 1 ? ` · ×${item.repeats}` : ""),
    area,
    h("div", { class: "row" }, h("button", { class: "save", onclick: save }, "Save"), tokens, status));
}

function renderStats(s) {
  const list = (pairs) => h("ol", {}, pairs.map(([t, n]) => h("li", {}, `${t} `, h("span", { class: "muted" }, `×${n}`))));
  $("#ds-stats").replaceChildren(
    h("p", {}, `${s.captions} captions · CLIP tokens min ${s.tokens_min}, mean ${s.tokens_mean}, max ${s.tokens_max}`),
    h("p", { class: s.over_limit ? "warn" : "muted" }, `${s.over_limit} over the ${s.limit}-token limit (cut by the text encoder)`),
    h("h4", {}, "most common tags"), list(s.tags.slice(0, 10)),
    h("h4", {}, "most common words"), list(s.words.slice(0, 10)));
}

// ------------------------------------------------------------------ Train

function inputFor(f) {
  const t = f.type, id = `f-${f.key}`;
  if (t.kind === "bool" && !t.optional) return h("input", { type: "checkbox", id, "data-key": f.key });
  if (t.kind === "choice") return h("select", { id, "data-key": f.key }, t.choices.map((c) => h("option", { value: c }, c)));
  if (t.kind === "list" && t.item === "str") return h("textarea", { id, "data-key": f.key, rows: 2, placeholder: "one per line" });
  if (["tables", "dict", "json"].includes(t.kind)) return h("textarea", { id, "data-key": f.key, rows: 2, placeholder: "JSON" });
  return h("input", { id, "data-key": f.key, size: t.kind === "str" ? 40 : 12, placeholder: t.optional ? "(inherit)" : "" });
}

function buildForm() {
  const form = $("#tr-form");
  form.replaceChildren();
  for (const sec of state.schema) {
    const fs = h("fieldset", { id: `sec-${sec.name}` }, h("legend", {}, `[${sec.name}]`));
    for (const f of sec.fields) {
      const input = inputFor(f);
      input.addEventListener("change", scheduleValidate);
      input.addEventListener("input", scheduleValidate);
      const doc = h("div", { class: "doc" });
      doc.innerHTML = docHTML(f.doc || "");
      fs.append(h("div", { class: "field" },
        h("label", { for: input.id }, f.name),
        h("div", {}, input, h("span", { class: "default muted" }, `default ${JSON.stringify(f.default)}`),
          h("div", { class: "err", id: `err-${f.key}` }), doc)));
    }
    form.append(fs);
  }
}

function fieldByKey(key) {
  for (const sec of state.schema) for (const f of sec.fields) if (f.key === key) return f;
  return null;
}

function setField(f, v) {
  const el = document.getElementById(`f-${f.key}`);
  const t = f.type;
  if (el.type === "checkbox") el.checked = !!v;
  else if (v === null || v === undefined) el.value = "";
  else if (t.kind === "list" && t.item === "str") el.value = v.join("\n");
  else if (t.kind === "list") el.value = v.join(", ");
  else if (["tables", "dict", "json"].includes(t.kind)) el.value = (Array.isArray(v) && !v.length) || (typeof v === "object" && !Object.keys(v).length) ? "" : JSON.stringify(v);
  else el.value = String(v);
}

// the text of an input → a typed value; what does not parse is sent as text so the server names the field
function parseValue(f, el) {
  const t = f.type, text = el.value;
  if (el.type === "checkbox") return el.checked;
  if (t.optional && text.trim() === "") return undefined;
  if (t.kind === "bool") return text === "true" ? true : text === "false" ? false : text;
  if (t.kind === "int") return /^\s*-?\d+\s*$/.test(text) ? parseInt(text, 10) : isFinite(Number(text)) && text.trim() ? Number(text) : text;
  if (t.kind === "float") return text.trim() !== "" && isFinite(Number(text)) ? Number(text) : text;
  if (t.kind === "list" && t.item === "str") return text.split("\n").map((s) => s.trim()).filter((s) => s);
  if (t.kind === "list") {
    if (!text.trim()) return [];
    const parts = text.replace(/^\s*\[|\]\s*$/g, "").split(",").map((s) => s.trim());
    return parts.every((p) => p !== "" && isFinite(Number(p))) ? parts.map(Number) : text;
  }
  if (["tables", "dict", "json"].includes(t.kind)) {
    if (!text.trim()) return t.kind === "dict" ? {} : [];
    try { return JSON.parse(text); } catch { return text; }
  }
  return text;
}

function formValue(key) {
  const f = fieldByKey(key);
  const el = f && document.getElementById(`f-${key}`);
  return el ? parseValue(f, el) : undefined;
}

function collectConfig() {
  const raw = {};
  for (const sec of state.schema) {
    raw[sec.name] = {};
    for (const f of sec.fields) {
      const v = parseValue(f, document.getElementById(`f-${f.key}`));
      if (v !== undefined) raw[sec.name][f.name] = v;
    }
  }
  return raw;
}

function loadConfig(cfg) {
  for (const sec of state.schema) for (const f of sec.fields) {
    const v = cfg[sec.name] && f.name in cfg[sec.name] ? cfg[sec.name][f.name] : f.default;
    setField(f, v);
  }
  showErrors({});
  syncBuckets();
}

function showErrors(errors) {
  document.querySelectorAll(".err").forEach((e) => (e.textContent = ""));
  document.querySelectorAll(".field.invalid").forEach((e) => e.classList.remove("invalid"));
  const general = [];
  for (const [key, msg] of Object.entries(errors)) {
    const el = document.getElementById(`err-${key}`);
    if (el) {
      el.textContent = msg;
      el.closest(".field").classList.add("invalid");
    } else general.push(`${key}: ${msg}`);
  }
  $("#tr-general").textContent = general.join("\n");
}

let validateTimer = null;
function scheduleValidate() {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(validate, 300);
  syncBuckets();
}

async function validate() {
  const r = await api("/api/validate", { body: { config: collectConfig() } });
  showErrors(r.errors);
  $("#tr-status").textContent = r.ok ? "config valid" : `${Object.keys(r.errors).length} problem(s)`;
  return r.ok;
}

async function startTraining() {
  $("#tr-status").textContent = "starting…";
  try {
    const job = await api("/api/train/start", { body: { config: collectConfig(), overwrite: $("#tr-overwrite").checked } });
    showErrors({});
    $("#tr-status").textContent = `started: ${job.command}`;
    location.hash = "#live";
  } catch (e) {
    showErrors(e.data && e.data.errors ? e.data.errors : { config: e.message });
    $("#tr-status").textContent = "not started";
    const first = document.querySelector(".field.invalid");
    if (first) first.scrollIntoView({ block: "center" });
  }
}

// ------------------------------------------------------------------ Live run

function connectLive() {
  if (state.live) state.live.close();
  const params = state.follow ? { dir: state.follow } : {};
  state.live = new EventSource(url("/api/live", params));
  state.live.onmessage = (ev) => updateLive(JSON.parse(ev.data));
}

function updateLive(d) {
  const job = d.job || {};
  const running = job.state === "running" || job.state === "stopping";
  const label = job.state === "idle" ? "no run started from this page" : `${job.state}${job.exit_code !== null && job.exit_code !== undefined ? ` (exit ${job.exit_code})` : ""}`;
  $("#lv-state").textContent = label;
  $("#lv-state").className = `state ${job.state || ""}`;
  $("#live-badge").textContent = running ? "●" : "";
  $("#lv-dir").textContent = d.dir ? `${d.dir}` : "";
  $("#lv-stop").disabled = !running;
  $("#lv-resume").disabled = running || d.state === null || d.state === undefined || (d.total && d.state >= d.total);
  $("#tr-stop").disabled = !running;
  if (d.reset) state.rows = [];
  state.rows.push(...(d.rows || []));
  $("#lv-step").textContent = d.total ? `${d.step ?? 0} / ${d.total}` : d.step ?? "–";
  $("#lv-loss").textContent = fmt(d.loss);
  $("#lv-smooth").textContent = fmt(d.smooth);
  $("#lv-lr").textContent = d.lr === null || d.lr === undefined ? "–" : Number(d.lr).toExponential(2);
  $("#lv-its").textContent = d.its ? d.its.toFixed(2) : "–";
  $("#lv-eta").textContent = running ? duration(d.eta) : "–";
  $("#lv-mem").textContent = d.mem || "–";
  if (d.sample) {
    const src = url("/api/file", { path: d.sample, v: d.sample_mtime });
    if ($("#lv-sample").getAttribute("src") !== src) $("#lv-sample").src = src;
    $("#lv-sample-name").textContent = d.sample;
  }
  const log = $("#lv-log");
  if (log.textContent !== d.log) {
    log.textContent = d.log || "";
    log.scrollTop = log.scrollHeight;
  }
  drawChart($("#lv-chart"), state.rows);
}

function drawChart(canvas, rows) {
  const dpr = window.devicePixelRatio || 1, W = canvas.clientWidth || 720, H = canvas.clientHeight || 360;
  if (canvas.width !== W * dpr) { canvas.width = W * dpr; canvas.height = H * dpr; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  canvas.dataset.points = rows.length;
  const L = 56, R = 12, T = 12, B = 28;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#666";
  if (rows.length < 1) { ctx.fillText("waiting for loss.csv rows…", L, H / 2); return; }
  const losses = rows.map((r) => r[1]).filter(isFinite), sorted = [...losses].sort((a, b) => a - b);
  const lo = sorted[0], hi = Math.max(sorted[Math.min(sorted.length - 1, Math.floor(0.98 * sorted.length))], lo + 1e-6);
  const x0 = rows[0][0], x1 = Math.max(rows[rows.length - 1][0], x0 + 1);
  const X = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => H - B - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * (H - T - B);
  ctx.strokeStyle = "#e5e5e5";
  ctx.lineWidth = 1;
  const ticks = new Set();
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4, y = Y(v);
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(W - R, y); ctx.stroke();
    ctx.fillText(v.toPrecision(3), 4, y + 4);
    ticks.add(Math.round(x0 + ((x1 - x0) * i) / 4));
  }
  ticks.forEach((s) => ctx.fillText(String(s), X(s) - 8, H - 8));
  const line = (values, colour, width) => {
    ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(X(rows[i][0]), Y(v)) : ctx.moveTo(X(rows[i][0]), Y(v))));
    ctx.stroke();
  };
  let ema = null;
  const smooth = rows.map((r) => (ema = ema === null ? r[1] : 0.95 * ema + 0.05 * r[1]));
  line(rows.map((r) => r[1]), "#9cc3f0", 1);
  line(smooth, "#1f4fa0", 2);
  if (rows.length === 1) { ctx.fillStyle = "#1f4fa0"; ctx.fillRect(X(rows[0][0]) - 2, Y(rows[0][1]) - 2, 4, 4); }
}

async function stopRun() {
  const s = await api("/api/train/stop", { body: {} });
  $("#lv-state").textContent = s.state;
}

async function resumeRun(dir) {
  try {
    await api("/api/train/resume", { body: { dir } });
    state.follow = null;
    connectLive();
    location.hash = "#live";
  } catch (e) {
    alert(e.message);
  }
}

// ------------------------------------------------------------------ Runs

async function loadRuns() {
  const list = await api("/api/runs");
  const body = $("#rn-table tbody");
  body.replaceChildren(...list.map((r) => h("tr", { class: "run", "data-dir": r.dir, onclick: () => showRun(r.dir) },
    h("td", {}, h("a", { href: "#runs" }, r.dir)), h("td", {}, r.total ? `${r.step} / ${r.total}` : r.step),
    h("td", {}, fmt(r.loss)), h("td", {}, r.loras), h("td", {}, r.state === null ? "–" : `step ${r.state}`))));
  if (!list.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "no runs under the root yet")));
}

const size = (n) => (n > 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

async function showRun(dir) {
  const r = await api("/api/run", { params: { dir } });
  const loras = h("table", { class: "table" }, h("tr", {}, ["file", "size", "modules", "components", "rank", "alpha", "problems", ""].map((t) => h("th", {}, t))),
    r.loras.map((l) => h("tr", {}, h("td", {}, l.file), h("td", {}, size(l.size)), h("td", {}, l.modules ?? "–"),
      h("td", {}, Object.entries(l.components || {}).map(([k, n]) => `${k} ${n}`).join(", ")),
      h("td", {}, Object.keys(l.ranks || {}).join(", ")), h("td", {}, Object.keys(l.alphas || {}).join(", ")),
      h("td", {}, (l.problems || []).length || "none"),
      h("td", {}, h("a", { href: url("/api/file", { path: l.path, download: 1 }), download: l.file }, "download")))));
  const meta = r.loras.length ? h("details", {}, h("summary", {}, `metadata of ${r.loras[r.loras.length - 1].file}`),
    h("pre", {}, JSON.stringify(r.loras[r.loras.length - 1].metadata || {}, null, 1))) : null;
  $("#rn-detail").replaceChildren(
    h("h2", {}, r.dir),
    h("div", { class: "bar" }, `step ${r.step}${r.total ? ` / ${r.total}` : ""} · state ${r.state === null ? "none" : `at step ${r.state}`} `,
      r.state !== null && (!r.total || r.state < r.total) ? h("button", { onclick: () => resumeRun(r.dir) }, "Resume") : null,
      h("button", { onclick: () => { state.follow = r.dir; connectLive(); location.hash = "#live"; } }, "Show in Live")),
    h("div", { class: "columns" },
      r.loss_png ? h("img", { class: "plot", src: url("/api/file", { path: r.loss_png, v: r.mtime }) }) : h("p", { class: "muted" }, "no loss.png yet"),
      h("div", {}, h("h3", {}, "LoRA files"), r.loras.length ? loras : h("p", { class: "muted" }, "none"), meta)),
    h("h3", {}, "Samples"),
    h("div", { class: "samples" }, r.samples.map((s) => h("a", { href: url("/api/file", { path: s }), target: "_blank" }, h("img", { src: url("/api/file", { path: s }), title: s })))),
    h("h3", {}, "config.toml"), h("pre", { class: "log" }, r.config),
    r.log ? [h("h3", {}, "Log"), h("pre", { class: "log" }, r.log)] : null);
}

// ------------------------------------------------------------------ Sample

async function loadWeights() {
  const w = await api("/api/weights");
  state.weights = w;
  const sel = $("#sm-model"), keep = sel.value;
  sel.replaceChildren(...w.models.map((m) => h("option", { value: m }, m)));
  if (keep && w.models.includes(keep)) sel.value = keep;
  document.querySelectorAll(".lora-row select").forEach((s) => fillLoras(s));
}

function fillLoras(sel) {
  const keep = sel.value;
  sel.replaceChildren(...(state.weights ? state.weights.loras : []).map((m) => h("option", { value: m }, m)));
  if (keep) sel.value = keep;
}

function addLora() {
  const sel = h("select", { class: "lora" });
  fillLoras(sel);
  const row = h("div", { class: "row lora-row" }, h("label", {}, "LoRA ", sel),
    h("label", {}, "strength ", h("input", { class: "scale", value: "1.0", size: 4 })),
    h("button", { type: "button", onclick: () => row.remove() }, "×"));
  $("#sm-loras").append(row);
}

async function generate() {
  const v = (id) => $(`#sm-${id}`).value;
  const body = { model: v("model"), prompt: v("prompt"), negative: v("negative"), sampler: v("sampler"), steps: v("steps"),
    cfg: v("cfg"), seed: v("seed"), width: v("width"), height: v("height"),
    loras: [...document.querySelectorAll(".lora-row")].map((r) => ({ path: $(".lora", r).value, scale: $(".scale", r).value })) };
  $("#sm-status").textContent = "rendering…";
  let job = await shown($("#sm-status"), "/api/sample", { body });
  if (!job) return;
  while (job.state === "running") {
    await new Promise((r) => setTimeout(r, 700));
    job = await api(`/api/sample/${job.id}`);
  }
  if (job.state !== "done") { $("#sm-status").textContent = `failed: ${job.error}`; return; }
  $("#sm-status").textContent = `done: ${job.files.map((f) => f.path).join(", ")}`;
  $("#sm-result").replaceChildren(...job.files.map((f) => h("figure", {},
    h("img", { class: "result", src: url("/api/file", { path: f.path }) }),
    h("figcaption", {}, h("a", { href: url("/api/file", { path: f.path, download: 1 }) }, f.path),
      paramsTable(f.params)))));
}

function paramsTable(params) {
  const show = (v) => (typeof v === "string" ? v : JSON.stringify(v));
  return h("table", { class: "table params" }, Object.entries(params).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, show(v)))));
}

// ------------------------------------------------------------------ start

async function init() {
  [state.health, state.schema, state.presets] = await Promise.all([api("/api/health"), api("/api/schema"), api("/api/presets")]);
  $("#root").textContent = state.health.root;
  buildForm();
  $("#tr-preset").replaceChildren(h("option", { value: "" }, "defaults (TrainConfig)"),
    ...state.presets.map((p, i) => h("option", { value: i, title: p.source }, p.name)));
  if (state.health.demo) $("#tr-preset").value = "0";
  const preset = state.presets[$("#tr-preset").value];
  loadConfig(preset ? preset.config : {});
  $("#tr-load").onclick = () => { const p = state.presets[$("#tr-preset").value]; loadConfig(p ? p.config : {}); validate(); };
  $("#tr-start").onclick = startTraining;
  $("#tr-stop").onclick = stopRun;
  $("#lv-stop").onclick = stopRun;
  $("#lv-resume").onclick = () => resumeRun($("#lv-dir").textContent);
  $("#ds-scan").onclick = scanDataset;
  $("#ds-folder").onchange = scanDataset;
  $("#rn-refresh").onclick = loadRuns;
  $("#sm-add-lora").onclick = addLora;
  $("#sm-go").onclick = generate;
  const size = formValue("sample.size"), prompts = formValue("sample.prompts");
  if (Array.isArray(size) && size.length === 2) [$("#sm-width").value, $("#sm-height").value] = size;
  if (Array.isArray(prompts) && prompts.length) $("#sm-prompt").value = prompts[0];
  await loadFolders();
  show(location.hash.slice(1) || "dataset");
  if ($("#ds-folder").value) scanDataset();
  connectLive();
  document.body.dataset.ready = "1";
}

init().catch((e) => { document.body.prepend(h("pre", { class: "error" }, `eri ui failed to start: ${e.message}`)); });
