"""`sparsetrace explain` and `sparsetrace align`: dashboards, labels and causal verdicts for a layer's
features, and cross-run feature matching.

``explain_layer``: one bounded-memory pass over corpus windows (harvesting only up to the dictionary's
layer) computes the dashboards; the built-in labeler names each live feature: the tokens it fires on and
the outputs it promotes. ``promoted="steered"`` (default) takes the promoted outputs from the measured
effect of steering the feature at the maxima of its top corpus examples (``add_steered_logits``);
``"direct"`` from the decoder row through the unembedding, which ignores every later layer. Each label is
then tested causally on the run's *held-out* windows (activation test + steering test,
``verify_labels``) and gets a verdict. Dashboards go to ``<run>/features/L{layer:02d}/`` and a summary with the verified fraction to
``<run>/features/L{layer:02d}/summary.json``.

Feature selections (``--features``): ``0:200`` (a range), ``3,17,99`` (a list), ``random:120`` (120
features drawn at random among the *live* ones: candidates are drawn in a seeded random order and the
dead ones, which never fire on the corpus, are skipped), or ``all``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..dictionary.io import atomic_write_text, find_dictionaries
from ..dictionary.load import load_dictionary
from ..errors import ConfigError, DataError

FEATURES_EXPECTED = "expected a range '0:200', a list '3,17,99', 'random:120' or 'all'"


def parse_features(spec: str, n_features: int, seed: int = 0) -> tuple[list[int], int | None]:
    """(candidate features in order, how many live ones to keep: None = keep all candidates)."""
    s = str(spec).strip().lower()
    if s == "all":
        return list(range(n_features)), None
    if s.startswith("random:"):
        n = s.split(":", 1)[1]
        if not n.isdigit() or int(n) <= 0:
            raise ConfigError(f"--features '{spec}' is invalid; {FEATURES_EXPECTED}")
        order = list(range(n_features))
        random.Random(seed).shuffle(order)
        return order, int(n)
    if ":" in s:
        a, b = s.split(":", 1)
        if not (a.isdigit() and b.isdigit()) or int(a) >= int(b):
            raise ConfigError(f"--features '{spec}' is invalid; {FEATURES_EXPECTED}")
        feats = list(range(int(a), min(int(b), n_features)))
    else:
        parts = [p for p in s.replace(" ", "").split(",") if p]
        if not parts or not all(p.isdigit() for p in parts):
            raise ConfigError(f"--features '{spec}' is invalid; {FEATURES_EXPECTED}")
        feats = list(dict.fromkeys(int(p) for p in parts))
    bad = [f for f in feats if f >= n_features]
    if bad or not feats:
        raise ConfigError(f"--features '{spec}' names features outside 0..{n_features - 1}")
    return feats, None


def find_layer_dictionary(run_dir: str | Path, layer: int) -> Path:
    found = [p for p in find_dictionaries(run_dir) if _layer_of(p) == layer]
    if not found:
        layers = sorted({x for x in (_layer_of(p) for p in find_dictionaries(run_dir)) if x is not None})
        raise DataError(f"run '{run_dir}' has no dictionary for layer {layer}; it has layers {layers}")
    return found[0]


def _layer_of(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("layer"))
    except (OSError, ValueError, TypeError, AttributeError):
        d = load_dictionary(folder)
        return int(d.cfg.layer)


def corpus_windows(lm, run_dir: Path, corpus: str | None, n_tokens: int, context: int,
                   heldout: Tensor | None, *, with_index: bool = False):
    """Token windows for dashboards: the run's corpus (or ``corpus``), without its held-out windows.
    ``with_index``: also the stream index of each window (its place among the corpus's consecutive
    windows) and the stream indices at which held-out windows were met."""
    from ..data.corpus import load_texts
    from ..data.tokens import tokenize_windows

    if corpus is None:
        try:
            corpus = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("corpus") or "default"
        except (OSError, ValueError, AttributeError):
            corpus = "default"
    n_windows = max(1, n_tokens // context)
    extra = len(heldout) if heldout is not None else 0
    windows = tokenize_windows(lm.tokenizer, load_texts(corpus), context, max_windows=n_windows + extra)
    index = list(range(len(windows)))
    met: list[int] = []
    if heldout is not None and heldout.shape[1] == windows.shape[1]:
        held = {tuple(r) for r in heldout.tolist()}
        rows = [tuple(r) for r in windows.tolist()]
        index = [i for i, r in enumerate(rows) if r not in held]
        met = [i for i, r in enumerate(rows) if r in held]
        windows = windows[index]
    if with_index:
        return windows[:n_windows], index[:n_windows], met
    return windows[:n_windows]


def _ranges(idx: list[int]) -> list[list[int]]:
    """Sorted integers as half-open ranges ``[[start, end), ...]``."""
    out: list[list[int]] = []
    for i in sorted(idx):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _windows_record(source: str, windows: Tensor, stream_index: list[int] | None) -> dict:
    """Which windows of the corpus's token stream a part uses: counts, window and token ranges."""
    n, ctx = int(windows.shape[0]), int(windows.shape[1])
    rec: dict = {"source": source, "n_windows": n, "n_tokens": n * ctx, "context": ctx}
    if stream_index is not None:
        wr = _ranges(stream_index)
        rec["stream_window_ranges"] = wr
        rec["stream_token_ranges"] = [[a * ctx, b * ctx] for a, b in wr]
    return rec


def explain_layer(
    lm,
    run_dir: str | Path,
    layer: int,
    features: str = "random:100",
    *,
    n_tokens: int = 60_000,
    corpus: str | None = None,
    context: int = 128,
    verify: bool = True,
    promoted: str = "steered",
    extra: list[int] | tuple[int, ...] = (),
    seed: int = 0,
    labeler: str = "builtin",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Dashboards + built-in labels + causal verdicts for features of one layer; returns the summary.

    ``extra``: features explained in addition to the selection (e.g. a circuit's); the summary's
    ``verdicts`` cover the selection only, ``extra_verdicts`` these. ``labeler``: ``builtin``,
    ``local:PATH`` or ``openai:URL[#MODEL]`` (see :func:`~.llm_labelers.make_labeler`).

    Labels are written from the dashboard windows (corpus windows outside the run's held-out set) and
    verified on the run's held-out windows (without them: the last tenth of the corpus windows); the
    summary and every dashboard record both (``label_windows``)."""
    from ..evaluate.job import heldout_windows
    from ..util.hashing import sha256_file
    from .dashboards import compute_dashboards
    from .labels import LabelCache, dictionary_sha, label_features
    from .llm_labelers import make_labeler
    from .steered import add_steered_logits
    from .verify_labels import VerifyConfig, summarize_verdicts, verify_labels
    from .writer import write_dashboards

    say = log or (lambda _m: None)
    if promoted not in ("steered", "direct"):
        raise ConfigError(f"--promoted '{promoted}' is unknown; expected steered or direct")
    labeler_obj = make_labeler(labeler, promoted=promoted, device=str(lm.device))
    run_dir = Path(run_dir)
    folder = find_layer_dictionary(run_dir, layer)
    d = load_dictionary(folder, device=lm.device)
    from ..dictionary.io import check_matches_model

    check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers)
    candidates, n_live = parse_features(features, d.n_features, seed)
    heldout = None
    if (run_dir / "heldout_tokens.safetensors").exists():  # the run's own held-out windows
        try:
            heldout = heldout_windows(run_dir, lm, None, n_windows=10_000, context=context)
        except DataError:
            heldout = None
    if heldout is not None and heldout.shape[1] != context:
        # the run's held-out windows can only be left out of windows of their own width
        say(f"dashboard windows of {heldout.shape[1]} tokens (the run's held-out window width), not {context}")
        context = int(heldout.shape[1])
    windows, stream_index, held_met = corpus_windows(lm, run_dir, corpus, n_tokens, context, heldout,
                                                     with_index=True)
    if len(windows) < 2:
        raise DataError(f"the corpus gives {len(windows)} window(s) of {context} tokens outside the run's held-out "
                        f"text; expected at least 2 (pass --corpus with more text)")
    corpus_name = corpus or "the run's corpus"
    if heldout is None:  # no held-out windows recorded: hold out the last 10% of the corpus windows
        cut = max(1, len(windows) // 10)
        windows, heldout = windows[:-cut], windows[-cut:]
        write_index, verify_index = stream_index[:-cut], stream_index[-cut:]
        verify_rec = _windows_record(f"{corpus_name}: the last tenth of the windows", heldout, verify_index)
    else:
        write_index = stream_index
        verify_rec = _windows_record("the run's held-out windows (heldout_tokens.safetensors)", heldout, None)
        verify_rec["met_in_writing_stream"] = {"n": len(held_met), "stream_window_ranges": _ranges(held_met)}
    split = {
        "writing": _windows_record(f"{corpus_name}: dashboard windows (top examples, steering of the top examples)",
                                   windows, write_index),
        "verification": verify_rec,
        "shared_windows": len(set(map(tuple, windows.tolist())) & set(map(tuple, heldout.tolist()))),
    }
    dict_sha256 = sha256_file(folder / "weights.safetensors") if (folder / "weights.safetensors").is_file() else None
    # a random live sample: twice as many candidates as wanted in one pass, topped up if too many were dead
    todo = candidates if n_live is None else candidates[: 2 * n_live]
    rest = [] if n_live is None else candidates[2 * n_live :]
    extra = [int(f) for f in dict.fromkeys(extra) if 0 <= int(f) < d.n_features]
    todo = todo + [f for f in extra if f not in set(todo)]
    t0 = time.perf_counter()
    bar = _bar(progress, len(windows), f"dashboards L{layer}")
    dashboards = compute_dashboards(lm, d, windows, todo, seed=seed, progress=bar)
    while n_live is not None and sum(1 for x in dashboards.values() if x["top_examples"]) < n_live and rest:
        more, rest = rest[: 4 * n_live], rest[4 * n_live :]
        dashboards.update(compute_dashboards(lm, d, windows, more, seed=seed, progress=bar))
    if hasattr(bar, "close"):
        bar.close()
    dash_s = time.perf_counter() - t0
    order = [f for f in candidates if f in dashboards]
    live = [f for f in order if dashboards[f]["top_examples"]]
    dead = [f for f in order if not dashboards[f]["top_examples"]]
    chosen = live[:n_live] if n_live is not None else live
    say(f"layer {layer}: {len(dashboards)} dashboards over {windows.numel():,} tokens in {dash_s:.0f} s; "
        f"{len(live)} live, {len(dead)} never fired")
    keep = {f: dashboards[f] for f in (chosen if n_live is not None else order)}
    keep.update({f: dashboards[f] for f in extra})
    extra_live = [f for f in extra if dashboards[f]["top_examples"] and f not in set(chosen)]
    chosen_all = chosen + extra_live
    if promoted == "steered" and chosen_all:
        t1 = time.perf_counter()
        add_steered_logits(lm, d, keep, windows, chosen_all)
        say(f"measured steering effects of {len(chosen_all)} features in {time.perf_counter() - t1:.0f} s")
    cache = LabelCache(run_dir / "features" / "labels.json")
    labels = label_features({f: keep[f] for f in chosen_all}, labeler_obj, cache=cache, dict_sha=dictionary_sha(d))
    for f in keep:
        if f not in labels:
            keep[f]["label"] = "dead (never fired on the corpus)"
    results: dict[int, dict] = {}
    verify_s = 0.0
    if verify and chosen_all:
        t1 = time.perf_counter()
        vbar = _bar(progress, len(chosen_all), f"verifying labels L{layer}")
        results = verify_labels(lm, d, keep, labels, heldout, cfg=VerifyConfig(seed=seed), features=chosen_all,
                                progress=vbar, split={k: split[k]["source"] for k in ("writing", "verification")})
        if hasattr(vbar, "close"):
            vbar.close()
        verify_s = time.perf_counter() - t1
    for dash in keep.values():
        dash["dictionary_sha256"] = dict_sha256
        dash["label_windows"] = {k: split[k]["source"] for k in ("writing", "verification")}
    write_dashboards(run_dir, layer, keep)
    summary = {
        "layer": layer,
        "dictionary": str(folder),
        "features": features,
        "n_dashboards": len(keep),
        "n_live": len(chosen),
        "n_dead_seen": len(dead),
        "n_tokens": int(windows.numel()),
        "seconds": {"dashboards": round(dash_s, 1), "verify": round(verify_s, 1)},
        "verdicts": summarize_verdicts({f: results[f] for f in chosen if f in results}) if results else None,
        "extra_features": extra,
        "extra_verdicts": summarize_verdicts({f: results[f] for f in extra if f in results}) if extra and results
        else None,
        "labeler": labeler_obj.id,
        "dictionary_sha256": dict_sha256,
        "label_windows": split,
    }
    atomic_write_text(run_dir / "features" / f"L{layer:02d}" / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    class _Update:
        def __call__(self, done: int, _total: int) -> None:
            bar.update(done - bar.n)

        def close(self) -> None:
            bar.close()

    return _Update()


def format_explain(summary: dict) -> str:
    v = summary.get("verdicts") or {}
    lines = [f"layer {summary['layer']}: {summary['n_dashboards']} dashboards over {summary['n_tokens']:,} tokens "
             f"({summary['n_live']} live features labelled)"]
    if v:
        lines.append(f"  causal verdicts on {v['n']} labels: verified {v['verified']} ({v['verified_fraction']:.0%}), "
                     f"associative {v['associative']} ({v['associative_fraction']:.0%}), "
                     f"failed {v['failed']} ({v['failed_fraction']:.0%})")
        lines.append(f"  activation test passed {v['activation_pass_fraction']:.0%}, "
                     f"steering test passed {v['intervention_pass_fraction']:.0%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- align
def align_runs(run1: str | Path, run2: str | Path, *, layer: int | None = None, threshold: float = 0.7,
               out: str | Path | None = None, densities: Tensor | None = None) -> dict:
    """Match the features of two runs' dictionaries for one layer (the first common layer by default);
    writes ``align.json`` into ``out`` (default: the first run folder)."""
    from .align import align, write_alignment

    run1 = Path(run1)
    run2 = Path(run2)
    l1 = {_layer_of(p): p for p in find_dictionaries(run1)}
    l2 = {_layer_of(p): p for p in find_dictionaries(run2)}
    common = sorted(set(l1) & set(l2))
    if layer is None:
        if not common:
            raise DataError(f"runs '{run1}' and '{run2}' share no layer (layers {sorted(l1)} and {sorted(l2)})")
        layer = common[0]
    if layer not in common:
        raise DataError(f"layer {layer} is not in both runs (layers {sorted(l1)} and {sorted(l2)})")
    d1, d2 = load_dictionary(l1[layer]), load_dictionary(l2[layer])
    if (d1.cfg.d_in, d1.cfg.d_out) != (d2.cfg.d_in, d2.cfg.d_out):
        raise DataError(f"layer-{layer} dictionaries have different widths ({d1.cfg.d_in} vs {d2.cfg.d_in})")
    res = align(d1, d2, densities1=densities, threshold=threshold)
    path = write_alignment(Path(out) if out else run1, res, run1=str(run1), run2=str(run2), layer=layer,
                           dictionary1=str(l1[layer]), dictionary2=str(l2[layer]))
    res["path"] = str(path)
    res["layer"] = layer
    return res


def feature_densities(lm, dictionary, windows: Tensor, batch_windows: int = 16) -> Tensor:
    """Firing frequency of every feature of ``dictionary`` over token windows (BOS excluded)."""
    from ..model.prefix_cache import harvest

    hp_name, layer = dictionary.cfg.hookpoint_in, dictionary.cfg.layer
    from ..model.hookpoints import Hookpoint

    hp = Hookpoint(hp_name, layer)
    counts = torch.zeros(dictionary.n_features, dtype=torch.float64)
    n = 0
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    with torch.no_grad():
        for s in range(0, len(windows), batch_windows):
            ids = windows[s : s + batch_windows]
            x = harvest(lm, ids.to(lm.device), hp)
            valid = (ids != bos) if bos is not None else torch.ones_like(ids, dtype=torch.bool)
            f = dictionary.features(x[valid.to(x.device)].to(dictionary.W_enc.dtype))
            counts += (f > 0).sum(0).double().cpu()
            n += int(valid.sum())
    return (counts / max(n, 1)).float()


def format_align(res: dict) -> str:
    o = res["overall"]
    lines = [f"layer {res['layer']}: {o['matched']}/{o['n']} features matched ({o['fraction']:.1%}) at cosine >= "
             f"{res.get('threshold', 0.7)}"]
    for b in res.get("by_density", []):
        frac = b.get("fraction")
        lines.append(f"  {b['label']:>22s}: {b['matched']:5d}/{b['n']:<5d} {'' if frac is None else f'{frac:.1%}'}")
    lines.append(f"  written: {res['path']}")
    return "\n".join(lines)
