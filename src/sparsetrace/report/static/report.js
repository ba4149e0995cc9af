/* sparsetrace report: app: sidebar, routing, run overview and comparison pages, boot.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { runCleanup, PALETTE, RUNS, app, circuitHref, clear, fmt, fmtCompact, fmtPct, h, isNum, kvTable, notFound, note, runHref, section, setCrumbs, sidebar, table, truncate, chart, renderFeatureList, renderFeaturePage, renderCircuit } = ST;

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
    runCleanup();
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
    if (run.replacement) {
      // the full replacement: every replaced MLP substituted at once (eval.json "replacement")
      const r = run.replacement;
      const box = h("div", { class: "replacement", id: "replacement" });
      box.appendChild(h("h3", { text: "Full replacement (" + (r.kind || "?") + ", " + (r.layers || []).length + " layers substituted at once)" }));
      box.appendChild(
        kvTable([
          ["CE (clean)", fmt(r.ce, 3) + " (" + fmt(r.clean_ce, 3) + ")"],
          ["CE recovered vs zero-ablating every replaced MLP", fmtPct(r.ce_recovered)],
          ["CE recovered vs mean-ablating every replaced MLP", fmtPct(r.ce_recovered_vs_mean) + " (means: " + (r.mean_ablation_reference || "?") + ")"],
          ["KL to the clean model", fmt(r.kl, 4)],
          ["top-1 agreement with the clean model", fmtPct(r.top1_agreement)],
          ["held-out windows", r.n_windows],
        ])
      );
      if (r.svg) {
        const fig = h("div", { class: "depth-plot-wrap", title: "error growth with depth" });
        fig.innerHTML = r.svg; // drawn by report/depth_plot.py from numbers only
        box.appendChild(fig);
      }
      ev.appendChild(box);
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
              !c.verify
                ? h("span", { class: "muted", text: "not verified" })
                : c.verify_status && c.verify_status.state === "stale"
                  ? h("span", { class: "badge badge-stale", title: c.verify_status.reason, text: "verification STALE" })
                  : h("span", null, "faithfulness ", h("b", { text: fmt(v.faithfulness, 3) }))
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
              " — " + fl.entries.length + " features, " + Object.keys(fl.chunk_of || {}).length + " dashboards",
              (fl.dashboard_states || {}).stale ? h("span", { class: "badge badge-stale", title: fl.stale_reason || "", text: fl.dashboard_states.stale + " STALE" }) : null
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


  /* ------------------------------------------------------------------ boot */
  function boot() {
    buildSidebar();
    window.addEventListener("hashchange", render);
    render();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();

  Object.assign(ST, { boot, buildSidebar, metricsTable, parseRoute, recoveredOf, render, renderHome, renderRun, runSeriesLabel, scatterFor });
})((window.ST = window.ST || {}));
