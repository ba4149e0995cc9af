/* sparsetrace report: QK attribution of attention-mediated edges (graph.json's optional "qk" key, written by
 * `sparsetrace trace --qk`; format in docs/formats.md). For a selected edge: which heads carry it (loadings),
 * and per head the pairs of query-side and key-side nodes whose terms make up the attention score. */
(function (ST) {
  "use strict";

  const { fmt, h, truncate } = ST;
  const KEY = (s, t) => s + "\u0000" + t;
  const TOP = 6;

  /* graph.qk as a Map "source\0target" -> entry (entries without both ends are ignored) */
  function qkIndex(graph) {
    const out = new Map();
    for (const e of Array.isArray(graph.qk) ? graph.qk : []) {
      if (e && e.source !== undefined && e.target !== undefined) out.set(KEY(e.source, e.target), e);
    }
    return out;
  }

  function rows(list, cells) {
    return h("ul", { class: "edge-list" }, list.map((x) => h("li", null, ...cells(x))));
  }

  function num(v) {
    return h("span", { class: "num " + (v >= 0 ? "pos" : "neg"), text: fmt(v, 3) });
  }

  /* the QK block of one edge: head loadings, then per head its score's largest pair terms and per-side sums.
   * nameOf(node_id) gives a node's display name. */
  function qkSection(entry, nameOf) {
    const name = (id) => truncate(nameOf(id), 30);
    const heads = Array.isArray(entry.heads) ? entry.heads : [];
    const docs = Array.isArray(entry.qk) ? entry.qk : [];
    const parts = [
      h("h4", { text: "through attention (QK attribution)" }),
      h("div", { class: "muted", text: "edge weight " + fmt(entry.weight, 4) + " = sum of head loadings " + fmt(entry.sum_of_loadings, 4) + (heads.length ? "; heads not listed " + fmt(entry.other_heads, 4) : "") }),
      heads.length
        ? rows(heads, (hd) => [h("span", { class: "mono", text: "L" + hd.layer + ".H" + hd.head + "  pattern " + fmt(hd.pattern, 3) + (hd.at_key !== undefined ? "  at key " + fmt(hd.at_key, 3) : "") }), num(hd.loading)])
        : null,
    ];
    for (const d of docs) {
      const pairs = (Array.isArray(d.top_pairs) ? d.top_pairs : []).slice(0, TOP);
      const keys = (Array.isArray(d.key_side) ? d.key_side : []).slice(0, TOP);
      const queries = (Array.isArray(d.query_side) ? d.query_side : []).slice(0, TOP);
      parts.push(
        h(
          "details",
          { class: "qk-head", "data-head": d.layer + "." + d.head },
          h("summary", { text: "L" + d.layer + ".H" + d.head + " score " + fmt(d.score, 3) + " (query @" + d.query_pos + " → key @" + d.key_pos + "; terms sum to " + fmt(d.sum_of_terms, 3) + ")" }),
          h("div", { class: "muted", text: "largest query × key pair terms" }),
          rows(pairs, (p) => [h("span", { class: "qk-pair", text: name(p.query) + " × " + name(p.key) }), num(p.value)]),
          h("div", { class: "two-col" },
            h("div", null, h("div", { class: "muted", text: "key side" }), rows(keys, (x) => [h("span", { text: name(x.node) }), num(x.value)])),
            h("div", null, h("div", { class: "muted", text: "query side" }), rows(queries, (x) => [h("span", { text: name(x.node) }), num(x.value)])))
        )
      );
    }
    return h("div", { class: "dash-section qk-section" }, parts);
  }

  ST.qkIndex = qkIndex;
  ST.qkKey = KEY;
  ST.qkSection = qkSection;
})(window.ST = window.ST || {});
