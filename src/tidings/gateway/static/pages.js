// tidings dashboard pages: a saga, a topic, a group's dead letters, an event stream.
// Each is `PAGES[kind](args, el)` returning {load, onSnapshot}: load fetches what the page
// shows, onSnapshot (every snapshot of the SSE stream) reloads it when it changed.
"use strict";

// h("div", {class: "x"}, child, "text", ...): a DOM element
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return e;
}

// JSON, pretty: on one line when it is short, indented when not
function pretty(v) {
  if (v === undefined) return h("pre", { class: "json" }, "—");
  const flat = JSON.stringify(v, null, 1).replace(/\n\s*/g, " ");
  return h("pre", { class: "json" }, flat.length <= 72 ? flat : JSON.stringify(v, null, 2));
}
// el.replaceChildren, leaving out what is null or false
const put = (el, ...children) => el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
const enc = encodeURIComponent;
const lastPosition = (s, pattern) => Math.max(0, ...s.topics.filter((t) => matches(pattern, t.topic))
  .map((t) => t.last_position || 0));
const globalPosition = (s) => Math.max(0, ...s.topics.map((t) => t.last_position || 0));

function failure(el, e) {
  el.replaceChildren(h("p", { class: "error", "data-testid": "page-error" }, e.message));
}

// The message as a block: position, time, key, id; its data pretty; its headers folded.
function messageBlock(m, extra) {
  const data = m.data !== undefined ? pretty(m.data)
    : h("pre", { class: "json" }, "(binary, base64) " + (m.data_b64 || ""));
  const stream = m.headers && m.headers["stream-id"];
  return h("article", { class: "msg", "data-position": m.position },
    h("div", { class: "msg-head" },
      h("b", {}, "#" + m.position), " ", new Date(m.time).toLocaleString(),
      m.key ? h("span", { class: "muted" }, " key " + m.key) : null,
      h("span", { class: "muted" }, " id " + m.id),
      m.topic ? h("span", {}, " on ", link(m.topic, href.topic(m.topic))) : null,
      stream ? h("span", {}, " stream ", link(stream, href.stream(stream))) : null,
      extra || null),
    data,
    h("details", {}, h("summary", {}, Object.keys(m.headers || {}).length + " headers"),
      pretty(m.headers)));
}

// saga ------------------------------------------------------------------------------------
const ENDED = new Set(["completed", "compensated"]);
const OUTCOME_COLOR = { ok: "#1a7f37", failed: "#cf222e", rejected: "#cf222e", running: "#9a6700" };

function gantt(s, box) {
  const rows = s.timeline || [];
  const t0 = s.started || (rows[0] && rows[0].started) || 0;
  const end = s.finished || Math.max(Date.now() / 1000, ...rows.map((r) => r.finished || r.started));
  const span = Math.max(end - t0, 1e-3);
  const W = Math.max(280, Math.min(900, Math.round((box.clientWidth || 600) - 34)));
  const L = Math.min(150, Math.round(W * 0.32)), R = 60, ROW = 22;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${rows.length * ROW + 20}`, width: W,
                             height: rows.length * ROW + 20, class: "chart gantt",
                             role: "img", "data-testid": "saga-gantt" });
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  rows.forEach((r, i) => {
    const y = i * ROW + 4;
    svg.appendChild(svgEl("text", { x: L - 6, y: y + 13, class: "tick", "text-anchor": "end" },
                          (r.kind === "compensation" ? "↩ " : "") + r.name));
    for (const a of r.attempts) {
      const a1 = a.finished || end;
      const rect = svgEl("rect", { x: x(a.started), y, height: ROW - 8, rx: 2,
        width: Math.max(2, x(a1) - x(a.started)),
        fill: OUTCOME_COLOR[a.outcome] || "#6e7781",
        class: "attempt " + a.outcome + (r.kind === "compensation" ? " comp" : "") });
      rect.appendChild(svgEl("title", {}, r.name + " attempt " + a.attempt + ": " + a.outcome +
                                          " in " + duration(a.duration)));
      svg.appendChild(rect);
    }
    svg.appendChild(svgEl("text", { x: x(r.finished || end) + 4, y: y + 13, class: "tick" },
                          duration(r.duration)));
  });
  svg.appendChild(svgEl("text", { x: L, y: rows.length * ROW + 16, class: "tick" }, "0"));
  svg.appendChild(svgEl("text", { x: W - R, y: rows.length * ROW + 16, class: "tick",
                                  "text-anchor": "end" }, duration(span)));
  return svg;
}

PAGES.saga = ([name, id], el) => {
  crumbs([["saga " + (name || "?"), null], [id || "?", null]]);
  let last = null, loading = false;
  const said = { text: "", error: false };  // what the last action answered (kept on redraws)
  const head = h("section", { class: "card wide" }, h("p", { class: "muted" }, "loading…"));
  const body = h("section", { class: "card wide" });
  el.append(head, body);

  async function act(action, button) {
    button.disabled = true;
    try {
      const opts = { method: "POST" };
      if (action === "cancel") opts.body = JSON.stringify({ reason: "cancelled from the dashboard" });
      const s = await api("/v1/sagas/" + enc(id) + "/" + action, opts);
      Object.assign(said, { text: action + " requested: the saga is " + s.status, error: false });
    } catch (e) {
      Object.assign(said, { text: action + " failed: " + e.message, error: true });
    } finally {
      button.disabled = false;
    }
    if (last) draw(last);
    load();
  }

  function draw(s) {
    const result = h("span", { class: said.error ? "note error" : "note",
                               "data-testid": "saga-action-result" }, said.text);
    const actions = [];
    if (s.status === "running")
      actions.push(h("button", { "data-testid": "saga-cancel", title: "stop it and compensate",
        onclick: (e) => act("cancel", e.target) }, "cancel"));
    if (s.status === "stuck")
      actions.push(h("button", { "data-testid": "saga-retry", title: "try the failed step again",
        onclick: (e) => act("retry", e.target) }, "retry"));
    const took = s.finished ? s.finished - s.started : null;
    put(head,
      h("h2", {}, s.saga + " ", h("code", {}, s.id), " ",
        h("span", { class: "badge st-" + s.status, "data-testid": "saga-status" }, s.status)),
      h("p", {}, "started " + clock(s.started),
        s.finished ? " · ended " + clock(s.finished) + " · took " + duration(took) : " · not ended"),
      s.reason ? h("p", { "data-testid": "saga-reason" }, "why it compensated: " + s.reason) : null,
      s.error ? h("p", { class: "error" }, "stuck: " + s.error) : null,
      h("p", {}, ...actions, " ", result, " ",
        link("its event stream", href.stream("saga-" + s.saga + "-" + s.id))),
      h("details", {}, h("summary", {}, "data"), pretty(s.data)));
    if (!s.timeline) {
      body.replaceChildren(h("h2", {}, "History"), pretty(s.steps));
      return;
    }
    const table = h("table", { "data-testid": "saga-steps" },
      h("thead", {}, h("tr", {}, ["step", "command", "status", "start", "duration", "attempts"]
        .map((c) => h("th", { class: { command: "wide-only", start: "n wide-only", duration: "n",
                                       attempts: "n wide-only" }[c] || null }, c)))),
      h("tbody"));
    for (const r of s.timeline) {
      table.tBodies[0].appendChild(h("tr", { class: "step-row", dataset: { step: r.name, kind: r.kind } },
        h("td", {}, (r.kind === "compensation" ? "↩ " : "") + r.name),
        h("td", { class: "wide-only" }, r.command ? link(r.command, href.topic(r.command)) : "local"),
        h("td", { class: "st-" + r.status }, r.status),
        h("td", { class: "n wide-only" }, "+" + duration(r.started - s.started)),
        h("td", { class: "n duration" }, duration(r.duration)),
        h("td", { class: "n wide-only" }, String(r.attempts.length))));
      const details = r.attempts.map((a) => h("details", { class: "attempt" },
        h("summary", {}, "attempt " + a.attempt + " · " + a.outcome + " · " + duration(a.duration) +
          (a.inline ? " · inline" : "")),
        h("div", { class: "pair" },
          h("div", {}, h("h3", {}, "command" + (a.command ? " on " + a.command.topic : "")),
            pretty(a.command ? a.command.data : null)),
          h("div", {}, h("h3", {}, a.error ? "error" : "reply"),
            a.error ? h("pre", { class: "json error" }, a.error) : pretty(a.reply)))));
      const td = h("td", { colspan: 6, class: "details" }, ...details);
      table.tBodies[0].appendChild(h("tr", { class: "detail-row" }, td));
    }
    body.replaceChildren(h("h2", {}, "Timeline"), gantt(s, body), table);
  }

  async function load() {
    if (loading || !id) return;
    loading = true;
    try {
      last = await api("/v1/sagas/" + enc(id) + "/timeline");
      draw(last);
    } catch (e) {
      failure(head, e);
    } finally {
      loading = false;
    }
  }
  return { load, onSnapshot() { if (last && !ENDED.has(last.status)) load(); },
           onResize() { if (last) draw(last); } };
};

// topic -----------------------------------------------------------------------------------
PAGES.topic = ([topic], el) => {
  crumbs([["topic " + (topic || "?"), null]]);
  const PAGE = 20;
  let query = { order: "newest" }, back = [], seen = -1, loading = false;
  const info = h("p", { class: "muted", "data-testid": "topic-info" });
  const chart = h("div", { class: "chart-box", "data-testid": "topic-chart" });
  const subs = h("table", { "data-testid": "topic-subscriptions" },
    h("thead", {}, h("tr", {}, h("th", {}, "group"), h("th", {}, "pattern"),
      h("th", { class: "n" }, "lag"), h("th", { class: "n" }, "in flight"))), h("tbody"));
  const list = h("div", { class: "msgs", "data-testid": "topic-messages" });
  const where = h("span", { class: "muted", "data-testid": "topic-page" });
  const newer = h("button", { "data-testid": "topic-newer", onclick: () => {
    query = back.pop() || { order: "newest" }; load(); } }, "← newer");
  const older = h("button", { "data-testid": "topic-older", onclick: () => {
    back.push(query);
    query = query.order === "newest" ? { order: "newest", before: older.dataset.cursor }
                                     : { order: "oldest", after: older.dataset.cursor };
    load(); } }, "older →");
  const fromPos = h("input", { type: "number", min: 1, placeholder: "position", "data-testid": "replay-position" });
  const fromTime = h("input", { type: "datetime-local", step: 1, "data-testid": "replay-time" });
  const replay = h("form", { class: "inline", onsubmit: (e) => {
    e.preventDefault();
    back = [];
    if (fromPos.value) query = { order: "oldest", after: Math.max(0, Number(fromPos.value) - 1) };
    else if (fromTime.value) query = { order: "oldest", since: new Date(fromTime.value).getTime() / 1000 };
    else query = { order: "newest" };
    load();
  } }, h("label", {}, "replay from ", fromPos), h("label", {}, " or ", fromTime),
    h("button", { type: "submit" }, "replay"),
    h("button", { type: "button", onclick: () => { back = []; query = { order: "newest" }; load(); } }, "newest"));
  el.append(
    h("section", { class: "card wide" }, h("h2", {}, "Topic ", h("code", {}, topic)), info,
      h("figure", {}, h("figcaption", {}, "published and delivered /s"), chart)),
    h("section", { class: "card wide" }, h("h2", {}, "Subscriptions on it"), subs),
    h("section", { class: "card wide" }, h("h2", {}, "Messages"), replay,
      h("div", { class: "pager" }, newer, older, where), list));

  async function load() {
    if (loading) return;
    loading = true;
    try {
      const q = new URLSearchParams(Object.assign({ limit: PAGE }, query));
      const page = await api("/v1/topics/" + enc(topic) + "/history?" + q);
      put(list, ...(page.messages.length ? page.messages.map((m) => messageBlock(m))
        : [h("p", { class: "muted" }, "no messages here")]));
      const cursor = page.order === "newest" ? page.next_before : page.next_after;
      older.disabled = cursor === null;
      older.dataset.cursor = cursor === null ? "" : String(cursor);
      older.textContent = page.order === "newest" ? "older →" : "next →";
      newer.disabled = !back.length;
      const ps = page.messages.map((m) => m.position);
      where.textContent = ps.length ? "positions " + Math.min(...ps) + "–" + Math.max(...ps) +
        (page.order === "oldest" ? " (replay, oldest first)" : " (newest first)") : "";
    } catch (e) {
      failure(list, e);
    } finally {
      loading = false;
    }
  }

  function onSnapshot(s) {
    const mine = s.topics.filter((t) => matches(topic, t.topic));
    const count = mine.reduce((a, t) => a + t.messages, 0);
    const lastPos = lastPosition(s, topic);
    info.textContent = num(count) + " messages · last position " + num(lastPos);
    const value = (field) => points.filter((p) => p.dt > 0).map((p) => [p.t,
      Object.entries(p[field] || {}).filter(([t]) => matches(topic, t)).reduce((a, [, v]) => a + v, 0) / p.dt]);
    lineChart(chart, [{ name: "published", points: value("published") },
                      { name: "delivered", points: value("delivered") }],
              Object.assign({ unit: "/s", empty: "nothing lately" }, chartSpan()));
    fill(subs, s.subscriptions.filter((x) => mine.some((t) => matches(x.pattern, t.topic)) ||
                                             x.pattern === topic),
         "no subscription on it", (x) => [linkCell(x.group, href.dlq(x.group)), cell(x.pattern),
           cell(num(x.lag), "n" + (x.lag > 0 ? " lag" : "")), cell(num(x.in_flight), "n")]);
    // live: the first page of the newest follows what is published
    if (lastPos !== seen) {
      seen = lastPos;
      if (query.order === "newest" && !query.before) load();
    }
  }
  return { load, onSnapshot, onResize() { if (lastSnapshot) onSnapshot(lastSnapshot); } };
};

// dead letters ------------------------------------------------------------------------------
PAGES.dlq = ([group], el) => {
  crumbs([["dead letters of " + (group || "?"), null]]);
  let seen = null, loading = false;
  const info = h("p", { class: "muted", "data-testid": "dlq-info" });
  const result = h("p", { class: "note", "data-testid": "dlq-page-result" });
  const all = h("button", { "data-testid": "redrive-all", onclick: async () => {
    await redrive(group, all, result);
    load();
  } }, "redrive all");
  const subs = h("table", { "data-testid": "dlq-subscriptions" },
    h("thead", {}, h("tr", {}, h("th", {}, "pattern"), h("th", { class: "n" }, "lag"),
      h("th", { class: "n" }, "pending"), h("th", { class: "n" }, "in flight"))), h("tbody"));
  const list = h("div", { class: "msgs", "data-testid": "dlq-messages" });
  el.append(
    h("section", { class: "card wide" }, h("h2", {}, "Dead letters of ", h("code", {}, group)),
      info, h("p", {}, all, " ", result),
      h("h3", {}, "its subscriptions (redriven messages are delivered to them again)"), subs),
    h("section", { class: "card wide" }, h("h2", {}, "Newest first"), list));

  async function load() {
    if (loading) return;
    loading = true;
    try {
      const base = "/v1/dlq/" + enc(group) + "?limit=1000";
      const [every, waiting] = await Promise.all([api(base + "&redriven=true"), api(base)]);
      const open = new Set(waiting.dead_letters.map((d) => d.id));
      const rows = every.dead_letters.slice().reverse();
      all.disabled = !open.size;
      put(list, ...(rows.length ? rows.map((d) => {
        const state = open.has(d.id) ? "waiting" : "redriven";
        const one = h("button", { onclick: async () => { await redrive(group, one, result, [d.id]); load(); } },
                      "redrive");
        const block = messageBlock(d, h("span", { class: "badge " + (state === "waiting" ? "bad" : "ok"),
                                                 "data-testid": "dlq-state" }, state));
        block.classList.add("dead");
        block.dataset.state = state;
        block.insertBefore(h("p", { class: "why" },
          "from ", d.original_topic ? link(d.original_topic, href.topic(d.original_topic)) : "?",
          " · reason " + (d.reason || "—") + " · attempts " + (d.attempts ?? "—") +
          (d.error ? " · error " + d.error : ""), " ", state === "waiting" ? one : null),
          block.children[1]);
        return block;
      }) : [h("p", { class: "muted" }, "no dead letters")]));
    } catch (e) {
      failure(list, e);
    } finally {
      loading = false;
    }
  }

  function onSnapshot(s) {
    const d = s.dead_letters.find((x) => x.group === group);
    const waiting = d ? d.messages : 0;
    info.textContent = num(waiting) + " waiting";
    fill(subs, s.subscriptions.filter((x) => x.group === group), "no subscription named " + group,
         (x) => [linkCell(x.pattern, href.topic(x.pattern)), cell(num(x.lag), "n" + (x.lag > 0 ? " lag" : "")),
                 cell(num(x.pending), "n"), cell(num(x.in_flight), "n")]);
    if (seen !== null && seen !== waiting) load();
    seen = waiting;
  }
  return { load, onSnapshot };
};

// event stream ------------------------------------------------------------------------------
PAGES.stream = ([id], el) => {
  crumbs([["stream " + (id || "?"), null]]);
  let query = {}, seen = -1, loading = false;
  const version = h("input", { type: "number", min: 1, "data-testid": "stream-version" });
  const slider = h("input", { type: "range", min: 1, value: 1, "data-testid": "stream-slider",
    oninput: () => { version.value = slider.value; }, onchange: () => { query = { version: slider.value }; load(); } });
  const when = h("input", { type: "datetime-local", step: 1, "data-testid": "stream-time" });
  const form = h("form", { class: "inline", onsubmit: (e) => {
    e.preventDefault();
    query = {};
    if (version.value) query.version = version.value;
    if (when.value) query.as_of = new Date(when.value).getTime() / 1000;
    load();
  } }, h("label", {}, "at version ", version), slider, h("label", {}, " or time ", when),
    h("button", { type: "submit" }, "show"),
    h("button", { type: "button", onclick: () => { query = {}; version.value = ""; when.value = ""; load(); } },
      "latest"));
  const head = h("p", { "data-testid": "stream-info" });
  const stateBox = h("div", { "data-testid": "stream-state" });
  const list = h("div", { class: "msgs", "data-testid": "stream-events" });
  el.append(
    h("section", { class: "card wide" }, h("h2", {}, "Event stream ", h("code", {}, id)), form, head,
      h("h3", {}, "state"), stateBox),
    h("section", { class: "card wide" }, h("h2", {}, "Events up to that point, newest first"), list));

  async function load() {
    if (loading) return;
    loading = true;
    try {
      const s = await api("/v1/streams/" + enc(id) + "/state?" + new URLSearchParams(query));
      head.textContent = "version " + s.version + " of " + s.current_version +
        (s.aggregate ? " · aggregate " + s.aggregate : "");
      head.dataset.version = String(s.version);
      slider.max = String(s.current_version);
      slider.value = String(s.version || 1);
      put(stateBox, s.state ? pretty(s.state) : h("p", { class: "muted" }, s.note || ""));
      put(list, ...s.events.map((ev) => h("article", { class: "msg", "data-version": ev.version },
        h("div", { class: "msg-head" },
          h("a", { href: "#", onclick: (e) => { e.preventDefault(); query = { version: ev.version };
                                                version.value = ev.version; load(); } }, "v" + ev.version),
          " ", h("b", {}, ev.type), " ", new Date(ev.time).toLocaleString(),
          h("span", { class: "muted" }, " position " + ev.position)),
        pretty(ev.data))),
        s.more ? h("p", { class: "muted" }, "older events not shown") : null);
    } catch (e) {
      failure(stateBox, e);
    } finally {
      loading = false;
    }
  }
  return { load, onSnapshot(s) {
    const p = globalPosition(s);
    if (p !== seen) { seen = p; if (!query.version && !query.as_of) load(); }
  } };
};
