// tidings dashboard: one EventSource on /v1/dashboard/stream; the overview and the open
// page redraw on every snapshot. Pages live at #/saga/<name>/<id>, #/topic/<topic>,
// #/dlq/<group> and #/stream/<id> (pages.js); chart.js draws the charts.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "tidings-token";
const HISTORY_SECONDS = 600;
let source = null;
let lastSnapshot = null;
let points = [];  // chart points of the last minutes (snapshot.history), oldest first

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

// fetch a /v1 route as JSON; a non-2xx answer throws an Error saying what the server said
async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = authHeaders(Object.assign(o.body ? { "Content-Type": "application/json" } : {},
                                        o.headers || {}));
  const res = await fetch(path, o);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    if (res.status === 401) $("token-box").hidden = false;
    const detail = body ? body.error + ": " + body.detail : res.statusText;
    const err = new Error(res.status === 401
      ? "this server needs a token: enter it in the box above (" + detail + ")"
      : res.status + " " + detail);
    err.status = res.status;
    throw err;
  }
  return body;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  td.title = td.textContent;
  if (cls) td.className = cls;
  return td;
}

function link(text, href, cls) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (cls) a.className = cls;
  return a;
}

function linkCell(text, href, cls) {
  const td = document.createElement("td");
  td.appendChild(link(text, href));
  td.title = String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, empty, render) {
  const table = typeof tableId === "string" ? $(tableId) : tableId;
  const out = document.createDocumentFragment();
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(empty);
    td.colSpan = table.tHead.rows[0].cells.length;
    tr.appendChild(td);
    out.appendChild(tr);
  }
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const td of render(r, tr)) tr.appendChild(td);
    out.appendChild(tr);
  }
  table.tBodies[0].replaceChildren(out);
}

const href = {
  saga: (name, id) => "#/saga/" + encodeURIComponent(name) + "/" + encodeURIComponent(id),
  topic: (t) => "#/topic/" + encodeURIComponent(t),
  dlq: (g) => "#/dlq/" + encodeURIComponent(g),
  stream: (id) => "#/stream/" + encodeURIComponent(id),
};

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
const clock = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleTimeString() : "—");
function duration(s) {
  if (typeof s !== "number") return "—";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  return Math.round(s / 60) + " min";
}

// topic patterns as NATS reads them: '*' one token, '>' the rest
function matches(pattern, topic) {
  const p = pattern.split("."), t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return t.length > i;
    if (i >= t.length || (p[i] !== "*" && p[i] !== t[i])) return false;
  }
  return p.length === t.length;
}

// chart series from the points: per key of points[i][field], value / dt per second
function series(field, perSecond, keep, top) {
  const totals = {};
  for (const p of points)
    for (const [k, v] of Object.entries(p[field] || {})) if (keep(k)) totals[k] = (totals[k] || 0) + v;
  const names = Object.keys(totals).filter((k) => totals[k] > 0)
    .sort((a, b) => totals[b] - totals[a]).slice(0, top || 6);
  return names.map((name) => ({
    name, points: points.filter((p) => p.dt > 0 || !perSecond)
      .map((p) => [p.t, ((p[field] || {})[name] || 0) / (perSecond ? p.dt : 1)]),
  }));
}

// the time the charts cover: the last minutes, as far back as there are points (1 min at least)
function chartSpan() {
  const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const back = points.length ? now - points[0].t : 0;
  return { from: now - Math.min(HISTORY_SECONDS, Math.max(60, Math.ceil(back / 60) * 60)), to: now };
}

function drawCharts() {
  const span = chartSpan();
  const seconds = span.to - span.from;
  const visible = (k) => !k.startsWith("$");
  lineChart($("chart-published"), series("published", true, visible),
            Object.assign({ unit: "/s", empty: "nothing published lately" }, span));
  lineChart($("chart-delivered"), series("delivered", true, visible),
            Object.assign({ unit: "/s", empty: "nothing delivered lately" }, span));
  lineChart($("chart-lag"), series("lag", false, () => true),
            Object.assign({ empty: "no subscription lagged lately" }, span));
  // outcomes in 10 s bins, oldest left
  const bins = Math.round(seconds / 10), labels = [], done = [], comp = [], other = [];
  for (let i = 0; i < bins; i++) {
    const ago = seconds - i * 10;
    labels.push(i % 6 === 0 ? "−" + (ago % 60 ? ago + "s" : ago / 60 + "m") : "");
    done.push(0); comp.push(0); other.push(0);
  }
  for (const p of points) {
    const i = Math.min(bins - 1, Math.floor((p.t - span.from) / 10));
    if (i < 0 || i >= bins) continue;
    for (const [st, n] of Object.entries(p.outcomes || {})) {
      if (st === "completed") done[i] += n; else if (st === "compensated") comp[i] += n;
      else other[i] += n;
    }
  }
  barChart($("chart-outcomes"), [
    { name: "completed", values: done, color: "#1a7f37" },
    { name: "compensated", values: comp, color: "#cf222e" },
    { name: "other", values: other, color: "#6e7781" }],
    { labels, legend: true, empty: "no saga ended lately" });
  const bounds = (lastSnapshot && lastSnapshot.latency_buckets) || [];
  const counts = new Array(bounds.length + 1).fill(0);
  for (const p of points) (p.latency || []).forEach((n, i) => { counts[i] += n; });
  const label = (b) => (b < 1 ? "≤" + b * 1000 + "ms" : "≤" + b + "s");
  barChart($("chart-latency"), [{ name: "sagas", values: counts, color: "#0969da" }],
           { labels: [...bounds.map(label), ">" + bounds[bounds.length - 1] + "s"],
             empty: "no saga ended lately" });
}

function addHistory(more) {
  const last = points.length ? points[points.length - 1].t : -Infinity;
  for (const p of more || []) if (p.t > last) points.push(p);
  const from = (points.length ? points[points.length - 1].t : 0) - HISTORY_SECONDS;
  while (points.length && points[0].t < from) points.shift();
}

function renderOverview(s) {
  fill("topics", s.topics, "no topics yet", (t) => {
    const tr = [linkCell(t.topic, href.topic(t.topic)), cell(num(t.messages), "n"),
                cell(num(t.rate), "n"), cell(num(t.last_position), "n"), cell(num(t.bytes), "n")];
    tr[0].dataset.topic = t.topic;
    return tr;
  });
  fill("subscriptions", s.subscriptions, "no subscriptions yet", (x) => [
    linkCell(x.group, href.dlq(x.group)), linkCell(x.pattern, href.topic(x.pattern)),
    cell(num(x.lag), "n" + (x.lag > 0 ? " lag" : "")),
    cell(num(x.pending), "n"), cell(num(x.in_flight), "n")]);
  fill("dead-letters", s.dead_letters, "none", (d) => {
    const td = document.createElement("td");
    if (d.messages > 0) {
      const b = document.createElement("button");
      b.textContent = "redrive";
      b.dataset.group = d.group;
      b.title = "move " + d.group + "'s dead letters back to their topics (each once)";
      b.addEventListener("click", () => redrive(d.group, b, $("dlq-result")));
      td.appendChild(b);
    }
    return [linkCell(d.group, href.dlq(d.group)),
            cell(num(d.messages), "n" + (d.messages > 0 ? " lag" : "")), td];
  });
  const total = $("dlq-total");
  total.textContent = num(s.dead_letter_total);
  total.className = "badge" + (s.dead_letter_total > 0 ? " bad" : "");

  // saga slot: live counts, the newest instances first
  const sagas = s.sagas;
  const counts = $("saga-counts");
  counts.replaceChildren();
  if (sagas) {
    for (const [status, n] of Object.entries(sagas.by_status)) {
      const span = document.createElement("span");
      span.className = "st-" + status;
      span.dataset.status = status;
      span.textContent = status + ": " + num(n);
      counts.appendChild(span);
    }
  }
  fill("saga-list", sagas ? sagas.instances : [], "no saga instances", (x) => [
    cell(x.saga), linkCell(x.id || x.saga_id, href.saga(x.saga, x.id || x.saga_id)),
    cell(x.status, "st-" + x.status), cell(clock(x.started), "wide-only"),
    cell(timeline(x.steps), "timeline wide-only")]);

  // recent requests slot
  fill("requests", s.requests, "no requests yet", (r) => [
    linkCell(r.request_id, href.saga(r.saga, r.request_id)), cell(r.saga),
    cell(r.status, "st-" + r.status)]);

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
  if (!$("overview").hidden) drawCharts();
}

function render(s) {
  lastSnapshot = s;
  addHistory(s.history);
  renderOverview(s);
  if (current && current.onSnapshot) current.onSnapshot(s);
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
  if (current && current.load) current.load();
}

// POST /v1/dlq/{group}/redrive: the group's dead letters back (all, or those in `ids`), each
// exactly once (asking again after a lost answer moves nothing twice).
async function redrive(group, button, result, ids) {
  button.disabled = true;
  try {
    const body = await api("/v1/dlq/" + encodeURIComponent(group) + "/redrive", {
      method: "POST", body: JSON.stringify(ids ? { ids } : { all: true }) });
    result.textContent = "moved " + body.moved + " of " + group + " back";
    result.dataset.moved = String(body.moved);
    return body.moved;
  } catch (e) {
    result.textContent = "redrive failed: " + e.message;
    result.dataset.moved = "";
    return null;
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
  result.replaceChildren("request ", link(id, href.saga(saga, id)), ": pending");
  const location = res.headers.get("Location") || "/v1/requests/" + id;
  for (let i = 0; i < 600; i++) {
    // ?wait: the server answers as soon as the request ends (no busy polling)
    const r = await fetch(location + "?wait=5", { headers: authHeaders() });
    if (r.ok) {
      const st = await r.json();
      result.replaceChildren("request ", link(id, href.saga(saga, id)), ": " + st.status +
        (st.error ? " (" + JSON.stringify(st.error) + ")" : ""));
      result.className = "st-" + st.status;
      result.dataset.status = st.status;
      if (["completed", "compensated", "failed"].includes(st.status)) return;
    } else {
      await new Promise((ok) => setTimeout(ok, 1000));
    }
  }
}

// routing ---------------------------------------------------------------------------------
const PAGES = {};  // kind -> (args, el) => page {load?, onSnapshot?}; filled by pages.js
let current = null;

function crumbs(parts) {
  const nav = $("crumbs");
  nav.replaceChildren(link("overview", "#/"));
  for (const [text, h] of parts) {
    nav.appendChild(document.createTextNode(" › "));
    nav.appendChild(h ? link(text, h) : document.createTextNode(text));
  }
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p !== "");
  const make = PAGES[parts[0]];
  current = null;
  const page = $("page");
  if (!make) {
    page.hidden = true;
    page.replaceChildren();
    $("overview").hidden = false;
    crumbs([]);
    if (lastSnapshot) drawCharts();
    return;
  }
  $("overview").hidden = true;
  page.hidden = false;
  page.replaceChildren();
  let args;
  try {
    args = parts.slice(1).map(decodeURIComponent);
  } catch (e) {
    args = [];
  }
  current = make(args, page);
  window.scrollTo(0, 0);
  if (current && current.load) current.load();
  if (current && current.onSnapshot && lastSnapshot) current.onSnapshot(lastSnapshot);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    connect();
  });
  $("order-form").addEventListener("submit", startOrder);
  $("order-submit").disabled = true;
  $("stream-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("stream-id").value.trim();
    if (id) location.hash = href.stream(id);
  });
  window.addEventListener("hashchange", route);
  let resizing = null;  // the charts are drawn at their boxes' pixel widths: redraw
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      if (!$("overview").hidden && lastSnapshot) drawCharts();
      if (current && current.onResize) current.onResize();
    }, 50);
  });
  route();
  connect();
});
