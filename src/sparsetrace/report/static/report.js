/* sparsetrace report: a dependency-free single-page viewer for run folders.
 *
 * Data comes from data/report-data.js (window.SPARSETRACE_DATA) and from data files injected as
 * <script> elements on demand (they call SPARSETRACE_LOAD(key, value)). No fetch/XHR is used, so the
 * report works from file:// as well as over http. All user-provided text is inserted with
 * textContent / setAttribute, never as HTML.
 */
(function () {
  "use strict";

  const DATA = window.SPARSETRACE_DATA || { runs: [] };
  const RUNS = Array.isArray(DATA.runs) ? DATA.runs : [];
  const SVGNS = "http" + "://www.w3.org/2000/svg"; // XML namespace identifier, not a network address
  const PALETTE = ["#3266ad", "#e07b39", "#3b9e6e", "#b8456b", "#7d5fb2", "#9a7b2f", "#2b9bb0", "#6b6b6b"];

  /* ------------------------------------------------------------------ data loading */
  const store = Object.create(null);
  const inflight = Object.create(null);
  window.SPARSETRACE_LOAD = function (key, value) {
    store[key] = value;
  };

  function loadData(key, src) {
    if (key in store) return Promise.resolve(store[key]);
    if (inflight[key]) return inflight[key];
    inflight[key] = new Promise(function (resolve, reject) {
      const el = document.createElement("script");
      el.src = src;
      el.async = true;
      el.onload = function () {
        if (key in store) resolve(store[key]);
        else reject(new Error("data file " + src + " did not provide " + key));
      };
      el.onerror = function () {
        delete inflight[key];
        reject(new Error("could not load " + src));
      };
      document.head.appendChild(el);
    });
    return inflight[key];
  }

  /* ------------------------------------------------------------------ DOM helpers */
  function setAttrs(el, attrs, isSvg) {
    if (!attrs) return;
    for (const k of Object.keys(attrs)) {
      const v = attrs[k];
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = String(v);
      else if (k === "class") {
        if (isSvg) el.setAttribute("class", v);
        else el.className = v;
      } else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.slice(0, 2) === "on" && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) appendAll(el, c);
      else el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs, false);
    return appendAll(el, children);
  }

  function sv(tag, attrs, ...children) {
    const el = document.createElementNS(SVGNS, tag);
    setAttrs(el, attrs, true);
    return appendAll(el, children);
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  /* ------------------------------------------------------------------ formatting */
  function isNum(v) {
    return typeof v === "number" && isFinite(v);
  }

  function fmt(v, digits) {
    if (!isNum(v)) return "—";
    const d = digits || 4;
    if (Number.isInteger(v) && Math.abs(v) < 1e7) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e7 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(d)));
  }

  function fmtPct(v) {
    return isNum(v) ? (v * 100).toFixed(v !== 0 && Math.abs(v) < 0.001 ? 3 : 1) + "%" : "—";
  }

  function fmtCompact(v) {
    if (!isNum(v)) return "—";
    const a = Math.abs(v);
    if (a >= 1e9) return Number((v / 1e9).toPrecision(3)) + "B";
    if (a >= 1e6) return Number((v / 1e6).toPrecision(3)) + "M";
    if (a >= 1e4) return Number((v / 1e3).toPrecision(3)) + "k";
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function showTok(t) {
    if (t === null || t === undefined) return "";
    const s = String(t).replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "");
    return s === "" ? "∅" : s;
  }

  function truncate(s, n) {
    s = String(s);
    return s.length > n ? s.slice(0, Math.max(1, n - 1)) + "…" : s;
  }

  function verdictBadge(v) {
    if (!v) return h("span", { class: "badge badge-none", text: "no verdict" });
    return h("span", { class: "badge badge-" + String(v).replace(/[^a-z]/gi, ""), text: String(v) });
  }

  function section(title, ...children) {
    return h("section", { class: "card" }, h("h2", { text: title }), ...children);
  }

  function note(text, cls) {
    return h("p", { class: "muted " + (cls || ""), text: text });
  }

  /* ------------------------------------------------------------------ charts */
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) {
      const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
      lo -= pad;
      hi += pad;
    }
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    const start = Math.ceil(lo / step - 1e-9) * step;
    const ticks = [];
    for (let t = start; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return ticks;
  }

  /* ticks (as log10 values) for a log axis spanning log10 range [l0, l1] */
  function logTicks(l0, l1) {
    const all = [];
    for (let d = Math.floor(l0); d <= Math.ceil(l1); d++) for (const m of [1, 2, 5]) all.push(Math.log10(m) + d);
    const inside = all.filter((t) => t >= l0 - 1e-9 && t <= l1 + 1e-9);
    if (inside.length > 7) return inside.filter((t) => Math.abs(t - Math.round(t)) < 1e-9);
    return inside;
  }

  function extent(values) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of values) {
      if (!isNum(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return lo === Infinity ? null : [lo, hi];
  }

  /* opts: {series:[{name,color,points:[[x,y,label?]],mode:'line'|'scatter',dashed}], xLabel, yLabel,
           logY, refLines:[{y,label}], width, height, xFormat, yFormat, id, pointLabels} */
  function chart(opts) {
    const W = opts.width || 520;
    const H = opts.height || 280;
    const M = { l: 66, r: 18, t: 14, b: 44 };
    const logY = !!opts.logY;
    const series = (opts.series || [])
      .map((s) => ({
        ...s,
        points: (s.points || []).filter((p) => isNum(p[0]) && isNum(p[1]) && (!logY || p[1] > 0)),
      }))
      .filter((s) => s.points.length);
    const fig = h("figure", { class: "chart", id: opts.id || null });
    if (opts.title) fig.appendChild(h("figcaption", { text: opts.title }));
    if (!series.length) {
      fig.appendChild(note("No data."));
      return fig;
    }
    const xs = [];
    const ys = [];
    for (const s of series)
      for (const p of s.points) {
        xs.push(p[0]);
        ys.push(logY ? Math.log10(p[1]) : p[1]);
      }
    for (const r of opts.refLines || []) if (isNum(r.y)) ys.push(logY ? Math.log10(r.y) : r.y);
    let [x0, x1] = extent(xs);
    let [y0, y1] = extent(ys);
    if (opts.yZero && !logY) y0 = Math.min(0, y0);
    if (x1 === x0) {
      x0 -= 1;
      x1 += 1;
    }
    if (y1 === y0) {
      const pad = Math.abs(y0) * 0.1 || 1;
      y0 -= pad;
      y1 += pad;
    }
    const ypad = (y1 - y0) * 0.06;
    y0 -= ypad;
    y1 += ypad;
    if (opts.scatterPad) {
      const xpad = (x1 - x0) * 0.08;
      x0 -= xpad;
      x1 += xpad;
    }
    const X = (x) => M.l + ((x - x0) / (x1 - x0)) * (W - M.l - M.r);
    const Y = (y) => H - M.b - (((logY ? Math.log10(y) : y) - y0) / (y1 - y0)) * (H - M.t - M.b);
    const xf = opts.xFormat || fmtCompact;
    const yf = opts.yFormat || fmtCompact;
    const svg = sv("svg", {
      class: "chart-svg",
      viewBox: "0 0 " + W + " " + H,
      role: "img",
      "aria-label": opts.title || "chart",
    });
    const grid = sv("g", { class: "grid" });
    for (const t of niceTicks(x0, x1, Math.max(3, Math.floor(W / 90)))) {
      if (t < x0 || t > x1) continue;
      grid.appendChild(sv("line", { x1: X(t), x2: X(t), y1: M.t, y2: H - M.b }));
      grid.appendChild(sv("text", { x: X(t), y: H - M.b + 16, "text-anchor": "middle", text: xf(t) }));
    }
    const yticks = logY ? logTicks(y0, y1) : niceTicks(y0, y1, 5);
    for (const t of yticks) {
      if (t < y0 || t > y1) continue;
      const yy = logY ? H - M.b - ((t - y0) / (y1 - y0)) * (H - M.t - M.b) : Y(t);
      grid.appendChild(sv("line", { x1: M.l, x2: W - M.r, y1: yy, y2: yy }));
      grid.appendChild(
        sv("text", { x: M.l - 6, y: yy + 4, "text-anchor": "end", text: logY ? yf(Math.pow(10, t)) : yf(t) })
      );
    }
    svg.appendChild(grid);
    svg.appendChild(
      sv("rect", { class: "frame", x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b })
    );
    if (opts.xLabel)
      svg.appendChild(sv("text", { class: "axis-label", x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle", text: opts.xLabel }));
    if (opts.yLabel)
      svg.appendChild(
        sv("text", {
          class: "axis-label",
          transform: "translate(14," + (M.t + H - M.b) / 2 + ") rotate(-90)",
          "text-anchor": "middle",
          text: opts.yLabel + (logY ? " (log)" : ""),
        })
      );
    for (const r of opts.refLines || []) {
      if (!isNum(r.y) || (logY && r.y <= 0)) continue;
      svg.appendChild(sv("line", { class: "ref-line", x1: M.l, x2: W - M.r, y1: Y(r.y), y2: Y(r.y) }));
      if (r.label)
        svg.appendChild(sv("text", { class: "ref-label", x: W - M.r - 4, y: Y(r.y) - 5, "text-anchor": "end", text: r.label }));
    }
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      s.color = color;
      if (s.mode !== "scatter") {
        const d = s.points.map((p, j) => (j ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join("");
        svg.appendChild(sv("path", { class: "series-line" + (s.dashed ? " dashed" : ""), d: d, stroke: color }));
      }
      if (s.mode === "scatter" || s.markers || s.points.length <= 12) {
        for (const p of s.points) {
          const c = sv("circle", { class: "series-dot", cx: X(p[0]), cy: Y(p[1]), r: s.mode === "scatter" ? 5 : 3, fill: color });
          c.appendChild(sv("title", { text: (p[2] ? p[2] + ": " : "") + xf(p[0]) + ", " + yf(p[1]) }));
          svg.appendChild(c);
          if (opts.pointLabels && p[2])
            svg.appendChild(sv("text", { class: "point-label", x: X(p[0]) + 7, y: Y(p[1]) - 6, text: p[2] }));
        }
      }
    });
    // hover read-out for line charts
    if (!opts.noHover && series.some((s) => s.mode !== "scatter")) {
      const guide = sv("line", { class: "hover-guide", y1: M.t, y2: H - M.b, x1: M.l, x2: M.l, visibility: "hidden" });
      svg.appendChild(guide);
      const tip = h("div", { class: "chart-tip", hidden: true });
      const hit = sv("rect", { class: "hover-hit", x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b });
      svg.appendChild(hit);
      hit.addEventListener("mousemove", function (ev) {
        const box = svg.getBoundingClientRect();
        const px = ((ev.clientX - box.left) / box.width) * W;
        const xv = x0 + ((px - M.l) / (W - M.l - M.r)) * (x1 - x0);
        clear(tip);
        let best = null;
        for (const s of series) {
          if (s.mode === "scatter") continue;
          let near = s.points[0];
          for (const p of s.points) if (Math.abs(p[0] - xv) < Math.abs(near[0] - xv)) near = p;
          if (!best || Math.abs(near[0] - xv) < Math.abs(best - xv)) best = near[0];
          tip.appendChild(
            h("div", null, h("span", { class: "swatch", style: { background: s.color } }), (s.name || "") + ": " + yf(near[1]) + " @ " + xf(near[0]))
          );
        }
        guide.setAttribute("x1", X(best));
        guide.setAttribute("x2", X(best));
        guide.setAttribute("visibility", "visible");
        tip.hidden = false;
        const left = ev.clientX - box.left;
        tip.style.left = Math.min(left + 12, box.width - 180) + "px";
        tip.style.top = ev.clientY - box.top + 12 + "px";
      });
      hit.addEventListener("mouseleave", function () {
        tip.hidden = true;
        guide.setAttribute("visibility", "hidden");
      });
      fig.appendChild(h("div", { class: "chart-box" }, svg, tip));
    } else fig.appendChild(h("div", { class: "chart-box" }, svg));
    if (series.length > 1 || opts.legend) {
      fig.appendChild(
        h(
          "div",
          { class: "legend" },
          series.map((s) => h("span", { class: "legend-item" }, h("span", { class: "swatch", style: { background: s.color } }), s.name || ""))
        )
      );
    }
    return fig;
  }

  function barChart(edges, counts, opts) {
    const W = 460;
    const H = 170;
    const M = { l: 48, r: 10, t: 10, b: 34 };
    const fig = h("figure", { class: "chart histogram" });
    if (opts.title) fig.appendChild(h("figcaption", { text: opts.title }));
    if (!Array.isArray(edges) || !Array.isArray(counts) || !counts.length || edges.length < 2) {
      fig.appendChild(note("No histogram."));
      return fig;
    }
    const n = Math.min(counts.length, edges.length - 1);
    const lo = edges[0];
    const hi = edges[n];
    const vals = counts.slice(0, n).map((c) => (isNum(c) ? c : 0));
    const logY = !!opts.logY;
    const tr = (c) => (logY ? Math.log10(1 + c) : c);
    const cmax = Math.max(1e-9, ...vals.map(tr));
    const X = (x) => M.l + ((x - lo) / (hi - lo || 1)) * (W - M.l - M.r);
    const svg = sv("svg", { class: "chart-svg", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "activation histogram" });
    for (let i = 0; i < n; i++) {
      const x = X(edges[i]);
      const w = Math.max(0.5, X(edges[i + 1]) - x - 1);
      const hh = (tr(vals[i]) / cmax) * (H - M.t - M.b);
      const r = sv("rect", { class: "bar", x: x, y: H - M.b - hh, width: w, height: hh });
      r.appendChild(sv("title", { text: "[" + fmt(edges[i]) + ", " + fmt(edges[i + 1]) + "): " + fmt(vals[i]) }));
      svg.appendChild(r);
    }
    svg.appendChild(sv("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
    for (const t of niceTicks(lo, hi, 5)) {
      if (t < lo || t > hi) continue;
      svg.appendChild(sv("text", { x: X(t), y: H - M.b + 15, "text-anchor": "middle", class: "tick", text: fmtCompact(t) }));
    }
    svg.appendChild(sv("text", { class: "axis-label", x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle", text: "activation" }));
    svg.appendChild(
      sv("text", { class: "tick", x: M.l - 6, y: M.t + 8, "text-anchor": "end", text: fmtCompact(Math.max(...vals)) })
    );
    svg.appendChild(
      sv("text", { class: "axis-label", transform: "translate(12," + (H - M.b + M.t) / 2 + ") rotate(-90)", "text-anchor": "middle", text: logY ? "count (log)" : "count" })
    );
    fig.appendChild(h("div", { class: "chart-box" }, svg));
    return fig;
  }

  /* ------------------------------------------------------------------ tables */
  function table(columns, rows, opts) {
    opts = opts || {};
    const tbl = h("table", { class: "data-table" + (opts.cls ? " " + opts.cls : ""), id: opts.id || null });
    const thead = h("thead");
    const tbody = h("tbody");
    let sortCol = null;
    let sortDir = 1;
    function fill() {
      clear(tbody);
      let data = rows.slice();
      if (sortCol !== null) {
        const c = columns[sortCol];
        const key = c.sort || c.value || ((r) => r[c.key]);
        data.sort((a, b) => {
          const va = key(a);
          const vb = key(b);
          if (va === vb) return 0;
          if (va === null || va === undefined) return 1;
          if (vb === null || vb === undefined) return -1;
          return (va < vb ? -1 : 1) * sortDir;
        });
      }
      if (opts.limit) data = data.slice(0, opts.limit);
      for (const r of data) {
        const tr = h("tr", opts.rowAttrs ? opts.rowAttrs(r) : null);
        for (const c of columns) {
          const v = c.render ? c.render(r) : c.value ? c.value(r) : r[c.key];
          tr.appendChild(h("td", { class: c.num ? "num" : null }, v instanceof Node ? v : c.fmt ? c.fmt(v) : v === null || v === undefined ? "—" : String(v)));
        }
        tbody.appendChild(tr);
      }
    }
    const hr = h("tr");
    columns.forEach((c, i) => {
      const th = h("th", { class: c.num ? "num" : null, title: c.title || null, scope: "col" }, c.label);
      if (!c.nosort) {
        th.classList.add("sortable");
        th.addEventListener("click", function () {
          sortDir = sortCol === i ? -sortDir : 1;
          sortCol = i;
          for (const o of hr.children) o.removeAttribute("aria-sort");
          th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
          fill();
        });
      }
      hr.appendChild(th);
    });
    thead.appendChild(hr);
    tbl.appendChild(thead);
    tbl.appendChild(tbody);
    fill();
    return h("div", { class: "table-wrap" }, tbl);
  }

  function kvTable(pairs, cls) {
    const t = h("table", { class: "kv " + (cls || "") });
    for (const [k, v] of pairs) {
      if (v === undefined) continue;
      t.appendChild(h("tr", null, h("th", { scope: "row", text: k }), h("td", null, v instanceof Node ? v : v === null ? "—" : String(v))));
    }
    return t;
  }

  /* ------------------------------------------------------------------ features */
  function featureLayer(run, layer) {
    return (run.features || []).find((l) => l.layer === layer) || null;
  }

  function hasDashboard(run, layer, feature) {
    const fl = featureLayer(run, layer);
    return !!(fl && fl.chunk_of && Object.prototype.hasOwnProperty.call(fl.chunk_of, String(feature)));
  }

  function featureEntry(run, layer, feature) {
    const fl = featureLayer(run, layer);
    return fl ? fl.entries.find((e) => e.feature === feature) || null : null;
  }

  function loadDashboard(run, layer, feature) {
    const fl = featureLayer(run, layer);
    if (!hasDashboard(run, layer, feature)) return Promise.resolve(null);
    const chunk = fl.chunk_of[String(feature)];
    return loadData("r" + run.index + "/L" + layer + "/c" + chunk, fl.chunks[String(chunk)]).then(
      (part) => (part && part[String(feature)]) || null
    );
  }

  function featureHref(run, layer, feature) {
    return "#/r/" + run.index + "/feature/" + layer + "/" + feature;
  }

  function tokenSeq(ex, scale) {
    const toks = Array.isArray(ex.tokens) ? ex.tokens : [];
    const acts = Array.isArray(ex.acts) ? ex.acts : [];
    const s = isNum(scale) && scale > 0 ? scale : Math.max(1e-9, ...acts.filter(isNum));
    const row = h("div", { class: "tokens" });
    toks.forEach((t, i) => {
      const a = isNum(acts[i]) ? acts[i] : 0;
      const alpha = Math.max(0, Math.min(1, a / s));
      const span = h("span", { class: "tok" + (alpha > 0.55 ? " hot" : ""), title: JSON.stringify(String(t)) + "  act " + fmt(a) }, showTok(t));
      if (alpha > 0) span.style.backgroundColor = "rgba(234, 108, 28, " + alpha.toFixed(3) + ")";
      row.appendChild(span);
    });
    return h("div", { class: "example" }, h("span", { class: "ex-max", text: fmt(ex.max_act, 3) }), row);
  }

  function logitTable(title, rows, cls) {
    const list = Array.isArray(rows) ? rows.filter((r) => Array.isArray(r) && r.length >= 2) : [];
    const maxv = Math.max(1e-9, ...list.map((r) => (isNum(r[1]) ? Math.abs(r[1]) : 0)));
    return h(
      "div",
      { class: "logit-list " + cls },
      h("h4", { text: title }),
      list.length
        ? h(
            "table",
            { class: "bars" },
            list.map((r) =>
              h(
                "tr",
                null,
                h("td", { class: "tokcell" }, h("span", { class: "tok-pill", text: showTok(r[0]) })),
                h("td", { class: "barcell" }, h("span", { class: "hbar", style: { width: (isNum(r[1]) ? (Math.abs(r[1]) / maxv) * 100 : 0) + "%" } })),
                h("td", { class: "num", text: fmt(r[1], 3) })
              )
            )
          )
        : note("none")
    );
  }

  function renderDashboard(run, dash, compact) {
    const root = h("div", { class: "dashboard-body", dataset: { layer: String(dash.layer), feature: String(dash.feature) } });
    root.appendChild(
      h(
        "div",
        { class: "dash-head" },
        h("div", { class: "dash-title" }, h("span", { class: "fid", text: "L" + dash.layer + " · F" + dash.feature }), verdictBadge(dash.verdict)),
        h("div", { class: "dash-label", text: dash.label || "(unlabelled)" }),
        h(
          "div",
          { class: "stat-row" },
          h("span", null, "density ", h("b", { text: fmtPct(dash.density) })),
          h("span", null, "max act ", h("b", { text: fmt(dash.max_act, 3) }))
        )
      )
    );
    const scale = dash.max_act;
    const tops = Array.isArray(dash.top_examples) ? dash.top_examples : [];
    root.appendChild(
      h(
        "div",
        { class: "dash-section dash-examples" },
        h("h3", { text: "Top activating contexts" }),
        tops.length ? tops.slice(0, compact ? 6 : 30).map((ex) => tokenSeq(ex, scale)) : note("none recorded")
      )
    );
    const grid = h("div", { class: compact ? "dash-grid compact" : "dash-grid" });
    const hist = dash.histogram || {};
    grid.appendChild(
      h(
        "div",
        { class: "dash-section" },
        barChart(hist.edges, hist.counts, { title: "Activation histogram (non-zero) · density " + fmtPct(dash.density), logY: !compact })
      )
    );
    grid.appendChild(
      h(
        "div",
        { class: "dash-section logits" },
        h("h3", { text: "Output logits" }),
        h("div", { class: "two-col" }, logitTable("promoted", dash.top_logits, "pos"), logitTable("suppressed", dash.bottom_logits, "neg"))
      )
    );
    grid.appendChild(h("div", { class: "dash-section" }, h("h3", { text: "Top input tokens" }), logitTable("", dash.top_inputs, "pos")));
    const nb = Array.isArray(dash.neighbors) ? dash.neighbors.filter((r) => Array.isArray(r)) : [];
    grid.appendChild(
      h(
        "div",
        { class: "dash-section" },
        h("h3", { text: "Nearest features" }),
        nb.length
          ? h(
              "ul",
              { class: "neighbors" },
              nb.map((r) => {
                const f = r[0];
                const e = featureEntry(run, dash.layer, f);
                const name = "F" + f + (e && e.label ? " · " + e.label : "");
                return h(
                  "li",
                  null,
                  hasDashboard(run, dash.layer, f) ? h("a", { href: featureHref(run, dash.layer, f), text: name }) : h("span", { text: name }),
                  h("span", { class: "num muted", text: " cos " + fmt(r[1], 3) })
                );
              })
            )
          : note("none recorded")
      )
    );
    root.appendChild(grid);
    const qs = Array.isArray(dash.quantile_examples) ? dash.quantile_examples : [];
    if (qs.length) {
      const qwrap = h("div", { class: "dash-section dash-quantiles" }, h("h3", { text: "Quantile samples" }));
      qs.slice()
        .reverse()
        .forEach((q, i) => {
          const r = Array.isArray(q.range) ? q.range : [];
          const det = h(
            "details",
            { open: !compact && i < 2 },
            h("summary", { text: "activation " + fmt(r[0], 3) + " – " + fmt(r[1], 3) + "  (" + (q.examples || []).length + ")" }),
            (q.examples || []).map((ex) => tokenSeq(ex, scale))
          );
          qwrap.appendChild(det);
        });
      root.appendChild(qwrap);
    }
    return root;
  }

  /* ------------------------------------------------------------------ routing & layout */
  const app = document.getElementById("app");
  const sidebar = document.getElementById("sidebar");
  const crumbs = document.getElementById("crumbs");
  let cleanup = null;

  function runHref(i) {
    return "#/r/" + i;
  }

  function circuitHref(i, name) {
    return "#/r/" + i + "/circuit/" + encodeURIComponent(name);
  }

  function buildSidebar() {
    clear(sidebar);
    if (RUNS.length > 1) sidebar.appendChild(h("a", { class: "nav-link", href: "#/", text: "All runs" }));
    for (const run of RUNS) {
      const grp = h("div", { class: "nav-group" }, h("div", { class: "nav-run", text: run.name, title: run.path }));
      grp.appendChild(h("a", { class: "nav-link", href: runHref(run.index), text: "Overview" }));
      if ((run.circuits || []).length) {
        grp.appendChild(h("div", { class: "nav-sub", text: "Circuits" }));
        for (const c of run.circuits) grp.appendChild(h("a", { class: "nav-link indent", href: circuitHref(run.index, c.name), text: c.name }));
      }
      if ((run.features || []).length) {
        grp.appendChild(h("div", { class: "nav-sub", text: "Features" }));
        for (const fl of run.features)
          grp.appendChild(
            h("a", { class: "nav-link indent", href: "#/r/" + run.index + "/features/" + fl.layer, text: "Layer " + fl.layer + " (" + fl.entries.length + ")" })
          );
      }
      sidebar.appendChild(grp);
    }
  }

  function setCrumbs(parts) {
    clear(crumbs);
    parts.forEach((p, i) => {
      if (i) crumbs.appendChild(h("span", { class: "sep", text: "/" }));
      crumbs.appendChild(p[1] ? h("a", { href: p[1], text: p[0] }) : h("span", { text: p[0] }));
    });
    const here = location.hash || "#/";
    for (const a of sidebar.querySelectorAll("a.nav-link")) a.classList.toggle("active", a.getAttribute("href") === here);
  }

  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, "");
    if (!raw) return [];
    try {
      return raw.split("/").map(decodeURIComponent);
    } catch (e) {
      return ["?"];
    }
  }

  function render() {
    if (cleanup) {
      cleanup();
      cleanup = null;
    }
    clear(app);
    const r = parseRoute();
    let run = null;
    if (r[0] === "r") {
      run = RUNS[Number(r[1])];
      if (!run || !/^\d+$/.test(r[1] || "")) return notFound();
    }
    if (!RUNS.length) {
      setCrumbs([["no runs", null]]);
      app.appendChild(section("Empty report", note("This report contains no runs.")));
      return;
    }
    if (r.length === 0) return RUNS.length === 1 ? renderRun(RUNS[0]) : renderHome();
    if (run && r.length === 2) return renderRun(run);
    if (run && r[2] === "circuit" && r.length === 4) return renderCircuit(run, r[3]);
    if (run && r[2] === "features" && r.length === 4) return renderFeatureList(run, Number(r[3]));
    if (run && r[2] === "feature" && r.length === 5) return renderFeaturePage(run, Number(r[3]), Number(r[4]));
    return notFound();
  }

  function notFound() {
    setCrumbs([["not found", null]]);
    app.appendChild(section("Not found", note("Nothing at this address."), h("a", { href: "#/", text: "Back to the start" })));
  }

  /* ------------------------------------------------------------------ pages */
  function runSeriesLabel(d) {
    return "L" + d.layer + " " + d.kind;
  }

  function metricsTable(run) {
    const cols = [
      { key: "layer", label: "layer", num: true },
      { key: "kind", label: "kind" },
      { key: "n_features", label: "features", num: true, fmt: fmt },
      { key: "l0", label: "L0", num: true, fmt: fmt },
      { key: "fvu", label: "FVU", num: true, fmt: fmt, title: "fraction of variance unexplained" },
      { key: "mse", label: "MSE", num: true, fmt: fmt },
      { key: "dead_frac", label: "dead", num: true, fmt: fmtPct },
      { key: "dense_frac", label: "dense", num: true, fmt: fmtPct },
      { key: "ce_clean", label: "CE clean", num: true, fmt: fmt },
      { key: "ce_spliced", label: "CE spliced", num: true, fmt: fmt },
      { key: "ce_recovered_vs_zero", label: "CE rec. (zero)", num: true, fmt: fmtPct, title: "CE loss recovered relative to zero ablation" },
      { key: "ce_recovered_vs_mean", label: "CE rec. (mean)", num: true, fmt: fmtPct, title: "CE loss recovered relative to mean ablation" },
      { key: "kl", label: "KL", num: true, fmt: fmt },
      { key: "n_tokens", label: "tokens", num: true, fmt: fmtCompact },
    ];
    return table(cols, run.metrics || [], { id: "metrics-table-" + run.index, cls: "metrics" });
  }

  function recoveredOf(m) {
    return isNum(m.ce_recovered_vs_zero) ? m.ce_recovered_vs_zero : isNum(m.ce_recovered_vs_mean) ? m.ce_recovered_vs_mean : null;
  }

  function scatterFor(runs) {
    const series = runs.map((run, i) => ({
      name: run.name,
      color: PALETTE[i % PALETTE.length],
      mode: "scatter",
      points: (run.metrics || []).map((m) => [m.l0, recoveredOf(m), "L" + m.layer + (m.kind ? " " + m.kind : "")]),
    }));
    return chart({
      id: "l0-vs-ce",
      title: "L0 vs CE loss recovered",
      xLabel: "L0 (active features per token)",
      yLabel: "CE loss recovered",
      yFormat: fmtPct,
      xFormat: fmtCompact,
      series: series,
      pointLabels: true,
      scatterPad: true,
      legend: runs.length > 1,
    });
  }

  function renderRun(run) {
    setCrumbs([[run.name, runHref(run.index)], ["overview", null]]);
    const meta = run.run || {};
    const page = h("div", { class: "page run-page" });
    page.appendChild(h("h1", { text: run.name }));
    const facts = [];
    for (const k of ["model", "kind", "layers", "target_l0", "corpus"]) if (k in meta) facts.push([k, Array.isArray(meta[k]) ? meta[k].join(", ") : meta[k]]);
    for (const k of Object.keys(meta))
      if (!["model", "kind", "layers", "target_l0", "corpus"].includes(k) && (typeof meta[k] !== "object" || meta[k] === null)) facts.push([k, meta[k]]);
    facts.push(["folder", run.path]);
    if (isNum(run.clean_ce)) facts.push(["clean CE", fmt(run.clean_ce)]);
    page.appendChild(h("div", { class: "card facts" }, kvTable(facts)));
    if ((run.warnings || []).length) {
      page.appendChild(
        h(
          "details",
          { class: "card warnings" },
          h("summary", { text: run.warnings.length + " file(s) could not be used fully" }),
          h("ul", null, run.warnings.map((w) => h("li", { text: w })))
        )
      );
    }
    // training curves
    const dicts = (run.dictionaries || []).filter((d) => (d.train_log || []).length);
    const tr = section("Training");
    if (dicts.length) {
      const xKey = dicts.every((d) => d.train_log.some((r) => isNum(r.tokens))) ? "tokens" : "step";
      const curves = h("div", { class: "chart-grid" });
      for (const [key, label, logY] of [
        ["loss", "loss", true],
        ["l0", "L0", true],
        ["lambda", "λ (sparsity coefficient)", false],
      ]) {
        const series = dicts.map((d) => ({ name: runSeriesLabel(d), points: d.train_log.map((r) => [r[xKey], r[key]]) }));
        curves.appendChild(chart({ title: label + " vs " + xKey, xLabel: xKey, yLabel: label, series: series, logY: logY, legend: true, id: "train-" + key }));
      }
      tr.appendChild(curves);
    } else tr.appendChild(note("No training logs (train_log.jsonl) in this run."));
    page.appendChild(tr);
    // evaluation
    const ev = section("Evaluation");
    if ((run.metrics || []).length) {
      ev.appendChild(metricsTable(run));
      const g = h("div", { class: "chart-grid" });
      g.appendChild(scatterFor([run]));
      const sub = run.substitution || [];
      if (sub.length) {
        g.appendChild(
          chart({
            id: "substitution-curve",
            title: "Substitution curve",
            xLabel: "layers substituted",
            yLabel: "CE loss",
            xFormat: (v) => (Number.isInteger(v) ? String(v) : ""),
            yFormat: (v) => fmt(v, 3),
            series: [{ name: "CE loss", points: sub.map((s) => [s.n_layers, s.ce_loss, "layers " + (s.layers || []).join(",")]), markers: true }],
            refLines: [{ y: run.clean_ce, label: "clean CE " + fmt(run.clean_ce, 4) }],
          })
        );
      }
      ev.appendChild(g);
    } else ev.appendChild(note(run.has_eval ? "eval.json has no per-dictionary metrics." : "No evaluation (eval.json / metrics.json) in this run."));
    if ((run.substitution || []).length && !(run.metrics || []).length) {
      ev.appendChild(
        chart({
          id: "substitution-curve",
          title: "Substitution curve",
          xLabel: "layers substituted",
          yLabel: "CE loss",
          series: [{ name: "CE loss", points: run.substitution.map((s) => [s.n_layers, s.ce_loss]), markers: true }],
          refLines: [{ y: run.clean_ce, label: "clean CE" }],
        })
      );
    }
    page.appendChild(ev);
    // circuits
    const cs = section("Circuits");
    if ((run.circuits || []).length) {
      const list = h("div", { class: "circuit-cards" });
      for (const c of run.circuits) {
        const v = c.verify || {};
        const s = c.summary || {};
        list.appendChild(
          h(
            "a",
            { class: "circuit-card", href: circuitHref(run.index, c.name) },
            h("div", { class: "cc-name", text: c.name }),
            s.prompt ? h("div", { class: "cc-prompt", text: truncate(s.prompt, 90) }) : null,
            h(
              "div",
              { class: "stat-row" },
              c.graph ? h("span", null, h("b", { text: String(s.n_nodes) }), " nodes") : h("span", { text: "no graph" }),
              c.graph ? h("span", null, h("b", { text: String(s.n_links) }), " edges") : null,
              c.verify ? h("span", null, "faithfulness ", h("b", { text: fmt(v.faithfulness, 3) })) : h("span", { class: "muted", text: "not verified" })
            )
          )
        );
      }
      cs.appendChild(list);
    } else cs.appendChild(note("No circuits in this run."));
    page.appendChild(cs);
    // features
    const fs = section("Features");
    if ((run.features || []).length) {
      fs.appendChild(
        h(
          "ul",
          { class: "plain" },
          run.features.map((fl) =>
            h(
              "li",
              null,
              h("a", { href: "#/r/" + run.index + "/features/" + fl.layer, text: "Layer " + fl.layer }),
              " — " + fl.entries.length + " features, " + Object.keys(fl.chunk_of || {}).length + " dashboards"
            )
          )
        )
      );
    } else fs.appendChild(note("No feature dashboards in this run."));
    page.appendChild(fs);
    if (run.align) {
      page.appendChild(section("Cross-run alignment", h("details", null, h("summary", { text: "align.json" }), h("pre", { class: "json", text: JSON.stringify(run.align, null, 1).slice(0, 20000) }))));
    }
    app.appendChild(page);
  }

  function renderHome() {
    setCrumbs([["all runs", null]]);
    const page = h("div", { class: "page" }, h("h1", { text: "Runs" }));
    const cols = [
      { key: "name", label: "run", render: (r) => h("a", { href: runHref(r.index), text: r.name }) },
      { key: "model", label: "model", value: (r) => (r.run || {}).model || "—" },
      { key: "dicts", label: "dictionaries", num: true, value: (r) => (r.metrics || []).length || (r.dictionaries || []).length },
      { key: "circuits", label: "circuits", num: true, value: (r) => (r.circuits || []).length },
      { key: "features", label: "feature layers", num: true, value: (r) => (r.features || []).length },
    ];
    page.appendChild(section("Overview", table(cols, RUNS)));
    page.appendChild(section("Comparison", h("div", { class: "chart-grid" }, scatterFor(RUNS))));
    app.appendChild(page);
  }

  function renderFeatureList(run, layer) {
    setCrumbs([[run.name, runHref(run.index)], ["features", null], ["layer " + layer, null]]);
    const fl = featureLayer(run, layer);
    const page = h("div", { class: "page" }, h("h1", { text: "Layer " + layer + " features" }));
    if (!fl) {
      page.appendChild(note("No features for this layer."));
      app.appendChild(page);
      return;
    }
    const search = h("input", { type: "search", class: "search", id: "feature-filter", placeholder: "filter by label or id…", "aria-label": "filter features" });
    const holder = h("div");
    const info = h("p", { class: "muted" });
    const cols = [
      {
        key: "feature",
        label: "feature",
        num: true,
        render: (e) => (hasDashboard(run, layer, e.feature) ? h("a", { href: featureHref(run, layer, e.feature), text: "F" + e.feature }) : "F" + e.feature),
        sort: (e) => e.feature,
      },
      { key: "label", label: "label", value: (e) => e.label || "" },
      { key: "verdict", label: "verdict", render: (e) => verdictBadge(e.verdict), sort: (e) => e.verdict || "" },
      { key: "density", label: "density", num: true, fmt: fmtPct },
      { key: "max_act", label: "max act", num: true, fmt: fmt },
      { key: "dash", label: "dashboard", nosort: true, value: (e) => (hasDashboard(run, layer, e.feature) ? "yes" : "—") },
    ];
    function refill() {
      const q = search.value.trim().toLowerCase();
      const rows = fl.entries.filter((e) => !q || String(e.feature) === q || ("f" + e.feature) === q || String(e.label || "").toLowerCase().includes(q));
      clear(holder);
      holder.appendChild(table(cols, rows, { limit: 500, id: "feature-table" }));
      info.textContent = rows.length > 500 ? "showing 500 of " + rows.length + " (refine the filter)" : rows.length + " features";
    }
    search.addEventListener("input", refill);
    refill();
    page.appendChild(h("section", { class: "card" }, h("div", { class: "toolbar" }, search, info), holder));
    app.appendChild(page);
  }

  function renderFeaturePage(run, layer, feature) {
    setCrumbs([[run.name, runHref(run.index)], ["layer " + layer, "#/r/" + run.index + "/features/" + layer], ["F" + feature, null]]);
    const page = h("div", { class: "page", id: "feature-page" });
    app.appendChild(page);
    const entry = featureEntry(run, layer, feature);
    if (!hasDashboard(run, layer, feature)) {
      page.appendChild(h("h1", { text: "L" + layer + " · F" + feature }));
      page.appendChild(
        section(
          "Feature",
          entry ? kvTable([["label", entry.label], ["verdict", entry.verdict], ["density", fmtPct(entry.density)], ["max act", fmt(entry.max_act)]]) : null,
          note("No dashboard computed for this feature.", "no-dashboard")
        )
      );
      return;
    }
    page.appendChild(note("Loading dashboard…"));
    loadDashboard(run, layer, feature).then(
      (dash) => {
        clear(page);
        if (!dash) return page.appendChild(note("No dashboard computed for this feature.", "no-dashboard"));
        page.appendChild(h("div", { class: "card" }, renderDashboard(run, dash, false)));
      },
      (err) => {
        clear(page);
        page.appendChild(note("Could not load dashboard: " + err.message, "error"));
      }
    );
  }

  /* ------------------------------------------------------------------ attribution graph viewer */
  const KIND_ORDER = { embedding: 0, feature: 1, supernode: 1, error: 2, logit: 3 };
  const SLOT = 58; // horizontal room per node when labels are drawn
  const SLOT_SMALL = 24; // ... and in large graphs, drawn without labels
  const LABEL_LIMIT = 160; // draw node labels up to this many nodes
  const ROW = 92;
  const MIN_COL = 30;
  const MAX_INITIAL_EDGES = 3000;

  function computeGroups(nodes) {
    const byLabel = new Map();
    for (const n of nodes) {
      if (n.kind !== "feature" || typeof n.label !== "string" || !n.label.trim()) continue;
      const key = n.label.trim();
      if (!byLabel.has(key)) byLabel.set(key, []);
      byLabel.get(key).push(n);
    }
    const groups = [];
    for (const [label, members] of byLabel) {
      if (members.length < 2) continue;
      groups.push({ id: "SN" + groups.length, label: label, members: members });
    }
    return groups;
  }

  function buildView(graph, groups, grouped) {
    let nodes;
    let links;
    if (!grouped || !groups.length) {
      nodes = graph.nodes.map((n) => ({ ...n }));
      links = graph.links.map((l) => ({ source: l.source, target: l.target, weight: l.weight }));
    } else {
      const rep = new Map();
      nodes = [];
      for (const g of groups) {
        const anchor = g.members.reduce((a, b) => ((b.influence || 0) > (a.influence || 0) ? b : a));
        const layers = g.members.map((m) => m.layer);
        nodes.push({
          node_id: g.id,
          kind: "supernode",
          label: g.label,
          layer: anchor.layer,
          position: anchor.position,
          token: anchor.token,
          activation: g.members.reduce((s, m) => s + (isNum(m.activation) ? m.activation : 0), 0),
          influence: g.members.reduce((s, m) => s + (isNum(m.influence) ? m.influence : 0), 0),
          members: g.members.map((m) => m.node_id),
          layerRange: [Math.min(...layers), Math.max(...layers)],
        });
        for (const m of g.members) rep.set(m.node_id, g.id);
      }
      for (const n of graph.nodes) if (!rep.has(n.node_id)) nodes.push({ ...n });
      const agg = new Map();
      for (const l of graph.links) {
        const s = rep.get(l.source) || l.source;
        const t = rep.get(l.target) || l.target;
        if (s === t) continue;
        const k = s + "\u0000" + t;
        const e = agg.get(k);
        if (e) e.weight += l.weight;
        else agg.set(k, { source: s, target: t, weight: l.weight });
      }
      links = Array.from(agg.values());
    }
    const byId = new Map(nodes.map((n) => [n.node_id, n]));
    let maxAbs = 0;
    for (const l of links) maxAbs = Math.max(maxAbs, Math.abs(l.weight));
    return { nodes: nodes, links: links, byId: byId, maxAbs: maxAbs };
  }

  function layoutView(view, meta, slot) {
    const nLayers = isNum(meta.n_layers) ? meta.n_layers : Math.max(0, ...view.nodes.filter((n) => n.kind !== "logit").map((n) => n.layer + 1));
    const rowOf = (n) => (n.kind === "logit" ? nLayers : n.kind === "embedding" ? -1 : Math.round(n.layer));
    let maxRow = nLayers;
    let minRow = -1;
    const cells = new Map();
    let nPos = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens.length : 0;
    for (const n of view.nodes) {
      n.row = rowOf(n);
      n.col = Math.max(0, Math.round(isNum(n.position) ? n.position : 0));
      maxRow = Math.max(maxRow, n.row);
      minRow = Math.min(minRow, n.row);
      nPos = Math.max(nPos, n.col + 1);
      const k = n.row + ":" + n.col;
      if (!cells.has(k)) cells.set(k, []);
      cells.get(k).push(n);
    }
    const slots = new Array(nPos).fill(0);
    for (const list of cells.values()) {
      const order = (n) => (n.kind in KIND_ORDER ? KIND_ORDER[n.kind] : 1);
      list.sort((a, b) => order(a) - order(b) || (b.influence || 0) - (a.influence || 0));
      slots[list[0].col] = Math.max(slots[list[0].col], list.length);
    }
    const colX = [];
    let x = 0;
    for (let p = 0; p < nPos; p++) {
      const w = slots[p] ? Math.max(MIN_COL * 2, slots[p] * slot) : MIN_COL;
      colX.push({ start: x, width: w });
      x += w;
    }
    const Y = (row) => (maxRow - row) * ROW;
    for (const list of cells.values()) {
      const c = colX[list[0].col];
      const off = c.start + (c.width - list.length * slot) / 2;
      list.forEach((n, i) => {
        n.x = off + (i + 0.5) * slot;
        n.y = Y(n.row);
        n.slot = i;
      });
    }
    return { width: x, minRow: minRow, maxRow: maxRow, nLayers: nLayers, colX: colX, Y: Y, nPos: nPos };
  }

  function nodeTitle(n) {
    if (n.kind === "feature") return "L" + n.layer + " · F" + n.feature;
    if (n.kind === "supernode") return "Supernode · " + n.members.length + " features";
    if (n.kind === "embedding") return "Embedding " + JSON.stringify(String(n.token || ""));
    if (n.kind === "logit") return "Logit " + JSON.stringify(String(n.token || ""));
    if (n.kind === "error") return "Error · L" + n.layer;
    return String(n.node_id);
  }

  function renderCircuit(run, name) {
    const circuit = (run.circuits || []).find((c) => c.name === name);
    if (!circuit) return notFound();
    setCrumbs([[run.name, runHref(run.index)], ["circuits", null], [name, null]]);
    const page = h("div", { class: "page circuit-page" });
    page.appendChild(h("h1", null, "Circuit ", h("span", { class: "accent", text: name })));
    app.appendChild(page);
    const verifyCard = renderVerify(circuit.verify);
    if (!circuit.graph) {
      page.appendChild(section("Attribution graph", note("No graph.json for this circuit.")));
      page.appendChild(verifyCard);
      return;
    }
    const holder = h("div", null, note("Loading graph…"));
    page.appendChild(holder);
    let alive = true;
    cleanup = function () {
      alive = false;
    };
    loadData(circuit.graph.key, circuit.graph.src).then(
      (graph) => {
        if (!alive) return;
        clear(holder);
        new GraphViewer(holder, run, circuit, graph, verifyCard);
      },
      (err) => {
        clear(holder);
        holder.appendChild(note("Could not load graph: " + err.message, "error"));
      }
    );
  }

  function renderVerify(v) {
    const card = h("section", { class: "card verify", id: "verify" }, h("h2", { text: "Causal verification" }));
    if (!v) {
      card.appendChild(note("No verification (verify.json) for this circuit."));
      return card;
    }
    card.appendChild(h("div", { class: "muted small", text: "task " + (v.task || "—") + " · metric " + (v.metric_name || "—") }));
    const tiles = [
      ["faithfulness", v.faithfulness],
      ["completeness", v.completeness],
      ["ablation drop", v.ablation_drop],
      ["curve AUC", v.curve_auc],
      ["spearman", v.spearman],
    ];
    card.appendChild(
      h(
        "div",
        { class: "tiles" },
        tiles.map(([k, val]) => h("div", { class: "tile", dataset: { metric: k } }, h("div", { class: "tile-v", text: fmt(val, 3) }), h("div", { class: "tile-k", text: k })))
      )
    );
    const sp = v.specificity && typeof v.specificity === "object" ? v.specificity : null;
    card.appendChild(
      kvTable([
        ["m(full)", fmt(v.m_full)],
        ["m(empty)", fmt(v.m_empty)],
        ["m(circuit)", fmt(v.m_circuit)],
        ["circuit size", Array.isArray(v.circuit) ? String(v.circuit.length) + " nodes" : "—"],
        sp ? ["specificity", (sp.task || "?") + ": " + fmt(sp.baseline) + " → " + fmt(sp.ablated) + " (" + fmtPct(sp.rel_change) + ")"] : ["specificity", "—"],
      ])
    );
    if (Array.isArray(v.layer_importance) && v.layer_importance.length) {
      // which layers carry the behaviour: the metric drop when only that layer's circuit features are ablated
      card.appendChild(h("h3", { text: "Layer importance (ablate one layer's circuit features)" }));
      card.appendChild(
        kvTable(
          v.layer_importance
            .filter((r) => r && typeof r === "object")
            .map((r) => ["L" + r.layer + " " + (r.component || "") + " · " + r.n_features + " features", fmtPct(r.drop) + " drop"])
        )
      );
    }
    if (Array.isArray(v.curve) && v.curve.length) {
      card.appendChild(
        chart({
          title: "Faithfulness vs circuit size",
          width: 360,
          height: 200,
          xLabel: "nodes kept",
          yLabel: "faithfulness",
          xFormat: (x) => (Number.isInteger(x) ? String(x) : ""),
          yFormat: (y) => fmt(y, 2),
          series: [{ name: "faithfulness", points: v.curve.map((c) => [c.size, c.faithfulness]), markers: true }],
          refLines: [{ y: 1, label: "full model" }],
          noHover: true,
        })
      );
    }
    if (Array.isArray(v.edge_checks) && v.edge_checks.length) {
      const rows = v.edge_checks.slice(0, 12).filter((e) => e && typeof e === "object");
      const keys = [];
      for (const r of rows) for (const k of Object.keys(r)) if (!keys.includes(k) && keys.length < 5) keys.push(k);
      card.appendChild(
        h(
          "details",
          null,
          h("summary", { text: v.edge_checks.length + " edge check(s)" }),
          table(
            keys.map((k) => ({ key: k, label: k, nosort: true, value: (r) => (isNum(r[k]) ? fmt(r[k], 3) : typeof r[k] === "object" ? JSON.stringify(r[k]) : r[k]) })),
            rows
          )
        )
      );
    }
    return card;
  }

  function GraphViewer(holder, run, circuit, graph, verifyCard) {
    const meta = graph.metadata || {};
    const nodes = Array.isArray(graph.nodes) ? graph.nodes : [];
    const links = Array.isArray(graph.links) ? graph.links : [];
    const groups = computeGroups(nodes);
    const groupOf = new Map();
    for (const g of groups) for (const m of g.members) groupOf.set(m.node_id, g.id);
    const circuitSet = new Set(Array.isArray((circuit.verify || {}).circuit) ? circuit.verify.circuit : []);
    const state = { threshold: 0, logit: "", grouped: false, selected: null, showCircuit: false };
    const probs = new Map();
    for (const t of Array.isArray(meta.targets) ? meta.targets : []) if (t && isNum(t.token_id)) probs.set(t.token_id, t.prob);

    /* header: prompt + scores */
    const toks = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens : [];
    const scores = meta.scores || {};
    holder.appendChild(
      h(
        "div",
        { class: "card graph-meta" },
        h("div", { class: "prompt" }, h("span", { class: "muted", text: "prompt " }), toks.length ? toks.map((t) => h("span", { class: "tok plain", text: showTok(t) })) : h("span", { text: meta.prompt || "—" })),
        h(
          "div",
          { class: "stat-row" },
          (Array.isArray(meta.targets) ? meta.targets : []).map((t) => h("span", null, "target ", h("b", { text: showTok(t.token) }), " p=" + fmt(t.prob, 3))),
          h("span", null, "replacement ", h("b", { text: fmt(scores.replacement, 3) })),
          h("span", null, "completeness ", h("b", { text: fmt(scores.completeness, 3) })),
          meta.model ? h("span", { class: "muted", text: String(meta.model) }) : null
        )
      )
    );

    /* toolbar */
    const slider = h("input", { type: "range", id: "edge-threshold", min: "0", max: "1", step: "0.01", value: "0", "aria-label": "edge pruning threshold" });
    const sliderVal = h("span", { class: "mono", id: "edge-threshold-value", text: "0.00" });
    const logitSel = h("select", { id: "logit-select", "aria-label": "highlight paths into logit" }, h("option", { value: "", text: "— none —" }));
    for (const n of nodes)
      if (n.kind === "logit") {
        const m = /^LOGIT\/(\d+)@/.exec(n.node_id);
        const p = m ? probs.get(Number(m[1])) : undefined;
        logitSel.appendChild(h("option", { value: n.node_id, text: showTok(n.token) + (isNum(p) ? "  (p=" + fmt(p, 3) + ")" : "") + "  @" + n.position }));
      }
    const groupBox = h("input", { type: "checkbox", id: "group-supernodes", disabled: !groups.length });
    const circuitBox = h("input", { type: "checkbox", id: "show-circuit", disabled: !circuitSet.size });
    const stats = h("span", { class: "graph-stats", id: "graph-stats" });
    const btn = (text, title, fn, id) => h("button", { type: "button", class: "btn", title: title, onclick: fn, id: id || null, text: text });
    holder.appendChild(
      h(
        "div",
        { class: "toolbar graph-toolbar" },
        h("label", { class: "ctl", for: "edge-threshold" }, "prune edges < ", slider, sliderVal, h("span", { class: "muted", text: "× max |w|" })),
        h("label", { class: "ctl", for: "logit-select" }, "paths into ", logitSel),
        h("label", { class: "ctl", title: groups.length ? groups.length + " groups of features sharing a label" : "no two features share a label" }, groupBox, " supernodes" + (groups.length ? " (" + groups.length + ")" : "")),
        circuitSet.size ? h("label", { class: "ctl", title: "nodes of the verified circuit (verify.json)" }, circuitBox, " verified circuit") : null,
        h(
          "span",
          { class: "ctl zoom-btns" },
          btn("−", "zoom out", () => zoomBy(1 / 1.3)),
          btn("+", "zoom in", () => zoomBy(1.3)),
          btn("fit", "fit graph to view", () => fit(), "graph-fit")
        ),
        stats
      )
    );

    /* main area */
    const svg = sv("svg", { id: "graph-svg", class: "graph-svg", role: "img", "aria-label": "attribution graph" });
    const viewport = sv("g", { id: "graph-viewport" });
    svg.appendChild(viewport);
    const tooltip = h("div", { id: "graph-tooltip", class: "graph-tooltip", hidden: true, role: "tooltip" });
    const wrap = h("div", { class: "graph-wrap" }, svg, tooltip, legend());
    const panelBody = h("div", { class: "panel-body" });
    const panelClose = h("button", { type: "button", class: "btn close", id: "dashboard-close", title: "close", "aria-label": "close", text: "×" });
    const panel = h("aside", { id: "dashboard", class: "card dash-panel", hidden: true, "aria-live": "polite" }, panelClose, panelBody);
    panelClose.addEventListener("click", () => {
      panel.hidden = true;
      select(null);
    });
    holder.appendChild(h("div", { class: "circuit-layout" }, h("div", { class: "graph-col" }, wrap), h("div", { class: "side-col" }, panel, verifyCard)));

    function legend() {
      return h(
        "div",
        { class: "graph-legend" },
        h("span", null, h("i", { class: "lg lg-emb" }), "embedding"),
        h("span", null, h("i", { class: "lg lg-feat" }), "feature"),
        h("span", null, h("i", { class: "lg lg-err" }), "error"),
        h("span", null, h("i", { class: "lg lg-logit" }), "logit"),
        h("span", null, h("i", { class: "lg lg-pos" }), "excites"),
        h("span", null, h("i", { class: "lg lg-neg" }), "inhibits")
      );
    }

    /* transform (pan / zoom) */
    const tf = { x: 0, y: 0, k: 1 };
    let fitted = false;
    function applyTf() {
      viewport.setAttribute("transform", "translate(" + tf.x.toFixed(2) + "," + tf.y.toFixed(2) + ") scale(" + tf.k.toFixed(4) + ")");
    }
    function zoomAt(px, py, factor) {
      const k = Math.max(0.08, Math.min(8, tf.k * factor));
      const f = k / tf.k;
      tf.x = px - (px - tf.x) * f;
      tf.y = py - (py - tf.y) * f;
      tf.k = k;
      applyTf();
    }
    function zoomBy(factor) {
      const r = svg.getBoundingClientRect();
      zoomAt(r.width / 2, r.height / 2, factor);
    }
    let view = null;
    let lay = null;
    function fit() {
      const r = svg.getBoundingClientRect();
      if (!lay || !r.width || !r.height) return;
      const x0 = -60;
      const x1 = lay.width + 20;
      const y0 = -40;
      const y1 = (lay.maxRow - lay.minRow) * ROW + 96;
      const k = Math.min(r.width / (x1 - x0), r.height / (y1 - y0), 1.6);
      tf.k = k;
      tf.x = (r.width - (x1 - x0) * k) / 2 - x0 * k;
      tf.y = (r.height - (y1 - y0) * k) / 2 - y0 * k;
      applyTf();
      fitted = true;
    }
    svg.addEventListener(
      "wheel",
      function (ev) {
        ev.preventDefault();
        const r = svg.getBoundingClientRect();
        const dy = ev.deltaMode === 1 ? ev.deltaY * 16 : ev.deltaY;
        zoomAt(ev.clientX - r.left, ev.clientY - r.top, Math.exp(-dy * 0.0015));
      },
      { passive: false }
    );
    let drag = null;
    let suppressClick = false;
    svg.addEventListener("pointerdown", function (ev) {
      suppressClick = false;
      if (ev.button !== 0 || ev.target.closest(".node")) return;
      drag = { x: ev.clientX, y: ev.clientY, tx: tf.x, ty: tf.y, moved: false, id: ev.pointerId };
      svg.setPointerCapture(ev.pointerId);
      svg.classList.add("dragging");
    });
    svg.addEventListener("pointermove", function (ev) {
      if (!drag) return;
      const dx = ev.clientX - drag.x;
      const dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      tf.x = drag.tx + dx;
      tf.y = drag.ty + dy;
      applyTf();
    });
    function endDrag(ev) {
      if (!drag) return;
      if (svg.hasPointerCapture(drag.id)) svg.releasePointerCapture(drag.id);
      suppressClick = drag.moved;
      if (!drag.moved && ev.type === "pointerup") select(null);
      drag = null;
      svg.classList.remove("dragging");
    }
    svg.addEventListener("pointerup", endDrag);
    svg.addEventListener("pointercancel", endDrag);

    /* tooltip */
    function showTip(n, ev) {
      clear(tooltip);
      tooltip.appendChild(h("div", { class: "tt-title", text: nodeTitle(n) }));
      if (n.label) tooltip.appendChild(h("div", { class: "tt-label", text: n.label }));
      const rows = [
        ["node", n.node_id],
        ["layer", n.kind === "supernode" ? "L" + n.layerRange[0] + "–L" + n.layerRange[1] : n.layer],
        ["position", n.position + (n.token !== undefined && n.token !== null ? " " + JSON.stringify(String(n.token)) : "")],
        ["activation", fmt(n.activation, 4)],
        ["influence", fmt(n.influence, 4)],
      ];
      if (n.kind === "feature" && groupOf.has(n.node_id)) {
        const g = groups.find((x) => x.id === groupOf.get(n.node_id));
        rows.push(["supernode", truncate(g.label, 28) + " (" + g.members.length + ")"]);
      }
      tooltip.appendChild(kvTable(rows, "tt"));
      tooltip.hidden = false;
      moveTip(ev);
    }
    function moveTip(ev) {
      const r = wrap.getBoundingClientRect();
      const x = ev.clientX - r.left + 14;
      const y = ev.clientY - r.top + 14;
      tooltip.style.left = Math.max(4, Math.min(x, r.width - tooltip.offsetWidth - 6)) + "px";
      tooltip.style.top = (y + tooltip.offsetHeight > r.height ? y - tooltip.offsetHeight - 20 : y) + "px";
    }

    /* drawing */
    let edgeEls = [];
    let nodeEls = new Map();
    function draw() {
      view = buildView({ nodes: nodes, links: links }, groups, state.grouped);
      const showLabels = view.nodes.length <= LABEL_LIMIT;
      lay = layoutView(view, meta, showLabels ? SLOT : SLOT_SMALL);
      clear(viewport);
      const axes = sv("g", { class: "axes" });
      for (let row = lay.minRow; row <= lay.maxRow; row++) {
        const y = lay.Y(row);
        axes.appendChild(sv("line", { class: "row-line", x1: -8, x2: lay.width, y1: y, y2: y }));
        const lbl = row === -1 ? "Emb" : row === lay.nLayers ? "Logits" : "L" + row;
        axes.appendChild(sv("text", { class: "row-label", x: -14, y: y + 4, "text-anchor": "end", text: lbl }));
      }
      const yb = lay.Y(lay.minRow) + 26;
      for (let p = 0; p < lay.nPos; p++) {
        const c = lay.colX[p];
        const tok = toks[p] !== undefined ? toks[p] : "";
        const cx = c.start + c.width / 2;
        const t = sv("text", { class: "tok-label", x: cx, y: yb, "text-anchor": "end", transform: "rotate(-35 " + cx + " " + yb + ")", text: truncate(showTok(tok), 12) });
        t.appendChild(sv("title", { text: p + ": " + JSON.stringify(String(tok)) }));
        axes.appendChild(t);
        if (p) axes.appendChild(sv("line", { class: "col-line", x1: c.start, x2: c.start, y1: lay.Y(lay.maxRow) - 20, y2: lay.Y(lay.minRow) + 12 }));
      }
      viewport.appendChild(axes);
      const eg = sv("g", { class: "edges" });
      edgeEls = [];
      const maxAbs = view.maxAbs || 1;
      for (const l of view.links) {
        const s = view.byId.get(l.source);
        const t = view.byId.get(l.target);
        if (!s || !t) continue;
        const f = Math.abs(l.weight) / maxAbs;
        const my = (s.y + t.y) / 2;
        const d = "M" + s.x.toFixed(1) + " " + s.y.toFixed(1) + "C" + s.x.toFixed(1) + " " + my.toFixed(1) + " " + t.x.toFixed(1) + " " + my.toFixed(1) + " " + t.x.toFixed(1) + " " + t.y.toFixed(1);
        const el = sv("path", {
          class: "edge " + (l.weight >= 0 ? "pos" : "neg"),
          d: d,
          "stroke-width": (0.6 + 4.4 * f).toFixed(2),
          "stroke-opacity": (0.25 + 0.6 * f).toFixed(3),
          "data-source": l.source,
          "data-target": l.target,
          "data-weight": String(l.weight),
        });
        el.appendChild(sv("title", { text: l.source + " → " + l.target + ": " + fmt(l.weight, 4) }));
        eg.appendChild(el);
        edgeEls.push({ el: el, link: l });
      }
      viewport.appendChild(eg);
      const ng = sv("g", { class: "nodes" });
      nodeEls = new Map();
      let maxInf = 1e-9;
      for (const n of view.nodes) if (isNum(n.influence)) maxInf = Math.max(maxInf, Math.abs(n.influence));
      for (const n of view.nodes) {
        const r = 5 + 6 * Math.sqrt(Math.abs(isNum(n.influence) ? n.influence : 0) / maxInf);
        const cls = ["node", "node-" + n.kind];
        if (n.kind === "feature" && hasDashboard(run, n.layer, n.feature)) cls.push("has-dash");
        if (groupOf.has(n.node_id) && !state.grouped) cls.push("in-group");
        const g = sv("g", { class: cls.join(" "), "data-node-id": n.node_id, transform: "translate(" + n.x.toFixed(1) + "," + n.y.toFixed(1) + ")" });
        if (groupOf.has(n.node_id)) g.setAttribute("data-group", groupOf.get(n.node_id));
        let shape;
        if (n.kind === "embedding") shape = sv("rect", { x: -7, y: -7, width: 14, height: 14, rx: 2 });
        else if (n.kind === "error") shape = sv("path", { d: "M0 -8L8 0L0 8L-8 0Z" });
        else if (n.kind === "logit") shape = sv("rect", { x: -11, y: -9, width: 22, height: 18, rx: 5 });
        else if (n.kind === "supernode") {
          g.appendChild(sv("circle", { class: "halo", r: r + 5 }));
          shape = sv("circle", { r: r + 2 });
        } else shape = sv("circle", { r: r });
        shape.setAttribute("class", "shape");
        g.appendChild(shape);
        if (n.kind === "supernode") g.appendChild(sv("text", { class: "count", y: 3.5, "text-anchor": "middle", text: String(n.members.length) }));
        if (n.kind === "logit") {
          g.appendChild(sv("text", { class: "node-text logit-text", y: -16, "text-anchor": "middle", text: truncate(showTok(n.token), 14) }));
        } else if (showLabels && (n.kind === "feature" || n.kind === "supernode") && n.label) {
          const above = n.slot % 2 === 1;
          g.appendChild(sv("text", { class: "node-text", y: above ? -r - 6 : r + 13, "text-anchor": "middle", text: truncate(n.label, 22) }));
        }
        ng.appendChild(g);
        nodeEls.set(n.node_id, g);
      }
      viewport.appendChild(ng);
      applyVisibility();
      applyCircuit();
      if (state.selected && !nodeEls.has(state.selected)) state.selected = null;
      markSelected();
    }

    /* event delegation on nodes */
    viewport.addEventListener("pointerover", function (ev) {
      const g = ev.target.closest(".node");
      if (!g) return;
      const n = view.byId.get(g.getAttribute("data-node-id"));
      if (!n) return;
      showTip(n, ev);
      const grp = g.getAttribute("data-group");
      if (grp && !state.grouped) for (const o of viewport.querySelectorAll('.node[data-group="' + grp + '"]')) o.classList.add("group-peer");
    });
    viewport.addEventListener("pointermove", function (ev) {
      if (!tooltip.hidden) moveTip(ev);
    });
    viewport.addEventListener("pointerout", function (ev) {
      const g = ev.target.closest(".node");
      if (!g || (ev.relatedTarget && g.contains(ev.relatedTarget))) return;
      tooltip.hidden = true;
      for (const o of viewport.querySelectorAll(".group-peer")) o.classList.remove("group-peer");
    });
    viewport.addEventListener("click", function (ev) {
      if (suppressClick) {
        suppressClick = false;
        return;
      }
      const g = ev.target.closest(".node");
      if (!g) return;
      const n = view.byId.get(g.getAttribute("data-node-id"));
      if (!n) return;
      select(n.node_id);
      if (n.kind === "logit") {
        logitSel.value = n.node_id;
        state.logit = n.node_id;
        applyPaths();
      }
      openPanel(n);
    });

    function select(id) {
      state.selected = id;
      markSelected();
    }
    function markSelected() {
      for (const o of viewport.querySelectorAll(".node.selected")) o.classList.remove("selected");
      for (const e of edgeEls) e.el.classList.toggle("focus", !!state.selected && (e.link.source === state.selected || e.link.target === state.selected));
      svg.classList.toggle("has-focus", !!state.selected);
      if (state.selected && nodeEls.has(state.selected)) nodeEls.get(state.selected).classList.add("selected");
    }

    /* visibility: threshold pruning */
    function applyVisibility() {
      const cutoff = state.threshold * view.maxAbs;
      const degree = new Map();
      let nEdges = 0;
      for (const e of edgeEls) {
        const vis = !(state.threshold > 0 && Math.abs(e.link.weight) < cutoff);
        e.visible = vis;
        e.el.classList.toggle("is-hidden", !vis);
        if (vis) {
          nEdges++;
          degree.set(e.link.source, (degree.get(e.link.source) || 0) + 1);
          degree.set(e.link.target, (degree.get(e.link.target) || 0) + 1);
        }
      }
      let nNodes = 0;
      for (const [id, g] of nodeEls) {
        const n = view.byId.get(id);
        const vis = state.threshold === 0 || n.kind === "logit" || (degree.get(id) || 0) > 0;
        g.classList.toggle("is-hidden", !vis);
        if (vis) nNodes++;
      }
      stats.textContent = nEdges + " / " + edgeEls.length + " edges · " + nNodes + " / " + nodeEls.size + " nodes";
      sliderVal.textContent = state.threshold.toFixed(2);
      slider.title = "hide edges with |weight| < " + fmt(cutoff, 3);
      applyPaths();
    }

    /* highlight all upstream paths into the chosen logit */
    function applyPaths() {
      for (const o of viewport.querySelectorAll(".path-on")) o.classList.remove("path-on");
      const target = state.logit && nodeEls.has(state.logit) ? state.logit : "";
      svg.classList.toggle("has-path", !!target);
      if (!target) return;
      const incoming = new Map();
      for (const e of edgeEls) {
        if (!e.visible) continue;
        if (!incoming.has(e.link.target)) incoming.set(e.link.target, []);
        incoming.get(e.link.target).push(e);
      }
      const seen = new Set([target]);
      const queue = [target];
      while (queue.length) {
        const id = queue.pop();
        for (const e of incoming.get(id) || []) {
          e.el.classList.add("path-on");
          if (!seen.has(e.link.source)) {
            seen.add(e.link.source);
            queue.push(e.link.source);
          }
        }
      }
      for (const id of seen) if (nodeEls.has(id)) nodeEls.get(id).classList.add("path-on");
      stats.textContent += " · " + (seen.size - 1) + " nodes upstream";
    }

    function applyCircuit() {
      for (const [id, g] of nodeEls) {
        const n = view.byId.get(id);
        const inC = n.kind === "supernode" ? n.members.some((m) => circuitSet.has(m)) : circuitSet.has(id);
        g.classList.toggle("in-circuit", state.showCircuit && inC);
      }
    }

    /* side panel */
    function neighbourList(title, list, key) {
      if (!list.length) return null;
      return h(
        "div",
        { class: "dash-section" },
        h("h4", { text: title }),
        h(
          "ul",
          { class: "edge-list" },
          list.slice(0, 8).map((l) => {
            const other = view.byId.get(l[key]);
            const name = other ? nodeTitle(other) + (other.label ? " · " + other.label : "") : l[key];
            return h(
              "li",
              null,
              h("a", {
                href: "#",
                text: truncate(name, 48),
                onclick: (ev) => {
                  ev.preventDefault();
                  if (other) {
                    select(other.node_id);
                    openPanel(other);
                  }
                },
              }),
              h("span", { class: "num " + (l.weight >= 0 ? "pos" : "neg"), text: fmt(l.weight, 3) })
            );
          })
        )
      );
    }

    function nodeInfo(n) {
      const rows = [
        ["node", n.node_id],
        ["kind", n.kind],
        ["layer", n.kind === "supernode" ? "L" + n.layerRange[0] + "–L" + n.layerRange[1] : n.layer],
        ["position", n.position],
        ["token", n.token !== undefined && n.token !== null ? JSON.stringify(String(n.token)) : "—"],
        ["activation", fmt(n.activation, 4)],
        ["influence", fmt(n.influence, 4)],
      ];
      if (n.hookpoint) rows.push(["hookpoint", n.hookpoint]);
      return kvTable(rows);
    }

    let panelToken = 0;
    function openPanel(n) {
      const my = ++panelToken;
      panel.hidden = false;
      panel.setAttribute("data-node", n.node_id);
      if (n.kind === "feature") {
        panel.setAttribute("data-layer", String(n.layer));
        panel.setAttribute("data-feature", String(n.feature));
      } else {
        panel.removeAttribute("data-layer");
        panel.removeAttribute("data-feature");
      }
      clear(panelBody);
      panelBody.appendChild(h("div", { class: "panel-kind", text: n.kind }));
      panelBody.appendChild(h("h3", { class: "panel-title", text: nodeTitle(n) + (n.kind === "feature" ? " @" + n.position : "") }));
      if (n.label) panelBody.appendChild(h("div", { class: "dash-label", text: n.label }));
      const inc = view.links.filter((l) => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
      const out = view.links.filter((l) => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
      const edgesBox = h("div", { class: "two-col" }, neighbourList("strongest inputs", inc, "source"), neighbourList("strongest outputs", out, "target"));
      if (n.kind === "supernode") {
        panelBody.appendChild(nodeInfo(n));
        panelBody.appendChild(
          h(
            "div",
            { class: "dash-section" },
            h("h4", { text: n.members.length + " member features" }),
            h(
              "ul",
              { class: "edge-list" },
              n.members.map((id) => {
                const m = nodes.find((x) => x.node_id === id);
                return h("li", null, h("a", { href: "#", text: id, onclick: (ev) => (ev.preventDefault(), openPanel(m)) }), h("span", { class: "num", text: fmt(m.activation, 3) }));
              })
            )
          )
        );
        panelBody.appendChild(edgesBox);
        return;
      }
      if (n.kind !== "feature") {
        panelBody.appendChild(nodeInfo(n));
        panelBody.appendChild(edgesBox);
        return;
      }
      if (!hasDashboard(run, n.layer, n.feature)) {
        const e = featureEntry(run, n.layer, n.feature);
        if (e && e.verdict) panelBody.appendChild(h("div", null, verdictBadge(e.verdict)));
        panelBody.appendChild(nodeInfo(n));
        panelBody.appendChild(note("No dashboard computed for this feature.", "no-dashboard"));
        panelBody.appendChild(edgesBox);
        return;
      }
      const slot = h("div", { class: "dash-slot" }, note("Loading dashboard…"));
      panelBody.appendChild(h("div", null, h("a", { class: "btn link", href: featureHref(run, n.layer, n.feature), text: "open full dashboard →" })));
      panelBody.appendChild(slot);
      panelBody.appendChild(edgesBox);
      loadDashboard(run, n.layer, n.feature).then(
        (dash) => {
          if (my !== panelToken) return;
          clear(slot);
          slot.appendChild(dash ? renderDashboard(run, dash, true) : note("No dashboard computed for this feature.", "no-dashboard"));
        },
        (err) => {
          if (my !== panelToken) return;
          clear(slot);
          slot.appendChild(note("Could not load dashboard: " + err.message, "error"));
        }
      );
    }

    /* controls */
    slider.addEventListener("input", function () {
      state.threshold = Math.max(0, Math.min(1, Number(slider.value) || 0));
      applyVisibility();
    });
    logitSel.addEventListener("change", function () {
      state.logit = logitSel.value;
      applyPaths();
    });
    groupBox.addEventListener("change", function () {
      state.grouped = groupBox.checked;
      draw();
    });
    circuitBox.addEventListener("change", function () {
      state.showCircuit = circuitBox.checked;
      applyCircuit();
    });

    // very large graphs start pruned to roughly their MAX_INITIAL_EDGES strongest edges
    if (links.length > MAX_INITIAL_EDGES) {
      const mags = links.map((l) => Math.abs(l.weight)).sort((a, b) => b - a);
      if (mags[0] > 0) {
        state.threshold = Math.min(1, Math.ceil((mags[MAX_INITIAL_EDGES] / mags[0]) * 100 + 1e-9) / 100);
        slider.value = String(state.threshold);
      }
    }
    draw();
    requestAnimationFrame(function () {
      if (!fitted) fit();
    });
    const onResize = () => fit();
    window.addEventListener("resize", onResize);
    const prev = cleanup;
    cleanup = function () {
      if (prev) prev();
      window.removeEventListener("resize", onResize);
    };
  }

  /* ------------------------------------------------------------------ boot */
  function boot() {
    buildSidebar();
    window.addEventListener("hashchange", render);
    render();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
