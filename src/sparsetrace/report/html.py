"""Build a static, self-contained HTML report from one or more run folders.

The report is a single-page application (``index.html`` + ``assets/*.js`` + ``assets/report.css``)
whose data is embedded as JavaScript files under ``data/``. Every data file is a plain ``<script>``
(either referenced from ``index.html`` or injected on demand), so the report opens straight from
disk through ``file://``: it never uses ``fetch``/XHR and never touches the network.

Layout of the output folder::

    index.html
    inputs.json                      sha256 of every input file the report read, per run
    assets/report.css, assets/favicon.svg, assets/{core,charts,dashboard,graph-prune,graph-layout,graph-groups,graph-qk,graph-viewer,circuit,report}.js
    data/report-data.js              window.SPARSETRACE_DATA = {...}: runs, metrics, curves, indexes
    data/r{i}/circuit-{j}.js         SPARSETRACE_LOAD("r{i}/circuit/{j}", graph)   (loaded on demand)
    data/r{i}/features-L{ll}-c{k}.js SPARSETRACE_LOAD("r{i}/L{ll}/c{k}", {feature: dashboard, ...})

Everything is read leniently: a missing or unreadable file is skipped and listed as a warning in the
report instead of failing the build (a run with only ``eval.json`` still gets a report).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from sparsetrace.errors import SparsetraceError
from sparsetrace.report.depth_plot import replacement_summary
from sparsetrace.report.inputs import dashboard_status, dictionary_hashes, input_hashes, verify_status

__all__ = ["build_report", "collect_run"]

#: dashboards per lazily-loaded data chunk
FEATURE_CHUNK = 128
#: training-log rows kept per dictionary (evenly subsampled, first and last kept)
MAX_LOG_POINTS = 1500
_MARKER = ".sparsetrace-report"
#: sha256 of every file the report read, per run (written beside index.html)
INPUTS_FILE = "inputs.json"
_DICT_DIR = re.compile(r"^L(\d+)_([A-Za-z0-9_]+)$")
#: the viewer's classic scripts, in load order (they share window.ST; ES modules do not load from file://)
SCRIPTS = ("core.js", "charts.js", "dashboard.js", "graph-prune.js", "graph-layout.js", "graph-groups.js", "graph-qk.js",
           "graph-viewer.js", "circuit.js", "report.js")
_FEATURE_DIR = re.compile(r"^L(\d+)$")
_DASHBOARD_FILE = re.compile(r"^f(\d+)\.json$")
_LOG_KEYS = ("step", "tokens", "loss", "mse", "fvu", "l0", "lambda", "lr", "dead_frac")


# --------------------------------------------------------------------------------------------- reading
class _Reader:
    """Reads JSON leniently, remembering a warning for each file it could not use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def warn(self, path: Path, why: str) -> None:
        self.warnings.append(f"{self._rel(path)}: {why}")

    def json(self, path: Path, expect: type | tuple[type, ...] = (dict, list)) -> Any:
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.warn(path, f"unreadable ({type(exc).__name__}: {str(exc)[:120]})")
            return None
        if not isinstance(value, expect):
            self.warn(path, f"unexpected JSON type {type(value).__name__}")
            return None
        return value

    def jsonl(self, path: Path) -> list[dict]:
        if not path.is_file():
            return []
        rows: list[dict] = []
        bad = 0
        try:
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError):
                        bad += 1
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
                    else:
                        bad += 1
        except OSError as exc:
            self.warn(path, f"unreadable ({exc})")
            return []
        if bad:
            self.warn(path, f"skipped {bad} malformed line(s)")
        return rows


def _clean(value: Any) -> Any:
    """Replace non-finite floats by None so the data is valid JSON (and sane in JS)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _subsample(rows: list[dict], limit: int) -> list[dict]:
    if len(rows) <= limit:
        return rows
    step = (len(rows) - 1) / (limit - 1)
    return [rows[round(i * step)] for i in range(limit)]


def _read_train_log(reader: _Reader, path: Path) -> list[dict]:
    rows = []
    for row in reader.jsonl(path):
        kept = {k: _num(row.get(k)) for k in _LOG_KEYS if k in row}
        if any(v is not None for v in kept.values()):
            rows.append(kept)
    return _subsample(rows, MAX_LOG_POINTS)


def _dictionaries(reader: _Reader, run_dir: Path) -> list[dict]:
    out = []
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        m = _DICT_DIR.match(sub.name)
        if not m:
            continue
        files = {n: (sub / n).is_file() for n in ("config.json", "train_log.jsonl", "metrics.json")}
        if not any(files.values()):
            continue
        config = reader.json(sub / "config.json", dict)
        metrics = reader.json(sub / "metrics.json", dict)
        out.append(
            {
                "name": sub.name,
                "layer": int(m.group(1)),
                "kind": m.group(2),
                "config": config,
                "metrics": metrics,
                "train_log": _read_train_log(reader, sub / "train_log.jsonl"),
                "has_weights": (sub / "weights.safetensors").is_file(),
            }
        )
    return out


def _metrics_table(eval_data: dict | None, dictionaries: list[dict]) -> list[dict]:
    """eval.json's per-dictionary metrics, completed by each dictionary's own metrics.json."""
    rows: list[dict] = []
    seen: set[tuple] = set()
    if eval_data and isinstance(eval_data.get("dictionaries"), list):
        for m in eval_data["dictionaries"]:
            if isinstance(m, dict):
                rows.append(m)
                seen.add((m.get("layer"), m.get("kind")))
    for d in dictionaries:
        m = d.get("metrics")
        if isinstance(m, dict) and (m.get("layer", d["layer"]), m.get("kind", d["kind"])) not in seen:
            rows.append({"layer": d["layer"], "kind": d["kind"], **m})
    rows.sort(key=lambda m: (_num(m.get("layer")) or 0.0, str(m.get("kind"))))
    return rows


def _graph_summary(graph: dict) -> dict:
    nodes = graph.get("nodes") if isinstance(graph.get("nodes"), list) else []
    links = graph.get("links") if isinstance(graph.get("links"), list) else []
    meta = graph.get("metadata") if isinstance(graph.get("metadata"), dict) else {}
    return {
        "n_nodes": len(nodes),
        "n_links": len(links),
        "prompt": meta.get("prompt"),
        "targets": meta.get("targets"),
        "scores": meta.get("scores"),
    }


def _valid_graph(reader: _Reader, path: Path, graph: dict) -> dict | None:
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        reader.warn(path, "no 'nodes' list")
        return None
    good_nodes = [n for n in nodes if isinstance(n, dict) and isinstance(n.get("node_id"), str)]
    ids = {n["node_id"] for n in good_nodes}
    links = graph.get("links") if isinstance(graph.get("links"), list) else []
    good_links = [
        lk
        for lk in links
        if isinstance(lk, dict)
        and isinstance(lk.get("source"), str)
        and isinstance(lk.get("target"), str)
        and lk["source"] in ids
        and lk["target"] in ids
        and _num(lk.get("weight")) is not None
    ]
    dropped = (len(nodes) - len(good_nodes)) + (len(links) - len(good_links))
    if dropped:
        reader.warn(path, f"ignored {dropped} malformed node(s)/link(s)")
    fmt = graph.get("format")
    if fmt is not None and fmt != "sparsetrace-graph/1":
        reader.warn(path, f"unknown format {fmt!r}; shown as sparsetrace-graph/1")
    return {**graph, "nodes": good_nodes, "links": good_links}


def _circuits(reader: _Reader, run_dir: Path, run_index: int, files: dict[str, Any]) -> list[dict]:
    cdir = run_dir / "circuits"
    if not cdir.is_dir():
        return []
    out = []
    for j, sub in enumerate(sorted(p for p in cdir.iterdir() if p.is_dir())):
        graph = reader.json(sub / "graph.json", dict)
        verify = reader.json(sub / "verify.json", dict)
        if graph is None and verify is None:
            continue
        if graph is not None:
            graph = _valid_graph(reader, sub / "graph.json", graph)
        if graph is None and verify is None:
            continue
        entry: dict[str, Any] = {
            "name": sub.name,
            "verify": verify,
            "verify_status": verify_status(sub, verify),
            "graph": None,
            "summary": None,
        }
        if graph is not None:
            key = f"r{run_index}/circuit/{j}"
            src = f"data/r{run_index}/circuit-{j}.js"
            files[src] = (key, graph)
            entry["graph"] = {"key": key, "src": src}
            entry["summary"] = _graph_summary(graph)
        out.append(entry)
    return out


def _features(
    reader: _Reader, run_dir: Path, run_index: int, files: dict[str, Any], dict_hashes: dict[int, dict[str, str]]
) -> list[dict]:
    fdir = run_dir / "features"
    if not fdir.is_dir():
        return []
    layers = []
    for sub in sorted(p for p in fdir.iterdir() if p.is_dir()):
        m = _FEATURE_DIR.match(sub.name)
        if not m:
            continue
        layer = int(m.group(1))
        index = reader.json(sub / "index.json", list) or []
        layer_meta = reader.json(sub / "meta.json", dict) or {}
        states: dict[str, int] = {}
        stale_reason = None
        entries: dict[int, dict] = {}
        for e in index:
            if isinstance(e, dict) and isinstance(e.get("feature"), int):
                entries[e["feature"]] = {
                    k: e.get(k) for k in ("feature", "label", "verdict", "density", "max_act")
                }
        dashboards: dict[int, dict] = {}
        for f in sorted(sub.iterdir()):
            dm = _DASHBOARD_FILE.match(f.name)
            if not dm:
                continue
            dash = reader.json(f, dict)
            if dash is None:
                continue
            feat = int(dm.group(1))
            status = dashboard_status(
                dash.get("dictionary_sha256", layer_meta.get("dictionary_sha256")), dict_hashes.get(layer)
            )
            states[status["state"]] = states.get(status["state"], 0) + 1
            if status["state"] == "stale":
                stale_reason = stale_reason or status["reason"]
            dashboards[feat] = {
                **dash,
                "feature": feat,
                "layer": dash.get("layer", layer),
                "dictionary_status": status,
            }
            entry = entries.setdefault(feat, {"feature": feat})
            if status["state"] == "stale":
                entry["stale"] = True
            for k in ("label", "verdict", "density", "max_act"):
                if entry.get(k) is None and dash.get(k) is not None:
                    entry[k] = dash[k]
        if not entries:
            continue
        chunks: dict[str, str] = {}
        chunk_of: dict[str, int] = {}
        ordered = sorted(dashboards)
        for c in range(0, len(ordered), FEATURE_CHUNK):
            k = c // FEATURE_CHUNK
            part = {str(f): dashboards[f] for f in ordered[c : c + FEATURE_CHUNK]}
            src = f"data/r{run_index}/features-L{layer:02d}-c{k}.js"
            files[src] = (f"r{run_index}/L{layer}/c{k}", part)
            chunks[str(k)] = src
            for f in part:
                chunk_of[f] = k
        layers.append(
            {
                "layer": layer,
                "entries": [entries[f] for f in sorted(entries)],
                "chunks": chunks,
                "chunk_of": chunk_of,
                "dashboard_states": states,
                "stale_reason": stale_reason,
            }
        )
    return layers


def collect_run(
    run_dir: Path, run_index: int = 0, *, upstream: bool = True, upstream_budget_s: float = 60.0
) -> tuple[dict, dict[str, Any]]:
    """Read one run folder. Returns (summary for the main data file, {data file: (key, payload)}).

    ``upstream``: compute each feature page's upstream panel from the run's dictionary weights and model
    (bounded by ``upstream_budget_s`` seconds; skipped with a warning when they cannot be loaded).
    """
    run_dir = Path(run_dir)
    reader = _Reader(run_dir)
    files: dict[str, Any] = {}
    run_meta = reader.json(run_dir / "run.json", dict)
    eval_data = reader.json(run_dir / "eval.json", dict)
    dictionaries = _dictionaries(reader, run_dir)
    substitution = []
    if eval_data and isinstance(eval_data.get("substitution"), list):
        substitution = [s for s in eval_data["substitution"] if isinstance(s, dict)]
    align = reader.json(run_dir / "align.json", (dict, list))
    dict_hashes = dictionary_hashes(run_dir)
    summary = {
        "index": run_index,
        "name": run_dir.name or str(run_dir),
        "path": str(run_dir),
        "run": run_meta,
        "clean_ce": _num(eval_data.get("clean_ce")) if eval_data else None,
        "has_eval": eval_data is not None,
        "metrics": _metrics_table(eval_data, dictionaries),
        "substitution": substitution,
        "replacement": replacement_summary(eval_data),
        "dictionaries": dictionaries,
        "circuits": _circuits(reader, run_dir, run_index, files),
        "features": _features(reader, run_dir, run_index, files, dict_hashes),
        "align": align,
    }
    if upstream and any(d["has_weights"] for d in dictionaries) and summary["features"]:
        from sparsetrace.report.upstream import add_upstream_panels

        add_upstream_panels(run_dir, files, warn=reader.warnings.append, budget_s=upstream_budget_s)
    summary["warnings"] = reader.warnings
    return summary, files


# --------------------------------------------------------------------------------------------- writing
def _js_json(value: Any) -> str:
    text = json.dumps(_clean(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    # keep the payload inert even if someone pastes it into an inline <script>
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_INDEX_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<link rel="icon" href="assets/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="assets/report.css">
</head>
<body>
<header class="topbar">
  <a class="brand" href="#/">sparsetrace<span>report</span></a>
  <nav id="crumbs" class="crumbs" aria-label="breadcrumbs"></nav>
</header>
<div class="layout">
  <nav id="sidebar" class="sidebar" aria-label="report contents"></nav>
  <main id="app" class="content">
    <noscript><p class="notice">This report needs JavaScript (it runs entirely offline).</p></noscript>
    <p class="muted" id="loading">Loading report&hellip;</p>
  </main>
</div>
<script src="data/report-data.js"></script>
{scripts}
</body>
</html>
"""


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _copy_static(out_dir: Path) -> None:
    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    static = resources.files("sparsetrace.report").joinpath("static")
    for item in static.iterdir():
        if item.is_file() and item.name.endswith((".js", ".css", ".svg")):
            (assets / item.name).write_bytes(item.read_bytes())


def build_report(
    run_dirs: list[Path], out_dir: Path, *, upstream: bool = True, upstream_budget_s: float = 60.0
) -> Path:
    """Write a static HTML report for ``run_dirs`` into ``out_dir``; returns the path of index.html.

    ``upstream``: give each feature page its weight-only upstream panel (needs the run's dictionary
    weights and model; at most ``upstream_budget_s`` seconds per run).

    Open the result with a browser from disk (file://) or serve it with
    :func:`sparsetrace.report.server.serve`.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise SparsetraceError("build_report needs at least one run folder")
    for p in run_dirs:
        if not p.is_dir():
            raise SparsetraceError(f"run folder {str(p)!r} does not exist or is not a directory")
    out_dir = Path(out_dir)
    for p in run_dirs:
        if out_dir.resolve() == p.resolve():
            raise SparsetraceError(f"report folder {str(out_dir)!r} must not be the run folder itself")
    out_dir.mkdir(parents=True, exist_ok=True)

    data_dir = out_dir / "data"
    if (data_dir / _MARKER).is_file():  # only ever delete a data folder this function wrote
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / _MARKER).write_text("written by sparsetrace.report.build_report\n", encoding="utf-8")

    runs = []
    inputs = []
    for i, run_dir in enumerate(run_dirs):
        summary, files = collect_run(run_dir, i, upstream=upstream, upstream_budget_s=upstream_budget_s)
        hashes = input_hashes(run_dir)
        inputs.append({"path": str(run_dir), "files": hashes})
        summary["n_inputs"] = len(hashes)
        runs.append(summary)
        for src, (key, payload) in files.items():
            target = out_dir / src
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"SPARSETRACE_LOAD({json.dumps(key)},{_js_json(payload)});\n", encoding="utf-8")

    # disambiguate identical folder names (e.g. two runs both called "tc")
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({r['index']})"

    payload = {"format": "sparsetrace-report/1", "runs": runs, "inputs": INPUTS_FILE}
    inputs_doc = {"format": "sparsetrace-report-inputs/1", "runs": inputs}
    (out_dir / INPUTS_FILE).write_text(json.dumps(inputs_doc, indent=1) + "\n", encoding="utf-8")
    (data_dir / "report-data.js").write_text(
        f"window.SPARSETRACE_DATA={_js_json(payload)};\n", encoding="utf-8"
    )
    _copy_static(out_dir)
    title = "sparsetrace report — " + ", ".join(r["name"] for r in runs)
    index = out_dir / "index.html"
    scripts = "\n".join(f'<script src="assets/{name}"></script>' for name in SCRIPTS)
    index.write_text(_INDEX_HTML.format(title=_html_escape(title), scripts=scripts), encoding="utf-8")
    return index
