/* sparsetrace report: attribution graph: supernodes a person makes (shift-click nodes, name the group).
 * A classic script (the report opens from file://, where ES modules are blocked); the files share the
 * window.ST namespace and are loaded in order by index.html: core, charts, dashboard, graph-prune,
 * graph-layout, graph-groups, graph-viewer, circuit, report.
 *
 * The groups start from the graph JSON's optional `supernodes` ([{name, members: [node_id, ...]}]),
 * are kept in the browser's localStorage per graph (so they survive a reload), and are downloaded with
 * the graph as graph.json with a `supernodes` key: the format `sparsetrace export` turns into
 * Neuronpedia's qParams.supernodes. */
(function (ST) {
  "use strict";

  const { h } = ST;

  function clean(list, ids) {
    const out = [];
    const seen = new Set();
    for (const g of Array.isArray(list) ? list : []) {
      if (!g || typeof g.name !== "string" || !g.name.trim() || !Array.isArray(g.members)) continue;
      const members = g.members.filter((m) => typeof m === "string" && ids.has(m) && !seen.has(m));
      members.forEach((m) => seen.add(m));
      if (members.length) out.push({ name: g.name.trim(), members: members });
    }
    return out;
  }

  function storage() {
    try {
      return window.localStorage || null;
    } catch (e) {
      return null; // a browser that refuses storage for file:// pages: groups last until the page closes
    }
  }

  /* the user's supernodes of one graph; key: where they are kept in localStorage */
  function UserGroups(graph, key) {
    const ids = new Set(graph.nodes.map((n) => n.node_id));
    const store = storage();
    let saved = null;
    try {
      saved = store ? JSON.parse(store.getItem(key) || "null") : null;
    } catch (e) {
      saved = null;
    }
    let groups = clean(saved !== null ? saved : graph.supernodes, ids);

    function persist() {
      if (!store) return;
      try {
        store.setItem(key, JSON.stringify(groups));
      } catch (e) {
        /* full or refused: the groups still hold until the page closes */
      }
    }
    return {
      list: () => groups,
      /* group `members` under `name`; a node already in another group moves to this one */
      add(name, members) {
        const set = new Set(members.filter((m) => ids.has(m)));
        if (!name.trim() || !set.size) return false;
        groups = groups.map((g) => ({ name: g.name, members: g.members.filter((m) => !set.has(m)) })).filter((g) => g.members.length);
        groups.push({ name: name.trim(), members: Array.from(set) });
        persist();
        return true;
      },
      remove(i) {
        groups = groups.filter((_, j) => j !== i);
        persist();
      },
      /* the graph JSON as it was written, with the current grouping under `supernodes` */
      document() {
        const doc = {};
        for (const k of Object.keys(graph)) if (k !== "supernodes") doc[k] = graph[k];
        doc.supernodes = groups.map((g) => ({ name: g.name, members: g.members.slice() }));
        return doc;
      },
    };
  }

  /* toolbar: picked count, a name box, "group", "clear", "download graph.json" */
  function groupBar(user, picked, fileName, onGroup, onClear) {
    const count = h("span", { id: "picked-count", class: "muted", text: "shift-click nodes to pick them" });
    const name = h("input", { type: "text", id: "supernode-name", placeholder: "supernode name", "aria-label": "supernode name", size: "16" });
    const make = h("button", { type: "button", class: "btn", id: "make-supernode", text: "group", disabled: true, title: "group the picked nodes under this name" });
    const clearBtn = h("button", { type: "button", class: "btn", id: "clear-picked", text: "clear", disabled: true });
    const download = h("a", { class: "btn", id: "download-graph", href: "#", download: fileName, text: "download graph.json", title: "the graph with your supernodes (a 'supernodes' key); `sparsetrace export` turns it into Neuronpedia JSON" });
    download.addEventListener("click", function () {
      // a data: URL (the report's CSP and file:// allow it; blob: URLs would be another origin's request)
      download.href = "data:application/json;charset=utf-8," + encodeURIComponent(JSON.stringify(user.document()));
    });
    function refresh() {
      const k = picked.size;
      count.textContent = k ? k + " picked" : "shift-click nodes to pick them";
      make.disabled = !k || !name.value.trim();
      clearBtn.disabled = !k;
    }
    name.addEventListener("input", refresh);
    name.addEventListener("keydown", (ev) => ev.key === "Enter" && !make.disabled && make.click());
    make.addEventListener("click", function () {
      if (onGroup(name.value)) name.value = "";
      refresh();
    });
    clearBtn.addEventListener("click", function () {
      onClear();
      refresh();
    });
    const bar = h("div", { class: "toolbar group-bar", id: "group-bar" }, h("b", { text: "supernodes" }), count, name, make, clearBtn, download);
    bar.refresh = refresh;
    return bar;
  }

  Object.assign(ST, { UserGroups, groupBar });
})((window.ST = window.ST || {}));
