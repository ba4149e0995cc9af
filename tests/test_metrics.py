"""evaluate/metrics.py against values computed by hand: plain torch forward hooks on the Hugging Face
module itself, the dictionary written out as matrix products, CE/KL/FVU/L0 from their definitions."""

import math

import pytest
import torch

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.evaluate.metrics import evaluate

LAYER = 1


@pytest.fixture()
def setup(tiny_llama):
    lm = tiny_llama
    d_model = lm.d_model
    cfg = DictionaryConfig(kind="transcoder", d_in=d_model, d_out=d_model, n_features=4 * d_model, activation="relu",
                           layer=LAYER, hookpoint_in="mlp_in", hookpoint_out="mlp_out", model_id=lm.model_id)
    d = SparseDictionary(cfg, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        d.W_enc.normal_(std=0.3, generator=g)
        d.b_enc.normal_(mean=-0.5, std=0.2, generator=g)
        d.W_dec.normal_(std=0.05, generator=g)
        d.b_dec.normal_(std=0.05, generator=g)
    vocab = min(lm.vocab_size, 250)  # any tokenizer: ids below the smallest vocabulary in use
    windows = torch.randint(0, vocab, (12, 10), generator=g)
    refs = {
        "target_mean": torch.randn(d_model, generator=g) * 0.1,
        "fire_count": torch.tensor([0, 3] * (2 * d_model)),
        "b_enc_before_calibration": d.b_enc.detach() - 0.3,
        "stream_tokens": 1000,
    }
    return lm, d, windows, refs


def _mlp(lm):
    return lm.model.model.layers[LAYER].mlp  # LlamaForCausalLM: the MLP module of the layer


def _by_hand(lm, d, windows, refs, skip):
    """Per-window CE for each condition, KL, and the reconstruction sums, from first principles."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    mlp = _mlp(lm)
    seen = {}

    def run(replace):
        def hook(module, args, output):
            seen["x"], seen["y"] = args[0].detach().double(), output.detach().double()
            if replace is None:
                return None
            new = output.clone()
            new[:, skip:] = replace(args[0].double(), output.double())[:, skip:].to(output.dtype)
            return new

        h = mlp.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=windows).logits.double()
        finally:
            h.remove()
        return logits

    def recon(x, b=b_enc):
        return torch.relu(x @ W_enc.T + b) @ W_dec + b_dec

    def ce(logits):  # mean next-token CE per window
        lp = logits[:, :-1].log_softmax(-1)
        return -lp.gather(-1, windows[:, 1:, None]).squeeze(-1).mean(-1)

    clean = run(None)
    x, y = seen["x"][:, skip:], seen["y"][:, skip:]
    spliced = run(lambda x_, y_: recon(x_))
    zero = run(lambda x_, y_: torch.zeros_like(y_))
    mean = run(lambda x_, y_: refs["target_mean"].double().expand_as(y_))
    p, q = clean.log_softmax(-1), spliced.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean(-1)

    def fvu(y_hat):
        return float(((y_hat - y) ** 2).sum() / ((y - y.reshape(-1, y.shape[-1]).mean(0)) ** 2).sum())

    b0 = refs["b_enc_before_calibration"].double()
    return {
        "ce": {k: ce(v) for k, v in (("clean", clean), ("spliced", spliced), ("zero", zero), ("mean", mean))},
        "kl": kl,
        "fvu": fvu(recon(x)),
        "l0": float((torch.relu(x @ W_enc.T + b_enc) > 0).sum(-1).double().mean()),
        "fvu_pre": fvu(recon(x, b0)),
        "l0_pre": float((torch.relu(x @ W_enc.T + b0) > 0).sum(-1).double().mean()),
    }


def test_metrics_match_hand_computation(setup):
    lm, d, windows, refs = setup
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    res = evaluate(lm, [d], windows, batch_windows=5, substitution=False, progress=False, references=[refs])
    row = res["dictionaries"][0]
    h = _by_hand(lm, d, windows, refs, skip)
    c = {k: float(v.mean()) for k, v in h["ce"].items()}
    assert res["clean_ce"] == pytest.approx(c["clean"], rel=1e-5)
    assert row["ce_spliced"] == pytest.approx(c["spliced"], rel=1e-5)
    assert row["ce_zero_ablation"] == pytest.approx(c["zero"], rel=1e-5)
    assert row["ce_mean_ablation"] == pytest.approx(c["mean"], rel=1e-5)
    assert row["mean_ablation_reference"] == "training"
    rec_zero = (c["zero"] - c["spliced"]) / (c["zero"] - c["clean"])
    rec_mean = (c["mean"] - c["spliced"]) / (c["mean"] - c["clean"])
    assert row["ce_recovered_vs_zero"] == pytest.approx(rec_zero, rel=1e-3, abs=1e-4)
    assert row["ce_recovered_vs_mean"] == pytest.approx(rec_mean, rel=1e-3, abs=1e-4)
    assert row["kl"] == pytest.approx(float(h["kl"].mean()), rel=1e-3, abs=1e-7)
    assert row["fvu"] == pytest.approx(h["fvu"], rel=1e-4)
    assert row["l0"] == pytest.approx(h["l0"], rel=1e-6)
    assert 0 < row["l0"] < d.n_features  # the hand-made dictionary is neither dead nor dense
    assert row["fvu_before_calibration"] == pytest.approx(h["fvu_pre"], rel=1e-4)
    assert row["l0_before_calibration"] == pytest.approx(h["l0_pre"], rel=1e-6)
    assert row["l0_before_calibration"] < row["l0"]  # the stored bias is lower
    assert row["dead_frac"] == pytest.approx(0.5)  # from the training counts, not the evaluation tokens
    assert row["n_tokens"] == windows.shape[0] * (windows.shape[1] - skip)


def test_bootstrap_interval_by_hand(setup):
    lm, d, windows, refs = setup
    res = evaluate(lm, [d], windows, substitution=False, progress=False, references=[refs], seed=3)
    again = evaluate(lm, [d], windows, substitution=False, progress=False, references=[refs], seed=3)
    row = res["dictionaries"][0]
    assert row["ce_spliced_ci"] == again["dictionaries"][0]["ce_spliced_ci"]  # seeded
    h = _by_hand(lm, d, windows, refs, 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0)
    # the same resamples drawn one by one: windows i_1..i_n with replacement, figure recomputed on them
    n = windows.shape[0]
    idx = torch.randint(0, n, (1000, n), generator=torch.Generator().manual_seed(3))
    for key, fig in (
        ("ce_spliced", lambda i: float(h["ce"]["spliced"][i].mean())),
        ("kl", lambda i: float(h["kl"][i].mean())),
        ("ce_recovered_vs_zero", lambda i: float((h["ce"]["zero"][i].mean() - h["ce"]["spliced"][i].mean())
                                                 / (h["ce"]["zero"][i].mean() - h["ce"]["clean"][i].mean()))),
    ):
        vals = torch.tensor([fig(i) for i in idx], dtype=torch.float64)
        lo, hi = torch.quantile(vals, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        got_lo, got_hi = row[f"{key}_ci"]
        # 1% of the width: the model runs in float32 here and the random dictionary's CE recovered has
        # a denominator near 0, which magnifies float32 rounding
        scale = max(abs(hi - lo), 1e-6)
        assert got_lo == pytest.approx(lo, abs=1e-2 * scale + 1e-6), key
        assert got_hi == pytest.approx(hi, abs=1e-2 * scale + 1e-6), key
        assert got_lo <= row[key] <= got_hi or math.isclose(got_lo, got_hi), key


def test_mean_reference_falls_back_to_evaluation_windows(setup):
    lm, d, windows, refs = setup
    res = evaluate(lm, [d], windows, substitution=False, progress=False)
    row = res["dictionaries"][0]
    assert row["mean_ablation_reference"] == "evaluation windows"
    assert any("mean over the evaluation windows" in n for n in res["notes"])
    assert "fvu_before_calibration" not in row
    # by hand: the mean of mlp_out over the evaluation tokens (BOS position excluded)
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    seen = {}
    h = _mlp(lm).register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.detach().double()))
    with torch.no_grad():
        lm.model(input_ids=windows)
    h.remove()
    y = seen["y"][:, skip:]
    h = _by_hand(lm, d, windows, {**refs, "target_mean": y.reshape(-1, y.shape[-1]).mean(0)}, skip)
    assert row["ce_mean_ablation"] == pytest.approx(float(h["ce"]["mean"].mean()), rel=1e-5)
