// petune serve playground: plain JavaScript, no build step. Talks to the same API as any client.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { runs: [], run: null, history: [], busy: false };

// -- API --------------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  const key = localStorage.getItem("petune-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.status + " " + response.statusText);
  return data;
}

// Server-sent events from a POST (EventSource only does GET): calls onData for each JSON event.
async function streamEvents(path, body, onData) {
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || response.status + " " + response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") return;
        const data = JSON.parse(payload);
        if (data.error) throw new Error(data.error.message);
        onData(data);
      }
    }
  }
}

// -- helpers ----------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(4);
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// -- status, runs -----------------------------------------------------------------------------
async function refreshStatus() {
  const badge = $("status");
  try {
    const response = await fetch("/health", { headers: headers(false) });
    const data = await response.json().catch(() => ({}));
    // /health answers without the key; the runs need it
    const probe = data.status === "ok" ? await fetch("/v1/models", { headers: headers(false) }) : response;
    if (probe.status === 401) { badge.dataset.state = "error"; badge.textContent = "API key needed"; return false; }
    badge.dataset.state = data.status === "ok" ? "ok" : data.status === "loading" ? "loading" : "error";
    badge.textContent = data.status === "ok" ? "ready" : data.status || "error";
    return data.status === "ok";
  } catch (e) {
    badge.dataset.state = "error"; badge.textContent = "unreachable"; return false;
  }
}

async function loadRuns() {
  try {
    const data = await api("/v1/models");
    state.runs = data.data;
  } catch (e) {
    $("runs-note").textContent = e.message;
    return;
  }
  const list = $("run-list");
  list.replaceChildren(...state.runs.map((run) => el("li", { "data-run": run.id, onclick: () => selectRun(run.id) },
    run.id, el("small", {}, `${run.task} · ${run.strategy} · ${run.base_model}${run.shared_base ? " (shared base)" : ""}`))));
  $("runs-note").textContent = state.runs.length ? "" : "No runs.";
  const wanted = new URLSearchParams(location.search).get("run");
  const pick = state.runs.find((r) => r.id === wanted) || state.runs[0];
  if (pick && !state.run) selectRun(pick.id);
}

async function selectRun(name) {
  const run = state.runs.find((r) => r.id === name);
  if (!run) return;
  state.run = run;
  state.history = [];
  for (const li of $("run-list").children) li.classList.toggle("selected", li.dataset.run === name);
  $("run").hidden = false;
  $("run-name").textContent = run.id;
  $("run-facts").textContent = `${run.task} with ${run.strategy} on ${run.base_model}`;
  $("chat").hidden = run.kind !== "chat";
  $("predict").hidden = run.kind !== "predict";
  $("messages").replaceChildren();
  $("predict-results").replaceChildren();
  showError("");
  $("metrics").replaceChildren();
  $("loss-plot").replaceChildren();
  try {
    const details = await api("/v1/runs/" + encodeURIComponent(name));
    if (state.run !== run) return;
    const params = details.trainable_parameters ? ` · ${fmt(details.trainable_parameters)} trainable of ${fmt(details.total_parameters)} parameters` : "";
    $("run-facts").textContent += params;
    $("metrics").replaceChildren(metricsTable(details.metrics));
    $("loss-plot").replaceChildren(lossPlot(details.loss_history));
  } catch (e) {
    showError(e.message);
  }
}

function metricsTable(metrics) {
  const splits = Object.keys(metrics || {}).filter((s) => metrics[s] && typeof metrics[s] === "object");
  if (!splits.length) return el("p", { class: "note" }, "No evaluation metrics in this run.");
  const names = [...new Set(splits.flatMap((s) => Object.keys(metrics[s]).filter((k) => typeof metrics[s][k] === "number")))];
  const table = el("table", {}, el("tr", {}, el("th", {}, "metric"), ...splits.map((s) => el("th", {}, s))));
  for (const name of names) {
    table.append(el("tr", {}, el("td", {}, name),
      ...splits.map((s) => el("td", { class: "num" }, metrics[s][name] === undefined ? "" : fmt(metrics[s][name])))));
  }
  return table;
}

function lossPlot(history) {
  const series = [["loss", "#2f6f4f"], ["eval_loss", "#c0612b"]]
    .map(([key, color]) => ({ key, color, points: (history || []).filter((h) => typeof h[key] === "number").map((h) => [h.step, h[key]]) }))
    .filter((s) => s.points.length);
  if (!series.length) return el("p", { class: "note" }, "No loss was logged.");
  const W = 360, H = 180, L = 42, R = 10, T = 10, B = 26;
  const all = series.flatMap((s) => s.points);
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (y1 === y0 ? 0.5 : 1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "training loss by step");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#bbb" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#bbb" });
  add("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(y1));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end" }, fmt(y0));
  add("text", { x: L, y: H - 8 }, "step " + x0);
  add("text", { x: W - R, y: H - 8, "text-anchor": "end" }, "step " + x1);
  series.forEach((s, i) => {
    add("polyline", { points: s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none", stroke: s.color, "stroke-width": 1.6 });
    add("text", { x: W - R, y: T + 10 + 12 * i, "text-anchor": "end", style: `fill:${s.color}` }, s.key);
  });
  return svg;
}

// -- chat -------------------------------------------------------------------------------------
async function sendChat(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || state.busy || !state.run) return;
  showError("");
  state.busy = true;
  $("send").disabled = true;
  const system = $("system").value.trim();
  state.history.push({ role: "user", content: prompt });
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  $("messages").append(el("div", { class: "msg user" }, prompt));
  const answer = el("div", { class: "msg assistant", "data-state": "pending" });
  const meta = el("span", { class: "meta" });
  $("messages").append(answer);
  $("prompt").value = "";
  const body = {
    model: state.run.id, messages,
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const started = performance.now();
  let text = "";
  try {
    if ($("stream").checked) {
      body.stream = true;
      body.stream_options = { include_usage: true };
      let usage = null;
      await streamEvents("/v1/chat/completions", body, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { text += delta.content; answer.textContent = text; scrollDown(); }
      });
      meta.textContent = usage ? `${usage.completion_tokens} tokens · ${((performance.now() - started) / 1000).toFixed(2)} s` : "";
    } else {
      const data = await api("/v1/chat/completions", body);
      text = data.choices[0].message.content;
      meta.textContent = `${data.usage.completion_tokens} tokens · ${((performance.now() - started) / 1000).toFixed(2)} s`;
    }
    answer.textContent = text;
    if (!text) answer.append(el("em", { class: "note" }, "(empty answer)"));
    answer.append(meta);
    answer.dataset.state = "done";
    state.history.push({ role: "assistant", content: text });
  } catch (e) {
    answer.dataset.state = "error";
    answer.textContent = text;
    state.history.pop();
    showError(e.message);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    scrollDown();
    refreshMetrics();
  }
}

function scrollDown() { const box = $("messages"); box.scrollTop = box.scrollHeight; }

// -- predict ----------------------------------------------------------------------------------
async function sendPredict(event) {
  event.preventDefault();
  const inputs = $("predict-input").value.split("\n").filter((line) => line.trim());
  if (!inputs.length || state.busy || !state.run) return;
  showError("");
  state.busy = true;
  $("predict-send").disabled = true;
  try {
    const data = await api("/v1/predict", { model: state.run.id, inputs });
    $("predict-results").replaceChildren(...data.data.map(renderPrediction));
    $("predict-results").dataset.state = "done";
  } catch (e) {
    showError(e.message);
  } finally {
    state.busy = false;
    $("predict-send").disabled = false;
    refreshMetrics();
  }
}

function renderPrediction(item) {
  const text = typeof item.input === "string" ? item.input : item.input.text;
  const box = el("div", { class: "prediction", "data-index": item.index });
  if (item.entities) {
    box.append(highlighted(text, item.entities));
    if (!item.entities.length) box.append(el("p", { class: "note" }, "no entities"));
  } else {
    box.append(el("div", { class: "text" }, text));
    const probabilities = Object.entries(item.probabilities || { [item.label]: item.probability })
      .sort((a, b) => b[1] - a[1]);
    for (const [label, p] of probabilities) {
      box.append(el("div", { class: "bar" + (label === item.label ? " best" : ""), "data-label": label },
        el("span", {}, label), el("div", {}, el("div", { class: "fill", style: `width:${(100 * p).toFixed(1)}%` })),
        el("span", { class: "num" }, (100 * p).toFixed(1) + "%")));
    }
  }
  return box;
}

function highlighted(text, entities) {
  const node = el("div", { class: "text" });
  let at = 0;
  const spans = entities.filter((e) => typeof e.char_start === "number").sort((a, b) => a.char_start - b.char_start);
  for (const e of spans) {
    if (e.char_start < at) continue;
    node.append(text.slice(at, e.char_start));
    node.append(el("mark", { "data-type": e.type }, text.slice(e.char_start, e.char_end), el("small", {}, e.type)));
    at = e.char_end;
  }
  node.append(text.slice(at));
  return node;
}

// -- server metrics ---------------------------------------------------------------------------
async function refreshMetrics() {
  try {
    const data = await api("/metrics?format=json");
    const t = data.totals;
    const latency = data.series.filter((s) => s.endpoint.startsWith("/v1/") && s.requests);
    const mean = latency.length ? latency.reduce((a, s) => a + s.latency_seconds_sum, 0) / latency.reduce((a, s) => a + s.requests, 0) : 0;
    const mem = data.memory && data.memory.rss_bytes ? ` · memory ${(data.memory.rss_bytes / 2 ** 20).toFixed(0)} MiB` : "";
    $("server-metrics").textContent = `server: ${t.requests} requests · ${t.errors} errors · ${t.prompt_tokens} prompt + ` +
      `${t.completion_tokens} completion tokens · mean API latency ${mean.toFixed(3)} s${mem}`;
  } catch (e) { /* the footer is a nicety */ }
}

// -- start ------------------------------------------------------------------------------------
function start() {
  const keyBox = $("api-key");
  keyBox.value = localStorage.getItem("petune-api-key") || "";
  keyBox.addEventListener("change", () => {
    localStorage.setItem("petune-api-key", keyBox.value.trim());
    state.run = null;
    boot();
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("reset").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); showError(""); });
  $("predict-form").addEventListener("submit", sendPredict);
  boot();
  setInterval(refreshMetrics, 5000);
}

async function boot() {
  for (let i = 0; i < 600; i++) {  // wait for the models to load (health says when)
    if (await refreshStatus()) break;
    if ($("status").textContent === "API key needed") return;
    await new Promise((r) => setTimeout(r, 1000));
  }
  await loadRuns();
  refreshMetrics();
}

start();
