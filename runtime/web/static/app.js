// hgad-edge live inspection page: polls /api/state, shows /stream.mjpg, draws the histogram and trend,
// and sends threshold changes and marks with the operator token (kept in this tab's sessionStorage only).
"use strict";

const POLL_MS = 500;
const TOKEN_KEY = "hgad-edge-token";
const $ = (id) => document.getElementById(id);

const ui = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  since: 0,
  recent: [],
  recentMax: 2000,
  cls: null,
  candidate: null,
  candidateTouched: false,
  thresholds: null,
  data: null,
  streaming: false,
  needsToken: false,
};

// ---- the token: from #token=... (printed at start) or the dialog; never sent in a URL ----------
function takeTokenFromHash() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    ui.token = decodeURIComponent(match[1]);
    sessionStorage.setItem(TOKEN_KEY, ui.token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function authHeaders() {
  return ui.token ? { Authorization: "Bearer " + ui.token } : {};
}

async function login(token) {
  const response = await fetch("/api/session", { method: "POST", headers: { Authorization: "Bearer " + token } });
  if (!response.ok) return false;
  ui.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  return true;
}

function askToken() {
  $("token-error").textContent = "";
  $("token-input").value = "";
  $("token-dialog").showModal();
}

// ---- polling ------------------------------------------------------------------------------------
async function poll() {
  try {
    const response = await fetch("/api/state?since=" + ui.since, { headers: authHeaders() });
    if (response.status === 401) {
      if (ui.token && (await login(ui.token))) return;
      ui.needsToken = true;
      setPill("token needed", "down");
      if (!$("token-dialog").open) askToken();
      return;
    }
    if (!response.ok) throw new Error(response.status);
    const data = await response.json();
    ui.data = data;
    ui.recentMax = data.recent_max;
    if (data.seq < ui.since) ui.recent = [];  // another run on the same port
    ui.recent.push(...data.recent);
    if (ui.recent.length > ui.recentMax) ui.recent.splice(0, ui.recent.length - ui.recentMax);
    ui.since = data.seq;
    render(data);
  } catch (err) {
    setPill("station unreachable", "down");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function setPill(text, kind) {
  const pill = $("run-state");
  pill.textContent = text;
  pill.className = "pill " + (kind || "");
}

// ---- rendering ----------------------------------------------------------------------------------
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(v < 0.1 ? 2 : 1) + " %");

function render(data) {
  const run = data.run;
  if (run.state === "live") setPill("LIVE", "live");
  else if (run.state === "ended") setPill("run ended", "ended");
  else setPill("model loading", "");
  if (run.run) {
    $("run-line").textContent = `${run.source} · ${run.backend} (${run.precision}) · run ${run.run}`;
    $("frame-source").textContent = "bundle " + run.bundle + (run.tiled ? " (tiled)" : "");
  }
  const live = data.live || {};
  $("fps").textContent = live.fps ? live.fps.toFixed(1) : "–";
  $("latency").textContent = live.mean_latency_ms ? live.mean_latency_ms.toFixed(1) + " ms" : "–";
  const health = [];
  if (live.dropped_frames) health.push(`${live.dropped_frames} dropped`);
  if (live.skipped_corrupt) health.push(`${live.skipped_corrupt} corrupt`);
  if (live.lost_to_server) health.push(`${live.lost_to_server} lost (server away)`);
  if (live.reconnects) health.push(`${live.reconnects} reconnects`);
  for (const [name, n] of Object.entries(live.queue_depths || {})) if (n) health.push(`${name}: ${n} queued`);
  $("health").textContent = health.join(" · ");

  if (!ui.streaming && run.state === "live") startStream();
  else if (run.state === "ended" && data.latest && !$("live-frame").src) $("live-frame").src = "/frame.jpg";
  renderLatest(data.latest);
  renderCounts(data.classes);
  renderThresholds(data.thresholds);
  renderGallery(data.gallery);
  drawCharts();
}

function startStream() {
  ui.streaming = true;
  const img = $("live-frame");
  img.onerror = () => {
    ui.streaming = false;  // the next poll restarts it
  };
  img.src = "/stream.mjpg?t=" + Date.now();
}

function renderLatest(latest) {
  if (!latest) return;
  const verdict = latest.anomalous ? "FAIL" : "PASS";
  const el = $("verdict");
  el.textContent = verdict;
  el.className = "verdict " + verdict;
  $("score").textContent = fmt(latest.score);
  $("score-norm").textContent = fmt(latest.score_normalized, 3);
  $("class").textContent = latest.class;
  $("frame-no").textContent = "#" + latest.frame;
}

function renderCounts(classes) {
  const body = $("counts-body");
  const rows = [];
  const total = { frames: 0, fails: 0, good: 0, defect: 0 };
  for (const [name, c] of Object.entries(classes)) {
    total.frames += c.frames;
    total.fails += c.fails;
    total.good += c.marks.good;
    total.defect += c.marks.defect;
    rows.push(row(name, c.frames, c.fails, c.marks.good, c.marks.defect, c.false_reject_rate));
  }
  const marked = total.good + total.defect;
  const frr = marked && total.frames ? (total.fails / total.frames) * (total.good / marked) : null;
  if (rows.length > 1) rows.push(row("all", total.frames, total.fails, total.good, total.defect, frr, "total"));
  body.replaceChildren(...rows);
}

function row(name, frames, fails, good, defect, frr, kind) {
  const tr = document.createElement("tr");
  tr.dataset.class = name;
  if (kind) tr.className = kind;
  const cells = [name, frames, fails, frames ? pct(fails / frames) : "–", `${good} / ${defect}`, pct(frr)];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (i === 2) td.className = "fails";
    tr.appendChild(td);
  });
  return tr;
}

function renderThresholds(thr) {
  ui.thresholds = thr;
  const select = $("thr-class");
  if (!thr) return;
  if (select.options.length !== thr.classes.length) {
    select.replaceChildren(...thr.classes.map((name) => new Option(name, name)));
    ui.cls = ui.cls || thr.classes[0];
    select.value = ui.cls;
  }
  $("thr-run").textContent = fmt(thr.run[ui.cls]);
  $("thr-bundle").textContent = fmt(thr.bundle[ui.cls]);
  if (!ui.candidateTouched) ui.candidate = thr.run[ui.cls];
  updateSlider();
  const writable = Boolean(ui.token);
  $("btn-apply").disabled = !writable;
  $("btn-save").disabled = !writable || !thr.can_save;
  $("btn-undo").disabled = !writable || !thr.can_save || !thr.calibration;
  $("btn-save").title = thr.can_save
    ? "write it into the bundle as hgad-edge calibrate does: atomic, recorded, undoable"
    : "this station scores on an inference server: calibrate the bundle there";
  const cal = thr.calibration;
  $("calibration-line").textContent = cal
    ? `Bundle calibrated ${cal.date} (${cal.policy}, class ${cal.class}); undo restores the thresholds from before it.`
    : "Bundle thresholds as exported (no calibration yet).";
  if (!writable) $("calibration-line").textContent += " Enter the operator token to change thresholds.";
}

function classScores() {
  return ui.recent.filter((r) => r.class === ui.cls).map((r) => r.score);
}

function sliderRange(scores) {
  const thr = ui.thresholds;
  const values = scores.concat([thr.run[ui.cls], thr.bundle[ui.cls]]);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const pad = (hi - lo || Math.abs(hi) || 1) * 0.08;
  return [lo - pad, hi + pad];
}

function updateSlider() {
  const thr = ui.thresholds;
  if (!thr || !ui.cls) return;
  const scores = classScores();
  const slider = $("thr-slider");
  if (!ui.candidateTouched) {
    const [lo, hi] = sliderRange(scores);
    slider.min = lo;
    slider.max = hi;
    slider.step = (hi - lo) / 1000;
    slider.value = ui.candidate;
  }
  const candidate = ui.candidate;
  $("thr-value").textContent = fmt(candidate);
  const wouldFail = scores.filter((s) => s >= candidate).length;
  const failNow = scores.filter((s) => s >= thr.run[ui.cls]).length;
  $("would-fail-count").textContent = wouldFail;
  $("would-fail-of").textContent = scores.length;
  $("would-fail-rate").textContent = scores.length ? pct(wouldFail / scores.length) : "–";
  $("fail-now").textContent = `${failNow} at the threshold in effect`;
}

function renderGallery(items) {
  const box = $("gallery");
  if (!items.length) return;
  const existing = new Map([...box.querySelectorAll(".shot")].map((el) => [Number(el.dataset.id), el]));
  const cards = items.map((item) => {
    let card = existing.get(item.id);
    if (!card) card = shotCard(item);
    if (item.ready && !card.querySelector("img").src) card.querySelector("img").src = `/gallery/${item.id}.jpg`;
    card.classList.toggle("good", item.mark === "good");
    card.classList.toggle("defect", item.mark === "defect");
    card.querySelector(".mark-good").className = "mark-good" + (item.mark === "good" ? " on-good" : "");
    card.querySelector(".mark-defect").className = "mark-defect" + (item.mark === "defect" ? " on-defect" : "");
    card.querySelectorAll("button").forEach((b) => (b.disabled = !ui.token));
    card.dataset.mark = item.mark || "";
    return card;
  });
  box.replaceChildren(...cards);
}

function shotCard(item) {
  const card = document.createElement("div");
  card.className = "shot";
  card.dataset.id = item.id;
  const img = document.createElement("img");
  img.alt = `FAIL frame ${item.frame}`;
  const cap = document.createElement("div");
  cap.className = "cap";
  const left = document.createElement("span");
  left.textContent = `#${item.frame} · ${item.class}`;
  const right = document.createElement("b");
  right.textContent = Number(item.score_normalized).toFixed(2);
  cap.append(left, right);
  const marks = document.createElement("div");
  marks.className = "marks";
  for (const [mark, label] of [["good", "Good part"], ["defect", "Defect"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "mark-" + mark;
    button.textContent = label;
    button.title = mark === "good" ? "a false reject: this part is fine" : "a real defect: rightly rejected";
    button.addEventListener("click", () => {
      const undo = card.dataset.mark === mark;
      send("/api/mark", { id: item.id, mark: undo ? null : mark });
    });
    marks.appendChild(button);
  }
  card.append(img, cap, marks);
  return card;
}

// ---- charts -------------------------------------------------------------------------------------
function canvas2d(id) {
  const canvas = $(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  return { ctx, width, height };
}

function vline(ctx, x, top, bottom, color, dash) {
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.setLineDash(dash || []);
  ctx.beginPath();
  ctx.moveTo(x, top);
  ctx.lineTo(x, bottom);
  ctx.stroke();
  ctx.restore();
}

function drawCharts() {
  if (!ui.thresholds || !ui.cls) return;
  drawHistogram();
  drawTrend();
}

function drawHistogram() {
  const { ctx, width, height } = canvas2d("histogram");
  const scores = classScores();
  const pad = { l: 8, r: 8, t: 10, b: 20 };
  if (!scores.length) return;
  const [lo, hi] = sliderRange(scores);
  const bins = 40;
  const counts = new Array(bins).fill(0);
  for (const s of scores) counts[Math.min(bins - 1, Math.max(0, Math.floor(((s - lo) / (hi - lo)) * bins)))]++;
  const top = Math.max(...counts);
  const w = (width - pad.l - pad.r) / bins;
  const x = (v) => pad.l + ((v - lo) / (hi - lo)) * (width - pad.l - pad.r);
  counts.forEach((n, i) => {
    const left = lo + (i / bins) * (hi - lo);
    const h = (n / top) * (height - pad.t - pad.b);
    ctx.fillStyle = left + (hi - lo) / bins > ui.candidate ? "rgba(239,68,68,.85)" : "rgba(96,165,250,.75)";
    ctx.fillRect(pad.l + i * w + 1, height - pad.b - h, w - 2, h);
  });
  ctx.fillStyle = "#8a97a8";
  ctx.fillText(lo.toFixed(3), pad.l, height - 5);
  const label = hi.toFixed(3);
  ctx.fillText(label, width - pad.r - ctx.measureText(label).width, height - 5);
  vline(ctx, x(ui.thresholds.run[ui.cls]), pad.t - 6, height - pad.b, "#e2e8f0", [5, 4]);
  vline(ctx, x(ui.candidate), pad.t - 6, height - pad.b, "#f5a524");
}

function drawTrend() {
  const { ctx, width, height } = canvas2d("trend");
  const points = ui.recent.filter((r) => r.class === ui.cls).slice(-300);
  $("trend-note").textContent = points.length ? `last ${points.length} frames of ${ui.cls}` : "";
  if (points.length < 2) return;
  const pad = { l: 8, r: 8, t: 10, b: 20 };
  const [lo, hi] = sliderRange(points.map((p) => p.score));
  const x = (i) => pad.l + (i / (points.length - 1)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - ((v - lo) / (hi - lo)) * (height - pad.t - pad.b);
  ctx.strokeStyle = "rgba(96,165,250,.9)";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p.score)) : ctx.moveTo(x(i), y(p.score))));
  ctx.stroke();
  ctx.fillStyle = "#ef4444";
  points.forEach((p, i) => {
    if (p.fail) ctx.fillRect(x(i) - 2, y(p.score) - 2, 4, 4);
  });
  const run = y(ui.thresholds.run[ui.cls]);
  ctx.save();
  ctx.strokeStyle = "#e2e8f0";
  ctx.setLineDash([5, 4]);
  ctx.beginPath();
  ctx.moveTo(pad.l, run);
  ctx.lineTo(width - pad.r, run);
  ctx.stroke();
  ctx.restore();
  ctx.fillStyle = "#8a97a8";
  ctx.fillText(`#${points[0].frame}`, pad.l, height - 5);
  const last = `#${points[points.length - 1].frame}`;
  ctx.fillText(last, width - pad.r - ctx.measureText(last).width, height - 5);
}

// ---- actions ------------------------------------------------------------------------------------
let toastTimer = null;
function toast(text, bad) {
  const el = $("toast");
  el.textContent = text;
  el.className = "toast show" + (bad ? " bad" : "");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.className = "toast"), 4000);
}

async function send(path, body) {
  if (!ui.token) {
    askToken();
    return null;
  }
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    toast(answer.error || `refused (${response.status})`, true);
    if (response.status === 401) askToken();
    return null;
  }
  return answer;
}

async function changeThreshold(action) {
  const value = Number($("thr-slider").value);
  const view = await send(action === "undo" ? "/api/undo" : "/api/threshold", { class: ui.cls, threshold: value, action });
  if (!view) return;
  ui.candidateTouched = false;
  renderThresholds(view);
  drawCharts();
  const done = {
    apply: `class ${ui.cls}: threshold ${fmt(value)} applied to this run`,
    save: `class ${ui.cls}: threshold ${fmt(value)} saved to the bundle (undo restores the previous one)`,
    undo: "bundle thresholds restored from before the last calibration",
  };
  toast(done[action]);
}

function wire() {
  $("thr-class").addEventListener("change", (event) => {
    ui.cls = event.target.value;
    ui.candidateTouched = false;
    renderThresholds(ui.thresholds);
    drawCharts();
  });
  $("thr-slider").addEventListener("input", (event) => {
    ui.candidateTouched = true;
    ui.candidate = Number(event.target.value);
    updateSlider();
    drawCharts();
  });
  $("btn-apply").addEventListener("click", () => changeThreshold("apply"));
  $("btn-save").addEventListener("click", () => changeThreshold("save"));
  $("btn-undo").addEventListener("click", () => changeThreshold("undo"));
  $("btn-token").addEventListener("click", askToken);
  $("token-cancel").addEventListener("click", () => $("token-dialog").close());
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (token && (await login(token))) {
      $("token-dialog").close();
      ui.needsToken = false;
      toast("operator token accepted");
    } else {
      $("token-error").textContent = "wrong token";
    }
  });
  window.addEventListener("resize", drawCharts);
}

takeTokenFromHash();
wire();
window.addEventListener("load", () => {
  const checked = ui.token ? login(ui.token) : Promise.resolve(true);
  checked.then((ok) => {
    if (!ok) {
      ui.token = "";
      sessionStorage.removeItem(TOKEN_KEY);
    }
    poll();
  });
});
