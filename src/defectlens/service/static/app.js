// defectlens operator UI: upload, verdict (OK / REVIEW / NOT OK), heat map, threshold what-if,
// operator review (good after review / defect confirmed), drift warning, history.
// Talks only to the public REST API; the slider re-judges the stored score in the browser and
// asks the server to re-threshold the stored anomaly map (no model run).
// With API tokens on the server, the operator signs in with a token: it is kept in this tab's
// sessionStorage (gone when the tab closes, never a cookie) and sent as an Authorization header
// on every request - pictures too (fetched, then shown from blob: URLs).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 15;
const TOKEN_KEY = "defectlens.token";
const OPERATOR_KEY = "defectlens.operator";
const VERDICT_CLASS = { "OK": "ok", "REVIEW": "review", "NOT OK": "bad" };
const state = { models: [], current: null, offset: 0, total: 0, timer: null, role: null, authRequired: false };
const pictures = { seq: {}, urls: {} };

class AuthError extends Error {}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}
function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}
function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders() {
  const headers = { "X-Defectlens-Client": "ui" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return headers;
}
async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401 && state.authRequired) {
    showLogin(token() ? "the token was refused: sign in again" : "sign in with an API token");
  }
  return response;
}
async function api(path, options) {
  const response = await request(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    const ErrorType = response.status === 401 ? AuthError : Error;
    throw new ErrorType(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}
// An <img> (and its link) shows an API picture fetched with the token; the API URL is kept in data-src.
async function setPicture(id, url) {
  const seq = (pictures.seq[id] || 0) + 1;
  pictures.seq[id] = seq;
  const img = $(id);
  img.dataset.src = url;
  const link = $(`${id}-link`);
  try {
    const response = await request(url);
    if (!response.ok) throw new Error(`${response.status}`);
    const blob = await response.blob();
    if (pictures.seq[id] !== seq) return;  // a newer picture was asked for meanwhile
    if (pictures.urls[id]) URL.revokeObjectURL(pictures.urls[id]);
    pictures.urls[id] = URL.createObjectURL(blob);
    img.src = pictures.urls[id];
    if (link) link.href = pictures.urls[id];
  } catch (error) {
    if (pictures.seq[id] === seq) showMessage(`could not load the ${id} image`);
  }
}

// ------------------------------------------------------------------ signing in
function showLogin(message) {
  $("login").hidden = false;
  $("session").hidden = true;
  if (message) showMessage(message);
}
function showSession(role) {
  state.role = role;
  $("login").hidden = true;
  $("session").hidden = !state.authRequired;
  $("session-role").textContent = `signed in · ${role}`;
  $("session-role").className = "role";
  const readOnly = role !== "write";
  $("dropzone").classList.toggle("readonly", readOnly);
  $("file").disabled = readOnly;
  document.querySelector(".drop-hint").textContent = readOnly
    ? "this token may only read: inspecting needs a write token"
    : "click to choose, or drop a file here";
}
async function signIn(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  await connect();
}
function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.role = null;
  state.current = null;
  document.querySelector("#history tbody").innerHTML = "";
  showLogin("signed out");
}
async function connect() {
  try {
    const who = await api("/v1/whoami");
    showMessage("");
    showSession(who.role);
  } catch (error) {
    if (error instanceof AuthError) return false;
    showMessage(`cannot reach the service: ${error.message}`);
    return false;
  }
  try {
    await loadModels();
  } catch (error) {
    showMessage(`cannot list models: ${error.message}`);
  }
  checkHealth();
  checkDrift();
  refreshHistory();
  return true;
}

// ------------------------------------------------------------------ drift & reviews
async function checkDrift() {
  const box = $("drift");
  let data;
  try { data = await api("/v1/monitor"); } catch (_) { return; }
  const drifting = data.items.filter((item) => item.status === "drift");
  box.hidden = !drifting.length;
  box.textContent = drifting.map((item) =>
    `Drift warning · model ${item.model}: ${item.alarms.join("; ")}`).join("\n");
}
function showReview(row) {
  const writable = state.role === "write" && Boolean(row);
  $("review-good").disabled = !writable;
  $("review-defect").disabled = !writable;
  const label = { good: "good after review", defect: "defect confirmed" };
  $("review-state").textContent = row && row.review
    ? `${label[row.review]} · ${row.reviewed_by}` : (row ? "not reviewed" : "");
}
async function sendReview(decision) {
  const row = state.current;
  if (!row) return;
  const operator = $("operator").value.trim();
  if (!operator) { showMessage("enter the operator's name to record a review"); $("operator").focus(); return; }
  localStorage.setItem(OPERATOR_KEY, operator);
  try {
    const review = await api(`/v1/inspections/${row.id}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ decision, operator, note: $("review-note").value }),
    });
    row.review = review.decision;
    row.reviewed_by = review.operator;
    $("review-note").value = "";
    showMessage("");
    showReview(row);
    refreshHistory();
  } catch (error) {
    showMessage(`review: ${error.message}`);
  }
}

// ------------------------------------------------------------------ models & health
async function loadModels() {
  const data = await api("/v1/models");
  state.models = data.items;
  const picker = $("model");
  const filter = $("filter-model");
  picker.innerHTML = "";
  for (const model of data.items) {
    const option = new Option(`${model.name} · ${model.method}`, model.name, model.default, model.default);
    option.title = `${model.file}\nthreshold ${fmt(model.threshold)}\nsha256 ${model.sha256}`;
    picker.add(option);
  }
  const known = new Set([...filter.options].map((o) => o.value));
  for (const model of data.items) if (!known.has(model.name)) filter.add(new Option(model.name, model.name));
}
async function checkHealth() {
  const badge = $("health");
  try {
    const data = await api("/health");
    state.authRequired = data.auth_required;
    badge.className = "health up";
    const count = data.inspections;
    $("health-text").textContent = count === null ? "online" : `online · ${count} inspection${count === 1 ? "" : "s"}`;
  } catch (error) {
    badge.className = "health down";
    $("health-text").textContent = "offline";
  }
}

// ------------------------------------------------------------------ inspecting
async function inspect(file) {
  if (!file) return;
  showMessage("");
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("model", $("model").value);
  if ($("use-threshold").checked && !$("threshold").disabled) form.append("threshold", $("threshold").value);
  const zone = $("dropzone");
  zone.classList.add("busy");
  setVerdict("busy", "Inspecting…");
  try {
    const row = await api("/v1/inspect", { method: "POST", body: form });
    show(row, true);
    state.offset = 0;
    refreshHistory();
    checkHealth();
    checkDrift();
  } catch (error) {
    showMessage(error.message);
    if (state.current) judge(); else setVerdict("idle", "—");
  } finally {
    zone.classList.remove("busy");
    $("file").value = "";
  }
}

function showView(view) {
  const mask = view === "mask";
  $("overlay-link").hidden = mask;
  $("mask-link").hidden = !mask;
  $("legend").style.visibility = mask ? "hidden" : "visible";
  $("show-heatmap").classList.toggle("active", !mask);
  $("show-mask").classList.toggle("active", mask);
  $("show-heatmap").setAttribute("aria-selected", String(!mask));
  $("show-mask").setAttribute("aria-selected", String(mask));
}

function setVerdict(kind, text) {
  const box = $("verdict");
  box.className = `verdict ${kind}`;
  box.textContent = text;
}

function show(row, keepSlider = false) {
  const keep = keepSlider && $("use-threshold").checked && !$("threshold").disabled;
  state.current = row;
  $("score").textContent = fmt(row.score);
  $("p-value").textContent = row.p_value === null || row.p_value === undefined
    ? "—" : `${fmt(row.p_value, 3)} (z ${fmt(row.z_score, 3)})`;
  $("review-threshold").textContent = fmt(row.review_threshold);
  const reasons = $("reasons");
  reasons.innerHTML = "";
  for (const line of row.reasons || []) {
    const item = document.createElement("li");
    item.textContent = line;
    reasons.append(item);
  }
  showReview(row);
  $("result-model").textContent = row.model;
  $("image-name").textContent = row.image_name || "—";
  $("image-name").title = row.image_name || "";
  $("latency").textContent = `${fmt(row.latency_ms, 3)} ms`;
  $("created").textContent = when(row.created_at);
  $("inspection-id").textContent = row.id;
  $("inspection-id").title = row.id;
  const slider = $("threshold");
  const top = Math.max(2 * row.threshold, 1.25 * row.score, 1e-6);
  slider.min = "0";
  slider.max = String(top);
  slider.step = String(top / 1000);
  if (!keep) slider.value = String(row.threshold);
  slider.disabled = false;
  $("threshold-max").textContent = fmt(top, 3);
  $("threshold-marker").textContent = `stored ${fmt(row.threshold)}`;
  setPicture("image", row.image_url);
  document.querySelector(".images").classList.remove("empty");
  judge(true);
  markCurrentRow();
}

let redraw = null;
function judge(immediate = false) {
  const row = state.current;
  if (!row) return;
  const slider = $("threshold");
  let threshold = Number(slider.value);
  if (Math.abs(threshold - row.threshold) <= Number(slider.step) / 2) threshold = row.threshold;
  const custom = threshold !== row.threshold;
  // the stored verdict at the stored thresholds; a what-if threshold has one threshold (no REVIEW)
  const verdict = custom ? (row.score > threshold ? "NOT OK" : "OK") : row.verdict;
  const anomalous = verdict === "NOT OK";
  setVerdict(VERDICT_CLASS[verdict], verdict);
  const top = Number(slider.max) || 1;
  $("gauge-fill").style.width = `${Math.min(100, (100 * row.score) / top)}%`;
  $("gauge-fill").className = `gauge-fill ${VERDICT_CLASS[verdict]}`;
  $("gauge-mark").style.left = `calc(${Math.min(100, (100 * threshold) / top)}% - 1px)`;
  $("gauge-mark").style.display = "block";
  $("threshold-value").textContent = fmt(threshold);
  $("threshold-reset").disabled = !custom;
  const note = $("rejudge-note");
  note.hidden = !custom;
  if (custom) {
    note.textContent = `Re-judged at threshold ${fmt(threshold)} — stored verdict: ` +
      `${row.verdict} at ${fmt(row.threshold)}.`;
  }
  const query = custom ? `?threshold=${encodeURIComponent(threshold)}` : "";
  const update = () => {
    setPicture("overlay", row.heatmap_url + query);
    setPicture("mask", row.mask_url + query);
  };
  clearTimeout(redraw);
  if (immediate) update(); else redraw = setTimeout(update, 180);
}

// ------------------------------------------------------------------ history
async function refreshHistory() {
  const params = new URLSearchParams({ limit: PAGE, offset: state.offset });
  if ($("filter-model").value) params.set("model", $("filter-model").value);
  if ($("filter-verdict").value) params.set("verdict", $("filter-verdict").value);
  let data;
  try {
    data = await api(`/v1/inspections?${params}`);
  } catch (error) {
    showMessage(`history: ${error.message}`);
    return;
  }
  state.total = data.total;
  const body = document.querySelector("#history tbody");
  body.innerHTML = "";
  if (!data.items.length) {
    const tr = body.insertRow();
    tr.className = "empty-row";
    const td = tr.insertCell();
    td.colSpan = 8;
    td.textContent = "No inspections yet.";
  }
  for (const row of data.items) {
    const tr = body.insertRow();
    tr.dataset.id = row.id;
    tr.tabIndex = 0;
    tr.insertCell().textContent = when(row.created_at);
    const badge = document.createElement("span");
    badge.className = `badge ${VERDICT_CLASS[row.verdict] || "ok"}`;
    badge.textContent = row.verdict;
    tr.insertCell().append(badge);
    tr.insertCell().textContent = fmt(row.score);
    tr.insertCell().textContent = fmt(row.threshold);
    tr.insertCell().textContent = row.model;
    const name = tr.insertCell();
    name.className = "image-cell";
    name.textContent = row.image_name || "—";
    name.title = row.image_name || "";
    tr.insertCell().textContent = `${fmt(row.latency_ms, 3)} ms`;
    tr.insertCell().textContent = row.review ? `${row.review} · ${row.reviewed_by}` : "";
    const open = () => { showMessage(""); show(row); };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  }
  $("history-total").textContent = `(${data.total})`;
  const last = Math.min(state.offset + data.items.length, data.total);
  $("page-info").textContent = data.total ? `${state.offset + 1}–${last} of ${data.total}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE >= data.total;
  markCurrentRow();
}
function markCurrentRow() {
  const id = state.current && state.current.id;
  for (const tr of document.querySelectorAll("#history tbody tr")) tr.classList.toggle("current", tr.dataset.id === id);
}

// ------------------------------------------------------------------ wiring
function wire() {
  $("file").addEventListener("change", (event) => inspect(event.target.files[0]));
  const zone = $("dropzone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (event) => inspect(event.dataTransfer.files[0]));
  $("threshold").addEventListener("input", () => judge());
  $("show-heatmap").addEventListener("click", () => showView("heatmap"));
  $("show-mask").addEventListener("click", () => showView("mask"));
  $("threshold-reset").addEventListener("click", () => {
    if (!state.current) return;
    $("threshold").value = String(state.current.threshold);
    judge(true);
  });
  $("filter-model").addEventListener("change", () => { state.offset = 0; refreshHistory(); });
  $("filter-verdict").addEventListener("change", () => { state.offset = 0; refreshHistory(); });
  $("refresh").addEventListener("click", () => { refreshHistory(); checkHealth(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); refreshHistory(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; refreshHistory(); });
  for (const id of ["image", "overlay", "mask"]) {
    $(id).addEventListener("error", () => { if ($(id).getAttribute("src")) showMessage(`could not load the ${id} image`); });
  }
  $("login").addEventListener("submit", signIn);
  $("review-box").addEventListener("submit", (event) => event.preventDefault());
  $("review-good").addEventListener("click", () => sendReview("good"));
  $("review-defect").addEventListener("click", () => sendReview("defect"));
  $("operator").value = localStorage.getItem(OPERATOR_KEY) || "";
  $("logout").addEventListener("click", signOut);
}

async function start() {
  document.querySelector(".images").classList.add("empty");
  wire();
  await checkHealth();
  if (state.authRequired && !token()) showLogin("");
  else await connect();
  state.timer = setInterval(() => {
    checkHealth();
    if (state.role) checkDrift();
    if (state.role && state.offset === 0) refreshHistory();
  }, 15000);
  document.body.dataset.ready = "true";
}
start();
