/* sparsetrace report: attribution graph: pruning by cumulative influence on the target logits.
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-prune,
 * graph-layout, graph-groups, graph-viewer, circuit, report.
 *
 * The same rule as the Python side (sparsetrace.attribute.prune.prune_graph, after Circuit Tracing):
 *  - influence of a node: the sum over all paths from it to the target logits of the products of the
 *    row-normalised |edge weights| (N[t, s] = |w(s->t)| / sum_s' |w(s'->t)|), seeded by the targets'
 *    probabilities renormalised to sum to 1. The node's stored `influence` is used when every feature
 *    and error node has one, else it is computed here from the edges.
 *  - node threshold τn: the features covering τn of the features' total influence are kept, and the
 *    error nodes covering τn of the errors' total (ranked apart, so that whole-MLP error nodes do not
 *    crowd out every feature); embeddings and logits are candidates always.
 *  - edge threshold τe: on the node-pruned graph, an edge's score is N'[t, s] * (influence'(t) + logit
 *    weight(t)); the edges covering τe of the total score are kept.
 *  - then features and errors left without outgoing edges, features without incoming ones and
 *    embeddings without outgoing ones are dropped, until nothing changes.
 * τn = τe = 1 shows the whole graph as it was written. */
(function (ST) {
  "use strict";

  const { isNum } = ST;

  const NODE_THRESHOLD = 0.8; // Circuit Tracing's defaults ...
  const EDGE_THRESHOLD = 0.98;
  const NODE_BUDGET = 80; // ... with the node threshold lowered until at most this many nodes show
  const MIN_NODE_THRESHOLD = 0.05;

  /* the smallest score among the top scores that together cover `frac` of the total */
  function findThreshold(scores, frac) {
    const s = scores.filter((x) => x > 0).sort((a, b) => b - a);
    if (!s.length) return Infinity;
    const total = s.reduce((a, b) => a + b, 0);
    let cum = 0;
    for (let i = 0; i < s.length; i++) {
      cum += s[i];
      if (cum / total >= frac - 1e-12) return s[i];
    }
    return s[s.length - 1];
  }

  function Pruner(graph) {
    const nodes = graph.nodes;
    const links = graph.links;
    const meta = graph.metadata || {};
    const n = nodes.length;
    const index = new Map(nodes.map((x, i) => [x.node_id, i]));
    const src = new Int32Array(links.length);
    const dst = new Int32Array(links.length);
    const mag = new Float64Array(links.length);
    links.forEach((l, i) => {
      src[i] = index.get(l.source);
      dst[i] = index.get(l.target);
      mag[i] = Math.abs(l.weight);
    });
    const kind = nodes.map((x) => x.kind);

    // logit weights: the targets' probabilities, renormalised (equal weights when none is known)
    const probOf = new Map();
    for (const t of Array.isArray(meta.targets) ? meta.targets : []) if (t && isNum(t.token_id) && isNum(t.prob)) probOf.set(t.token_id, t.prob);
    const lw = new Float64Array(n);
    let lwSum = 0;
    nodes.forEach((x, i) => {
      if (x.kind !== "logit") return;
      const m = /^LOGIT\/(-?\d+)@/.exec(x.node_id);
      const p = isNum(x.prob) ? x.prob : m && probOf.has(Number(m[1])) ? probOf.get(Number(m[1])) : 1;
      lw[i] = Math.max(0, p);
      lwSum += lw[i];
    });
    if (lwSum > 0) for (let i = 0; i < n; i++) lw[i] /= lwSum;
    else nodes.forEach((x, i) => x.kind === "logit" && (lw[i] = 1 / Math.max(1, kind.filter((k) => k === "logit").length)));

    // targets before their sources (a reversed topological order); a cycle leaves nodes out (never in a DAG)
    const outDeg = new Int32Array(n);
    const inByNode = Array.from({ length: n }, () => []);
    for (let e = 0; e < links.length; e++) {
      outDeg[src[e]]++;
      inByNode[dst[e]].push(e);
    }
    const order = [];
    const left = outDeg.slice();
    for (let i = 0; i < n; i++) if (!left[i]) order.push(i);
    for (let k = 0; k < order.length; k++) for (const e of inByNode[order[k]]) if (--left[src[e]] === 0) order.push(src[e]);

    /* influence + logit weight of every node, on the edges with edgeOn[e] */
    function reach(edgeOn) {
      const rows = new Float64Array(n);
      for (let e = 0; e < links.length; e++) if (edgeOn[e]) rows[dst[e]] += mag[e];
      const x = Float64Array.from(lw);
      for (const t of order) {
        if (!x[t] || !rows[t]) continue;
        for (const e of inByNode[t]) if (edgeOn[e]) x[src[e]] += (x[t] * mag[e]) / rows[t];
      }
      return { x: x, rows: rows };
    }

    const all = new Uint8Array(links.length).fill(1);
    const stored = nodes.every((x) => (x.kind !== "feature" && x.kind !== "error") || isNum(x.influence));
    const computed = reach(all).x;
    const influence = nodes.map((x, i) => (stored ? Math.abs(isNum(x.influence) ? x.influence : 0) : computed[i] - (x.kind === "logit" ? 0 : lw[i])));

    /* {nodes: Set of kept node ids, links: Set of kept link indices} at thresholds (tn, te) */
    function prune(tn, te) {
      if (tn >= 1 && te >= 1) return { nodes: new Set(nodes.map((x) => x.node_id)), links: new Set(links.map((_, i) => i)) };
      const keep = new Uint8Array(n);
      for (const k of ["feature", "error"]) {
        const pool = [];
        for (let i = 0; i < n; i++) if (kind[i] === k) pool.push(influence[i]);
        const thr = tn >= 1 ? -Infinity : findThreshold(pool, tn);
        for (let i = 0; i < n; i++) if (kind[i] === k && (tn >= 1 || (influence[i] >= thr && influence[i] > 0))) keep[i] = 1;
      }
      for (let i = 0; i < n; i++) if (kind[i] === "embedding" || kind[i] === "logit" || (kind[i] !== "feature" && kind[i] !== "error")) keep[i] = 1;
      const on = new Uint8Array(links.length);
      for (let e = 0; e < links.length; e++) on[e] = keep[src[e]] && keep[dst[e]] ? 1 : 0;
      if (te < 1) {
        const r = reach(on);
        const score = new Float64Array(links.length);
        const list = [];
        for (let e = 0; e < links.length; e++)
          if (on[e]) {
            score[e] = r.rows[dst[e]] > 0 ? (mag[e] / r.rows[dst[e]]) * r.x[dst[e]] : 0;
            list.push(score[e]);
          }
        const thr = findThreshold(list, te);
        for (let e = 0; e < links.length; e++) on[e] = on[e] && score[e] >= thr && score[e] > 0 ? 1 : 0;
      }
      for (;;) {
        const hasOut = new Uint8Array(n);
        const hasIn = new Uint8Array(n);
        for (let e = 0; e < links.length; e++)
          if (on[e] && keep[src[e]] && keep[dst[e]]) {
            hasOut[src[e]] = 1;
            hasIn[dst[e]] = 1;
          }
        let changed = false;
        for (let i = 0; i < n; i++) {
          if (!keep[i] || kind[i] === "logit") continue;
          if (!hasOut[i] || (kind[i] === "feature" && !hasIn[i])) {
            keep[i] = 0;
            changed = true;
          }
        }
        if (!changed) break;
      }
      const keptNodes = new Set();
      for (let i = 0; i < n; i++) if (keep[i]) keptNodes.add(nodes[i].node_id);
      const keptLinks = new Set();
      for (let e = 0; e < links.length; e++) if (on[e] && keep[src[e]] && keep[dst[e]]) keptLinks.add(e);
      return { nodes: keptNodes, links: keptLinks };
    }

    /* the default: τe = 0.98 and τn = 0.8, or when that shows more than NODE_BUDGET nodes the largest τn
     * (in hundredths, down to MIN_NODE_THRESHOLD) that shows at most NODE_BUDGET (a bisection: the count
     * grows with τn) */
    function defaults() {
      let kept = prune(NODE_THRESHOLD, EDGE_THRESHOLD);
      if (kept.nodes.size <= NODE_BUDGET) return { node: NODE_THRESHOLD, edge: EDGE_THRESHOLD, lowered: false, kept: kept };
      let lo = Math.round(MIN_NODE_THRESHOLD * 100);
      let hi = Math.round(NODE_THRESHOLD * 100); // shows too many
      let best = null;
      while (lo < hi) {
        const mid = Math.floor((lo + hi) / 2);
        const k = prune(mid / 100, EDGE_THRESHOLD);
        if (k.nodes.size <= NODE_BUDGET) {
          best = { tn: mid, kept: k };
          lo = mid + 1;
        } else hi = mid;
      }
      if (!best) best = { tn: Math.round(MIN_NODE_THRESHOLD * 100), kept: prune(MIN_NODE_THRESHOLD, EDGE_THRESHOLD) };
      return { node: best.tn / 100, edge: EDGE_THRESHOLD, lowered: true, kept: best.kept };
    }

    const influenceOf = new Map(nodes.map((x, i) => [x.node_id, influence[i]]));
    return { prune: prune, defaults: defaults, influenceOf: influenceOf, storedInfluence: stored };
  }

  Object.assign(ST, { EDGE_THRESHOLD, NODE_BUDGET, NODE_THRESHOLD, Pruner, findThreshold });
})((window.ST = window.ST || {}));
