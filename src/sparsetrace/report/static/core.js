/* sparsetrace report: a dependency-free single-page viewer for run folders.
 *
 * Data comes from data/report-data.js (window.SPARSETRACE_DATA) and from data files injected as
 * <script> elements on demand (they call SPARSETRACE_LOAD(key, value)). No fetch/XHR is used, so the
 * report works from file:// as well as over http. All user-provided text is inserted with
 * textContent / setAttribute, never as HTML.
 */
/* sparsetrace report: shared state, data loading, DOM helpers, formatting, tables and page chrome.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
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


  /* ------------------------------------------------------------------ page chrome */
  const app = document.getElementById("app");
  const sidebar = document.getElementById("sidebar");
  const crumbs = document.getElementById("crumbs");
  let cleanup = null;

  /* run fn when the page is left (chained: every registered function runs once) */
  function addCleanup(fn) {
    const prev = cleanup;
    cleanup = function () {
      if (prev) prev();
      fn();
    };
  }

  function runCleanup() {
    const fn = cleanup;
    cleanup = null;
    if (fn) fn();
  }


  function runHref(i) {
    return "#/r/" + i;
  }

  function circuitHref(i, name) {
    return "#/r/" + i + "/circuit/" + encodeURIComponent(name);
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

  function notFound() {
    setCrumbs([["not found", null]]);
    app.appendChild(section("Not found", note("Nothing at this address."), h("a", { href: "#/", text: "Back to the start" })));
  }

  function featureHref(run, layer, feature) {
    return "#/r/" + run.index + "/feature/" + layer + "/" + feature;
  }

  Object.assign(ST, { DATA, PALETTE, RUNS, SVGNS, addCleanup, app, appendAll, circuitHref, clear, crumbs, featureHref, fmt, fmtCompact, fmtPct, h, inflight, isNum, kvTable, loadData, notFound, note, runCleanup, runHref, section, setAttrs, setCrumbs, showTok, sidebar, store, sv, table, truncate, verdictBadge });
})((window.ST = window.ST || {}));
