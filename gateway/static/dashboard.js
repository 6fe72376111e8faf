// Slipstream dashboard: polls /dashboard/data every second and redraws. No dependencies.
"use strict";

const POLL_MS = 1000;
const HISTORY = 120; // points kept for the charts (two minutes at one poll a second)
const MIN_SPAN = 30; // the x axis spans at least this many points, then grows to HISTORY
const PRIORITIES = [
  ["high", "#d9534f"],
  ["normal", "#2f6fdf"],
  ["low", "#8a94a6"],
];
const TPS_SERIES = [
  ["workers", "#1f8a4c"],
  ["streamed", "#b7791f"],
];
const history = { t: [], high: [], normal: [], low: [], workers: [], streamed: [] };
let previous = null; // last data, for the streamed-tokens rate
const state = { polls: 0, last: null, errors: 0, history };
window.slipstream = state;

const $ = (id) => document.getElementById(id);
const fmtInt = (v) => Math.round(v).toLocaleString("en-US");
const fmtRate = (v) => (v >= 100 ? fmtInt(v) : v.toFixed(1));

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  return `${s.toFixed(2)} s`;
}

function setStat(id, value, text) {
  const el = $(id);
  el.dataset.value = String(value);
  el.textContent = text === undefined ? fmtInt(value) : text;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, items, columns, render) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (items.length === 0) {
    const row = body.insertRow();
    cell(row, "none", "empty").colSpan = columns;
    return;
  }
  for (const item of items) render(body.insertRow(), item);
}

function capacityBar(row, w) {
  const td = cell(row, "");
  const share = w.capacity_tokens > 0 ? Math.min(1, w.tokens_in_use / w.capacity_tokens) : 0;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  fill.className = share > 0.85 ? "fill high" : "fill";
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  const label = document.createElement("span");
  label.textContent = `${fmtInt(w.tokens_in_use)} / ${fmtInt(w.capacity_tokens)} (${Math.round(share * 100)}%)`;
  bar.append(fill, label);
  td.appendChild(bar);
}

function renderWorker(row, w) {
  cell(row, w.id, "mono");
  cell(row, w.model);
  cell(row, w.engine);
  capacityBar(row, w);
  cell(row, `${w.seqs_in_use} / ${w.max_seqs}`, "num");
  cell(row, fmtRate(w.tokens_per_s), "num");
  cell(row, w.draining ? "draining" : w.healthy ? "serving" : "unhealthy");
}

function queueRows(models) {
  const rows = [];
  for (const m of models) {
    for (const [p] of PRIORITIES) {
      if (m.queues[p]) rows.push({ model: m.model, priority: p, ...m.queues[p] });
    }
  }
  return rows;
}

function renderQueue(row, q) {
  cell(row, q.model);
  cell(row, q.priority);
  for (const f of ["waiting_jobs", "waiting_tokens", "length", "lag", "pending"]) {
    cell(row, fmtInt(q[f] || 0), "num");
  }
}

function renderRecent(row, r) {
  cell(row, new Date(r.at * 1000).toLocaleTimeString("en-GB"));
  cell(row, r.request_id, "mono");
  cell(row, r.model);
  cell(row, r.priority);
  const span = document.createElement("span");
  span.className = `outcome ${r.outcome === "completed" ? "completed" : "bad"}`;
  span.textContent = r.outcome;
  cell(row, "").appendChild(span);
  cell(row, fmtSeconds(r.queue_wait_s), "num");
  cell(row, fmtSeconds(r.ttft_s), "num");
  cell(row, fmtSeconds(r.duration_s), "num");
  cell(row, fmtInt(r.tokens), "num");
}

function sumOver(models, pick) {
  return models.reduce((acc, m) => acc + pick(m), 0);
}

function record(data) {
  const waiting = (p) => sumOver(data.models, (m) => (m.queues[p] ? m.queues[p].waiting_jobs || 0 : 0));
  let streamedRate = 0;
  if (previous !== null && data.time > previous.time) {
    const delta = data.gateway.streamed_tokens_total - previous.gateway.streamed_tokens_total;
    streamedRate = Math.max(0, delta / (data.time - previous.time));
  }
  previous = data;
  history.t.push(data.time);
  for (const [p] of PRIORITIES) history[p].push(waiting(p));
  history.workers.push(sumOver(data.models, (m) => m.tokens_per_s || 0));
  history.streamed.push(streamedRate);
  for (const key of Object.keys(history)) {
    if (history[key].length > HISTORY) history[key].shift();
  }
}

function niceMax(v) {
  if (v <= 4) return 4;
  const step = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const pad = { l: 44, r: 10, t: 8, b: 20 };
  const pw = w - pad.l - pad.r;
  const ph = h - pad.t - pad.b;
  const top = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  ctx.font = "11px 'DejaVu Sans', sans-serif";
  ctx.fillStyle = "#6b7385";
  ctx.strokeStyle = "#e3e6ec";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + ph - (ph * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(pad.l + pw, y);
    ctx.stroke();
    const v = (top * i) / 4;
    ctx.fillText(v >= 100 ? fmtInt(v) : String(+v.toFixed(1)), pad.l - 6, y + 4);
  }
  const span = Math.min(HISTORY, Math.max(MIN_SPAN, history.t.length));
  ctx.textAlign = "left";
  ctx.fillText(`-${span} s`, pad.l, h - 4);
  ctx.textAlign = "right";
  ctx.fillText("now", pad.l + pw, h - 4);
  const x = (i) => pad.l + (pw * (span - history.t.length + i)) / (span - 1);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.values.forEach((v, i) => {
      const y = pad.t + ph - (ph * v) / top;
      if (i === 0) ctx.moveTo(x(i), y);
      else ctx.lineTo(x(i), y);
    });
    ctx.stroke();
  }
}

function legend(id, series) {
  const el = $(id);
  el.replaceChildren();
  for (const s of series) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = s.color;
    const last = s.values.length ? s.values[s.values.length - 1] : 0;
    item.append(swatch, `${s.label}: ${fmtRate(last)}`);
    el.appendChild(item);
  }
}

function charts() {
  const queue = PRIORITIES.map(([p, color]) => ({ label: p, color, values: history[p] }));
  const labels = { workers: "generated (workers, 10 s avg)", streamed: "streamed to clients" };
  const tps = TPS_SERIES.map(([k, color]) => ({ label: labels[k], color, values: history[k] }));
  legend("legend-queue", queue);
  legend("legend-tps", tps);
  drawChart($("chart-queue"), queue);
  drawChart($("chart-tps"), tps);
}

function render(data) {
  const g = data.gateway;
  const completed = g.requests_by_outcome.completed || 0;
  setStat("stat-requests", g.requests_total);
  setStat("stat-completed", completed);
  setStat("stat-failed", g.requests_total - completed);
  setStat("stat-rejected", g.admission_rejections_total);
  setStat("stat-in-flight", g.in_flight_requests);
  setStat("stat-streamed", g.streamed_tokens_total);
  const hits = g.prompt_tokens_total ? g.cached_tokens_total / g.prompt_tokens_total : null;
  setStat("stat-hit-ratio", hits, hits === null ? "–" : `${(100 * hits).toFixed(1)}%`);
  setStat("stat-waiting", sumOver(data.models, (m) => sumOver(Object.values(m.queues), (q) => q.waiting_jobs || 0)));
  setStat("stat-workers", sumOver(data.models, (m) => m.workers || 0));
  const tps = sumOver(data.models, (m) => m.tokens_per_s || 0);
  setStat("stat-tokens-per-s", tps, fmtRate(tps));
  fillTable("workers", data.workers, 7, renderWorker);
  fillTable("queues", queueRows(data.models), 7, renderQueue);
  fillTable("recent", data.recent.slice(0, 25), 9, renderRecent);
  const status = $("status");
  status.className = `pill ${data.draining ? "draining" : data.redis_ok ? "live" : "down"}`;
  status.textContent = data.draining ? "draining" : data.redis_ok ? "live" : "redis unreachable";
  $("updated").textContent = new Date(data.time * 1000).toLocaleTimeString("en-GB");
  charts();
}

async function poll() {
  try {
    // From the origin, never the page's URL: a page opened as http://user:key@host/ would
    // resolve a relative URL with the credentials in it, which fetch() refuses. The browser
    // sends the Basic credentials it was given for this page on its own.
    const url = new URL("/dashboard/data", window.location.origin);
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (response.status === 401 || response.status === 403) {
      throw new Error(`HTTP ${response.status}: needs a key with the 'metrics' or 'admin' scope`);
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    record(data);
    render(data);
    state.last = data;
    state.polls += 1;
  } catch (err) {
    state.errors += 1;
    $("status").className = "pill down";
    $("status").textContent = `gateway unreachable (${err.message})`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

window.addEventListener("resize", charts);
poll();
