/* sparsetrace report: attribution graph viewer (pan/zoom, pruning, paths, supernodes, side panel).
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { addCleanup, clear, featureHref, fmt, h, isNum, kvTable, note, showTok, sv, truncate, verdictBadge, featureEntry, hasDashboard, loadDashboard, renderDashboard, LABEL_LIMIT, MAX_INITIAL_EDGES, ROW, SLOT, SLOT_SMALL, buildView, computeGroups, layoutView, nodeTitle } = ST;

  function GraphViewer(holder, run, circuit, graph, verifyCard) {
    const meta = graph.metadata || {};
    const nodes = Array.isArray(graph.nodes) ? graph.nodes : [];
    const links = Array.isArray(graph.links) ? graph.links : [];
    const groups = computeGroups(nodes);
    const groupOf = new Map();
    for (const g of groups) for (const m of g.members) groupOf.set(m.node_id, g.id);
    // a stale verify.json describes another circuit: its node set is not offered as "verified"
    const staleVerify = !!(circuit.verify_status && circuit.verify_status.state === "stale");
    const circuitSet = new Set(!staleVerify && Array.isArray((circuit.verify || {}).circuit) ? circuit.verify.circuit : []);
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
    addCleanup(function () {
      window.removeEventListener("resize", onResize);
    });
  }

  Object.assign(ST, { GraphViewer });
})((window.ST = window.ST || {}));
