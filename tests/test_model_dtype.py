"""--model-dtype bfloat16: activations harvested from a bf16 copy of the model are float32 rows close to
the float32 model's, under their own cache entry (never mixed with float32 harvests)."""

import torch

from sparsetrace.data.store import harvest
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.model.hookpoints import Hookpoint


def test_bfloat16_model_harvest_is_close_and_cached_apart(tmp_path):
    lms = {dt: LanguageModel.load("tiny-llama", dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    assert lms[torch.bfloat16].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(5, lms[torch.float32].vocab_size, (8, 24), generator=g)
    hps = [Hookpoint("mlp_in", 1), Hookpoint("mlp_out", 1)]
    caches = {dt: harvest(lm, windows, hps, cache_dir=tmp_path, progress=False) for dt, lm in lms.items()}
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # one entry per model dtype
    for hp in hps:
        ref = caches[torch.float32].get(hp, slice(None))
        got = caches[torch.bfloat16].get(hp, slice(None))
        assert got.dtype == torch.float32 and got.shape == ref.shape
        rel = float((got - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum())
        assert 0 < rel < 1e-2, (hp, rel)
