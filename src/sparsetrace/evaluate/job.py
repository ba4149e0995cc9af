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


def evaluate_run(
    run_dir: str | Path,
    *,
    model: str | None = None,
    corpus: str | None = None,
    n_windows: int = 32,
    lm: LanguageModel | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict:
    run_dir = Path(run_dir)
    dictionaries = load_run_dictionaries(run_dir)
    lm = lm or LanguageModel.load(model_for(dictionaries, model))
    windows = heldout_windows(run_dir, lm, corpus, n_windows)
    result = evaluate(lm, dictionaries, windows, progress=progress)
    if write:
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        for path, row in zip(find_dictionaries(run_dir), result["dictionaries"], strict=False):
            atomic_write_text(path / "metrics.json", json.dumps(row, indent=2))
    return result


def format_table(result: dict) -> str:
    cols = [
        ("layer", "layer", "{}"),
        ("kind", "kind", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.3f}"),
        ("dead", "dead_frac", "{:.1%}"),
        ("dense", "dense_frac", "{:.1%}"),
        ("CE spliced", "ce_spliced", "{:.3f}"),
        ("rec(zero)", "ce_recovered_vs_zero", "{:.1%}"),
        ("rec(mean)", "ce_recovered_vs_mean", "{:.1%}"),
        ("KL", "kl", "{:.4f}"),
    ]
    rows = [[h for h, _, _ in cols]]
    for r in result["dictionaries"]:
        rows.append([f.format(r[k]) for _, k, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [f"model {result['model']}   clean CE {result['clean_ce']:.3f} nats/token   ({result['n_windows']} held-out windows)"]
    out += lines
    if result["substitution"]:
        out.append("")
        out.append("all trained layers substituted at once (first k layers):")
        for s in result["substitution"]:
            out.append(
                f"  k={s['n_layers']} layers {s['layers']}: CE {s['ce_loss']:.3f} ({s['ce_increase']:+.3f}), KL {s['kl']:.4f}"
            )
    return "\n".join(out)
