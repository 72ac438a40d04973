// The build service's page: the same JSON API as curl uses. Data from the service is
// only ever put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let token = localStorage.getItem("atomToken") || "";
let selected = null;
let logAbort = null;

function setToken(t) {
  token = t.trim();
  localStorage.setItem("atomToken", token);
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let v = null;
  try { v = text ? JSON.parse(text) : null; } catch (_) { v = { message: text }; }
  if (!r.ok) throw new Error((v && v.message) || `${r.status} ${r.statusText}`);
  return v;
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function what(o) {
  const r = o.request || {};
  const base = r.template ? r.template : "recipe";
  const set = (r.set || []).join(", ");
  return set ? `${base} (${set})` : base;
}

function stage(o) {
  const b = o.build;
  if (!b.stage_index) return "";
  return `${b.stage_index}/${b.stages} ${b.stage || ""}`;
}

function readyIn(o) {
  if (!o.eta || ["succeeded", "failed", "cancelled", "expired"].includes(o.state)) return "";
  const s = o.eta.ready_in_seconds;
  return s >= 120 ? `${Math.round(s / 60)} min` : `${s} s`;
}

async function loadTemplates() {
  const v = await api("GET", "/v1/templates");
  const sel = $("template");
  sel.replaceChildren(...v.templates.map((t) => { const o = el("option", t); o.value = t; return o; }));
}

async function refreshList() {
  const v = await api("GET", "/v1/orders");
  const rows = v.orders.map((o) => {
    const tr = el("tr");
    tr.dataset.id = o.id;
    const a = el("a", o.id);
    a.href = `#order=${o.id}`;
    const id = el("td");
    id.append(a);
    tr.append(id, el("td", what(o)), el("td", o.state, `state ${o.state}`), el("td", stage(o)),
      el("td", o.queue_position || ""), el("td", readyIn(o)), el("td", (o.created || "").replace("T", " ")));
    if (o.id === selected) tr.className = "selected";
    return tr;
  });
  $("orders").tBodies[0].replaceChildren(...rows);
}

function showOrder(o) {
  $("detail").hidden = false;
  $("d-id").textContent = o.id;
  $("d-state").textContent = o.state;
  $("d-state").className = `state ${o.state}`;
  const b = o.build;
  $("d-progress").max = b.stages;
  $("d-progress").value = o.state === "succeeded" ? b.stages : b.stage_index || 0;
  $("d-stage").textContent = b.stage_index ? `stage ${stage(o)}` : "";
  const eta = readyIn(o);
  $("d-eta").textContent = o.queue_position ? `queued, position ${o.queue_position}${eta ? `, ready in about ${eta}` : ""}`
    : eta ? `· ready in about ${eta}` : "";
  $("d-error").textContent = b.error && o.state !== "succeeded" ? b.error : "";
  $("d-expires").textContent = o.pinned ? "pinned: kept until unpinned" : o.expires_at ? `files removed after ${o.expires_at}` : "";
  $("d-pin").textContent = o.pinned ? "Unpin" : "Pin";
  $("d-cancel").disabled = !["queued", "running"].includes(o.state);
  const items = (o.artifacts || []).map((art) => {
    const li = el("li");
    const a = el("a", art.name);
    a.href = art.url;
    a.setAttribute("download", art.name);
    li.append(a, el("span", ` ${art.size} bytes, sha256 ${art.sha256}`, "sha"));
    return li;
  });
  $("d-artifacts").replaceChildren(...items);
}

async function followLog(id) {
  if (logAbort) logAbort.abort();
  logAbort = new AbortController();
  const pre = $("d-log");
  pre.textContent = "";
  try {
    const r = await fetch(`/v1/orders/${encodeURIComponent(id)}/log?follow=1`,
      { headers: { Authorization: `Bearer ${token}` }, signal: logAbort.signal });
    if (!r.ok) { pre.textContent = `(no log: ${r.status})`; return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(decoder.decode(value, { stream: true }));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    pre.dataset.ended = "1";
  } catch (e) {
    if (e.name !== "AbortError") pre.append(`\n(log interrupted: ${e.message})`);
  }
}

async function select(id) {
  selected = id;
  $("d-log").dataset.ended = "";
  try {
    showOrder(await api("GET", `/v1/orders/${encodeURIComponent(id)}`));
    followLog(id);
  } catch (e) {
    $("detail").hidden = true;
    say(`order ${id}: ${e.message}`, true);
  }
}

async function tick() {
  if (!token) return;
  try {
    await refreshList();
    if (selected) showOrder(await api("GET", `/v1/orders/${encodeURIComponent(selected)}`));
  } catch (e) {
    say(e.message, true);
  }
}

function fromHash() {
  const m = location.hash.match(/^#order=([0-9a-f]+)$/);
  if (m && m[1] !== selected) select(m[1]);
}

async function order(ev) {
  ev.preventDefault();
  const body = { template: $("template").value };
  const set = $("set").value.split("\n").map((l) => l.trim()).filter((l) => l);
  const version = $("version").value.trim();
  if (version) set.unshift(`os.version=${JSON.stringify(version)}`);
  if (set.length) body.set = set;
  const formats = $("formats").value.split(/[\s,]+/).filter((f) => f);
  if (formats.length) body.formats = formats;
  const email = $("email").value.trim();
  if (email) body.notify = { email };
  try {
    const o = await api("POST", "/v1/orders", body);
    say(o.shared ? `order ${o.id}: shares a build already there` : `order ${o.id} queued`);
    location.hash = `order=${o.id}`;
    await refreshList();
  } catch (e) {
    say(`not ordered: ${e.message}`, true);
  }
}

async function start() {
  if (!token) { say("give your token (atom-build token add NAME prints one)"); return; }
  setToken(token);
  try {
    // Downloads are plain links: the service sets an HttpOnly cookie good for them only.
    await api("POST", "/v1/session");
    await loadTemplates();
    say("");
  } catch (e) {
    say(e.message, true);
    return;
  }
  await tick();
  fromHash();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token;
  $("token-form").addEventListener("submit", (ev) => { ev.preventDefault(); setToken($("token").value); start(); });
  $("order-form").addEventListener("submit", order);
  $("d-cancel").addEventListener("click", async () => {
    try { await api("POST", `/v1/orders/${selected}/cancel`); await tick(); } catch (e) { say(e.message, true); }
  });
  $("d-pin").addEventListener("click", async () => {
    const pinned = $("d-pin").textContent === "Unpin";
    try { await api(pinned ? "DELETE" : "POST", `/v1/orders/${selected}/pin`); await tick(); } catch (e) { say(e.message, true); }
  });
  window.addEventListener("hashchange", fromHash);
  setInterval(tick, 1500);
  start();
});
