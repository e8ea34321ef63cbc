// The runs page. Run data is only ever written with textContent (never innerHTML), so a
// task id or an error message cannot become markup; the server's CSP forbids inline code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { cursor: null, open: null, events: null, rows: new Map() };

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "-";
}

function short(seconds) {
  // The list's compact time: the clock today, the date before that (full in the detail).
  const date = new Date(seconds * 1000);
  const today = new Date().toDateString() === date.toDateString();
  const pad = (n) => String(n).padStart(2, "0");
  const clock = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  return today ? clock : `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${clock}`;
}

function took(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function say(text) { $("message").textContent = text || ""; }

function filters() {
  const params = new URLSearchParams();
  for (const name of ["environment", "task", "state"]) {
    const value = $(`f-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  for (const name of ["since", "until"]) {
    const value = $(`f-${name}`).value;
    if (value) params.set(name, String(new Date(value).getTime() / 1000));
  }
  return params;
}

async function getJSON(url, options) {
  const response = await fetch(url, Object.assign({ credentials: "same-origin" }, options));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function badge(runState) { return el("span", runState, `state state-${runState}`); }

function cancelButton(run) {
  const button = el("button", "Cancel", "cancel");
  button.type = "button";
  button.dataset.action = "cancel";
  button.disabled = !run.cancellable;
  button.title = run.cancellable ? "cancel this run" : run.cancel_note;
  button.addEventListener("click", (event) => { event.stopPropagation(); cancel(run.run_id); });
  return button;
}

function rowFor(run) {
  const tr = el("tr");
  tr.dataset.runId = run.run_id;
  tr.dataset.state = run.state;
  tr.dataset.createdAt = String(run.created_at);
  const cells = [
    el("td", short(run.created_at)), el("td", run.task_id, "task"),
    el("td", run.environment, "environment"), el("td", run.executor || "-"),
    el("td"), el("td", run.attempt), el("td", took(run.duration)),
    el("td", run.run_id, "run-id"), el("td"),
  ];
  cells[7].title = run.run_id;
  cells[4].className = "state-cell";
  cells[4].appendChild(badge(run.state));
  cells[8].appendChild(cancelButton(run));
  for (const cell of cells) tr.appendChild(cell);
  tr.addEventListener("click", () => openDetail(run.run_id));
  if (state.open === run.run_id) tr.classList.add("selected");
  return tr;
}

function upsert(run, append) {
  const body = $("rows");
  const fresh = rowFor(run);
  const old = state.rows.get(run.run_id);
  state.rows.set(run.run_id, fresh);
  if (old) { old.replaceWith(fresh); return; }
  if (append) { body.appendChild(fresh); return; }
  // A new run: newest first, so it goes before the first older row.
  const later = Array.from(body.children).find(
    (tr) => Number(tr.dataset.createdAt) < run.created_at);
  body.insertBefore(fresh, later || null);
}

function showEmpty() { $("empty").hidden = state.rows.size > 0; }

async function load() {
  say("");
  state.rows.clear();
  $("rows").replaceChildren();
  state.cursor = null;
  try {
    const page = await getJSON(`/api/runs?${filters()}`);
    $("ledger").textContent = page.ledger;
    for (const run of page.runs) upsert(run, true);
    state.cursor = page.next_cursor;
    $("more").hidden = !state.cursor;
  } catch (error) { say(error.message); }
  showEmpty();
  listen();
  summary();
}

async function more() {
  const params = filters();
  params.set("cursor", state.cursor);
  try {
    const page = await getJSON(`/api/runs?${params}`);
    for (const run of page.runs) upsert(run, true);
    state.cursor = page.next_cursor;
    $("more").hidden = !state.cursor;
  } catch (error) { say(error.message); }
}

async function summary() {
  try {
    const found = await getJSON("/api/summary");
    const select = $("f-environment");
    const chosen = select.value;
    const known = new Set(Array.from(select.options).map((o) => o.value));
    for (const name of found.environments) {
      if (!known.has(name)) select.appendChild(new Option(name, name));
    }
    select.value = chosen;
    const totals = $("totals");
    totals.replaceChildren();
    for (const [name, count] of Object.entries(found.by_state)) {
      if (count) totals.appendChild(el("li", `${name} ${count}`));
    }
  } catch (error) { say(error.message); }
}

function listen() {
  if (state.events) state.events.close();
  const params = filters();
  if (state.open) params.set("watch", state.open);
  const events = new EventSource(`/api/events?${params}`);
  state.events = events;
  events.addEventListener("open", () => { $("live").className = "live on"; });
  events.addEventListener("error", () => { $("live").className = "live off"; });
  events.addEventListener("runs", (event) => {
    for (const run of JSON.parse(event.data)) upsert(run, false);
    showEmpty();
    summary();
  });
  events.addEventListener("gone", (event) => {
    // Runs that no longer match the filters (a state moved on): as a reload would show.
    for (const runId of JSON.parse(event.data)) {
      const tr = state.rows.get(runId);
      if (tr) { tr.remove(); state.rows.delete(runId); }
    }
    showEmpty();
  });
  events.addEventListener("run", (event) => {
    const run = JSON.parse(event.data);
    if (run.run_id === state.open) renderDetail(run);
  });
}

function field(list, name, value) {
  list.appendChild(el("dt", name));
  const dd = el("dd", value === null || value === undefined || value === "" ? "-" : value);
  dd.dataset.field = name;
  list.appendChild(dd);
}

function renderDetail(run) {
  $("detail").hidden = false;
  $("detail").dataset.runId = run.run_id;
  $("detail").dataset.state = run.state;
  $("detail-title").textContent = run.run_id;
  const list = $("detail-fields");
  list.replaceChildren();
  field(list, "state", run.state);
  field(list, "task", run.task_id);
  field(list, "environment", run.where.environment);
  field(list, "executor", run.where.executor);
  field(list, "backend handle", run.where.backend_handle);
  field(list, "attempt", run.attempt);
  field(list, "idempotency key", run.idempotency_key);
  field(list, "submitted", when(run.timings.submitted_at));
  field(list, "last change", when(run.timings.last_change_at));
  field(list, "submit to end", took(run.timings.submit_to_end));
  field(list, "ran on worker", took(run.timings.ran_on_worker));
  const box = $("detail-outcome");
  box.replaceChildren();
  const outcome = run.outcome;
  if (outcome.status === "unverifiable") {
    box.appendChild(el("p", "unverifiable", "unverifiable"));
    box.appendChild(el("p", outcome.note, "muted"));
  } else if (outcome.type === "error") {
    const error = outcome.error;
    const head = el("p", `${error.kind}: ${error.message}`, "error-line");
    head.id = "detail-error";
    box.appendChild(head);
    box.appendChild(el("p", `raised in: ${error.source}`, "muted"));
    const trace = el("pre", error.traceback || "(no traceback was sent)");
    trace.id = "detail-traceback";
    box.appendChild(trace);
  } else if (outcome.type === "cancelled") {
    box.appendChild(el("p", `cancelled: ${outcome.reason || "no reason recorded"}`));
  } else if (outcome.note) {
    box.appendChild(el("p", outcome.note, "muted"));
  }
  const button = $("detail-cancel");
  button.disabled = !run.cancellable;
  button.title = run.cancellable ? "cancel this run" : run.cancel_note;
  for (const tr of $("rows").children) {
    tr.classList.toggle("selected", tr.dataset.runId === run.run_id);
  }
}

async function openDetail(runId) {
  state.open = runId;
  try { renderDetail(await getJSON(`/api/runs/${encodeURIComponent(runId)}`)); }
  catch (error) { say(error.message); }
  listen();
}

async function cancel(runId) {
  say("");
  try {
    await getJSON(`/api/runs/${encodeURIComponent(runId)}/cancel`, { method: "POST" });
  } catch (error) { say(`cancel failed: ${error.message}`); }
}

function setup() {
  const states = $("f-state");
  for (const name of ["submitted", "running", "succeeded", "failed", "cancelled", "lost",
    "detached"]) states.appendChild(new Option(name, name));
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); load(); });
  $("f-environment").addEventListener("change", load);
  $("f-state").addEventListener("change", load);
  $("f-clear").addEventListener("click", () => { $("filters").reset(); load(); });
  $("more").addEventListener("click", more);
  $("detail-close").addEventListener("click", () => {
    state.open = null;
    $("detail").hidden = true;
    for (const tr of $("rows").children) tr.classList.remove("selected");
    listen();
  });
  $("detail-cancel").addEventListener("click", () => { if (state.open) cancel(state.open); });
  load();
}

document.addEventListener("DOMContentLoaded", setup);
