"""`sparsetrace evaluate RUN`: load a run's dictionaries and model, evaluate, write eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokens import tokenize_windows
from ..dictionary.io import atomic_write_text, find_dictionaries
from ..dictionary.load import load_dictionary
from ..dictionary.model import SparseDictionary
from ..errors import DataError, DictionaryFileError
from ..model.adapter import LanguageModel
from .metrics import evaluate

HELDOUT = "heldout_tokens.safetensors"


def load_run_dictionaries(run_dir: str | Path, device: str = "cpu") -> list[SparseDictionary]:
    return [load_dictionary(p, device=device) for p in find_dictionaries(run_dir)]


def model_for(dictionaries: list[SparseDictionary], model: str | None) -> str:
    if model:
        return model
    ids = {d.cfg.model_id for d in dictionaries if d.cfg.model_id}
    if len(ids) > 1:
        raise DictionaryFileError(f"dictionaries were trained on different models {sorted(ids)}; pass --model")
    if not ids:
        raise DictionaryFileError("the dictionaries do not record their model; pass --model")
    return ids.pop()


def heldout_windows(run_dir: Path, lm: LanguageModel, corpus: str | None, n_windows: int, context: int = 128):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(run_dir) / HELDOUT
    if corpus is None and p.exists():
        try:
            tokens = load_file(str(p))["tokens"]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise DataError(
                f"held-out tokens file '{p}' is corrupt ({e}); delete it or pass --corpus for held-out text"
            ) from None
        if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.numel() == 0:
            raise DataError(f"held-out tokens file '{p}' has {tokens.dtype} {list(tokens.shape)}; expected windows of token ids")
        if int(tokens.min()) < 0 or int(tokens.max()) >= lm.vocab_size:
            raise DataError(f"held-out tokens in '{p}' are not token ids of '{lm.model_id}' (vocab {lm.vocab_size})")
        return tokens[:n_windows]
    from ..data.corpus import load_texts

    texts = load_texts(corpus or "default")
    return tokenize_windows(lm.tokenizer, texts, context, max_windows=n_windows)


TRAINING_STATS = "training_stats.safetensors"
TRAINING_STATS_JSON = "training_stats.json"
CALIBRATION_FVU_TOLERANCE = 0.05


def training_references(folder: Path) -> dict | None:
    """What training saved beside a dictionary (train/stats.py), or None for dictionaries without it."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p, pj = Path(folder) / TRAINING_STATS, Path(folder) / TRAINING_STATS_JSON
    if not p.exists():
        return None
    try:
        t = load_file(str(p))
        info = json.loads(pj.read_text(encoding="utf-8")) if pj.exists() else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryFileError(f"'{p}' is corrupt ({e}); delete it to evaluate without training statistics") \
            from None
    ref = {k: t[k] for k in ("target_mean", "fire_count", "b_enc_before_calibration",
                             "threshold_before_calibration") if k in t}
    if "fire_count" in ref and int(info.get("stream_tokens", 1)) == 0:
        ref.pop("fire_count")
    if "target_mean" in ref and not bool(torch.isfinite(ref["target_mean"]).all()):
        ref.pop("target_mean")
    ref["stream_tokens"] = info.get("stream_tokens")
    ref["training"] = info
    return ref


def evaluation_warnings(result: dict, refs: list[dict | None]) -> list[str]:
    """Loud lines for the table and eval.json: training's own warnings, a calibration that hurt
    held-out FVU by more than 5% (relative), and dictionaries worse than mean-ablation."""
    out = []
    for row, ref in zip(result["dictionaries"], refs, strict=True):
        layer = row["layer"]
        for w in ((ref or {}).get("training") or {}).get("warnings", []):
            out.append(f"training: {w}")
        before = row.get("fvu_before_calibration")
        if before is not None and before > 0 and (row["fvu"] - before) / before > CALIBRATION_FVU_TOLERANCE:
            out.append(f"layer {layer}: the L0 calibration raised held-out FVU from {before:.3f} to {row['fvu']:.3f} "
                       f"({(row['fvu'] - before) / before:+.0%})")
        if "ce_spliced" not in row:  # per-layer CE skipped
            continue
        row["worse_than_mean_ablation"] = bool(row["ce_spliced"] > row["ce_mean_ablation"])
        if row["worse_than_mean_ablation"]:
            out.append(f"layer {layer}: splicing the dictionary in is WORSE than mean-ablating {row['hookpoint_out']} "
                       f"(CE {row['ce_spliced']:.3f} vs {row['ce_mean_ablation']:.3f})")
    return out


def eval_path(run_dir: str | Path, corpus: str | None) -> Path:
    """Where an evaluation is written: eval.json on the run's held-out windows, eval_<corpus slug>.json else."""
    import re

    if corpus is None:
        return Path(run_dir) / "eval.json"
    name = corpus.rstrip("/\\")
    name = Path(name).stem if ("/" in name or "." in Path(name).name) and not name.startswith("hf:") else name
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60] or "corpus"
    return Path(run_dir) / f"eval_{slug}.json"


def _run_replacement(run_dir: Path, dictionaries: list[SparseDictionary]):
    """The run's CLT, else a PLTSet of its transcoders, else None."""
    from ..dictionary.clt import find_clt
    from ..dictionary.replacement_set import PLTSet, load_replacement

    if find_clt(run_dir) is not None:
        return load_replacement(run_dir)
    tcs = [d for d in dictionaries if d.cfg.kind in ("transcoder", "skip_transcoder")
           and (d.cfg.hookpoint_in, d.cfg.hookpoint_out) == ("mlp_in", "mlp_out")]
    try:
        return PLTSet(tcs) if tcs else None
    except DictionaryFileError:  # e.g. two transcoders on one layer: no single replacement to evaluate
        return None


def _training_means(run_dir: Path, rep, dictionaries, refs) -> dict:
    """Mean MLP output per replaced layer over the training activations, where the run saved it."""
    from ..dictionary.clt import find_clt

    if rep.kind == "clt":
        ref = training_references(find_clt(run_dir)) or {}
        m = ref.get("target_mean")
        return {ly: m[ly] for ly in rep.layers} if m is not None and m.dim() == 2 else {}
    return {d.cfg.layer: r["target_mean"] for d, r in zip(dictionaries, refs, strict=True)
            if r and r.get("target_mean") is not None and d.cfg.layer in rep.layers
            and d.cfg.kind in ("transcoder", "skip_transcoder")}


def evaluate_run(
    run_dir: str | Path,
    *,
    model: str | None = None,
    corpus: str | None = None,
    n_windows: int = 64,
    lm: LanguageModel | None = None,
    progress: bool = True,
    write: bool = True,
    replacement: bool | None = None,
    per_layer_ce: bool | None = None,
) -> dict:
    """Evaluate a run's dictionaries and, when they replace every MLP (a transcoder on every layer, or a
    CLT) or ``replacement=True``, the full replacement (:mod:`.replacement`) under ``result["replacement"]``.

    ``per_layer_ce`` (default: on unless the full replacement of every layer is evaluated): the per-dictionary
    splices (CE spliced / zero / mean, KL); FVU, L0, dead and dense need only the clean pass.
    """
    from ..dictionary.clt import find_clt

    run_dir = Path(run_dir)
    has_clt = find_clt(run_dir) is not None
    try:
        paths = find_dictionaries(run_dir)
    except DictionaryFileError:
        if not has_clt:
            raise
        paths = []
    dictionaries = [load_dictionary(p) for p in paths]
    refs = [training_references(p) for p in paths]
    rep = _run_replacement(run_dir, dictionaries)
    if replacement and rep is None:
        raise DictionaryFileError(f"'{run_dir}' has no transcoders (mlp_in -> mlp_out) and no CLT; "
                                  f"--replacement needs one of them")
    lm = lm or LanguageModel.load(model or (rep.model_id if has_clt and rep.model_id else None)
                                  or model_for(dictionaries, model))
    full = rep is not None and (rep.kind == "clt" or rep.layers == list(range(lm.n_layers)))
    do_rep = bool(rep is not None and (replacement if replacement is not None else full))
    if per_layer_ce is None:
        per_layer_ce = not (do_rep and full)
    windows = heldout_windows(run_dir, lm, corpus, n_windows)
    import time

    t0 = time.perf_counter()
    result = evaluate(lm, dictionaries, windows, progress=progress, references=refs,
                      substitution=not do_rep, per_layer_ce=per_layer_ce)
    result["seconds_dictionaries"] = round(time.perf_counter() - t0, 2)
    if not per_layer_ce and dictionaries:
        result["notes"].append("per-layer CE splices skipped (the full replacement is evaluated instead); "
                               "pass --per-layer-ce for CE/KL with each dictionary spliced in alone")
    if do_rep:
        from .replacement import as_substitution, evaluate_replacement

        means = _training_means(run_dir, rep, dictionaries, refs)
        result["replacement"] = evaluate_replacement(lm, rep, windows, means=means, progress=progress)
        result["substitution"] = as_substitution(result["replacement"])
        if result["replacement"]["mean_ablation_reference"] != "training":
            result["notes"].append("replacement: no training means saved for every replaced layer; mean-ablation "
                                   f"uses {result['replacement']['mean_ablation_reference']}")
    if len(windows) < n_windows:
        result["notes"].append(f"only {len(windows)} held-out windows were available (asked for {n_windows}); "
                               f"pass --corpus FILE for more")
    by_layer = sorted(zip(dictionaries, refs, strict=True), key=lambda p: p[0].cfg.layer)
    result["warnings"] = evaluation_warnings(result, [r for _, r in by_layer])
    if write and corpus is not None:  # other text: beside the run's own held-out figures, named by the corpus
        atomic_write_text(eval_path(run_dir, corpus), json.dumps({"corpus": corpus, **result}, indent=2))
    elif write:
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        for path, row in zip(find_dictionaries(run_dir), result["dictionaries"], strict=False):
            atomic_write_text(path / "metrics.json", json.dumps(row, indent=2))
    return result


def _with_ci(row: dict, key: str, fmt: str) -> str:
    value = fmt.format(row[key])
    ci = row.get(f"{key}_ci")
    if ci is None:
        return value
    lo, hi = (fmt.format(c).rstrip("%") for c in ci)
    return f"{value} [{lo}, {hi}]"


def format_table(result: dict) -> str:
    cols = [
        ("layer", "layer", "{}"),
        ("kind", "kind", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.3f}"),
        ("FVU precal", "fvu_before_calibration", "{:.3f}"),
        ("dead(train)", "dead_frac", "{:.1%}"),
        ("dense", "dense_frac", "{:.1%}"),
        ("CE spliced", "ce_spliced", "{:.3f}"),
        ("rec(zero)", "ce_recovered_vs_zero", "{:.1%}"),
        ("rec(mean)", "ce_recovered_vs_mean", "{:.1%}"),
        ("KL", "kl", "{:.4f}"),
    ]
    with_ci = {"l0", "fvu", "fvu_before_calibration", "ce_spliced", "ce_recovered_vs_zero", "ce_recovered_vs_mean", "kl"}
    rows = [[h for h, _, _ in cols] + [""]]
    for r in result["dictionaries"]:
        cells = []
        for _, k, f in cols:
            if k not in r:
                cells.append("-")
            elif k in with_ci:
                cells.append(_with_ci(r, k, f))
            else:
                cells.append(f.format(r[k]))
        cells.append("<- WORSE THAN MEAN-ABLATION" if r.get("worse_than_mean_ablation") else "")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths[:-1]))
    lo, hi = result.get("clean_ce_ci", [float("nan")] * 2)
    out = [f"model {result['model']}   clean CE {result['clean_ce']:.3f} [{lo:.3f}, {hi:.3f}] nats/token   "
           f"({result['n_windows']} held-out windows; [..] = {result.get('interval_definition', '95% interval')})"]
    out += lines
    if result.get("replacement"):
        from .replacement import format_replacement

        out += ["", format_replacement(result["replacement"])]
    elif result["substitution"]:
        out.append("")
        out.append("all trained layers substituted at once (first k layers):")
        for s in result["substitution"]:
            out.append(
                f"  k={s['n_layers']} layers {s['layers']}: CE {s['ce_loss']:.3f} ({s['ce_increase']:+.3f}), KL {s['kl']:.4f}"
            )
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    for w in result.get("warnings", []):
        out.append(f"WARNING: {w}")
    return "\n".join(out)
