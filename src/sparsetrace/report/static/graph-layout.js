/* sparsetrace report: attribution graph: supernode grouping and layered layout.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-prune,
 * graph-layout, graph-groups, graph-viewer, circuit, report. */
(function (ST) {
  "use strict";

  const { isNum, showTok, sv, truncate } = ST;

  const KIND_ORDER = { embedding: 0, feature: 1, supernode: 1, error: 2, logit: 3 };
  const SLOT = 64; // horizontal room per node when labels are drawn
  const SLOT_SMALL = 24; // ... and in large graphs, drawn without labels
  const ERR_SLOT = 20; // room per error node in a column's error lane
  const LABEL_LIMIT = 160; // draw node labels up to this many nodes
  const LABEL_CHARS = 22; // labels are cut to this many characters (the full text is in the tooltip)
  const ROW = 92; // height of a layer with nodes
  const ROW_EMPTY = 22; // ... and of a layer without any
  const MIN_COL = 30;
  const MAX_INITIAL_EDGES = 3000;

  /* features sharing a label (offered as "merge same-label features") */
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

  function superNode(id, label, members, user) {
    const anchor = members.reduce((a, b) => ((b.influence || 0) > (a.influence || 0) ? b : a));
    const layers = members.map((m) => m.layer);
    return {
      node_id: id,
      kind: "supernode",
      user: !!user,
      label: label,
      layer: anchor.layer,
      position: anchor.position,
      token: anchor.token,
      activation: members.reduce((s, m) => s + (isNum(m.activation) ? m.activation : 0), 0),
      influence: members.reduce((s, m) => s + (isNum(m.influence) ? m.influence : 0), 0),
      members: members.map((m) => m.node_id),
      layerRange: [Math.min(...layers), Math.max(...layers)],
    };
  }

  /* the drawn graph: `graph` ({nodes, links}: what pruning kept) with the user's supernodes (always
   * collapsed, ids "USN{i}") and, when `grouped`, the same-label groups collapsed too */
  function buildView(graph, groups, grouped, userGroups) {
    const present = new Map(graph.nodes.map((n) => [n.node_id, n]));
    const rep = new Map();
    const nodes = [];
    (userGroups || []).forEach((g, i) => {
      const members = g.members.map((id) => present.get(id)).filter(Boolean);
      if (!members.length) return;
      nodes.push(superNode("USN" + i, g.name, members, true));
      for (const m of members) rep.set(m.node_id, "USN" + i);
    });
    if (grouped)
      for (const g of groups) {
        const members = g.members.filter((m) => present.has(m.node_id) && !rep.has(m.node_id));
        if (members.length < 2) continue;
        nodes.push(superNode(g.id, g.label, members, false));
        for (const m of members) rep.set(m.node_id, g.id);
      }
    for (const n of graph.nodes) if (!rep.has(n.node_id)) nodes.push({ ...n });
    let links;
    if (!rep.size) links = graph.links.map((l) => ({ source: l.source, target: l.target, weight: l.weight }));
    else {
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

  /* layers bottom to top (embeddings at the bottom, logits on top; layers without nodes are thin),
   * token positions left to right; each column keeps its error nodes in a lane on its right */
  function layoutView(view, meta, slot) {
    const nLayers = isNum(meta.n_layers) ? meta.n_layers : Math.max(0, ...view.nodes.filter((n) => n.kind !== "logit").map((n) => n.layer + 1));
    const rowOf = (n) => (n.kind === "logit" ? nLayers : n.kind === "embedding" ? -1 : Math.round(n.layer));
    let maxRow = nLayers;
    let minRow = -1;
    const cells = new Map();
    const used = new Set([-1, nLayers]);
    let nPos = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens.length : 0;
    for (const n of view.nodes) {
      n.row = rowOf(n);
      n.col = Math.max(0, Math.round(isNum(n.position) ? n.position : 0));
      maxRow = Math.max(maxRow, n.row);
      minRow = Math.min(minRow, n.row);
      nPos = Math.max(nPos, n.col + 1);
      used.add(n.row);
      const k = n.row + ":" + n.col + (n.kind === "error" ? ":e" : "");
      if (!cells.has(k)) cells.set(k, []);
      cells.get(k).push(n);
    }
    const slots = new Array(nPos).fill(0);
    const lanes = new Array(nPos).fill(0);
    for (const list of cells.values()) {
      const order = (n) => (n.kind in KIND_ORDER ? KIND_ORDER[n.kind] : 1);
      list.sort((a, b) => order(a) - order(b) || Math.abs(b.influence || 0) - Math.abs(a.influence || 0));
      const c = list[0].col;
      if (list[0].kind === "error") lanes[c] = Math.max(lanes[c], list.length);
      else slots[c] = Math.max(slots[c], list.length);
    }
    const mains = slots.map((k, p) => (k ? Math.max(MIN_COL * 2, k * slot) : lanes[p] ? 8 : MIN_COL));
    const laneW = lanes.map((k) => (k ? k * ERR_SLOT + 6 : 0));
    const natural = mains.reduce((a, b) => a + b, 0) + laneW.reduce((a, b) => a + b, 0);
    // rows with nodes share a height that keeps the drawing about as tall as it is wide (30..ROW) ...
    const nEmpty = maxRow - minRow + 1 - used.size;
    const rowH = Math.max(30, Math.min(ROW, (Math.max(natural, 640) * 0.7 - nEmpty * ROW_EMPTY) / Math.max(1, used.size)));
    // ... and columns widen when many layers make it tall and narrow
    const tall = used.size * rowH + nEmpty * ROW_EMPTY;
    const stretch = Math.max(1, (tall * 1.25 - natural) / Math.max(1, mains.reduce((a, b) => a + b, 0)) + 1);
    const colX = [];
    let x = 0;
    for (let p = 0; p < nPos; p++) {
      const main = mains[p] * stretch;
      colX.push({ start: x, width: main + laneW[p], main: main, lane: laneW[p] });
      x += main + laneW[p];
    }
    const rowY = new Map();
    let y = 0;
    for (let row = maxRow; row >= minRow; row--) {
      const hgt = used.has(row) ? rowH : ROW_EMPTY;
      const prev = row === maxRow ? 0 : used.has(row + 1) ? rowH : ROW_EMPTY;
      y += row === maxRow ? 0 : (hgt + prev) / 2;
      rowY.set(row, y);
    }
    const Y = (row) => (rowY.has(row) ? rowY.get(row) : 0);
    for (const list of cells.values()) {
      const c = colX[list[0].col];
      const isErr = list[0].kind === "error";
      const w = isErr ? ERR_SLOT : slot;
      const off = isErr ? c.start + c.main + 3 : c.start + (c.main - list.length * slot) / 2;
      list.forEach((n, i) => {
        n.x = off + (i + 0.5) * w;
        n.y = Y(n.row);
        n.slot = i;
      });
    }
    return { width: x, height: Y(minRow), minRow: minRow, maxRow: maxRow, nLayers: nLayers, colX: colX, Y: Y, nPos: nPos, used: used };
  }

  function nodeRadius(n, maxInf) {
    const f = Math.sqrt(Math.abs(isNum(n.influence) ? n.influence : 0) / (maxInf || 1));
    return n.kind === "error" ? 4 + 7 * f : 5 + 6 * f;
  }

  /* where each drawn label goes: supernodes' names first, then feature labels in order of influence,
   * below or above the node, skipped where they would cover a label already placed or another node
   * (supernodes and the most influential feature are labelled whatever they cover) */
  function placeLabels(view, text, maxInf, limit) {
    const boxes = [];
    for (const n of view.nodes) {
      const r = nodeRadius(n, maxInf);
      boxes.push({ x0: n.x - r, x1: n.x + r, y0: n.y - r, y1: n.y + r, node: n.node_id });
    }
    const cands = view.nodes.filter((n) => (n.kind === "feature" || n.kind === "supernode") && text(n));
    const rank = (n) => (n.kind === "supernode" ? 1 : 0);
    cands.sort((a, b) => rank(b) - rank(a) || Math.abs(b.influence || 0) - Math.abs(a.influence || 0));
    const out = new Map();
    let firstFeature = true;
    for (const n of cands.slice(0, Math.max(limit, 1))) {
      const t = truncate(text(n), LABEL_CHARS);
      const w = t.length * 6.1 + 4;
      const r = nodeRadius(n, maxInf) + (n.kind === "supernode" ? 5 : 0);
      const tries = n.slot % 2 === 1 ? [-1, 1] : [1, -1];
      const must = n.kind === "supernode" || firstFeature;
      if (n.kind === "feature") firstFeature = false;
      const sides = must ? [tries[0], tries[1], tries[0]] : tries;
      for (let k = 0; k < sides.length; k++) {
        const base = sides[k] > 0 ? n.y + r + 11 : n.y - r - 4;
        const b = { x0: n.x - w / 2, x1: n.x + w / 2, y0: base - 9, y1: base + 2, node: n.node_id };
        const clash = boxes.some((o) => o.node !== n.node_id && b.x0 < o.x1 && o.x0 < b.x1 && b.y0 < o.y1 && o.y0 < b.y1);
        if (clash && k < 2) continue; // the third try (labels that must show) takes the first side anyway
        boxes.push(b);
        out.set(n.node_id, { text: t, y: base - n.y });
        break;
      }
    }
    return out;
  }

  function edgePath(s, t) {
    const my = (s.y + t.y) / 2;
    return "M" + s.x.toFixed(1) + " " + s.y.toFixed(1) + "C" + s.x.toFixed(1) + " " + my.toFixed(1) + " " + t.x.toFixed(1) + " " + my.toFixed(1) + " " + t.x.toFixed(1) + " " + t.y.toFixed(1);
  }

  /* row lines and layer names on the left, the prompt's tokens under the columns, error lanes */
  function drawAxes(lay, toks) {
    const axes = sv("g", { class: "axes" });
    const top = lay.Y(lay.maxRow) - 20;
    const bottom = lay.Y(lay.minRow) + 12;
    for (let p = 0; p < lay.nPos; p++) {
      const c = lay.colX[p];
      if (c.lane) axes.appendChild(sv("rect", { class: "err-lane", x: c.start + c.main, y: top, width: c.lane, height: bottom - top, rx: 4 }));
    }
    for (let row = lay.minRow; row <= lay.maxRow; row++) {
      const y = lay.Y(row);
      const used = lay.used.has(row);
      axes.appendChild(sv("line", { class: "row-line" + (used ? "" : " empty"), x1: -8, x2: lay.width, y1: y, y2: y }));
      const lbl = row === -1 ? "Emb" : row === lay.nLayers ? "Logits" : "L" + row;
      if (used || row % 5 === 0) axes.appendChild(sv("text", { class: "row-label" + (used ? "" : " empty"), x: -14, y: y + 4, "text-anchor": "end", text: lbl }));
    }
    const yb = lay.Y(lay.minRow) + 26;
    for (let p = 0; p < lay.nPos; p++) {
      const c = lay.colX[p];
      const tok = toks[p] !== undefined ? toks[p] : "";
      const cx = c.start + c.main / 2;
      const t = sv("text", { class: "tok-label", x: cx, y: yb, "text-anchor": "end", transform: "rotate(-35 " + cx + " " + yb + ")", text: truncate(showTok(tok), 12) });
      t.appendChild(sv("title", { text: p + ": " + JSON.stringify(String(tok)) }));
      axes.appendChild(t);
      if (c.lane) axes.appendChild(sv("text", { class: "err-lane-label", x: c.start + c.main + c.lane / 2, y: top - 4, "text-anchor": "middle", text: "err" }));
      if (p) axes.appendChild(sv("line", { class: "col-line", x1: c.start, x2: c.start, y1: top, y2: bottom }));
    }
    return axes;
  }

  function nodeTitle(n) {
    if (n.kind === "feature") return "L" + n.layer + " · F" + n.feature;
    if (n.kind === "supernode") return (n.user ? "Supernode · " : "Same-label group · ") + n.members.length + " nodes";
    if (n.kind === "embedding") return "Embedding " + JSON.stringify(String(n.token || ""));
    if (n.kind === "logit") return "Logit " + JSON.stringify(String(n.token || ""));
    if (n.kind === "error") return "Error · L" + n.layer;
    return String(n.node_id);
  }


  Object.assign(ST, { KIND_ORDER, LABEL_LIMIT, MAX_INITIAL_EDGES, MIN_COL, ROW, SLOT, SLOT_SMALL, buildView, computeGroups, drawAxes, edgePath, layoutView, nodeRadius, nodeTitle, placeLabels });
})((window.ST = window.ST || {}));
