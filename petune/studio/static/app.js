// petune studio: forms from the plugins' option schemas, live validation, jobs streamed over
// server-sent events, runs and their comparison. No framework, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { schema: null, data: {}, jobs: [], job: null, stream: null, runs: [], run: null, compare: null };
let validateTimer = null, validateSeq = 0;

// -- the API ------------------------------------------------------------------------------------
async function api(method, url, body) {
  const headers = {};
  const key = localStorage.getItem("petune-studio-key");
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (answer.status === 401) { $("key-box").hidden = false; notice("this studio needs its API key"); }
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) { const error = new Error((data.error && data.error.message) || answer.statusText); error.status = answer.status; error.data = data; throw error; }
  return data;
}

function notice(text) { $("notice").textContent = text || ""; $("notice").hidden = !text; }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== name;
  if (name === "runs") loadRuns();
}

// -- the form, from JSON schemas ------------------------------------------------------------------
function sectionSchema(section) {
  if (section === "task" || section === "strategy") {
    const plugins = section === "task" ? state.schema.tasks : state.schema.strategies;
    const name = (state.data[section] || {}).name;
    return plugins[name] ? plugins[name].schema : null;
  }
  return state.schema.core[section];
}

function resolveType(prop) {
  // {type}, {enum}, {anyOf: [X, {type: null}]} → the non-null member; anything else is "toml"
  let p = prop;
  if (p.anyOf) {
    const members = p.anyOf.filter((m) => m.type !== "null");
    if (members.length === 1) p = { ...members[0], description: prop.description, default: prop.default };
    else return { kind: "toml", p: prop };
  }
  if (p.enum) return { kind: "enum", p };
  if (["integer", "number", "boolean", "string"].includes(p.type)) return { kind: p.type, p };
  return { kind: "toml", p };
}

function fieldInput(section, key, prop) {
  const { kind, p } = resolveType(prop);
  const id = `f-${section}-${key}`;
  const value = (state.data[section] || {})[key];
  let input;
  if (kind === "enum") {
    input = el("select", { id });
    input.append(el("option", { value: "", text: p.default !== undefined ? `(default: ${p.default})` : "" }));
    for (const option of p.enum) input.append(el("option", { value: JSON.stringify(option), text: String(option) }));
    input.value = value === undefined ? "" : JSON.stringify(value);
  } else if (kind === "boolean") {
    input = el("select", { id });
    input.append(el("option", { value: "", text: `(default: ${p.default})` }), el("option", { value: "true", text: "true" }),
      el("option", { value: "false", text: "false" }));
    input.value = value === undefined ? "" : String(value);
  } else {
    const shown = value === undefined ? "" : (typeof value === "object" ? JSON.stringify(value) : String(value));
    const placeholder = p.default !== undefined && p.default !== null ? `default: ${typeof p.default === "object" ? JSON.stringify(p.default) : p.default}`
      : (p.format === "path" ? "a path, relative to the recipe's folder" : "");
    input = el("input", { id, value: shown, placeholder, size: 36 });
    if (key === "name" && section === "model") input.setAttribute("list", "model-names");
  }
  input.dataset.field = `${section}.${key}`;
  input.dataset.kind = kind;
  input.addEventListener(kind === "enum" || kind === "boolean" ? "change" : "input", () => onField(input));
  return input;
}

function parseValue(kind, text) {
  if (text === "") return undefined;
  if (kind === "integer" && /^-?\d+$/.test(text.trim())) return parseInt(text, 10);
  if (kind === "number" && text.trim() !== "" && !isNaN(Number(text))) return Number(text);
  if (kind === "enum") return JSON.parse(text);
  if (kind === "boolean") return text === "true";
  if (kind === "toml" && /^[[{"0-9-]|^(true|false)$/.test(text.trim())) { try { return JSON.parse(text); } catch (e) { return text; } }
  return text;  // a wrong type goes to the validator as typed, which says what it expected
}

function onField(input) {
  const [section, key] = input.dataset.field.split(".");
  const value = parseValue(input.dataset.kind, input.value);
  const table = { ...(state.data[section] || {}) };
  if (value === undefined) delete table[key]; else table[key] = value;
  if (key === "name" && (section === "task" || section === "strategy")) {  // another plugin: its own options
    for (const k of Object.keys(table)) if (k !== "name") delete table[k];
    state.data[section] = table;
    renderForm();
  } else {
    state.data[section] = table;
  }
  scheduleValidate({ data: state.data });
}

function renderForm() {
  const form = $("form");
  form.replaceChildren();
  const models = el("datalist", { id: "model-names" });
  for (const name of state.schema.models) models.append(el("option", { value: name }));
  form.append(models);
  for (const section of state.schema.sections) {
    const fs = el("fieldset", { "data-section": section }, el("legend", { text: `[${section}]` }));
    if (section === "task" || section === "strategy") {
      const plugins = section === "task" ? state.schema.tasks : state.schema.strategies;
      const select = el("select", { id: `f-${section}-name` }, el("option", { value: "", text: `choose a ${section}…` }));
      for (const [name, info] of Object.entries(plugins)) select.append(el("option", { value: JSON.stringify(name), text: `${name} (${info.package})` }));
      const current = (state.data[section] || {}).name;
      select.value = current === undefined ? "" : JSON.stringify(current);
      select.dataset.field = `${section}.name`;
      select.dataset.kind = "enum";
      select.addEventListener("change", () => onField(select));
      fs.append(fieldRow(section, "name", select, ""));
      if (plugins[current]) fs.append(el("div", { class: "plugin-desc", text: plugins[current].description }));
    }
    const schema = sectionSchema(section);
    if (schema) {
      for (const [key, prop] of Object.entries(schema.properties || {})) {
        if ((section === "task" || section === "strategy") && key === "name") continue;
        fs.append(fieldRow(section, key, fieldInput(section, key, prop), prop.description || ""));
      }
    }
    form.append(fs);
  }
}

function fieldRow(section, key, input, help) {
  return el("div", { class: "field" }, el("label", { for: input.id, text: key }), input,
    help ? el("div", { class: "help", text: help }) : null,
    el("div", { class: "field-error", "data-error-for": `${section}.${key}`, hidden: true }));
}

// -- validation, both ways --------------------------------------------------------------------
function scheduleValidate(body) {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(() => validate(body), 250);
}

async function validate(body) {
  const seq = ++validateSeq;
  let answer;
  try { answer = await api("POST", "/api/validate", { path: $("recipe-path").value, ...body }); }
  catch (e) { showErrors([{ field: e.data && e.data.error ? e.data.error.field : null, message: e.message }]); return null; }
  if (seq !== validateSeq) return null;  // a newer edit is on its way
  if (body.data !== undefined && document.activeElement !== $("toml")) $("toml").value = answer.toml;
  if (body.toml !== undefined && answer.data) {
    const rebuild = JSON.stringify([(answer.data.task || {}).name, (answer.data.strategy || {}).name]) !==
      JSON.stringify([(state.data.task || {}).name, (state.data.strategy || {}).name]);
    state.data = answer.data;
    if (rebuild || !$("form").children.length) renderForm(); else fillForm();
  }
  showErrors(answer.errors);
  const badge = $("valid");
  badge.textContent = answer.ok ? `valid — ${answer.summary}${answer.output_exists ? ` (${answer.output} exists)` : ""}` :
    `${answer.errors.length} problem${answer.errors.length === 1 ? "" : "s"}`;
  badge.className = "badge " + (answer.ok ? "ok" : "bad");
  badge.dataset.state = answer.ok ? "valid" : "invalid";
  return answer;
}

function fillForm() {
  for (const input of document.querySelectorAll("#form [data-field]")) {
    const [section, key] = input.dataset.field.split(".");
    const value = (state.data[section] || {})[key];
    if (input === document.activeElement) continue;
    if (input.tagName === "SELECT") input.value = value === undefined ? "" : (input.dataset.kind === "boolean" ? String(value) : JSON.stringify(value));
    else input.value = value === undefined ? "" : (typeof value === "object" ? JSON.stringify(value) : String(value));
  }
}

function showErrors(errors) {
  for (const node of document.querySelectorAll("[data-error-for]")) { node.hidden = true; node.textContent = ""; }
  for (const node of document.querySelectorAll("#form .invalid")) node.classList.remove("invalid");
  const general = $("errors");
  general.replaceChildren();
  for (const error of errors) {
    const place = error.field && document.querySelector(`[data-error-for="${CSS.escape(error.field)}"]`);
    if (place) {
      place.hidden = false;
      place.textContent = error.message;
      const input = document.querySelector(`#form [data-field="${CSS.escape(error.field)}"]`);
      if (input) input.classList.add("invalid");
    }
    general.append(el("li", { text: error.field ? `${error.field}: ${error.message}` : error.message }));
  }
}

// -- recipes ----------------------------------------------------------------------------------
async function loadRecipeList() {
  const listing = await api("GET", "/api/recipes");
  const select = $("recipe-open");
  select.replaceChildren(el("option", { value: "", text: "open a recipe…" }));
  const mine = el("optgroup", { label: "workspace" }), bundled = el("optgroup", { label: "bundled with petune" });
  for (const r of listing.workspace) mine.append(el("option", { value: "ws:" + r.path, text: r.path, title: r.summary }));
  for (const r of listing.bundled) bundled.append(el("option", { value: "bundled:" + r.name, text: r.name, title: r.summary }));
  select.append(mine, bundled);
}

async function openRecipe(value) {
  let path = value.slice(3);
  if (value.startsWith("bundled:")) path = (await api("POST", "/api/recipes/bundled", { name: value.slice(8) })).path;
  const answer = await api("GET", "/api/recipe?path=" + encodeURIComponent(path));
  $("recipe-path").value = answer.path;
  $("toml").value = answer.toml;
  await validate({ toml: answer.toml });
  await loadRecipeList();
}

async function plan() {
  $("plan-box").hidden = false;
  $("plan").textContent = "planning… (petune run --dry-run and petune estimate, as processes)";
  $("estimate").replaceChildren();
  try {
    const answer = await api("POST", "/api/plan", { path: $("recipe-path").value, data: state.data });
    $("plan").textContent = answer.plan;
    const est = answer.estimate;
    if (est) $("estimate").append(el("div", { text: `memory: ≈ ${bytes(est.peak)} peak on ${est.device}` + (est.capacity ? ` (of ${bytes(est.capacity)})` : "") }));
    if (answer.warning) $("estimate").append(el("div", { class: "warn", text: "warning: " + answer.warning }));
    if (answer.estimate_error) $("estimate").append(el("div", { class: "dim", text: answer.estimate_error }));
  } catch (e) { $("plan").textContent = e.message; if (e.data && e.data.errors) showErrors(e.data.errors); }
}

async function launch() {
  notice("");
  try {
    const job = await api("POST", "/api/jobs", { path: $("recipe-path").value, data: state.data, overwrite: $("overwrite").checked });
    showTab("watch");
    await loadJobs();
    watch(job.id);
  } catch (e) { notice(e.message); if (e.data && e.data.errors) showErrors(e.data.errors); }
}

// -- jobs -------------------------------------------------------------------------------------
async function loadJobs() {
  state.jobs = (await api("GET", "/api/jobs")).jobs;
  const list = $("jobs");
  list.replaceChildren();
  for (const job of state.jobs.slice().reverse()) {
    list.append(el("li", { class: job.id === state.job ? "current" : "", "data-job": job.id, onclick: () => watch(job.id) },
      el("span", { class: "badge " + job.status, text: job.status }), " ", job.output || job.command, el("br"),
      el("span", { class: "dim", text: job.command })));
  }
  return state.jobs;
}

function resetWatch() {
  $("log").textContent = "";
  $("bar").style.width = "0";
  $("bar-text").textContent = "";
  $("stats").textContent = "";
  $("bar").dataset.step = "0";
  state.points = { loss: [], eval: [], lr: [] };
  drawCurves();
}

async function watch(id) {
  if (state.stream) state.stream.abort();
  state.job = id;
  resetWatch();
  for (const li of document.querySelectorAll("#jobs li")) li.classList.toggle("current", li.dataset.job === id);
  const controller = new AbortController();
  state.stream = controller;
  const headers = {};
  const key = localStorage.getItem("petune-studio-key");
  if (key) headers.Authorization = "Bearer " + key;
  try {
    const answer = await fetch(`/api/jobs/${id}/events`, { headers, signal: controller.signal });
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const raw = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message", data = "";
        for (const line of raw.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7); else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(kind, JSON.parse(data));
      }
    }
  } catch (e) { if (e.name !== "AbortError") notice("the stream stopped: " + e.message); }
  if (state.stream === controller) { state.stream = null; loadJobs(); }
}

function onEvent(kind, data) {
  if (kind === "status") {
    $("job-title").textContent = data.command;
    $("job-status").textContent = data.status;
    $("job-status").className = "badge " + data.status;
    $("job-status").dataset.status = data.status;
    $("stop").hidden = !data.active;
    $("resume").hidden = data.active || data.kind !== "run" || data.status === "completed";
    if (!data.active) loadJobs();
  } else if (kind === "log") {
    const log = $("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
    log.textContent += data.text;
    if (atEnd) log.scrollTop = log.scrollHeight;
  } else if (kind === "progress") {
    if (data.event === "begin" || data.event === "step" || data.event === "end") {
      const pct = data.max_steps ? Math.min(100, 100 * data.step / data.max_steps) : 0;
      $("bar").style.width = pct + "%";
      $("bar").dataset.step = data.step;
      $("bar").dataset.max = data.max_steps;
      $("bar-text").textContent = `step ${data.step} / ${data.max_steps}` + (data.eta != null ? ` — ETA ${duration(data.eta)}` : "");
      if (data.event === "step") {
        const last = state.points.loss.length ? state.points.loss[state.points.loss.length - 1][1] : null;
        const lr = state.points.lr.length ? state.points.lr[state.points.lr.length - 1][1] : null;
        $("stats").textContent = [`loss ${last == null ? "—" : last.toFixed(4)}`, `lr ${lr == null ? "—" : lr.toExponential(2)}`,
          data.tokens_per_second ? `${Math.round(data.tokens_per_second)} tok/s` : "— tok/s", data.memory,
          `elapsed ${duration(data.elapsed)}`, data.eta != null ? `ETA ${duration(data.eta)}` : ""].filter(Boolean).join("   ");
      }
    } else if (data.event === "log") {
      if (data.loss !== undefined) state.points.loss.push([data.step, data.loss]);
      if (data.eval_loss !== undefined) state.points.eval.push([data.step, data.eval_loss]);
      if (data.learning_rate !== undefined) state.points.lr.push([data.step, data.learning_rate]);
      drawCurves();
    }
  }
}

function drawCurves() {
  $("loss-curve").replaceChildren(plot([{ points: state.points.loss, color: "#2d6cdf" },
    { points: state.points.eval, color: "#d9480f", dashed: true }], "loss"));
  $("lr-curve").replaceChildren(plot([{ points: state.points.lr, color: "#2f9e44" }], "learning rate"));
}

// -- SVG line plots ---------------------------------------------------------------------------
function plot(series, label, W = 420, H = 200) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label + " by step");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const all = series.flatMap((s) => s.points);
  if (!all.length) { add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#889", "font-size": 12 }, `no ${label} yet`); return svg; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const L = 52, R = 10, T = 10, B = 24;
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (y1 === y0 ? 0.5 : 1 - (y - y0) / (y1 - y0)) * (H - T - B);
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#bbb" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#bbb" });
  const fmt = (v) => Math.abs(v) < 1e-2 && v !== 0 ? v.toExponential(1) : v.toPrecision(3);
  add("text", { x: L - 4, y: T + 8, "text-anchor": "end", "font-size": 10, fill: "#667" }, fmt(y1));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10, fill: "#667" }, fmt(y0));
  add("text", { x: L, y: H - 8, "font-size": 10, fill: "#667" }, `step ${x0}`);
  add("text", { x: W - R, y: H - 8, "text-anchor": "end", "font-size": 10, fill: "#667" }, `${x1}`);
  for (const s of series) {
    if (!s.points.length) continue;
    const attrs = { points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "), fill: "none",
      stroke: s.color, "stroke-width": 1.6, "data-label": s.label || label };
    if (s.dashed) attrs["stroke-dasharray"] = "5 3";
    add("polyline", attrs);
  }
  return svg;
}

// -- runs -------------------------------------------------------------------------------------
async function loadRuns() {
  state.runs = (await api("GET", "/api/runs")).runs;
  const body = document.querySelector("#runs-table tbody");
  body.replaceChildren();
  for (const run of state.runs.slice().reverse()) {
    const tick = el("input", { type: "checkbox", "data-run": run.dir, onclick: (e) => e.stopPropagation() });
    body.append(el("tr", { "data-run": run.dir, onclick: () => showRun(run.dir) },
      el("td", {}, tick), el("td", { text: run.dir }), el("td", { text: run.task || "—" }), el("td", { text: run.strategy || "—" }),
      el("td", { text: run.model || "—" }), el("td", {}, el("span", { class: "badge " + run.status, text: run.status })),
      el("td", { class: "num", text: run.metric_value == null ? "—" : `${run.metric} ${run.metric_value.toFixed(4)}` }),
      el("td", { class: "num", text: duration(run.wall_seconds) }), el("td", { class: "num", text: run.steps ?? "—" })));
  }
}

async function showRun(dir) {
  const run = state.run = await api("GET", "/api/run?path=" + encodeURIComponent(dir));
  $("run-detail").hidden = false;
  $("run-name").textContent = run.dir;
  $("run-status").textContent = run.status;
  $("run-status").className = "badge " + run.status;
  $("serve-cmd").textContent = `petune serve ${run.dir}`;
  $("chat-link").hidden = true;
  const metrics = $("run-metrics");
  metrics.replaceChildren();
  for (const [split, values] of Object.entries(run.metrics || {})) {
    for (const [name, value] of Object.entries(values || {})) {
      if (typeof value === "number") metrics.append(el("tr", {}, el("td", { text: `${split} ${name}` }), el("td", { class: "num", text: num(value) })));
    }
  }
  $("run-plots").replaceChildren(...run.plots.map((p) => el("img", { src: fileUrl(p), alt: p })));
  $("run-samples").replaceChildren(...(run.samples.length ? run.samples.map((s) => el("div", { class: "sample", text: Object.entries(s).map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`).join("\n") })) : ["none"]));
  $("run-plan").textContent = run.plan || "— (the plan is kept for runs the studio started)";
  $("run-recipe").textContent = run.recipe || "—";
  $("run-files").replaceChildren(...run.files.map((f) => el("li", {}, el("a", { href: fileUrl(f), target: "_blank", text: f }))));
}

function fileUrl(path) {
  const key = localStorage.getItem("petune-studio-key");
  return "/api/file?path=" + encodeURIComponent(path) + (key ? "&key=" + encodeURIComponent(key) : "");
}

async function cloneRun() {
  const run = state.run;
  const name = run.dir.split("/").pop();
  $("recipe-path").value = `recipes/${name}-clone.toml`;
  showTab("compose");
  const answer = await validate({ toml: run.recipe });
  if (answer && answer.data) {
    state.data.output = { dir: run.dir + "-clone" };
    renderForm();
    await validate({ data: state.data });
  }
}

async function runCommand(command) {
  try {
    const job = await api("POST", "/api/run/command", { path: state.run.dir, command });
    showTab("watch");
    await loadJobs();
    watch(job.id);
  } catch (e) { notice(e.message); }
}

async function compareTicked() {
  const ticked = [...document.querySelectorAll("#runs-table input[type=checkbox]:checked")].map((c) => c.dataset.run);
  if (!ticked.length) { notice("tick one run or more to compare"); return; }
  notice("");
  const query = ticked.map((r) => "run=" + encodeURIComponent(r)).join("&");
  const data = state.compare = await api("GET", "/api/compare?" + query);
  showTab("compare");
  $("compare-hint").hidden = true;
  const table = $("compare-table");
  table.replaceChildren(el("tr", {}, el("th"), ...data.runs.map((r) => el("th", { text: r.short_name }))));
  const row = (label, cells) => table.append(el("tr", {}, el("td", { text: label }), ...cells));
  for (const key of ["task", "strategy", "model", "status"]) row(key, data.runs.map((r) => el("td", { text: r[key] || "—" })));
  row("wall time", data.runs.map((r) => el("td", { class: "num", text: duration(r.wall_seconds) })));
  row("steps", data.runs.map((r) => el("td", { class: "num", text: r.steps ?? "—" })));
  for (const m of data.metrics) {
    const numbers = m.values.filter((v) => typeof v === "number");
    const best = numbers.length > 1 ? (m.lower_is_better ? Math.min(...numbers) : Math.max(...numbers)) : null;
    row(`${m.split} ${m.metric}`, m.values.map((v) => el("td", { class: "num" + (v === best ? " best" : ""), text: v == null ? "—" : num(v) })));
  }
  row("best eval", data.best.map((b) => el("td", { class: "num", text: b ? `${b.metric} ${num(b.value)} (step ${b.step})` : "—" })));
  const colors = ["#2d6cdf", "#d9480f", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599"];
  const series = [];
  data.runs.forEach((r, i) => {
    const color = colors[i % colors.length];
    series.push({ points: r.log_history.filter((h) => typeof h.loss === "number").map((h) => [h.step, h.loss]), color, label: r.short_name });
    series.push({ points: r.log_history.filter((h) => typeof h.eval_loss === "number").map((h) => [h.step, h.eval_loss]), color, dashed: true, label: r.short_name + " eval" });
  });
  $("compare-curve").replaceChildren(plot(series, "loss", 760, 260));
}

// -- small things -----------------------------------------------------------------------------
function bytes(n) { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return `${n.toFixed(i ? 1 : 0)} ${u[i]}`; }
function duration(s) { if (s == null) return "—"; s = Math.round(s); const m = Math.floor(s / 60); return m ? `${m}m ${String(s % 60).padStart(2, "0")}s` : `${s}s`; }
function num(v) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : String(v); }

async function start() {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("key-save").addEventListener("click", () => { localStorage.setItem("petune-studio-key", $("api-key").value); location.reload(); });
  $("toml").addEventListener("input", () => scheduleValidate({ toml: $("toml").value }));
  $("recipe-path").addEventListener("change", () => scheduleValidate({ data: state.data }));
  $("recipe-open").addEventListener("change", (e) => { if (e.target.value) openRecipe(e.target.value).catch((x) => notice(x.message)); e.target.value = ""; });
  $("save").addEventListener("click", async () => {
    try { await api("POST", "/api/recipe", { path: $("recipe-path").value, data: state.data }); notice(""); await loadRecipeList(); }
    catch (e) { notice(e.message); }
  });
  $("plan-btn").addEventListener("click", plan);
  $("launch").addEventListener("click", launch);
  $("stop").addEventListener("click", () => api("POST", `/api/jobs/${state.job}/stop`).catch((e) => notice(e.message)));
  $("resume").addEventListener("click", async () => {
    try { const job = await api("POST", `/api/jobs/${state.job}/resume`, {}); await loadJobs(); watch(job.id); } catch (e) { notice(e.message); }
  });
  $("runs-refresh").addEventListener("click", loadRuns);
  $("compare-btn").addEventListener("click", () => compareTicked().catch((e) => notice(e.message)));
  $("clone").addEventListener("click", cloneRun);
  $("merge").addEventListener("click", () => runCommand("merge"));
  $("export").addEventListener("click", () => runCommand("export"));
  $("chat").addEventListener("click", async () => {
    try {
      const answer = await api("POST", "/api/run/serve", { path: state.run.dir });
      const link = $("chat-link");
      link.href = answer.url;
      link.textContent = "open the playground (it loads the model first)";
      link.hidden = false;
      window.open(answer.url, "_blank");
    } catch (e) { notice(e.message); }
  });
  try {
    const info = await api("GET", "/api/info");
    $("workspace").textContent = info.workspace;
    state.schema = await api("GET", "/api/schema");
  } catch (e) { notice(e.message); return; }
  state.data = { model: {}, task: {}, strategy: {}, train: {}, eval: {}, output: {} };
  renderForm();
  resetWatch();
  validate({ data: state.data });
  await loadRecipeList().catch((e) => notice(e.message));
  const jobs = await loadJobs();
  const active = jobs.filter((j) => j.active).pop();
  if (active) { showTab("watch"); watch(active.id); }  // a run started before the page was (re)opened
  document.body.dataset.ready = "true";
}

start();
