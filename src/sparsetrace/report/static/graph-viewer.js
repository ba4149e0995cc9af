/* sparsetrace report: attribution graph viewer (pan/zoom, pruning, paths, supernodes, side panel).
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-prune,
 * graph-layout, graph-groups, graph-qk, graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { addCleanup, clear, featureHref, fmt, h, isNum, kvTable, note, showTok, sv, truncate, verdictBadge, featureEntry, hasDashboard, loadDashboard, renderDashboard } = ST;
  const { qkIndex, qkKey, qkSection } = ST;
  const { EDGE_THRESHOLD, LABEL_LIMIT, MAX_INITIAL_EDGES, NODE_BUDGET, NODE_THRESHOLD, SLOT, SLOT_SMALL, Pruner, UserGroups, buildView, computeGroups, drawAxes, edgePath, groupBar, layoutView, nodeRadius, nodeTitle, placeLabels } = ST;

  function GraphViewer(holder, run, circuit, graph, verifyCard) {
    const meta = graph.metadata || {};
    const nodes = Array.isArray(graph.nodes) ? graph.nodes : [];
    const links = Array.isArray(graph.links) ? graph.links : [];
    const qk = qkIndex(graph); // QK attribution of attention-mediated edges (trace --qk), by "source\0target"
    const nodeById = new Map(nodes.map((n) => [n.node_id, n]));
    const nameOf = (id) => {
      const n = nodeById.get(id);
      return n ? nodeTitle(n) + (isNum(n.position) && n.kind !== "logit" ? " @" + n.position : "") : String(id);
    };
    const groups = computeGroups(nodes);
    const groupOf = new Map();
    for (const g of groups) for (const m of g.members) groupOf.set(m.node_id, g.id);
    // a stale verify.json describes another circuit: its node set is not offered as "verified"
    const staleVerify = !!(circuit.verify_status && circuit.verify_status.state === "stale");
    const circuitSet = new Set(!staleVerify && Array.isArray((circuit.verify || {}).circuit) ? circuit.verify.circuit : []);
    const pruner = Pruner({ nodes: nodes, links: links, metadata: meta });
    const dflt = pruner.defaults();
    const user = UserGroups(graph, "sparsetrace-supernodes:" + (run.name || run.index) + ":" + circuit.name + ":" + nodes.length + ":" + links.length);
    const state = { threshold: 0, nodeThr: dflt.node, edgeThr: dflt.edge, logit: "", grouped: false, selected: null, showCircuit: false, picked: new Set() };
    // a feature's label: its own, else the feature index's (dashboards/labels), else its id
    const labelOf = (n) => {
      if (n.kind === "supernode") return n.label;
      if (n.kind !== "feature") return null;
      if (n.label) return n.label;
      const e = featureEntry(run, n.layer, n.feature);
      return (e && e.label) || String(n.node_id).replace(/@\d+$/, "");
    };
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
          h("span", null, "graph_completeness ", h("b", { text: fmt(scores.graph_completeness ?? scores.completeness, 3) })),
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
    const range = (id, label, value) => h("input", { type: "range", id: id, min: "0.05", max: "1", step: "0.01", value: String(value), "aria-label": label });
    const nodeSlider = range("node-threshold", "node threshold (cumulative influence)", state.nodeThr);
    const edgeSlider = range("edge-influence", "edge threshold (cumulative influence)", state.edgeThr);
    const nodeVal = h("span", { class: "mono", id: "node-threshold-value" });
    const edgeVal = h("span", { class: "mono", id: "edge-influence-value" });
    const pruneNote = h("div", { class: "prune-note muted", id: "prune-note" });
    const groupBox = h("input", { type: "checkbox", id: "group-supernodes", disabled: !groups.length });
    const circuitBox = h("input", { type: "checkbox", id: "show-circuit", disabled: !circuitSet.size });
    const stats = h("span", { class: "graph-stats", id: "graph-stats" });
    const btn = (text, title, fn, id) => h("button", { type: "button", class: "btn", title: title, onclick: fn, id: id || null, text: text });
    holder.appendChild(
      h(
        "div",
        { class: "toolbar graph-toolbar" },
        h("label", { class: "ctl", for: "node-threshold", title: "keep the features (and, ranked apart, the error nodes) that together carry this fraction of the influence on the target logits" }, "nodes ", nodeSlider, nodeVal),
        h("label", { class: "ctl", for: "edge-influence", title: "keep the edges that together carry this fraction of the edge influence among the kept nodes" }, "edges ", edgeSlider, edgeVal),
        btn("default", "back to the default pruning", () => setPrune(dflt.node, dflt.edge), "prune-default"),
        btn("show all", "no pruning: every node and edge of graph.json", () => setPrune(1, 1), "prune-none"),
        h("label", { class: "ctl", for: "edge-threshold" }, "hide |w| < ", slider, sliderVal, h("span", { class: "muted", text: "× max" })),
        h("label", { class: "ctl", for: "logit-select" }, "paths into ", logitSel),
        h("label", { class: "ctl", title: groups.length ? groups.length + " groups of features sharing a label" : "no two features share a label" }, groupBox, " merge same-label" + (groups.length ? " (" + groups.length + ")" : "")),
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
    holder.appendChild(pruneNote);
    const bar = groupBar(user, state.picked, (circuit.name || "graph") + ".graph.json", makeGroup, clearPicked);
    holder.appendChild(bar);

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
      const y1 = lay.height + 120;
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
      const kept = pruner.prune(state.nodeThr, state.edgeThr);
      const shown = { nodes: nodes.filter((n) => kept.nodes.has(n.node_id)), links: links.filter((_, i) => kept.links.has(i)) };
      view = buildView(shown, groups, state.grouped, user.list());
      const showLabels = view.nodes.length <= LABEL_LIMIT;
      lay = layoutView(view, meta, showLabels ? SLOT : SLOT_SMALL);
      clear(viewport);
      viewport.appendChild(drawAxes(lay, toks));
      const eg = sv("g", { class: "edges" });
      edgeEls = [];
      const maxAbs = view.maxAbs || 1;
      for (const l of view.links) {
        const s = view.byId.get(l.source);
        const t = view.byId.get(l.target);
        if (!s || !t) continue;
        const f = Math.abs(l.weight) / maxAbs;
        const el = sv("path", {
          class: "edge " + (l.weight >= 0 ? "pos" : "neg"),
          d: edgePath(s, t),
          "stroke-width": (0.6 + 4.4 * f).toFixed(2),
          "stroke-opacity": (0.25 + 0.6 * f).toFixed(3),
          "data-source": l.source,
          "data-target": l.target,
          "data-weight": String(l.weight),
        });
        el.appendChild(sv("title", { text: l.source + " → " + l.target + ": " + fmt(l.weight, 4) }));
        if (qk.has(qkKey(l.source, l.target))) {
          el.classList.add("has-qk"); // click: the heads and QK terms behind this edge
          el.addEventListener("click", (ev) => (ev.stopPropagation(), openEdgePanel(l)));
        }
        eg.appendChild(el);
        edgeEls.push({ el: el, link: l });
      }
      viewport.appendChild(eg);
      const ng = sv("g", { class: "nodes" });
      nodeEls = new Map();
      let maxInf = 1e-9;
      for (const n of view.nodes) if (isNum(n.influence) && n.kind !== "logit" && n.kind !== "embedding") maxInf = Math.max(maxInf, Math.abs(n.influence));
      const labels = showLabels ? placeLabels(view, labelOf, maxInf, LABEL_LIMIT) : new Map();
      for (const n of view.nodes) {
        const r = nodeRadius(n, maxInf);
        const cls = ["node", "node-" + n.kind];
        if (n.kind === "feature" && hasDashboard(run, n.layer, n.feature)) cls.push("has-dash");
        if (groupOf.has(n.node_id) && !state.grouped) cls.push("in-group");
        if (n.user) cls.push("user-supernode");
        if (state.picked.has(n.node_id)) cls.push("picked");
        const g = sv("g", { class: cls.join(" "), "data-node-id": n.node_id, transform: "translate(" + n.x.toFixed(1) + "," + n.y.toFixed(1) + ")" });
        if (groupOf.has(n.node_id)) g.setAttribute("data-group", groupOf.get(n.node_id));
        let shape;
        if (n.kind === "embedding") shape = sv("rect", { x: -7, y: -7, width: 14, height: 14, rx: 2 });
        else if (n.kind === "error") shape = sv("path", { d: "M0 " + -r + "L" + r + " 0L0 " + r + "L" + -r + " 0Z" });
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
        } else if (labels.has(n.node_id)) {
          const lb = labels.get(n.node_id);
          g.appendChild(sv("text", { class: "node-text" + (n.kind === "supernode" ? " sn-text" : ""), y: lb.y, "text-anchor": "middle", text: lb.text }));
        }
        ng.appendChild(g);
        nodeEls.set(n.node_id, g);
      }
      viewport.appendChild(ng);
      applyVisibility();
      applyCircuit();
      if (state.selected && !nodeEls.has(state.selected)) state.selected = null;
      markSelected();
      nodeVal.textContent = state.nodeThr.toFixed(2);
      edgeVal.textContent = state.edgeThr.toFixed(2);
    }

    function setPrune(tn, te) {
      state.nodeThr = tn;
      state.edgeThr = te;
      nodeSlider.value = String(tn);
      edgeSlider.value = String(te);
      draw();
      fit();
    }
    pruneNote.textContent =
      "Opened pruned: the nodes that carry " + Math.round(NODE_THRESHOLD * 100) + "% of the influence on the target logits and the edges that carry " +
      Math.round(EDGE_THRESHOLD * 100) + "% (Circuit Tracing's defaults)" +
      (!dflt.lowered ? "" : dflt.kept.nodes.size <= NODE_BUDGET ? ", with the node threshold lowered to " + dflt.node.toFixed(2) + " so that at most " + NODE_BUDGET + " nodes show" : ", with the node threshold lowered to its minimum, " + dflt.node.toFixed(2) + ": still more than " + NODE_BUDGET + " nodes") +
      ". " + dflt.kept.nodes.size + " of " + nodes.length + " nodes; “show all” or the sliders at 1.00 show the rest." +
      (pruner.storedInfluence ? "" : " (Influence computed here: graph.json has none.)");

    /* supernodes the user makes: shift-click picks nodes, "group" names them */
    function makeGroup(name) {
      const members = [];
      for (const id of state.picked) {
        const n = view.byId.get(id);
        if (n && n.kind === "supernode") members.push(...n.members);
        else members.push(id);
      }
      if (!user.add(name, members)) return false;
      state.picked.clear();
      draw();
      return true;
    }
    function clearPicked() {
      state.picked.clear();
      for (const o of viewport.querySelectorAll(".node.picked")) o.classList.remove("picked");
    }

    /* event delegation on nodes */
    viewport.addEventListener("pointerover", function (ev) {
      const g = ev.target.closest(".node");
      if (!g) return;
      const n = view.byId.get(g.getAttribute("data-node-id"));
      if (!n) return;
      showTip(n, ev);
      for (const e of edgeEls) if (e.link.source === n.node_id || e.link.target === n.node_id) e.el.classList.add("hover");
      svg.classList.add("has-hover");
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
      for (const o of viewport.querySelectorAll(".edge.hover")) o.classList.remove("hover");
      svg.classList.remove("has-hover");
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
      if (ev.shiftKey) {
        // shift-click picks nodes for a supernode
        if (state.picked.has(n.node_id)) state.picked.delete(n.node_id);
        else state.picked.add(n.node_id);
        g.classList.toggle("picked", state.picked.has(n.node_id));
        bar.refresh();
        return;
      }
      if (state.selected === n.node_id) {
        // a second click unpins
        select(null);
        panel.hidden = true;
        return;
      }
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
    /* the pinned node (click; a second click, a click on the background or Esc unpins) keeps its in- and
     * out-edges and their other ends highlighted */
    function markSelected() {
      for (const o of viewport.querySelectorAll(".node.selected, .node.neighbour")) o.classList.remove("selected", "neighbour");
      const id = state.selected;
      for (const e of edgeEls) {
        const on = !!id && (e.link.source === id || e.link.target === id);
        e.el.classList.toggle("focus", on);
        if (on) for (const end of [e.link.source, e.link.target]) if (end !== id && nodeEls.has(end)) nodeEls.get(end).classList.add("neighbour");
      }
      svg.classList.toggle("has-focus", !!id);
      if (id && nodeEls.has(id)) nodeEls.get(id).classList.add("selected");
      if (id) svg.setAttribute("data-pinned", id);
      else svg.removeAttribute("data-pinned");
    }
    const onKey = (ev) => {
      if (ev.key === "Escape" && state.selected) {
        select(null);
        panel.hidden = true;
      }
    };
    document.addEventListener("keydown", onKey);

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
      const grouped = view.nodes.some((n) => n.kind === "supernode"); // totals of the drawn graph, else of graph.json
      stats.textContent = nEdges + " / " + (grouped ? edgeEls.length : links.length) + " edges · " + nNodes + " / " + (grouped ? nodeEls.size : nodes.length) + " nodes";
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
              qk.has(qkKey(l.source, l.target))
                ? h("a", { href: "#", class: "qk-mark", text: "QK", title: "which heads carry this edge, and why they attend there", onclick: (ev) => (ev.preventDefault(), openEdgePanel(l)) })
                : null,
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
    /* an edge's panel: its ends and weight, and its QK attribution when graph.json has one */
    function openEdgePanel(l) {
      ++panelToken;
      panel.hidden = false;
      for (const a of ["data-node", "data-layer", "data-feature"]) panel.removeAttribute(a);
      panel.setAttribute("data-edge", l.source + " -> " + l.target);
      clear(panelBody);
      panelBody.appendChild(h("div", { class: "panel-kind", text: "edge" }));
      panelBody.appendChild(h("h3", { class: "panel-title", text: nameOf(l.source) + " → " + nameOf(l.target) }));
      panelBody.appendChild(kvTable([["source", l.source], ["target", l.target], ["weight", fmt(l.weight, 4)]]));
      const e = qk.get(qkKey(l.source, l.target));
      panelBody.appendChild(e ? qkSection(e, nameOf) : note("No QK attribution for this edge (trace --qk adds it for the strongest attention-mediated edges).", "no-qk"));
    }

    function openPanel(n) {
      const my = ++panelToken;
      panel.hidden = false;
      panel.removeAttribute("data-edge");
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
        if (n.user)
          panelBody.appendChild(
            h("button", {
              type: "button",
              class: "btn",
              id: "ungroup-supernode",
              text: "ungroup",
              onclick: () => {
                user.remove(Number(n.node_id.slice(3)));
                panel.hidden = true;
                state.selected = null;
                draw();
              },
            })
          );
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
    nodeSlider.addEventListener("input", function () {
      state.nodeThr = Math.max(0.05, Math.min(1, Number(nodeSlider.value) || 1));
      draw();
    });
    edgeSlider.addEventListener("input", function () {
      state.edgeThr = Math.max(0.05, Math.min(1, Number(edgeSlider.value) || 1));
      draw();
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

    // a default view that still draws very many edges also hides all but its MAX_INITIAL_EDGES strongest
    if (dflt.kept.links.size > MAX_INITIAL_EDGES) {
      const mags = Array.from(dflt.kept.links, (i) => Math.abs(links[i].weight)).sort((a, b) => b - a);
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
    addCleanup(function () {
      window.removeEventListener("resize", onResize);
      document.removeEventListener("keydown", onKey);
    });
  }

  Object.assign(ST, { GraphViewer });
})((window.ST = window.ST || {}));
