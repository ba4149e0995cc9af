/* sparsetrace report: circuit page: graph viewer and causal verification.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { addCleanup, app, clear, fmt, fmtPct, h, isNum, kvTable, loadData, notFound, note, runHref, section, setCrumbs, table, chart, GraphViewer } = ST;

  function renderCircuit(run, name) {
    const circuit = (run.circuits || []).find((c) => c.name === name);
    if (!circuit) return notFound();
    setCrumbs([[run.name, runHref(run.index)], ["circuits", null], [name, null]]);
    const page = h("div", { class: "page circuit-page" });
    page.appendChild(h("h1", null, "Circuit ", h("span", { class: "accent", text: name })));
    app.appendChild(page);
    const verifyCard = renderVerify(circuit.verify, circuit.verify_status);
    if (!circuit.graph) {
      page.appendChild(section("Attribution graph", note("No graph.json for this circuit.")));
      page.appendChild(verifyCard);
      return;
    }
    const holder = h("div", null, note("Loading graph…"));
    page.appendChild(holder);
    let alive = true;
    addCleanup(function () {
      alive = false;
    });
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

  /* status: verify.json checked against the circuit.json beside it (report/inputs.py). A stale verification
   * describes another circuit: its numbers are kept out of sight, behind a closed "stale" disclosure. */
  function renderVerify(v, status) {
    const stale = !!(v && status && status.state === "stale");
    const card = h(
      "section",
      { class: "card verify" + (stale ? " stale" : ""), id: "verify", dataset: { state: status ? status.state : "none" } },
      h("h2", null, "Causal verification", stale ? h("span", { class: "badge badge-stale", text: "STALE" }) : null)
    );
    if (!v) {
      card.appendChild(note("No verification (verify.json) for this circuit."));
      return card;
    }
    if (stale) {
      card.appendChild(h("p", { class: "stale-banner", id: "verify-stale", text: "STALE — not a verification of this circuit. " + status.reason }));
      const body = h("details", { class: "stale-numbers" }, h("summary", { text: "numbers of the stale verification (they describe another circuit)" }));
      fillVerify(body, v);
      card.appendChild(body);
      return card;
    }
    if (status && status.state === "unrecorded") card.appendChild(note(status.reason + ": cannot tell whether it is current.", "small unrecorded"));
    fillVerify(card, v);
    return card;
  }

  function fillVerify(card, v) {
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


  Object.assign(ST, { renderCircuit, renderVerify });
})((window.ST = window.ST || {}));
