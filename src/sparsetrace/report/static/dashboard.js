/* sparsetrace report: feature dashboards, the feature list and feature pages.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { app, clear, featureHref, fmt, fmtPct, h, isNum, kvTable, loadData, note, runHref, section, setCrumbs, showTok, table, verdictBadge, barChart } = ST;

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
    const status = dash.dictionary_status || {};
    const root = h("div", { class: "dashboard-body" + (status.state === "stale" ? " stale" : ""), dataset: { layer: String(dash.layer), feature: String(dash.feature), state: status.state || "none" } });
    if (status.state === "stale") root.appendChild(h("p", { class: "stale-banner dash-stale", text: "STALE dashboard — " + status.reason }));
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
      { key: "dash", label: "dashboard", nosort: true, render: (e) => (!hasDashboard(run, layer, e.feature) ? "—" : e.stale ? h("span", { class: "badge badge-stale", text: "STALE" }) : "yes") },
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
    const nStale = (fl.dashboard_states || {}).stale || 0;
    if (nStale) page.appendChild(h("p", { class: "stale-banner", id: "features-stale", text: nStale + " dashboard(s) are STALE — " + (fl.stale_reason || "") }));
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
        page.appendChild(renderUpstream(run, layer, dash.upstream));
      },
      (err) => {
        clear(page);
        page.appendChild(note("Could not load dashboard: " + err.message, "error"));
      }
    );
  }

  /* ------------------------------------------------------------------ upstream panel */
  function tokenPills(rows) {
    const list = Array.isArray(rows) ? rows.filter((r) => Array.isArray(r) && r.length >= 2) : [];
    if (!list.length) return h("span", { class: "muted", text: "—" });
    return h("span", { class: "pills" }, list.map((r) => h("span", { class: "tok-pill", title: "score " + fmt(r[1], 3), text: showTok(r[0]) })));
  }

  /* panel: {deembedding: [[token, score]], features: [{layer, kind, feature, path, weight, deembedding}],
   * n_sources} written by report/upstream.py; null when it was not computed */
  function renderUpstream(run, layer, panel) {
    const card = h("section", { class: "card upstream", id: "upstream-panel" }, h("h2", { text: "Upstream features (weight-only)" }));
    if (!panel) {
      card.appendChild(note("Not computed for this feature: the run's dictionary weights or model could not be loaded, or the report's time budget ran out (see the run's warnings).", "upstream-missing"));
      return card;
    }
    card.appendChild(
      note("What drives this feature by the weights alone, no prompt run: virtual weights from features of earlier dictionaries, directly through the residual stream or through one attention head's OV circuit. Exact up to each norm's per-token scale; per unit of the source feature's activation.", "small")
    );
    card.appendChild(h("div", { class: "deembed" }, h("h3", { text: "From the embedding (de-embedding)" }), tokenPills(panel.deembedding)));
    const rows = Array.isArray(panel.features) ? panel.features.filter((r) => r && typeof r === "object") : [];
    if (!rows.length) {
      card.appendChild(note(panel.n_sources ? "No upstream feature path found." : "No dictionary of this run lies upstream of layer " + layer + ": only the embedding feeds it directly."));
      return card;
    }
    const maxv = Math.max(1e-12, ...rows.map((r) => (isNum(r.weight) ? Math.abs(r.weight) : 0)));
    const cols = [
      {
        key: "feature",
        label: "feature",
        render: (r) => {
          const e = featureEntry(run, r.layer, r.feature);
          const name = "L" + r.layer + " · F" + r.feature;
          return h(
            "span",
            null,
            hasDashboard(run, r.layer, r.feature) ? h("a", { href: featureHref(run, r.layer, r.feature), text: name }) : h("span", { text: name }),
            e && e.label ? h("span", { class: "muted", text: " " + e.label }) : null
          );
        },
        sort: (r) => r.layer * 1e9 + r.feature,
      },
      { key: "path", label: "path" },
      {
        key: "weight",
        label: "virtual weight",
        num: true,
        render: (r) =>
          h(
            "span",
            { class: "wcell " + (r.weight >= 0 ? "pos" : "neg") },
            h("span", { class: "hbar", style: { width: ((Math.abs(r.weight) || 0) / maxv) * 60 + "px" } }),
            " " + fmt(r.weight, 3)
          ),
        sort: (r) => -Math.abs(r.weight),
      },
      { key: "deembedding", label: "its de-embedding", nosort: true, render: (r) => tokenPills(r.deembedding) },
    ];
    card.appendChild(table(cols, rows, { id: "upstream-table" }));
    return card;
  }

  Object.assign(ST, { featureEntry, featureLayer, hasDashboard, loadDashboard, logitTable, renderDashboard, renderFeatureList, renderFeaturePage, renderUpstream, tokenSeq });
})((window.ST = window.ST || {}));
