"""Graph scores of a full replacement over a fixed prompt set (``sparsetrace graph-scores``).

For each prompt, the unpruned attribution graph of the model's top next-token logits (those covering 95%
of the probability, at most 10) is built over the run's MLP replacement (its cross-layer transcoder if it
has one, else its per-layer transcoders), and its replacement score and graph completeness
(:func:`~.prune.graph_scores`) are recorded, with the time the graph took. The prompt set is
``data/score_prompts.txt`` (20 short English prompts written for this purpose: not taken from the
training corpus mix nor from the circuit tasks' prompts) unless another file is given.

Features beyond ``max_feature_nodes`` (ranked by their estimated influence on the logits) get no row and
are left out of the graph, as in :func:`~.build.build_graph`; their share then counts as lost rather
than as error, so a cap that binds can only lower completeness relative to the exact graph.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from pathlib import Path

import torch

from ..dictionary.clt import find_clt, load_clt
from ..dictionary.io import check_matches_model, find_dictionaries
from ..dictionary.load import load_dictionary
from ..dictionary.replacement_set import CLTReplacement, MLPReplacement, PLTSet
from ..errors import ConfigError, DataError, DictionaryFileError
from ..model.adapter import LanguageModel
from .build import attribute

__all__ = ["graph_scores_over_prompts", "load_mlp_replacement", "score_prompts"]

SCORE_PROMPTS = "score_prompts.txt"
KINDS = ("auto", "clt", "plt")


def score_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of ``path`` (one per line; blank lines and lines starting with ``#`` skipped), by
    default the 20 packaged ones."""
    if path is None:
        text = resources.files("sparsetrace.attribute").joinpath("data", SCORE_PROMPTS).read_text(encoding="utf-8")
        where = f"sparsetrace/attribute/data/{SCORE_PROMPTS}"
    else:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"prompts file '{path}' does not exist; expected a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"prompts file '{path}' cannot be read as UTF-8 text ({e})") from None
        where = str(path)
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"prompts file '{where}' holds no prompt; expected one prompt per line")
    return prompts


def load_mlp_replacement(run: str | Path, kind: str = "auto", *, device: str = "cpu") -> MLPReplacement:
    """A run's MLP replacement for attribution: ``auto`` its CLT if it has one (``RUN/clt/``), else its
    per-layer transcoders; ``clt`` / ``plt`` ask for one of them."""
    if kind not in KINDS:
        raise ConfigError(f"--kind '{kind}' is invalid; expected one of {', '.join(KINDS)}")
    run = Path(run)
    if not run.exists():
        raise DictionaryFileError(f"run '{run}' does not exist; expected a run folder")
    clt_folder = find_clt(run)
    if kind == "clt" or (kind == "auto" and clt_folder is not None):
        if clt_folder is None:
            raise DictionaryFileError(f"run '{run}' has no cross-layer transcoder (no {run}/clt/); "
                                      "expected a run trained with --kind clt, or --kind plt")
        return CLTReplacement(load_clt(clt_folder, device=device))
    folders = [f for f in find_dictionaries(run) if f.name != "clt"]
    dicts = [load_dictionary(f, device=device) for f in folders]
    tcs = [d for d in dicts if d.cfg.kind in ("transcoder", "skip_transcoder")]
    if not tcs:
        raise DictionaryFileError(f"run '{run}' holds no transcoders (mlp_in -> mlp_out); graph scores need "
                                  "transcoders or a cross-layer transcoder")
    return PLTSet(tcs)


def _check_model(rep: MLPReplacement, lm: LanguageModel) -> None:
    if isinstance(rep, PLTSet):
        for d in rep.by_layer.values():
            check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers)
    elif rep.model_id and lm.model_id and rep.model_id != lm.model_id:
        raise DictionaryFileError(f"the cross-layer transcoder was trained on '{rep.model_id}', not "
                                  f"'{lm.model_id}'; pass the model it was trained on")


def _mean(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return sum(ok) / len(ok) if ok else float("nan")


def graph_scores_over_prompts(lm: LanguageModel, replacement: MLPReplacement, prompts: list[str], *,
                              max_feature_nodes: int = 3000, batch_size: int | None = None,
                              progress: bool = False, log=None) -> dict:
    """Per prompt and averaged: the unpruned graph's ``replacement`` score and ``graph_completeness``,
    with sizes and seconds per graph."""
    if max_feature_nodes < 1:
        raise ConfigError(f"--max-feature-nodes {max_feature_nodes} is invalid; expected an integer >= 1")
    if not prompts:
        raise DataError("no prompts to score")
    _check_model(replacement, lm)
    for p in prompts:
        lm.tokenize(p)  # a prompt longer than the model's context fails here, before any graph
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="graphs", unit="graph")
    try:
        for p in prompts:
            t0 = time.perf_counter()
            g = attribute(lm, p, replacement, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                          prune=False)
            secs = time.perf_counter() - t0
            m = g.metadata
            top = m["targets"][0] if m.get("targets") else {}
            rows.append({"prompt": p, "n_tokens": len(m["prompt_tokens"]),
                         "replacement": g.scores["replacement"], "graph_completeness": g.scores["graph_completeness"],
                         "n_active_features": m["n_active_features"], "n_feature_rows": m["n_feature_rows"],
                         "n_nodes": len(g.nodes), "n_edges": len(g.edges), "n_logits": len(m["targets"]),
                         "top_token": top.get("token"), "top_prob": top.get("prob"), "exactness": m["exactness"],
                         "seconds": round(secs, 2)})
            if log:
                log(f"{len(rows)}/{len(prompts)}: replacement {rows[-1]['replacement']:.3f}, completeness "
                    f"{rows[-1]['graph_completeness']:.3f}, {secs:.1f} s")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {
        "model": lm.model_id,
        "kind": replacement.kind,
        "layers": list(replacement.layers),
        "n_features": {str(k): v for k, v in replacement.n_features.items()},
        "max_feature_nodes": max_feature_nodes,
        "num_threads": torch.get_num_threads(),
        "n_prompts": len(rows),
        "mean": {"replacement": _mean([r["replacement"] for r in rows]),
                 "graph_completeness": _mean([r["graph_completeness"] for r in rows]),
                 "seconds": _mean([r["seconds"] for r in rows])},
        "prompts": rows,
    }


def format_scores(res: dict) -> str:
    lines = [f"{'#':>2} {'tok':>3} {'replacement':>11} {'completeness':>12} {'feats':>6} {'s':>6}  prompt"]
    for i, r in enumerate(res["prompts"], 1):
        lines.append(f"{i:>2} {r['n_tokens']:>3} {r['replacement']:>11.3f} {r['graph_completeness']:>12.3f} "
                     f"{r['n_active_features']:>6} {r['seconds']:>6.1f}  {r['prompt'][:60]}")
    m = res["mean"]
    lines.append(f"mean over {res['n_prompts']} prompts ({res['kind']}, {len(res['layers'])} layers): replacement "
                 f"{m['replacement']:.3f}, graph completeness {m['graph_completeness']:.3f}, {m['seconds']:.1f} s/graph")
    return "\n".join(lines)
