// tidings charts: small SVG line and bar charts, no dependencies.
//   lineChart(el, series, {from, to, unit})   series: [{name, points: [[t, y], ...]}]
//   barChart(el, bars, {labels, unit})        bars: [{name, cls?, values: [...]}] (stacked)
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#0969da", "#1a7f37", "#bf3989", "#9a6700", "#8250df", "#cf222e",
                 "#1b7c83", "#6e7781"];
const H = 150, PAD = { l: 44, r: 8, t: 8, b: 22 };
// drawn at the box's own pixel width, so text stays legible on a phone and on a desktop
const widthOf = (el) => Math.max(240, Math.round(el.clientWidth || 600));

function svgEl(name, attrs, text) {
  const e = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

const fmt = (v) => (v >= 100 || Number.isInteger(v) ? Math.round(v).toLocaleString()
                                                     : v.toFixed(v >= 10 ? 1 : 2));

function frame(W, ymax, unit) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart",
                             role: "img" });
  for (const f of [0, 0.5, 1]) {
    const y = PAD.t + (1 - f) * (H - PAD.t - PAD.b);
    svg.appendChild(svgEl("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, class: "grid" }));
    svg.appendChild(svgEl("text", { x: PAD.l - 4, y: y + 4, class: "tick", "text-anchor": "end" },
                          fmt(ymax * f) + (f === 1 && unit ? " " + unit : "")));
  }
  return svg;
}

function legend(el, names) {
  const div = document.createElement("div");
  div.className = "legend";
  names.forEach(([name, color]) => {
    const s = document.createElement("span");
    s.innerHTML = '<i style="background:' + color + '"></i>';
    s.appendChild(document.createTextNode(name));
    div.appendChild(s);
  });
  el.appendChild(div);
}

function empty(el, text) {
  const p = document.createElement("p");
  p.className = "muted chart-empty";
  p.textContent = text;
  el.appendChild(p);
}

// Lines over time: x from `from` to `to` (seconds), y from 0 to the largest value.
function lineChart(el, series, opts) {
  const W = widthOf(el);
  el.replaceChildren();
  const o = opts || {};
  const shown = series.filter((s) => s.points.length);
  if (!shown.length) return empty(el, o.empty || "nothing yet");
  const ymax = niceMax(Math.max(...shown.flatMap((s) => s.points.map((p) => p[1]))));
  const from = o.from, to = Math.max(o.to, from + 1);
  const x = (t) => PAD.l + ((t - from) / (to - from)) * (W - PAD.l - PAD.r);
  const y = (v) => PAD.t + (1 - v / ymax) * (H - PAD.t - PAD.b);
  const svg = frame(W, ymax, o.unit);
  const back = to - from;
  svg.appendChild(svgEl("text", { x: PAD.l, y: H - 6, class: "tick" },
                        "−" + (back < 120 ? Math.round(back) + " s" : Math.round(back / 60) + " min")));
  svg.appendChild(svgEl("text", { x: W - PAD.r, y: H - 6, class: "tick", "text-anchor": "end" },
                        "now"));
  shown.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const pts = s.points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    const line = svgEl("polyline", { points: pts, fill: "none", stroke: color,
                                     "stroke-width": 1.6, "data-series": s.name });
    line.appendChild(svgEl("title", {}, s.name));
    svg.appendChild(line);
    const [lt, lv] = s.points[s.points.length - 1];
    svg.appendChild(svgEl("circle", { cx: x(lt), cy: y(lv), r: 2.5, fill: color }));
  });
  el.appendChild(svg);
  legend(el, shown.map((s, i) => [s.name, PALETTE[i % PALETTE.length]]));
}

// Bars, stacked: bars[k].values[i] is series k's part of bar i (labels[i] under it).
function barChart(el, bars, opts) {
  const W = widthOf(el);
  el.replaceChildren();
  const o = opts || {};
  const n = o.labels.length;
  const totals = o.labels.map((_, i) => bars.reduce((a, b) => a + (b.values[i] || 0), 0));
  if (!totals.some((v) => v > 0)) return empty(el, o.empty || "nothing yet");
  const ymax = niceMax(Math.max(...totals));
  const slot = (W - PAD.l - PAD.r) / n;
  const h = (v) => (v / ymax) * (H - PAD.t - PAD.b);
  const svg = frame(W, ymax, o.unit);
  const every = Math.ceil(n / Math.max(2, Math.floor(W / 70)));
  for (let i = 0; i < n; i++) {
    let top = H - PAD.b;
    bars.forEach((b, k) => {
      const v = b.values[i] || 0;
      if (!v) return;
      const r = svgEl("rect", { x: PAD.l + i * slot + 1, y: top - h(v), width: Math.max(1, slot - 2),
                                height: h(v), fill: b.color || PALETTE[k % PALETTE.length] });
      r.appendChild(svgEl("title", {}, o.labels[i] + ": " + v + " " + b.name));
      svg.appendChild(r);
      top -= h(v);
    });
    if (i % every === 0 && o.labels[i])
      svg.appendChild(svgEl("text", { x: PAD.l + (i + 0.5) * slot, y: H - 6, class: "tick",
                                      "text-anchor": "middle" }, o.labels[i]));
  }
  el.appendChild(svg);
  if (bars.length > 1 || o.legend)
    legend(el, bars.map((b, k) => [b.name, b.color || PALETTE[k % PALETTE.length]]));
}
