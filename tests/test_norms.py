"""The one MLP-norm table (model/norms.py) against what each architecture really feeds its MLP."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsetrace.dictionary.interop import parse_hf_module  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.hookpoints import Hookpoint  # noqa: E402
from sparsetrace.model.norms import apply_norm, model_type_from_name, norm_info, norm_spec  # noqa: E402

TINY = ["tiny-gpt2", "tiny-neox", "tiny-llama", "tiny-gptneo"]


def _randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.0 if "bias" in name else 0.3))


def _tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LanguageModel(Gemma2ForCausalLM(cfg), None, "tiny-gemma2")


def _mlp_input_check(lm, residual_mid):
    _randomise_norms(lm.model)
    ids = torch.randint(1, lm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    for L in range(lm.n_layers):
        hps = [Hookpoint(n, L) for n in ("resid_pre", "attn_out", "mlp_in")]
        acts = lm.run(ids, read=hps).acts
        h = residual_mid(lm, L, acts[hps[0]], acts[hps[1]])
        torch.testing.assert_close(apply_norm(lm, L, "mlp", h), acts[hps[2]], atol=1e-4, rtol=1e-4)


def test_gemma2_mlp_norm_is_pre_feedforward_with_one_plus_scale():
    lm = _tiny_gemma2()
    spec = norm_spec(lm)
    assert spec.mlp == "pre_feedforward_layernorm" and spec.one_plus
    info = norm_info(lm, 0, "mlp")
    assert info.module is lm.arch.layer(0).pre_feedforward_layernorm
    torch.testing.assert_close(info.gamma, lm.arch.layer(0).pre_feedforward_layernorm.weight.float() + 1)

    def mid(lm, L, resid_pre, attn_out):
        # Gemma-2: h = x + post_attention_layernorm(attn(input_layernorm(x))); the MLP reads
        # pre_feedforward_layernorm(h)
        return resid_pre + lm.arch.layer(L).post_attention_layernorm(attn_out)

    _mlp_input_check(lm, mid)
    # the old tables' choice (post_attention_layernorm, scale w) does not give the MLP input
    ids = torch.randint(1, lm.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    acts = lm.run(
        ids, read=[Hookpoint("resid_pre", 1), Hookpoint("attn_out", 1), Hookpoint("mlp_in", 1)]
    ).acts
    h = acts[Hookpoint("resid_pre", 1)] + lm.arch.layer(1).post_attention_layernorm(
        acts[Hookpoint("attn_out", 1)]
    )
    w = lm.arch.layer(1).post_attention_layernorm.weight
    wrong = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert not torch.allclose(wrong, acts[Hookpoint("mlp_in", 1)], atol=1e-2)


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_mlp_norm(name):
    lm = LanguageModel.load(name)

    def mid(lm, L, resid_pre, attn_out):
        return resid_pre if lm.arch.parallel_residual else resid_pre + attn_out

    _mlp_input_check(lm, mid)


def test_final_norm_matches_the_model():
    lm = _tiny_gemma2()
    _randomise_norms(lm.model)
    x = torch.randn(3, lm.d_model)
    torch.testing.assert_close(apply_norm(lm, None, "final", x), lm.arch.final_norm(x), atol=1e-5, rtol=1e-5)


def test_hf_module_names_follow_the_table():
    assert parse_hf_module("model.layers.4.post_attention_layernorm")[::2] == (4, "mlp_in")
    assert parse_hf_module("model.layers.4.pre_feedforward_layernorm")[::2] == (4, "mlp_in")
    assert parse_hf_module("model.layers.4.post_attention_layernorm", "gemma2")[2] != "mlp_in"
    assert parse_hf_module("h.2.ln_2")[::2] == (2, "mlp_in")
    assert model_type_from_name("google/gemma-2-2b") == "gemma2"
    assert model_type_from_name("EleutherAI/pythia-70m") is None
