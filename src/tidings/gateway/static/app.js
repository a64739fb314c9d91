// tidings dashboard: one EventSource on /v1/dashboard/stream, redraw on every snapshot.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "tidings-token";
let source = null;
let lastSnapshot = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  td.title = td.textContent;
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, empty, render) {
  const body = $(tableId).tBodies[0];
  const out = document.createDocumentFragment();
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(empty);
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    tr.appendChild(td);
    out.appendChild(tr);
  }
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const td of render(r)) tr.appendChild(td);
    out.appendChild(tr);
  }
  body.replaceChildren(out);
}

// A saga's step history as "create_order ✓ → reserve_credit ✗ ↩ create_order".
const MARKS = { StepCompleted: "✓", StepFailed: "✗", CompensationCompleted: "↩",
                CompensationFailed: "↩✗" };
function timeline(steps) {
  if (!Array.isArray(steps)) return "";
  return steps.filter((e) => e && e.name && MARKS[e.event])
    .map((e) => (e.event.startsWith("Compensation") ? MARKS[e.event] + " " + e.name
                                                   : e.name + " " + MARKS[e.event]))
    .join(" → ");
}

const num = (n) => (typeof n === "number" ? n.toLocaleString() : n);

function render(s) {
  lastSnapshot = s;
  fill("topics", s.topics, "no topics yet", (t) => {
    const tr = [cell(t.topic), cell(num(t.messages), "n"), cell(num(t.rate), "n"),
                cell(num(t.last_position), "n"), cell(num(t.bytes), "n")];
    tr[0].dataset.topic = t.topic;
    return tr;
  });
  fill("subscriptions", s.subscriptions, "no subscriptions yet", (x) => [
    cell(x.group), cell(x.pattern), cell(num(x.lag), "n" + (x.lag > 0 ? " lag" : "")),
    cell(num(x.pending), "n"), cell(num(x.in_flight), "n")]);
  fill("dead-letters", s.dead_letters, "none", (d) => {
    const td = document.createElement("td");
    if (d.messages > 0) {
      const b = document.createElement("button");
      b.textContent = "redrive";
      b.dataset.group = d.group;
      b.title = "move " + d.group + "'s dead letters back to their topics (each once)";
      b.addEventListener("click", () => redrive(d.group, b));
      td.appendChild(b);
    }
    return [cell(d.group), cell(num(d.messages), "n" + (d.messages > 0 ? " lag" : "")), td];
  });
  const total = $("dlq-total");
  total.textContent = num(s.dead_letter_total);
  total.className = "badge" + (s.dead_letter_total > 0 ? " bad" : "");

  // saga slot
  const sagas = s.sagas;
  const counts = $("saga-counts");
  counts.replaceChildren();
  if (sagas) {
    for (const [status, n] of Object.entries(sagas.by_status)) {
      const span = document.createElement("span");
      span.className = "st-" + status;
      span.textContent = status + ": " + n;
      counts.appendChild(span);
    }
  }
  fill("saga-list", sagas ? sagas.instances : [], "no saga instances", (x) => [
    cell(x.saga), cell(x.id || x.saga_id), cell(x.status, "st-" + x.status),
    cell(timeline(x.steps), "timeline")]);

  // recent requests slot
  fill("requests", s.requests, "no requests yet", (r) => [
    cell(r.request_id), cell(r.saga), cell(r.status, "st-" + r.status)]);

  // command form: the sagas this server can start
  const select = $("order-saga");
  const names = s.commands || [];
  if (select.dataset.names !== names.join(",")) {
    select.dataset.names = names.join(",");
    select.replaceChildren(...names.map((n) => {
      const o = document.createElement("option");
      o.value = o.textContent = n;
      return o;
    }));
    $("order-submit").disabled = !names.length;
    if (!names.length) $("order-result").textContent = "no saga registered yet";
    else if ($("order-result").textContent === "no saga registered yet")
      $("order-result").textContent = "";
  }
  $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
}

function setStatus(text, cls) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + cls;
}

async function connect() {
  if (source) source.close();
  // EventSource cannot send headers: probe once with fetch to learn whether a token is needed.
  const probe = await fetch("/v1/dashboard", { headers: authHeaders() }).catch(() => null);
  if (probe && probe.status === 401) {
    $("token-box").hidden = false;
    setStatus("token needed", "down");
    return;
  }
  $("token-box").hidden = true;
  if (probe && probe.ok) render(await probe.json());
  const q = token() ? "?access_token=" + encodeURIComponent(token()) : "";
  source = new EventSource("/v1/dashboard/stream" + q);
  source.addEventListener("snapshot", (e) => {
    setStatus("live", "live");
    render(JSON.parse(e.data));
  });
  source.onerror = () => setStatus("reconnecting…", "down");  // EventSource retries by itself
}

// POST /v1/dlq/{group}/redrive: every dead letter of the group back, each exactly once
// (asking again after a lost answer moves nothing twice).
async function redrive(group, button) {
  const result = $("dlq-result");
  button.disabled = true;
  try {
    const res = await fetch("/v1/dlq/" + encodeURIComponent(group) + "/redrive", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ all: true }),
    });
    const body = await res.json();
    result.textContent = res.ok ? "moved " + body.moved + " of " + group + " back"
                                : res.status + " " + body.error + ": " + body.detail;
    result.dataset.moved = res.ok ? String(body.moved) : "";
  } catch (e) {
    result.textContent = "redrive failed: " + e.message;
  } finally {
    button.disabled = false;
  }
}

async function startOrder(event) {
  event.preventDefault();
  const result = $("order-result");
  const saga = $("order-saga").value;
  let data;
  try {
    data = JSON.parse($("order-data").value);
  } catch (e) {
    result.textContent = "the data is not valid JSON: " + e.message;
    return;
  }
  const key = (crypto.randomUUID && crypto.randomUUID()) || String(Date.now() + Math.random());
  const res = await fetch("/v1/commands/" + encodeURIComponent(saga), {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json", "Idempotency-Key": key }),
    body: JSON.stringify(data),
  });
  const body = await res.json();
  if (res.status !== 202) {
    result.textContent = res.status + " " + body.error + ": " + body.detail;
    return;
  }
  const id = body.request_id;
  result.dataset.requestId = id;
  result.textContent = "request " + id + ": pending";
  const location = res.headers.get("Location") || "/v1/requests/" + id;
  for (let i = 0; i < 600; i++) {
    // ?wait: the server answers as soon as the request ends (no busy polling)
    const r = await fetch(location + "?wait=5", { headers: authHeaders() });
    if (r.ok) {
      const st = await r.json();
      result.textContent = "request " + id + ": " + st.status +
        (st.error ? " (" + JSON.stringify(st.error) + ")" : "");
      result.className = "st-" + st.status;
      result.dataset.status = st.status;
      if (["completed", "compensated", "failed"].includes(st.status)) return;
    } else {
      await new Promise((ok) => setTimeout(ok, 1000));
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    connect();
  });
  $("order-form").addEventListener("submit", startOrder);
  $("order-submit").disabled = true;
  connect();
});
