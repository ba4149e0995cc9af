"""Hookpoints read and replace correctly on every supported architecture."""

import pytest
import torch

from sparsetrace.errors import DataError, HookpointError
from sparsetrace.model.hookpoints import HOOKPOINTS, Hookpoint

TINY_MODELS = ["tiny-gpt2", "tiny-neox", "tiny-llama", "tiny-gptneo"]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_hookpoints_decompose_residual(tiny_lms, name):
    lm = tiny_lms[name]
    ids = torch.randint(0, lm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    layer = 1
    out = lm.run(ids, read=[Hookpoint(h, layer) for h in HOOKPOINTS])
    a = {h.name: t for h, t in out.acts.items()}
    for t in a.values():
        assert t.shape == (2, 9, lm.d_model)
    # resid_post = resid_pre + attn_out + mlp_out holds for sequential and parallel residuals
    assert torch.allclose(a["resid_post"], a["resid_pre"] + a["attn_out"] + a["mlp_out"], atol=1e-5)
    mlp = lm.arch.mlp(layer)
    assert torch.allclose(mlp(a["mlp_in"]), a["mlp_out"], atol=1e-6)
    # next layer's resid_pre is this layer's resid_post
    nxt = lm.run(ids, read=[Hookpoint("resid_pre", layer + 1)]).acts[Hookpoint("resid_pre", layer + 1)]
    assert torch.allclose(nxt, a["resid_post"], atol=1e-6)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_replacement_changes_downstream_only(tiny_lms, name):
    lm = tiny_lms[name]
    ids = torch.randint(0, lm.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    clean = lm.run(ids)
    same = lm.run(ids, edit={Hookpoint("mlp_out", 2): lambda x: x})
    assert torch.equal(clean.logits, same.logits)
    zeroed = lm.run(ids, edit={Hookpoint("mlp_out", 2): torch.zeros_like}, read=[Hookpoint("resid_pre", 2)])
    assert not torch.allclose(clean.logits, zeroed.logits)
    # replace_mlp swaps the forward: the edit receives the MLP input
    mlp = lm.arch.mlp(2)
    swapped = lm.run(ids, edit={Hookpoint("mlp_out", 2): lambda x: type(mlp).forward(mlp, x)}, replace_mlp=True)
    assert torch.allclose(clean.logits, swapped.logits, atol=1e-6)
    # patched forward is restored afterwards
    assert "forward" not in vars(mlp)


def test_stop_after_skips_later_layers(tiny_llama):
    lm = tiny_llama
    ids = torch.randint(0, lm.vocab_size, (1, 5))
    calls = []
    h = lm.arch.layer(3).register_forward_hook(lambda *a: calls.append(1))
    try:
        out = lm.run(ids, read=[Hookpoint("mlp_in", 1)], stop_after=1)
    finally:
        h.remove()
    assert out.logits is None and not calls
    assert Hookpoint("mlp_in", 1) in out.acts


def test_bad_hookpoints(tiny_llama):
    with pytest.raises(HookpointError, match="unknown hookpoint 'mlp_mid'"):
        tiny_llama.run(torch.ones(1, 3, dtype=torch.long), read=[Hookpoint("mlp_mid", 0)])
    with pytest.raises(HookpointError, match="layer 9 is out of range"):
        tiny_llama.run(torch.ones(1, 3, dtype=torch.long), read=[Hookpoint("mlp_in", 9)])
    with pytest.raises(HookpointError):
        Hookpoint.parse("mlp_in")
    assert Hookpoint.parse("mlp_out.6") == Hookpoint("mlp_out", 6) == Hookpoint.parse("6.mlp_out")


def test_prompt_errors(tiny_llama):
    with pytest.raises(DataError, match="empty"):
        tiny_llama.tokenize("   ")
    with pytest.raises(DataError, match="context"):
        tiny_llama.tokenize("word " * 2000)
