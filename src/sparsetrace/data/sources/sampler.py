"""Last resort for the default corpus: text sampled from the model itself (cached per model)."""

from __future__ import annotations

import re

from ...errors import DataError
from ...util.cache import log
from ..fetch import read_cached, write_cache

__all__ = ["make_model_sampler", "sampled_corpus"]


def make_model_sampler(model, tokenizer, *, max_new_tokens: int = 200, batch_size: int = 8, seed: int = 0):
    """A ``model_sampler`` for :func:`default_corpus_texts`: samples text from ``model`` (temperature 1).

    The returned callable takes the number of characters still needed and returns a list of texts.
    """
    import torch

    state = {"seed": seed}

    def sample(n_chars_needed: int) -> list[str]:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError("cannot sample a corpus from the model: its tokenizer has no BOS or EOS token")
        device = next(model.parameters()).device
        ids = torch.full((batch_size, 1), int(start), dtype=torch.long, device=device)
        gen = torch.Generator(device="cpu").manual_seed(state["seed"])
        state["seed"] += 1
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(start),
            )
        texts = [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in out]
        return [t for t in texts if t]

    return sample


def sampled_corpus(model_sampler, sampler_id: str, min_chars: int) -> list[str]:
    name = "model-samples-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", sampler_id)[:80]
    cached = read_cached(name)
    if cached is not None and sum(len(t) for t in cached) >= min_chars:
        return cached
    log(f"no text corpus is available offline; sampling ~{min_chars:,} characters from the model instead")
    texts: list[str] = []
    total = 0
    stalls = 0
    while total < min_chars and stalls < 5:
        new = [t for t in model_sampler(min_chars - total) if isinstance(t, str) and t.strip()]
        stalls = stalls + 1 if not new else 0
        texts.extend(new)
        total += sum(len(t) for t in new)
    if not texts:
        raise DataError("the model sampler produced no text for the default corpus")
    write_cache(name, texts, {"name": name, "source": f"sampled from {sampler_id}", "license": "generated"})
    return texts
