/* sparsetrace report: SVG line/scatter charts and histograms.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { PALETTE, clear, fmt, fmtCompact, h, isNum, note, sv } = ST;

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


  Object.assign(ST, { barChart, chart, extent, logTicks, niceTicks });
})((window.ST = window.ST || {}));
