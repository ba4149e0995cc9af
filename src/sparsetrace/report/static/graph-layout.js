/* sparsetrace report: attribution graph: supernode grouping and layered layout.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-layout,
 * graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { isNum } = ST;

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


  Object.assign(ST, { KIND_ORDER, LABEL_LIMIT, MAX_INITIAL_EDGES, MIN_COL, ROW, SLOT, SLOT_SMALL, buildView, computeGroups, layoutView, nodeTitle });
})((window.ST = window.ST || {}));
